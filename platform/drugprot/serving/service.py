"""The relation service without a framework, in two halves that Serve runs as two deployments.

``ModelService`` (the model deployment): one loaded Predictor, whose Scorer it runs, its warm-up, and the
:class:`PairBatcher` that combines jobs from every ingress into one ``Scorer.probabilities`` call per batch, in the
model thread (a job of more than ``max_batch_pairs`` pairs is cut into chunks that take turns with the other jobs).
``RelationService`` (the ingress, what the FastAPI app in ``serving.api`` calls) holds the model's
:class:`~drugprot.inference.plan.Plan`: limits (413) → documents under keys unique across ingress replicas →
``Plan.prepare`` → pair limit (413) → ``await model.score(job)`` → ``Plan.decode`` with the request's threshold.
``model`` is a ``ModelService`` in this process (unit tests, the in-process benchmark) or
``serving.app.RemoteModel`` (a Serve handle with failover); both offer the same async
``plan``/``score``/``status``/``info``. With a rollout (``options.rollout``) it holds a second model, the challenger
(``serving.rollout.Challenger``): ``choose`` picks the side of each request (canary), and a champion's answer starts a
background call to the challenger whose relations are compared with it (shadow). No Ray here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from drugprot.corpus import Document, Entity
from drugprot.inference.plan import Job, Plan
from drugprot.serving.batching import PairBatcher, QueueWaitExceeded, join_results, run_jobs, split_job
from drugprot.serving.options import ServeOptions
from drugprot.serving.rollout import CHALLENGER, CHAMPION, Agreement, Answering, Challenger, bucket
from drugprot.serving.schemas import (DocumentRelations, MemberInfo, ModelInfo, RelationOut, RelationsRequest,
                                      RelationsResponse, RolloutInfo)

log = logging.getLogger("drugprot.serving")
_ARRIVING: ContextVar[list | None] = ContextVar("drugprot_serving_arriving", default=None)


class ServingError(Exception):
    """A refusal with an HTTP status; the message says what was wrong and what to do."""

    status = 500
    headers: dict[str, str] = {}


class PayloadTooLarge(ServingError):
    status = 413


class NotReady(ServingError):
    status = 503
    headers = {"Retry-After": "1"}


OVERLOAD_HEADER = "X-Drugprot-Overload"  # marks refusals for lack of capacity: the proxy's admission learns from them


class Overloaded(ServingError):
    """Refused for lack of capacity (the model's queue is full, or the latency objective ``max_queue_wait_s``):
    503, retry after about the expected wait."""

    status = 503

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, retry_after_s)  # both in ``args``: the error crosses a Serve handle by pickle
        self.headers = {"Retry-After": str(max(1, math.ceil(min(retry_after_s, 60)))), OVERLOAD_HEADER: "1"}

    def __str__(self) -> str:
        return str(self.args[0])


if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Scored:
    """A job's ``(M, n, L)`` member probabilities and the registry version (its Plan's) that computed them."""

    probabilities: torch.Tensor
    version: str | None


def configure_torch_threads(threads: int) -> None:
    """One intra-op thread per replica core (and one inter-op thread), set before any model work."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


# Warm-up text: one sentence with 4 chemicals and 8 genes (32 candidate pairs inside the default interval).
_WARM_CHEMICALS = ("aspirin", "ibuprofen", "caffeine", "nicotine")
_WARM_GENES = ("COX-1", "COX-2", "CYP3A4", "EGFR", "TNF", "IL-6", "AKT1", "MAPK1")


def warmup_document(key: str) -> Document:
    parts, entities = [], {}
    cursor = 0

    def add(word: str, kind: str) -> None:
        nonlocal cursor
        entity_id = f"T{len(entities) + 1}"
        entities[entity_id] = Entity(entity_id, kind, cursor, cursor + len(word), word)
        parts.append(word)
        cursor += len(word) + 1

    def say(word: str) -> None:
        nonlocal cursor
        parts.append(word)
        cursor += len(word) + 1

    for half in range(2):
        chemicals, genes = _WARM_CHEMICALS[2 * half:2 * half + 2], _WARM_GENES[4 * half:4 * half + 4]
        if half:
            say("while")
        add(chemicals[0], "CHEMICAL")
        say("and")
        add(chemicals[1], "CHEMICAL")
        say("inhibit" if not half else "activate")
        for i, gene in enumerate(genes):
            add(gene, "GENE-Y" if i % 2 else "GENE-N")
            if i < len(genes) - 1:
                say(",")
    title = " ".join(parts) + " ."
    return Document(key, title, "", entities)


