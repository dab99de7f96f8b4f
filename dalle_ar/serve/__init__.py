"""`dalle-ar serve`: an OpenAI-compatible images API with dynamic batching, and a web page.

Needs the `serve` extra (`pip install -e .[serve]`): FastAPI, uvicorn, prometheus_client.
`create_app(pipeline, ...)` builds the ASGI app; `serve(model_dir, host, port, ...)` runs it
with uvicorn. Both are imported on first use, so that `dalle-ar --help` needs no extra.
"""

__all__ = ["create_app", "serve"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
