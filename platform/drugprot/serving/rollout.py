"""Canary and shadow in the ingress, without a framework: which model answers a request, the challenger's state as
the ingress sees it, and how often a shadowed challenger agrees with the champion, per relation type.

The key rule: a request's ``X-Request-Key`` header (any text) maps to a bucket 0..99, the first eight bytes of its
SHA-256 read as an unsigned big-endian integer, modulo 100; a bucket below ``canary_percent`` goes to the
challenger. The same key therefore reaches the same side on every replica and after every restart. No Ray here.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

KEY_HEADER = "X-Request-Key"
ROLE_HEADER = "X-Model-Role"
VERSION_HEADER = "X-Model-Version"
CHAMPION, CHALLENGER = "champion", "challenger"
OUTCOMES = ("agreed", "champion_only", "challenger_only")
SHADOW_CALLS = ("compared", "failed", "timed_out", "skipped")
STATES = ("loading", "ready", "failed")


def bucket(key: str) -> int:
    """The key's bucket, 0..99 (see the module docstring)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100


@dataclass
class Answering:
    """Which side answers one request, and its registry version once known (None for a model folder)."""

    role: str
    version: str | None = None


def answer_headers(answering: Answering | None, *, rollout: bool) -> dict[str, str]:
    """``X-Model-Version`` (the registry version that answered) and, in a rollout, ``X-Model-Role``."""
    headers = {}
    if answering is not None and answering.version is not None:
        headers[VERSION_HEADER] = answering.version
    if answering is not None and rollout:
        headers[ROLE_HEADER] = answering.role
    return headers


@dataclass
class Challenger:
    """The challenger as the ingress sees it: the model (``plan``/``score``/``info``, as ``ModelService``; None until
    its application runs), whether it serves yet, and why not. Serve's ingress sets ``model``, ``state`` and
    ``error`` from ``serve.status()``; ``plan`` and ``score`` go to whichever model is set."""

    model: Any
    uri: str
    state: str = "loading"
    error: str | None = None
    info: Any = None  # the challenger's ModelInfo, fetched once it is ready

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.model is not None

    async def plan(self):
        return await self.model.plan()

    async def score(self, job):
        return await self.model.score(job)


@dataclass
class Agreement:
    """Shadow counts: per relation type, relations both sides gave (same document, pair and type), the champion's
    alone, the challenger's alone; and how the challenger calls ended."""

    by_type: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    calls: Counter = field(default_factory=Counter)

    def compare(self, champion: Iterable[tuple], challenger: Iterable[tuple]) -> dict[str, Counter]:
        """Count one request's relations, each ``(document, chemical, gene, type)``; returns this request's counts."""
        mine, theirs = set(champion), set(challenger)
        counts: dict[str, Counter] = defaultdict(Counter)
        for relation in mine | theirs:
            outcome = "agreed" if relation in mine and relation in theirs else (
                "champion_only" if relation in mine else "challenger_only")
            counts[relation[3]][outcome] += 1
        for type_, found in counts.items():
            self.by_type[type_].update(found)
        return counts

    def summary(self) -> dict[str, Any]:
        """What ``/v1/model`` shows: call outcomes, and per type the counts with the agreed share of all three."""
        types = {}
        for type_ in sorted(self.by_type):
            found = self.by_type[type_]
            total = sum(found[o] for o in OUTCOMES)
            types[type_] = {**{o: found[o] for o in OUTCOMES},
                            "agreement": round(found["agreed"] / total, 4) if total else None}
        return {"calls": {c: self.calls[c] for c in SHADOW_CALLS}, "by_type": types}
