"""Prometheus metrics of the two deployments, through Ray Serve's metrics (``ray.serve.metrics``).

Each node's Ray metrics agent exports them (with Serve's own ``ray_serve_*`` series) at its metrics port; Ray prefixes
the names with ``ray_``. Ingress: requests by route and status, end-to-end latency, model-call latency (queue and
compute in the model replica, retries included), model calls retried on another replica. Model: time jobs waited
in the batcher's queue, pairs per model call, queue depth, and ``drugprot_model_info`` (Prometheus's info convention:
always 1, the registered name, version and alias as labels), both gauges set again every few seconds by the replica.
A swap starts new replicas and stops the old ones, so the old version's series ends with its replicas.
Routes are the API's own paths; anything else is counted as ``other`` so that clients cannot create series.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
PAIRS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
ROUTES = frozenset({"/", "/v1/relations", "/v1/model", "/healthz", "/readyz", "/docs", "/openapi.json"})


class IngressMetrics:
    def __init__(self):
        self.requests = Counter("drugprot_requests", "HTTP requests answered, by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("drugprot_request_seconds", "End-to-end latency of HTTP requests",
                                 boundaries=SECONDS, tag_keys=("route",))
        self.model_calls = Histogram("drugprot_model_call_seconds", "Latency of calls to the model deployment",
                                     boundaries=SECONDS)
        self.retries = Counter("drugprot_model_retries", "Model calls sent again after their replica died")

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in ROUTES else "other"
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def model_call(self, seconds: float) -> None:
        self.model_calls.observe(seconds)

    def retry(self) -> None:
        self.retries.inc()


class ModelMetrics:
    def __init__(self, registry: dict, uri: str):
        """``registry``: name, version and alias of a ``models:/`` model (empty for a folder)."""
        self.queue_wait = Histogram("drugprot_queue_wait_seconds", "Time jobs waited in the batcher before their "
                                    "model call", boundaries=SECONDS)
        self.pairs = Histogram("drugprot_pairs_per_model_call", "Candidate pairs scored per model call",
                               boundaries=PAIRS)
        self.depth = Gauge("drugprot_queue_depth", "Jobs waiting in this model replica's batcher")
        self.info = Gauge("drugprot_model_info", "The model this replica serves (always 1; name, version and alias "
                          "as labels)", tag_keys=("name", "version", "alias", "uri"))
        self.served = {"name": registry.get("name") or "", "version": registry.get("version") or "folder",
                       "alias": registry.get("alias") or "", "uri": uri}

    def refresh(self, queued: int) -> None:
        """Gauges are exported only while they are set (OpenTelemetry drops a gauge not recorded since the last
        export), so the replica sets them again every few seconds."""
        self.info.set(1, tags=dict(self.served))
        self.depth.set(queued)

    def batch(self, pairs: int, waits: list[float], queued: int) -> None:
        self.pairs.observe(pairs)
        for wait in waits:
            self.queue_wait.observe(wait)
        self.depth.set(queued)