class ModelService:
    """One loaded Predictor behind readiness and cross-request batching: the model deployment's work."""

    def __init__(self, predictor, options: ServeOptions, *, executor: ThreadPoolExecutor | None = None,
                 registry: dict[str, Any] | None = None, swap_error: str | None = None):
        """``batcher.on_batch`` may be set afterwards to observe each model call (the Serve deployment's metrics).
        ``swap_error``: why the last alias move was not served (this replica serves the version before it)."""
        self.predictor = predictor
        self.options = options
        self.registry = registry or {}  # name, version, alias, dev_f1 of a models:/ URI, pinned at load time
        self.swap_error = swap_error
        self._plan = replace(predictor.plan, version=self.registry.get("version"))
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="drugprot-model")
        self.batcher: PairBatcher[Job, Any] = PairBatcher(partial(run_jobs, predictor.scorer),
                                                          max_pairs=options.max_batch_pairs,
                                                          wait_s=options.batch_wait_ms / 1000.0, executor=self._executor,
                                                          split=split_job, join=join_results,
                                                          max_wait_s=options.max_queue_wait_s)
        self._warmup: Future | None = None

    @classmethod
    def load(cls, options: ServeOptions, *, threads: int | None = None, version: str | None = None,
             swap_error: str | None = None) -> ModelService:
        """Set torch threads, load the model (folder, ensemble or models:/ URI) on the replica's device.

        ``version``: load this version of a ``models:/NAME@ALIAS`` model instead of the one the alias names now (the
        alias watcher pins every replica of a deployment to one version)."""
        from drugprot.inference.loading import load_predictor

        configure_torch_threads(threads or options.torch_threads)
        model, registry = options.model, None
        if model.startswith("models:/"):
            # Pin the alias to one version first, so what /v1/model reports is exactly what was loaded.
            from drugprot.registry import parse_model_uri, resolve_model_version

            name, alias, _ = parse_model_uri(model)
            pinned = f"models:/{name}/{version}" if version is not None else model
            resolved = resolve_model_version(pinned, tracking_uri=options.tracking_uri)
            model = f"models:/{resolved.name}/{resolved.version}"
            registry = {"name": resolved.name, "version": str(resolved.version), "alias": alias,
                        "dev_f1": _number((resolved.tags or {}).get("dev_f1"))}
        predictor = load_predictor(model, device=options.device, tracking_uri=options.tracking_uri,
                                   verify_key=options.verify_key, options=options.inference)
        return cls(predictor, options, registry=registry, swap_error=swap_error)

    # ---- readiness -------------------------------------------------------------------------------------------
    def start_warmup(self) -> Future:
        """Run the warm-up in the model thread; the service is ready when it finishes."""
        if self._warmup is None:
            self._warmup = self._executor.submit(self.warm_up)
        return self._warmup

    def warm_up(self) -> None:
        """``warmup_rounds`` synthetic batches through the real path: a one-document batch and a full one."""
        full = max(1, math.ceil(self.options.max_batch_pairs / 32))
        for round_ in range(self.options.warmup_rounds):
            for count in sorted({1, full}):
                documents = [warmup_document(f"warmup:{round_}:{i}") for i in range(count)]
                run_jobs(self.predictor.scorer, [self._plan.prepare(documents)])
        log.info("drugprot serving: warm-up done (%d rounds)", self.options.warmup_rounds)

    @property
    def state(self) -> str:
        if self._warmup is None or not self._warmup.done():
            return "warming up"
        return "failed" if self._warmup.exception() is not None else "ready"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def failure(self) -> str | None:
        if self._warmup is not None and self._warmup.done() and self._warmup.exception() is not None:
            error = self._warmup.exception()
            return f"warm-up failed: {type(error).__name__}: {error}"
        return None

    def check_health(self) -> None:
        """Raise when the replica cannot serve (Serve then replaces it)."""
        failure = self.failure()
        if failure:
            raise RuntimeError(failure)

    # ---- the protocol the ingress calls (in this process, or through a Serve handle) ---------------------------
    async def score(self, job: Job) -> Scored:
        if not self.ready:
            raise NotReady(self.failure() or "the model is still warming up (see GET /readyz); retry shortly")
        try:
            probabilities = await self.batcher.submit(job)
        except QueueWaitExceeded as refused:
            raise Overloaded(str(refused), refused.expected_s) from None
        return Scored(probabilities, self._plan.version)

    async def plan(self) -> Plan:
        """What the ingress prepares jobs and decodes probabilities with: this replica's Plan (and version)."""
        return self._plan

    async def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.state, "batching": self.batcher.describe()}
        if self.failure():
            body["detail"] = self.failure()
        return body

    async def info(self) -> ModelInfo:
        return self.model_info()

    # ---- description -----------------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        """Registry name/version/alias (models:/ URIs), members and the dev F1 recorded for the loaded model."""
        metadata = dict(getattr(self.predictor, "metadata", None) or {})
        entries = metadata.get("members") if isinstance(metadata.get("members"), list) else []
        members = []
        for i, member in enumerate(self.predictor.members):
            info = getattr(member, "info", {}) or {}
            entry = entries[i] if i < len(entries) and isinstance(entries[i], dict) else {}
            members.append(MemberInfo(
                name=_text(entry.get("name")), encoder=_text(info.get("encoder") or entry.get("encoder")),
                system=_text(info.get("system")), markers=_text(info.get("markers")),
                seed=entry.get("seed") if isinstance(entry.get("seed"), int) else None,
                dev_f1=_number(entry.get("dev_f1_a")) if entry.get("dev_f1_a") is not None
                else _number((info.get("dev") or {}).get("dev_f1_a"))))
        dev_f1 = self.registry.get("dev_f1")
        if dev_f1 is None:  # an ensemble folder's own evaluation, else a single member's
            dev_f1 = _first_number(metadata, ("dev", "ensemble", "f1"))
        if dev_f1 is None and len(members) == 1:
            dev_f1 = members[0].dev_f1
        device = str(getattr(self.predictor, "device", self.options.device))
        precision = getattr(self.predictor, "precision", "bf16")
        if precision != "cascade":  # bf16 is autocast on CUDA only; a CPU replica computes in fp32
            precision = "bf16" if device.startswith("cuda") and precision == "bf16" else "fp32"
        return ModelInfo(
            uri=self.options.model, name=self.registry.get("name"), version=self.registry.get("version"),
            alias=self.registry.get("alias"), dev_f1=dev_f1, vote=self.predictor.vote_mode,
            interval=tuple(self._plan.interval), members=members, device=device,
            precision=precision, execution=_text(getattr(self.predictor, "execution", None)),
            max_batch_pairs=self.options.max_batch_pairs, batch_wait_ms=self.options.batch_wait_ms,
            limits=self.options.limits.model_dump(), metadata=_json_safe(metadata), swap_error=self.swap_error)

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


