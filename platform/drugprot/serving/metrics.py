"""Prometheus metrics of the two deployments, through Ray Serve's metrics (``ray.serve.metrics``).

Each node's Ray metrics agent exports them (with Serve's own ``ray_serve_*`` series) at its metrics port; Ray prefixes
the names with ``ray_``. Ingress: requests by route and status, end-to-end latency, model-call latency (queue and
compute in the model replica, retries included), model calls retried on another replica. Model: time jobs waited
in the batcher's queue, pairs per model call, queue depth, and ``drugprot_model_info`` (Prometheus's info convention:
always 1, the registered name, version and alias as labels), both gauges set again every few seconds by the replica.
A swap starts new replicas and stops the old ones, so the old version's series ends with its replicas.
Routes are the API's own paths; anything else is counted as ``other`` so that clients cannot create series.

Per model (champion or challenger, by ``role`` and registry ``version``, ``folder`` for a model folder): relations
requests by status and their latency; with a rollout, the challenger's state (one gauge per state, 1 for the current
one), shadow calls by outcome with their latency, and shadowed relations per type by outcome (agreed,
champion_only, challenger_only).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from drugprot.serving.rollout import STATES, Answering

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
        self.answered = Counter("drugprot_version_requests", "Relations requests by the model that answered "
                                "(role, registry version) and status", tag_keys=("role", "version", "status"))
        self.answer_latency = Histogram("drugprot_version_request_seconds", "End-to-end latency of relations "
                                        "requests by the model that answered", boundaries=SECONDS,
                                        tag_keys=("role", "version"))
        self.challenger = Gauge("drugprot_challenger_state", "The rollout's challenger: 1 for its current state "
                                "(loading, ready, failed), 0 for the others", tag_keys=("state",))
        self.shadow_calls = Counter("drugprot_shadow_calls", "Shadow calls to the challenger by outcome (compared, "
                                    "failed, timed_out, skipped)", tag_keys=("outcome",))
        self.shadow_latency = Histogram("drugprot_shadow_seconds", "Latency of shadow calls to the challenger "
                                        "(never part of an answer's)", boundaries=SECONDS)
        self.shadow_relations = Counter("drugprot_shadow_relations", "Shadowed relations per type: agreed (both "
                                        "models), champion_only, challenger_only", tag_keys=("type", "outcome"))

    def request(self, route: str, status: int, seconds: float, answering: Answering | None = None) -> None:
        route = route if route in ROUTES else "other"
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})
        if answering is not None:
            model = {"role": answering.role, "version": answering.version or "folder"}
            self.answered.inc(tags={**model, "status": str(status)})
            self.answer_latency.observe(seconds, tags=model)

    def challenger_state(self, state: str) -> None:
        """Set again every few seconds by the ingress (a gauge not set since the last export is dropped)."""
        for each in STATES:
            self.challenger.set(1 if each == state else 0, tags={"state": each})

    def shadow(self, outcome: str, seconds: float | None, counts: dict) -> None:
        self.shadow_calls.inc(tags={"outcome": outcome})
        if seconds is not None:
            self.shadow_latency.observe(seconds)
        for type_, found in counts.items():
            for what, count in found.items():
                self.shadow_relations.inc(count, tags={"type": type_, "outcome": what})

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
