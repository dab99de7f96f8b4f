"""The server's Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ready = Gauge("dalle_ar_ready", "1 once the model has loaded", registry=r)
        self.queue_requests = Gauge("dalle_ar_queue_requests", "requests waiting for a sampling batch", registry=r)
        self.queue_candidates = Gauge("dalle_ar_queue_candidates", "candidates waiting for a sampling batch",
                                      registry=r)
        self.batch_candidates = Histogram("dalle_ar_batch_candidates", "candidates per sampling batch",
                                          buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("dalle_ar_batch_requests", "requests sharing a sampling batch",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("dalle_ar_batch_seconds", "sampling, decoding and reranking time of a batch",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("dalle_ar_queue_wait_seconds",
                                            "time from a request's arrival to its first batch",
                                            buckets=SECONDS_BUCKETS, registry=r)
        self.request_seconds = Histogram("dalle_ar_request_seconds", "latency of answered generation requests",
                                         buckets=SECONDS_BUCKETS, registry=r)
        self.requests = Counter("dalle_ar_requests", "generation requests by HTTP status", ["code"], registry=r)
        self.dropped = Counter("dalle_ar_requests_dropped", "requests dropped because their client disconnected",
                               registry=r)
        self.candidates = Counter("dalle_ar_candidates", "candidate images sampled", registry=r)

    def watch(self, batcher) -> None:
        """Queue gauges read the batcher at scrape time."""
        self.queue_requests.set_function(lambda: len(batcher.queue))
        self.queue_candidates.set_function(batcher.queued_candidates)

    def observe_batch(self, candidates: int, requests: int, seconds: float) -> None:
        self.batch_candidates.observe(candidates)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)
        self.candidates.inc(candidates)

    def render(self) -> bytes:
        return generate_latest(self.registry)