class RelationService:
    """Limits, candidates and decoding around a model that scores jobs: the ingress deployment's work."""

    def __init__(self, model, options: ServeOptions, *, challenger: Challenger | None = None, on_shadow=None):
        """``challenger``: the rollout's second model (with ``options.rollout``); ``on_shadow(outcome, seconds,
        counts)`` is told how each shadow call ended (the Serve deployment's metrics)."""
        self.model = model
        self.options = options
        self.challenger = challenger
        self.on_shadow = on_shadow
        self.agreement = Agreement()
        self._sides = {CHAMPION: _Side(model), CHALLENGER: _Side(challenger)}
        self._shadows: set[asyncio.Task] = set()  # held here: the loop keeps only weak references to tasks
        self._random = random.Random()
        self.limits = options.limits
        self._preparing = 0  # requests between arrival and the batcher (all on the event loop: no lock needed)
        if isinstance(model, ModelService):  # one process: the batcher can see requests on their way
            model.batcher.announced = lambda: self._preparing
        self.in_flight = 0  # HTTP requests inside the app now (the HTTP layer counts them)
        self.draining = False  # set on shutdown: new requests get 503, those inside finish
        self._prefix = uuid.uuid4().hex[:8]  # document keys stay unique across ingress replicas sharing a model
        self._keys = itertools.count()

    def warm_up(self) -> None:
        """Candidates for the warm-up document, and torch, before the first request: the first request would
        otherwise import them, seconds in which the event loop would answer nothing and bodies on their way would
        time out (408)."""
        import torch  # noqa: F401 - imported now, not on a request: the model's probabilities arrive as tensors

        Plan(1).prepare([warmup_document("ingress-warmup")])

    # ---- requests --------------------------------------------------------------------------------------------
    def _check_limits(self, request: RelationsRequest) -> None:
        limits, documents = self.limits, request.documents
        if len(documents) > limits.max_documents:
            raise PayloadTooLarge(f"documents: {len(documents)} documents exceed the limit of {limits.max_documents} "
                                  f"per request; split the request")
        characters = sum(len(d.full_text) for d in documents)
        if characters > limits.max_characters:
            raise PayloadTooLarge(f"documents: {characters} characters of text exceed the limit of "
                                  f"{limits.max_characters} per request; send fewer or shorter documents")
        entities = sum(len(d.entities) for d in documents)
        if entities > limits.max_entities:
            raise PayloadTooLarge(f"documents: {entities} entities exceed the limit of {limits.max_entities} per "
                                  f"request; send fewer documents per request")

    @contextmanager
    def arriving(self):
        """Wrap a request from before its body is read (the HTTP layer does): while requests are on their way to the
        batcher, it waits up to ``batch_wait_ms`` for them; with none on the way it runs a lone request at once."""
        flag = [True]
        self._preparing += 1
        token = _ARRIVING.set(flag)
        try:
            yield
        finally:
            _ARRIVING.reset(token)
            if flag[0]:
                self._preparing -= 1

    def _arrived(self) -> None:
        flag = _ARRIVING.get()
        if flag is not None and flag[0]:
            flag[0] = False
            self._preparing -= 1

    def _prepare(self, request: RelationsRequest, plan: Plan) -> tuple[list[str], Job]:
        self._check_limits(request)
        request_key = f"{self._prefix}:{next(self._keys)}"
        keys = [f"{request_key}:{i}" for i in range(len(request.documents))]
        job = plan.prepare([d.to_document(key) for d, key in zip(request.documents, keys)],
                           tuple(request.interval) if request.interval else None)
        candidates = job.candidates
        if len(candidates) > self.limits.max_pairs:
            per_doc = Counter(c.pmid for c in candidates)
            worst = max(range(len(keys)), key=lambda i: per_doc[keys[i]])
            raise PayloadTooLarge(f"documents: {len(candidates)} candidate pairs exceed the limit of {self.limits.max_pairs} "
                                  f"per request (most from documents[{worst}] (id {request.documents[worst].id!r}): "
                                  f"{per_doc[keys[worst]]}); send fewer documents or a narrower interval")
        return keys, job

    # ---- rollout --------------------------------------------------------------------------------------------
    def choose(self, key: str | None = None) -> Answering:
        """The side that answers a request with ``key`` (its ``X-Request-Key``; None: drawn at random): the
        challenger for a canary share while it is ready, else the champion."""
        rollout = self.options.rollout
        challenger = self.challenger is not None and self.challenger.ready
        if rollout is not None and rollout.canary_percent and challenger:
            drawn = bucket(key) if key is not None else self._random.randrange(100)
            if drawn < rollout.canary_percent:
                return Answering(CHALLENGER, self._sides[CHALLENGER].version)
        return Answering(CHAMPION, self._sides[CHAMPION].version)

    async def rollout_info(self) -> RolloutInfo | None:
        rollout, challenger = self.options.rollout, self.challenger
        if rollout is None or challenger is None:
            return None
        if challenger.ready and challenger.info is None:
            challenger.info = await challenger.model.info()
        info = challenger.info
        return RolloutInfo(mode=rollout.mode, canary_percent=rollout.canary_percent, challenger=challenger.uri,
                           challenger_state=challenger.state, challenger_error=challenger.error,
                           challenger_version=getattr(info, "version", None),
                           shadow=self.agreement.summary() if rollout.shadow else None)

    def _shadow(self, request: RelationsRequest, job: Job, relations: list) -> None:
        """Start the challenger's call for a request the champion answered; never awaited by the answer."""
        rollout = self.options.rollout
        if rollout is None or not rollout.shadow or self.challenger is None:
            return
        if not self.challenger.ready or len(self._shadows) >= rollout.shadow_max_in_flight:
            self._shadow_done("skipped", None, {})
            return
        task = asyncio.get_running_loop().create_task(self._compare(request, job, relations, rollout.shadow_timeout_s))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _compare(self, request: RelationsRequest, job: Job, relations: list, timeout_s: float) -> None:
        started = time.monotonic()
        try:
            side = self._sides[CHALLENGER]
            plan = await asyncio.wait_for(side.current_plan(), timeout_s)
            if plan.interval != self._sides[CHAMPION].plan.interval and not request.interval:
                job = plan.prepare(job.documents)
            remaining = timeout_s - (time.monotonic() - started)
            theirs, _ = await asyncio.wait_for(side.run(job, request.threshold, lambda: None), max(0.0, remaining))
        except TimeoutError:
            self._shadow_done("timed_out", time.monotonic() - started, {})
            return
        except Exception as error:  # noqa: BLE001 - whatever the challenger does, the answer is already sent
            log.warning("drugprot serving: shadow call to the challenger failed (%s: %s)", type(error).__name__, error)
            self._shadow_done("failed", time.monotonic() - started, {})
            return
        counts = self.agreement.compare(((r.pmid, r.chemical, r.gene, r.type) for r in relations),
                                        ((r.pmid, r.chemical, r.gene, r.type) for r in theirs))
        self._shadow_done("compared", time.monotonic() - started, counts)

    def _shadow_done(self, outcome: str, seconds: float | None, counts: dict) -> None:
        self.agreement.calls[outcome] += 1
        if self.on_shadow is not None:
            self.on_shadow(outcome, seconds, counts)

    # ---- requests --------------------------------------------------------------------------------------------
    async def relations(self, request: RelationsRequest,
                        answering: Answering | None = None) -> tuple[RelationsResponse, str | None]:
        """Relations for each document of a validated request, in request order, and the model version that
        answered (None for a model folder). ``answering`` (default: ``choose()``) names the side, and gets its
        version once known."""
        answering = answering or self.choose()
        side = self._sides[answering.role]
        plan = await side.current_plan()
        answering.version = plan.version
        keys, job = self._prepare(request, plan)
        relations = []
        if job.candidates:
            relations, answering.version = await side.run(job, request.threshold, self._arrived)
            if answering.role == CHAMPION:
                self._shadow(request, job, relations)
        by_key: dict[str, list[RelationOut]] = {key: [] for key in keys}
        for relation in relations:
            by_key[relation.pmid].append(RelationOut(chemical=relation.chemical, gene=relation.gene, type=relation.type,
                                                     score=relation.score, votes=list(relation.votes)))
        counts = Counter(c.pmid for c in job.candidates)
        response = RelationsResponse(documents=[DocumentRelations(id=d.id, candidates=counts[key], relations=by_key[key])
                                                for d, key in zip(request.documents, keys)])
        return response, answering.version


