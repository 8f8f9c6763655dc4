"""The relation service without a framework: limits, readiness, warm-up and batching around one Predictor.

``RelationService`` is what a Serve replica holds and what the FastAPI app (``serving.api``) calls; it is also
driven directly by the unit tests and by the in-process GPU benchmark. Request → limits (413) → documents under
replica-unique keys → ``Predictor.candidates`` → pair limit (413) → :class:`PairBatcher` (one
``member_probabilities`` call per batch, in the model thread) → ``inference.decode`` with the request's threshold.
No Ray here.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any

from drugprot.candidates import DEFAULT_INTERVAL
from drugprot.corpus import Document, Entity
from drugprot.serving.batching import Job, PairBatcher, run_jobs
from drugprot.serving.options import ServeOptions
from drugprot.serving.schemas import (DocumentRelations, MemberInfo, ModelInfo, RelationOut, RelationsRequest,
                                      RelationsResponse)

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


class RelationService:
    """One loaded Predictor behind limits, readiness and cross-request batching."""

    def __init__(self, predictor, options: ServeOptions, *, executor: ThreadPoolExecutor | None = None,
                 registry: dict[str, Any] | None = None):
        self.predictor = predictor
        self.options = options
        self.registry = registry or {}  # name, version, alias, dev_f1 of a models:/ URI, pinned at load time
        self.limits = options.limits
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="drugprot-model")
        self._preparing = 0  # requests between arrival and the batcher (all on the event loop: no lock needed)
        self.batcher: PairBatcher[Job, Any] = PairBatcher(partial(run_jobs, predictor), max_pairs=options.max_batch_pairs,
                                                          wait_s=options.batch_wait_ms / 1000.0, executor=self._executor,
                                                          announced=lambda: self._preparing)
        self._keys = itertools.count()
        self._warmup: Future | None = None

    @classmethod
    def load(cls, options: ServeOptions) -> RelationService:
        """Set torch threads, load the model (folder, ensemble or models:/ URI) on the replica's device."""
        from drugprot.inference import load_predictor

        configure_torch_threads(options.torch_threads)
        model, registry = options.model, None
        if model.startswith("models:/"):
            # Pin the alias to one version first, so what /v1/model reports is exactly what was loaded.
            from drugprot.tracking import parse_model_uri, resolve_model_version

            _, alias, _ = parse_model_uri(model)
            version = resolve_model_version(model, tracking_uri=options.tracking_uri)
            model = f"models:/{version.name}/{version.version}"
            registry = {"name": version.name, "version": str(version.version), "alias": alias,
                        "dev_f1": _number((version.tags or {}).get("dev_f1"))}
        predictor = load_predictor(model, device=options.device, tracking_uri=options.tracking_uri)
        return cls(predictor, options, registry=registry)

    # ---- readiness -------------------------------------------------------------------------------------------
    def start_warmup(self) -> Future:
        """Run the warm-up in the model thread; /readyz turns ready when it finishes."""
        if self._warmup is None:
            self._warmup = self._executor.submit(self.warm_up)
        return self._warmup

    def warm_up(self) -> None:
        """``warmup_rounds`` synthetic batches through the real path: a one-document batch and a full one."""
        full = max(1, math.ceil(self.options.max_batch_pairs / 32))
        for round_ in range(self.options.warmup_rounds):
            for count in sorted({1, full}):
                documents = [warmup_document(f"warmup:{round_}:{i}") for i in range(count)]
                job = Job(documents, self.predictor.candidates(documents))
                run_jobs(self.predictor, [job])
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

    def _prepare(self, request: RelationsRequest):
        self._check_limits(request)
        request_key = next(self._keys)
        keys = [f"{request_key}:{i}" for i in range(len(request.documents))]
        documents = [d.to_document(key) for d, key in zip(request.documents, keys)]
        candidates = self.predictor.candidates(documents, tuple(request.interval) if request.interval else None)
        if len(candidates) > self.limits.max_pairs:
            per_doc = Counter(c.pmid for c in candidates)
            worst = max(range(len(keys)), key=lambda i: per_doc[keys[i]])
            raise PayloadTooLarge(f"documents: {len(candidates)} candidate pairs exceed the limit of {self.limits.max_pairs} "
                                  f"per request (most from documents[{worst}] (id {request.documents[worst].id!r}): "
                                  f"{per_doc[keys[worst]]}); send fewer documents or a narrower interval")
        return keys, documents, candidates

    async def relations(self, request: RelationsRequest) -> RelationsResponse:
        """Relations for each document of a validated request, in request order."""
        if not self.ready:
            raise NotReady(self.failure() or "the model is still warming up (see GET /readyz); retry shortly")
        keys, documents, candidates = self._prepare(request)
        relations = []
        if candidates:
            self._arrived()  # no await between here and the queue: the batcher sees this request in one place
            probabilities = await self.batcher.submit(Job(documents, candidates))
            relations = self.predictor.decode(candidates, probabilities, request.threshold)
        by_key: dict[str, list[RelationOut]] = {key: [] for key in keys}
        for relation in relations:
            by_key[relation.pmid].append(RelationOut(chemical=relation.chemical, gene=relation.gene, type=relation.type,
                                                     score=relation.score, votes=list(relation.votes)))
        counts = Counter(c.pmid for c in candidates)
        return RelationsResponse(documents=[DocumentRelations(id=d.id, candidates=counts[key], relations=by_key[key])
                                            for d, key in zip(request.documents, keys)])

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
                dev_f1=_number(entry.get("dev_f1")) if entry.get("dev_f1") is not None
                else _number((info.get("dev") or {}).get("dev_f1"))))
        dev_f1 = self.registry.get("dev_f1")
        if dev_f1 is None:  # an ensemble folder's own evaluation, else a single member's
            dev_f1 = _first_number(metadata, ("dev", "ensemble", "f1"))
        if dev_f1 is None and len(members) == 1:
            dev_f1 = members[0].dev_f1
        device = str(getattr(self.predictor, "device", self.options.device))
        bf16 = device.startswith("cuda") and getattr(self.predictor, "precision", "bf16") == "bf16"
        return ModelInfo(
            uri=self.options.model, name=self.registry.get("name"), version=self.registry.get("version"),
            alias=self.registry.get("alias"), dev_f1=dev_f1, vote=self.predictor.vote_mode,
            interval=tuple(getattr(self.predictor, "interval", DEFAULT_INTERVAL)), members=members, device=device,
            precision="bf16" if bf16 else "fp32", execution=_text(getattr(self.predictor, "execution", None)),
            max_batch_pairs=self.options.max_batch_pairs, batch_wait_ms=self.options.batch_wait_ms,
            limits=self.limits.model_dump(), metadata=_json_safe(metadata))

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "batching": self.batcher.describe()}

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


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
