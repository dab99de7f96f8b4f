"""`dalle-ar serve`: an OpenAI-compatible images API, dynamic batching and a web page over a pipeline."""

import argparse

from .common import add_threads_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a pipeline: OpenAI-compatible images API, dynamic batching, web page",
        description="Serve a pipeline directory over HTTP: POST /v1/images/generations (OpenAI Images API), "
                    "GET /v1/models, /healthz, /metrics, and a web page at /.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline directory (dalle-ar pipeline / demo output)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=16, help="candidates sampled together at most")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--batch-wait", type=float, default=0.5,
                   help="seconds a batch may wait for as many candidates as the last batch held "
                        "(never longer than a batch takes)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $DALLE_AR_API_KEY, else none)")
    p.add_argument("--candidates", type=int, default=8, help="candidates per request that names none")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_threads_argument(p)
    p.add_argument("--clip", default=None, help="CLIP directory to rerank with instead of the pipeline's clip/")
    p.add_argument("--root-path", default="", help="path prefix when served behind a reverse proxy, e.g. /dalle")
    p.set_defaults(func=_run)


def _run(args) -> int:
    try:
        from dalle_ar.serve import serve  # FastAPI, uvicorn: the serve extra
    except ImportError as e:
        raise ValueError(f"the server needs the serve extra ({e.name} is missing): "
                         "pip install 'dalle-ar[serve]'") from None
    serve(args.model, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          batch_wait=args.batch_wait, api_key=args.api_key, default_candidates=args.candidates,
          device=args.device, clip=args.clip, root_path=args.root_path, threads=args.threads)
    return 0