class _Side:
    """One model the ingress sends jobs to, and the Plan it prepares and decodes them with (fetched on first use and
    again when the model's version changes)."""

    def __init__(self, model):
        self.model = model
        self.plan: Plan | None = None

    @property
    def version(self) -> str | None:
        return self.plan.version if self.plan is not None else None

    async def current_plan(self) -> Plan:
        if self.plan is None:
            self.plan = await self.model.plan()
        return self.plan

    async def run(self, job: Job, threshold: float, arrived) -> tuple[list, str | None]:
        """The job's relations and the version that scored them."""
        version = self.plan.version
        arrived()  # no await between here and the queue: the batcher sees this request in one place
        scored = await self.model.score(job)
        if scored.version != self.plan.version:  # another model answered (a champion swap): its plan from now on
            self.plan = await self.model.plan()
            if scored.version != self.plan.version:
                raise NotReady(f"the model moved from version {version} to {scored.version} and then "
                               f"{self.plan.version} during this request; retry")
        return self.plan.decode(job, scored.probabilities, threshold), scored.version


def _first(mapping: dict, *paths: tuple[str, ...]) -> Any:
    for path in paths:
        value: Any = mapping
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _first_number(mapping: dict, *paths: tuple[str, ...]) -> float | None:
    return _number(_first(mapping, *paths))


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_safe(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
