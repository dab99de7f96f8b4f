"""Dynamic batching: requests that wait together are sampled together.

One asyncio task takes queued requests in arrival order, up to `max_batch` candidates whose
sampling settings match those of the oldest request, and runs them as one batch on one worker
thread, so the event loop keeps answering while the model samples. Clients answered by one batch
tend to send again a moment later; so while fewer candidates wait than the last batch held, the
next batch is held open for them, until `batch_wait` seconds after the oldest request arrived and
never longer than a batch takes (waiting longer would cost more than sampling twice). Requests sent
one at a time never wait: the last batch held one. A request with more
candidates than `max_batch` spans several batches. Every candidate samples with its own
request's uniforms (`TextToImagePipeline.candidate_noise`), so a request's images are the same
whoever it shares a batch with. A request cancelled while it waits (its client went away) is
dropped from the batches still to come.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..pipeline import PromptResult, TextToImagePipeline, to_pil
from ..rerank import CONSENSUS, LIKELIHOOD

log = logging.getLogger(__name__)


def check_settings(batch_wait: float = 0.0, **counts: int) -> None:
    """ValueError naming the first bad one: counts are integers >= 1, batch_wait seconds in [0, 60)."""
    for name, v in counts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(batch_wait, (int, float)) or isinstance(batch_wait, bool) or not 0 <= batch_wait < 60:
        raise ValueError(f"batch_wait must be a number of seconds in [0, 60), got {batch_wait!r}")


class QueueFull(Exception):
    """The queue holds max_queue requests; retry_after: seconds until it has likely drained."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Answer:
    """A finished job: the pipeline's result and its kept images as PNG files (encoded on the
    worker thread, so the event loop only sends them)."""

    result: PromptResult
    pngs: list


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(eq=False)
class Job:
    """One generation request: `candidates` samples of one prompt, the `keep` best returned."""

    id: str
    prompt: str
    text: torch.Tensor              # [1, text_len] prompt tokens
    keep: int
    candidates: int
    seed: int
    sampling: dict                  # DALLE.generate keywords (TextToImagePipeline.sampling_options)
    consensus: float = CONSENSUS
    likelihood: float = LIKELIHOOD
    future: Optional[asyncio.Future] = None
    submitted: float = field(default_factory=time.monotonic)
    started: Optional[float] = None  # when its first candidates went into a batch
    taken: int = 0                  # candidates handed to batches so far
    done: int = 0                   # candidates sampled so far
    cancelled: bool = False
    images: list = field(default_factory=list)  # sampled candidates, in sampling order (worker thread)
    log_probs: list = field(default_factory=list)  # their [n, 2] log-likelihoods with / without the prompt
    noise: Optional[torch.Tensor] = None         # its uniforms, drawn on the worker thread

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        return tuple(sorted(self.sampling.items()))


