"""The HTTP server: an OpenAI-compatible images API over a TextToImagePipeline, and a web page.

    POST /v1/images/generations   OpenAI Images API (+ candidates, seed, guidance_scale, temperature,
                                  top_k, top_p); every image carries its reranker score and rank
    GET  /v1/models               the one model served
    GET  /v1/images/progress/ID   where request ID (its X-Request-ID header) stands
    GET  /v1/images/files/T.png   images of response_format="url" (unguessable names, kept LRU)
    GET  /healthz                 200 once the model has loaded, 503 before
    GET  /metrics                 Prometheus text: queue depth, batch sizes, latencies
    GET  /                        the web page (static/, no CDN)

The server is a client of the pipeline like any other: it imports nothing from training.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline import PIPELINE_FILE, TextToImagePipeline
from .batcher import Batcher, Job, QueueFull, check_settings
from .metrics import Metrics
from .schema import APIError, ImageRequest, validation_error

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "DALLE_AR_API_KEY"
MAX_CANDIDATES = 256
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
GENERATIONS = "/v1/images/generations"


class ImageStore:
    """PNG bytes behind unguessable names for response_format="url"; the oldest go first."""

    def __init__(self, capacity: int = 1024):
        self.capacity, self._items = capacity, OrderedDict()

    def put(self, png: bytes) -> str:
        name = secrets.token_urlsafe(16)
        self._items[name] = png
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return name

    def get(self, name: str) -> Optional[bytes]:
        return self._items.get(name)


class Server:
    """What the routes share: settings, and the pipeline and batcher once loaded."""

    def __init__(self, model_name: str, max_batch: int, max_queue: int, batch_wait: float, api_key: Optional[str],
                 default_candidates: int, max_candidates: int, store_size: int):
        self.model_name, self.max_batch, self.max_queue, self.api_key = model_name, max_batch, max_queue, api_key
        self.batch_wait = batch_wait
        self.default_candidates, self.max_candidates = default_candidates, max_candidates
        self.store, self.metrics = ImageStore(store_size), Metrics()
        self.pipeline: Optional[TextToImagePipeline] = None
        self.batcher: Optional[Batcher] = None
        self.error: Optional[str] = None
        self.created = int(time.time())

    def attach(self, pipeline: TextToImagePipeline) -> None:
        self.batcher = Batcher(pipeline, self.max_batch, self.max_queue, self.batch_wait, self.metrics)
        self.batcher.start()
        self.metrics.watch(self.batcher)
        self.pipeline = pipeline
        self.metrics.ready.set(1)
        log.info("model %s loaded: %d px images, serving", self.model_name, pipeline.image_size)

    async def load(self, loader: Callable[[], TextToImagePipeline]) -> None:
        try:
            pipeline = await asyncio.to_thread(loader)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.error)
            return
        self.attach(pipeline)

    @property
    def size(self) -> str:
        s = self.pipeline.image_size
        return f"{s}x{s}"


def create_app(pipeline: Union[TextToImagePipeline, Callable[[], TextToImagePipeline]], *,
               model_name: str = "dalle-ar", max_batch: int = 16, max_queue: int = 64, batch_wait: float = 0.5,
               api_key: Optional[str] = None, default_candidates: int = 8,
               max_candidates: int = MAX_CANDIDATES, url_store_size: int = 1024) -> FastAPI:
    """The FastAPI app serving `pipeline`, or a zero-argument function that loads one (called on a
    thread at startup; /healthz answers 503 until it returns).

    max_batch: candidates sampled together at most; max_queue: waiting requests before 429;
    batch_wait: seconds a batch may wait for as many candidates as the last one held (batcher.py);
    api_key (or the DALLE_AR_API_KEY environment variable): required as `Authorization: Bearer KEY`
    on /v1/ (401 otherwise); default_candidates: candidates per request when it names none.
    """
    check_settings(max_batch=max_batch, max_queue=max_queue, batch_wait=batch_wait,
                   default_candidates=default_candidates, max_candidates=max_candidates, url_store_size=url_store_size)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    s = Server(model_name, max_batch, max_queue, batch_wait, api_key, default_candidates, max_candidates,
               url_store_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = None
        if isinstance(pipeline, TextToImagePipeline):
            s.attach(pipeline)
        else:
            loading = asyncio.create_task(s.load(pipeline))
        yield
        if loading is not None:
            loading.cancel()
        if s.batcher is not None:
            await s.batcher.stop()

    app = FastAPI(title="dalle-ar", summary="OpenAI-compatible images API", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.server = s

    # ---- errors: always OpenAI's shape -----------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return counted(request, e.response())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return counted(request, validation_error(e.errors()).response())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), code=None, headers=getattr(e, "headers", None)).response()

    def counted(request: Request, response: Response) -> Response:
        if request.url.path.endswith(GENERATIONS):
            s.metrics.requests.labels(str(response.status_code)).inc()
        return response

    def require_key(request: Request) -> None:
        if s.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def ready() -> None:
        if s.batcher is None:
            raise APIError(503, "the model is still loading" if s.error is None else
                           f"the model failed to load: {s.error}", type="server_error",
                           code="model_not_ready", headers={"Retry-After": "5"})

    # ---- page, health, metrics ----------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz():
        if s.batcher is not None:
            return {"status": "ok", "model": s.model_name}
        status = "loading" if s.error is None else "error"
        return JSONResponse({"status": status, "error": s.error}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(s.metrics.render(), media_type=s.metrics.content_type)

    # ---- the API ------------------------------------------------------------------------------

    def model_card() -> dict:
        card = {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "dalle-ar"}
        if s.pipeline is not None:
            card.update(size=s.size, max_batch=s.max_batch, default_candidates=s.default_candidates,
                        max_candidates=s.max_candidates, reranker=s.pipeline.reranker is not None)
        return card

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", dependencies=[Depends(require_key)])
    async def model(model: str):
        if model != s.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{s.model_name}'.",
                           "model", "model_not_found")
        return model_card()

    @app.get("/v1/images/progress/{request_id}", dependencies=[Depends(require_key)])
    async def progress(request_id: str):
        job = s.batcher.jobs.get(request_id) if s.batcher is not None else None
        if job is None:
            raise APIError(404, f"no request {request_id!r} is waiting or running", "request_id", "not_found")
        return s.batcher.progress(job)

    @app.get("/v1/images/files/{name}.png", name="image_file")
    async def image_file(name: str):
        png = s.store.get(name)
        if png is None:
            raise APIError(404, "no such image (images of response_format=url are kept for a while only)",
                           code="not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post(GENERATIONS, dependencies=[Depends(require_key)])
    async def generations(body: ImageRequest, request: Request):
        response = await generate(body, request)
        return counted(request, response)

    async def generate(body: ImageRequest, request: Request) -> Response:
        ready()
        job = make_job(body, request.headers.get("x-request-id"))
        try:
            future = s.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({s.max_queue} requests queued); retry after "
                                f"{e.retry_after} s.", code="queue_full", type="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ValueError as e:
            raise APIError(400, str(e), "X-Request-ID") from None
        if not await answered_or_gone(future, request):
            s.batcher.cancel(job)
            s.metrics.dropped.inc()
            log.info("request %s dropped: client disconnected", job.id)
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        try:
            answer = future.result()
        except Exception as e:
            log.error("request %s failed: %s", job.id, e)
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed") from None
        result, data = answer.result, []
        for png, score, rank in zip(answer.pngs, result.scores, result.ranks):
            item = ({"b64_json": base64.b64encode(png).decode()} if body.response_format == "b64_json"
                    else {"url": str(request.url_for("image_file", name=s.store.put(png)))})
            item.update(revised_prompt=result.prompt, score=score if math.isfinite(score) else None, rank=rank)
            data.append(item)
        s.metrics.request_seconds.observe(time.monotonic() - job.submitted)
        return JSONResponse({"created": int(time.time()), "data": data, "model": s.model_name, "size": s.size,
                             "output_format": "png", "seed": job.seed, "candidates": job.candidates},
                            headers={"X-Request-ID": job.id})

    def make_job(body: ImageRequest, request_id: Optional[str]) -> Job:
        """Check the request against the model and the server's limits -> a Job (APIError if bad)."""
        pipe = s.pipeline
        if body.model is not None and body.model != s.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{s.model_name}'.",
                           "model", "model_not_found")
        if body.size is not None and body.size != s.size:
            raise APIError(400, f"Invalid value for 'size': {body.size!r}; this model makes {s.size} images only.",
                           "size", "invalid_value")
        prompt = body.prompt.strip()
        if not prompt:
            raise APIError(400, "Invalid value for 'prompt': it is empty.", "prompt", "invalid_value")
        candidates = body.candidates if body.candidates is not None else max(body.n, s.default_candidates)
        if candidates > s.max_candidates:
            raise APIError(400, f"Invalid value for 'candidates': {candidates} > {s.max_candidates} "
                                f"(this server's limit).", "candidates", "invalid_value")
        if body.n > candidates:
            raise APIError(400, f"Invalid value for 'n': {body.n} > candidates={candidates} (the n best of the "
                                f"candidates are returned).", "n", "invalid_value")
        try:
            text = pipe.encode_prompts([prompt], truncation="error")
        except ValueError:
            n = len(pipe.tokenizer.backend.encode(prompt).ids)
            raise APIError(400, f"Invalid value for 'prompt': it is {n} tokens long; this model reads at most "
                                f"{pipe.dalle.config.text_len}.", "prompt", "invalid_value") from None
        if request_id is not None and not REQUEST_ID.match(request_id):
            raise APIError(400, "X-Request-ID must be 1-64 characters of A-Z a-z 0-9 . _ -", "X-Request-ID",
                           "invalid_value")
        sampling = pipe.sampling_options(body.temperature, body.top_k, body.top_p, body.guidance_scale)
        seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
        return Job(id=request_id or uuid.uuid4().hex, prompt=prompt, text=text, keep=body.n,
                   candidates=candidates, seed=seed, sampling=sampling)

    return app


