"""The weight-free half of inference: documents into jobs, probabilities into relations. Imports no torch.

A :class:`Plan` is read from a model folder's JSON (``ensemble.json``, or a member's ``drugprot.json``) and the
:class:`~drugprot.inference.options.InferenceOptions`; ``prepare`` makes a :class:`Job` (the documents and their
candidate pairs inside the GENE interval), a :class:`~drugprot.inference.scorers.Scorer` turns it into every
member's (M, N, L) probabilities, and ``decode`` votes them into relations. The Serve ingress holds a Plan, the
model replica the Scorer; ``drugprot predict``, bulk prediction and the MLflow pyfunc hold both
(:class:`~drugprot.inference.loading.Predictor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drugprot.candidates import DEFAULT_INTERVAL, Candidate, document_candidates
from drugprot.corpus import Document
from drugprot.inference.options import InferenceOptions
from drugprot.inference.voting import Decision, PredictedRelation, VoteRule

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Job:
    """Documents keyed (``pmid``) uniquely within the job, and their candidates in order: what a scorer scores."""

    documents: Sequence[Document]
    candidates: Sequence[Candidate]

    @property
    def pairs(self) -> int:
        return len(self.candidates)


@dataclass(frozen=True)
class Plan:
    """How one model turns documents into jobs and probabilities into relations."""

    members: int
    interval: tuple[int, int] = DEFAULT_INTERVAL
    rule: VoteRule = field(default_factory=VoteRule)
    version: str | None = None  # the registry version of a models:/ model, once pinned

    def __post_init__(self):
        if self.rule.weights is not None and len(self.rule.weights) != self.members:
            raise ValueError(f"weights must be one positive integer per member ({self.members}), got {list(self.rule.weights)}")

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], options: InferenceOptions, *, where: str) -> Plan:
        """From ``ensemble.json`` (members, vote, weights, decision, interval) or a member's ``drugprot.json``
        (its interval); ``options`` override vote and interval. A bad decision is a ValueError naming ``where``."""
        entries = meta.get("members")
        if not isinstance(entries, list):  # a single model
            return cls(1, tuple(options.interval or meta.get("interval") or DEFAULT_INTERVAL),
                       VoteRule(options.vote or "hard"))
        weights = [entry.get("weight", 1) for entry in entries]
        rule = VoteRule(options.vote or meta["vote"], tuple(weights) if any(w != 1 for w in weights) else None,
                        Decision.from_dict(meta.get("decision"), f"{where}: decision"))
        return cls(len(entries), tuple(options.interval or meta["interval"]), rule)

    def prepare(self, documents: Sequence[Document], interval: tuple[int, int] | None = None) -> Job:
        """Every document's candidates in order, inside ``interval`` (default: the plan's)."""
        interval = tuple(interval or self.interval)
        return Job(documents, [c for doc in documents for c in document_candidates(doc, interval)])

    def decode(self, job: Job, probabilities: torch.Tensor, threshold: float = 0.0) -> list[PredictedRelation]:
        """The vote and decision over the job's (M, N, L) probabilities: its relations scoring at least ``threshold``."""
        return self.rule.decode(job.candidates, probabilities, threshold)

    @staticmethod
    def by_document(documents: Sequence[Document], relations: Sequence[PredictedRelation]) -> list[list[PredictedRelation]]:
        """Relations per document, in the documents' order."""
        results: dict[str, list[PredictedRelation]] = {d.pmid: [] for d in documents}
        for relation in relations:
            results[relation.pmid].append(relation)
        return [results[d.pmid] for d in documents]