class Batcher:
    """Queue + batch loop around one pipeline. Start it inside a running event loop."""

    def __init__(self, pipeline: TextToImagePipeline, max_batch: int = 16, max_queue: int = 64,
                 batch_wait: float = 0.5, metrics=None):
        check_settings(max_batch=max_batch, max_queue=max_queue, batch_wait=batch_wait)
        self.pipeline, self.max_batch, self.max_queue, self.metrics = pipeline, max_batch, max_queue, metrics
        self.batch_wait = batch_wait
        self.last_batch = 0  # candidates in the last batch
        self.queue: deque[Job] = deque()   # jobs with candidates not yet handed to a batch
        self.jobs: dict[str, Job] = {}     # every unanswered job, by id
        self.in_flight: list[tuple[Job, int, int]] = []
        self.batch_started = 0.0
        self.seconds_per_batch: Optional[float] = None  # running mean, for progress and Retry-After
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dalle-ar-sampler")
        self._task: Optional[asyncio.Task] = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dalle-ar-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in list(self.jobs.values()):
            if job.future is not None and not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job -> a future of its Answer. Raises QueueFull when max_queue jobs wait."""
        if len(self.queue) >= self.max_queue:
            raise QueueFull(self.retry_after())
        if job.id in self.jobs:
            raise ValueError(f"request id {job.id!r} is already in use")
        job.future = asyncio.get_running_loop().create_future()
        self.queue.append(job)
        self.jobs[job.id] = job
        self._wake.set()
        return job.future

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): its remaining candidates are never sampled."""
        job.cancelled = True
        if job in self.queue:
            self.queue.remove(job)
        self.jobs.pop(job.id, None)
        if job.future is not None and not job.future.done():
            job.future.cancel()

    def queued_candidates(self) -> int:
        return sum(j.candidates - j.taken for j in self.queue)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        batches = math.ceil(self.queued_candidates() / self.max_batch) + bool(self.in_flight)
        return max(1, math.ceil(batches * (self.seconds_per_batch or 1.0)))

    def progress(self, job: Job) -> dict:
        """Where a job stands: state, requests ahead of it, fraction done (estimated inside a batch)."""
        per_batch = self.seconds_per_batch
        running = sum(b - a for j, a, b in self.in_flight if j is job)
        done = job.done
        if running:
            elapsed = time.monotonic() - self.batch_started
            done += running * (min(elapsed / per_batch, 0.95) if per_batch else 0.5)
        ahead = waiting = 0  # requests and candidates queued before this job
        for other in self.queue:
            if other is job:
                break
            ahead += 1
            waiting += other.candidates - other.taken
        state = "queued" if job.started is None else "sampling"
        eta = None
        if per_batch:
            todo = waiting + job.candidates - job.taken
            eta = round((math.ceil(todo / self.max_batch) + bool(self.in_flight)) * per_batch, 1)
        return {"id": job.id, "state": state, "requests_ahead": ahead if state == "queued" else 0,
                "candidates": job.candidates, "progress": round(done / job.candidates, 3), "eta_seconds": eta}

    # ---- the batch loop ------------------------------------------------------------------------

    def _take(self) -> list[tuple[Job, int, int]]:
        """Up to max_batch candidates, oldest job first, from jobs sampling like the oldest one."""
        key, room, batch = self.queue[0].key, self.max_batch, []
        for job in list(self.queue):
            if room == 0:
                break
            if job.key != key:
                continue
            k = min(room, job.candidates - job.taken)
            batch.append((job, job.taken, job.taken + k))
            job.taken += k
            room -= k
            if job.started is None:
                job.started = time.monotonic()
                if self.metrics is not None:
                    self.metrics.queue_wait_seconds.observe(job.started - job.submitted)
            if job.taken == job.candidates:
                self.queue.remove(job)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            await self._fill()
            if not self.queue:  # all cancelled meanwhile
                continue
            batch = self._take()
            self.in_flight, self.batch_started = batch, time.monotonic()
            self.last_batch = sum(b - a for _, a, b in batch)
            try:
                finished, sampled = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as e:  # the whole batch fails; later batches still run
                log.exception("sampling batch failed")
                for job in {j for j, _, _ in batch}:
                    self._fail(job, e)
                continue
            finally:
                self.in_flight = []
            seconds = time.monotonic() - self.batch_started
            self.seconds_per_batch = seconds if self.seconds_per_batch is None else \
                0.8 * self.seconds_per_batch + 0.2 * seconds
            if self.metrics is not None and sampled:
                self.metrics.observe_batch(candidates=sampled, requests=len({j.id for j, _, _ in batch}),
                                           seconds=seconds)
            for job, result in finished:
                self.jobs.pop(job.id, None)
                if not job.future.done():
                    job.future.set_result(result)

    async def _fill(self) -> None:
        """Wait until as many candidates are queued as the last batch held (at most max_batch), or
        until min(batch_wait, a batch's time) has passed since the oldest request arrived."""
        target = min(self.max_batch, self.last_batch)
        wait = min(self.batch_wait, self.seconds_per_batch or self.batch_wait)
        while self.queue and self.queued_candidates() < target:
            left = self.queue[0].submitted + wait - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _fail(self, job: Job, error: Exception) -> None:
        if job in self.queue:
            self.queue.remove(job)
        self.jobs.pop(job.id, None)
        if not job.future.done():
            job.future.set_exception(error)

    def _run(self, batch: list[tuple[Job, int, int]]) -> tuple[list[tuple[Job, Answer]], int]:
        """On the worker thread: sample and decode the batch, rerank the jobs it completes
        -> (finished jobs and their answers, candidates sampled)."""
        rows = [(job, a, b) for job, a, b in batch if not job.cancelled]
        if not rows:
            return [], 0
        for job, _, _ in rows:
            if job.noise is None:
                job.noise = self.pipeline.candidate_noise(job.seed, job.candidates)
        text = torch.cat([job.text.expand(b - a, -1) for job, a, b in rows])
        noise = torch.cat([job.noise[a:b] for job, a, b in rows])
        # Likelihoods only when a job ranks with them: without guidance they cost a teacher-forced pass.
        scored = any(job.likelihood > 0 for job, _, _ in rows)
        out = self.pipeline.sample_rows(text, noise, batch_size=len(text), log_probs=scored, **rows[0][0].sampling)
        images, log_probs = out if scored else (out, None)
        images = to_pil(images)
        finished, i = [], 0
        for job, a, b in rows:
            job.images.extend(images[i:i + b - a])
            if log_probs is not None:
                job.log_probs.append(log_probs[i:i + b - a])
            job.done += b - a
            i += b - a
            if job.done == job.candidates and not job.cancelled:
                result = self.pipeline.rank(job.prompt, job.images, job.keep, job.seed, job.consensus,
                                            log_probs=torch.cat(job.log_probs) if job.likelihood > 0 else None,
                                            likelihood=job.likelihood)
                finished.append((job, Answer(result, [png_bytes(im) for im in result.images])))
        return finished, len(text)