async def answered_or_gone(future: asyncio.Future, request: Request) -> bool:
    """Wait for the future -> True, or until the client disconnects -> False."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    return future.done()


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 16, max_queue: int = 64,
          batch_wait: float = 0.5, api_key: Optional[str] = None, default_candidates: int = 8, device: str = "cpu",
          clip: Optional[str] = None, model_name: Optional[str] = None, root_path: str = "",
          threads: Optional[int] = None, log_level: str = "info") -> None:
    """Serve the pipeline directory `model_dir` with uvicorn until interrupted. The model loads
    on a thread while the server already answers /healthz (503 until loaded). root_path: the
    path prefix a reverse proxy serves this under (e.g. "/dalle"); threads: torch's CPU threads
    for sampling, set once at start-up (None: the `dalle_ar.threads` policy)."""
    import uvicorn

    from dalle_ar.threads import set_threads

    d = Path(model_dir)
    if not (d / PIPELINE_FILE).is_file():
        raise ValueError(f"model {d} is not a pipeline directory: no {PIPELINE_FILE}")
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    set_threads(threads)  # once for the process: the sampling thread inherits it
    app = create_app(lambda: TextToImagePipeline.from_pretrained(d, device=device, clip=clip),
                     model_name=model_name or d.resolve().name, max_batch=max_batch, max_queue=max_queue,
                     batch_wait=batch_wait,
                     api_key=api_key, default_candidates=default_candidates)
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level=log_level, timeout_graceful_shutdown=30)
