"""Votes and decision rules: from every member's (M, N, L) probabilities to relations, and which pairs the members
not run yet may skip. No model; torch is imported on the first vote, so the Serve ingress loads this module
without it.

A vote gives each candidate pair a *ranking* over LABELS (NONE first): ``soft`` ranks by the weighted mean
probability; ``hard`` by the weighted share of the members' top labels, ties broken by the mean probability. A pair
gets one label (its argmax) unless the decision says otherwise. The default :class:`Decision` keeps the argmax rule:
the best type wins when it ranks above NONE. A calibrated decision moves that line (``margin``: the best type must
beat NONE by more than it; negative values let close calls through), can ask a per-type minimum (``thresholds``),
and can give a pair a second type (``second_type``: the runner-up is output too when its ranking reaches this value;
the official scorer scores each type on its own). Multi-label members (``model.multilabel``) vote for every type whose
probability beats NONE's, and their decision (``multilabel``) gives every type that passes, not only the best.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drugprot.candidates import LABELS, Candidate
from drugprot.corpus import Relation
from drugprot.ensemble_folder import VOTE_MODES

if TYPE_CHECKING:
    import torch

NONE_INDEX = 0
#: float slack for :func:`settled_as_none`: a pair within this of passing is not settled (the final vote sums members
#: in another order than the bound)
SETTLE_SLACK = 1e-5


@dataclass(frozen=True)
class Decision:
    margin: float = 0.0
    thresholds: Mapping[str, float] = field(default_factory=dict)  # relation type -> minimum ranking
    second_type: float | None = None  # multi-label: runner-up type's minimum ranking; None: one type per pair
    multilabel: bool = False  # every passing type, for members trained multi-label

    def __post_init__(self):
        unknown = sorted(set(self.thresholds) - set(LABELS[1:]))
        if unknown:
            raise ValueError(f"decision thresholds: unknown relation type(s) {', '.join(unknown)}")

    @property
    def is_argmax(self) -> bool:
        return self.margin == 0.0 and not self.thresholds and self.second_type is None and not self.multilabel

    def choose(self, ranking: torch.Tensor) -> list[tuple[int, int]]:
        """``(row, label index)`` of every relation the ``(N, L)`` ranking yields, rows ascending."""
        import torch

        if ranking.numel() == 0:
            return []
        types = ranking[:, 1:]
        floor = torch.tensor([self.thresholds.get(t, float("-inf")) for t in LABELS[1:]])
        over_none = types - ranking[:, NONE_INDEX:NONE_INDEX + 1]
        passes = (over_none > self.margin) & (types >= floor)
        order = types.argsort(dim=-1, descending=True, stable=True)
        best, runner_up = order[:, 0], order[:, 1]
        if self.multilabel:
            return [(int(i), int(t) + 1) for i, t in torch.nonzero(passes)]
        rows = torch.arange(ranking.size(0))
        chosen = [(int(i), int(best[i]) + 1) for i in torch.nonzero(passes[rows, best]).flatten()]
        if self.second_type is not None:
            second = passes[rows, best] & (types[rows, runner_up] >= self.second_type) & (types[rows, runner_up] >= floor[runner_up])
            chosen += [(int(i), int(runner_up[i]) + 1) for i in torch.nonzero(second).flatten()]
            chosen.sort()
        return chosen

    def as_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "thresholds": dict(self.thresholds), "second_type": self.second_type,
                "multilabel": self.multilabel}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "decision") -> Decision:
        """A decision from ``ensemble.json``; a bad entry is a ValueError naming ``where`` and the key."""
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"margin", "thresholds", "second_type", "multilabel"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (expected margin, thresholds, second_type, "
                             f"multilabel)")
        try:
            second = raw.get("second_type")
            multilabel = raw.get("multilabel", False)
            if not isinstance(multilabel, bool):
                raise ValueError(f"multilabel must be true or false, got {multilabel!r}")
            return cls(float(raw.get("margin", 0.0)), {str(k): float(v) for k, v in (raw.get("thresholds") or {}).items()},
                       None if second is None else float(second), multilabel)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None


@dataclass(frozen=True, slots=True)
class PredictedRelation:
    pmid: str
    chemical: str
    gene: str
    type: str
    score: float  # vote share (hard) or mean probability (soft)
    votes: tuple[str, ...]  # each member's label for the pair

    def as_relation(self) -> Relation:
        return Relation(self.type, self.chemical, self.gene)


def combine(member_probs: torch.Tensor, mode: str = "hard", weights: torch.Tensor | None = None, *,
            multilabel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (M, N, L) member probabilities (each member counted ``weights[m]`` times, default once).

    Returns (ranking (N, L), score (N, L)): ``soft`` ranks and scores by the weighted mean probability; ``hard``
    scores by the weighted vote share of each member's top label and ranks by that share with ties broken by the
    weighted mean probability (a nudge smaller than one vote). Multi-label members (``multilabel``) vote for every
    type whose probability beats NONE's; a type then needs more than half the votes, so NONE's ranking is one half."""
    import torch

    if mode not in VOTE_MODES:
        raise ValueError(f"vote must be 'hard' or 'soft', got {mode!r}")
    weights = torch.ones(member_probs.size(0)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    total = float(weights.sum())
    mean = torch.einsum("m,mnl->nl", weights, member_probs) / total
    if mode == "soft":
        return mean, mean
    if multilabel:
        votes = (member_probs > member_probs[..., :1]).float()
        share = torch.einsum("m,mnl->nl", weights, votes) / total
        share[:, 0] = 0.5
        return share, share
    one_hot = torch.nn.functional.one_hot(member_probs.argmax(-1), member_probs.size(-1)).float()
    share = torch.einsum("m,mnl->nl", weights, one_hot) / total
    return share + mean * (0.5 / total), share  # weights are counts: shares differ by at least 1 / total


def vote(member_probs: torch.Tensor, mode: str = "hard",
         weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine (M, N, L) member probabilities; returns (labels (N,), scores (N,), member labels (M, N))."""
    ranking, score = combine(member_probs, mode, weights)
    labels = ranking.argmax(-1)
    return labels, score.gather(-1, labels[:, None])[:, 0], member_probs.argmax(-1)


def settled_as_none(known_probs: torch.Tensor, weights: torch.Tensor, mode: str = "hard",
                    decision: Decision | None = None) -> torch.Tensor:
    """(N,) True where a pair yields no relation whatever the members not run yet say.

    ``known_probs``: (K, N, L) probabilities of the first K members; ``weights``: all M members' weights (M >= K).
    The best case of each type is the remaining members' whole weight on it (all their votes and probability
    mass), which is what :func:`combine` and the decision would then see; a pair is settled when no type passes
    the decision even then (tight for the argmax rule and margins; per-type thresholds make it cautious, as the
    decision looks at the best type only). Skipping settled pairs changes no relation, score or vote output."""
    import torch

    weights = torch.as_tensor(weights, dtype=torch.float32)
    done = known_probs.size(0)
    total, remaining = float(weights.sum()), float(weights[done:].sum())
    mass = torch.einsum("k,knl->nl", weights[:done], known_probs)
    best = (mass + remaining) / total  # each type's best final mean probability; NONE keeps what it has
    none = mass[:, NONE_INDEX] / total
    if mode == "hard":
        one_hot = torch.nn.functional.one_hot(known_probs.argmax(-1), known_probs.size(-1)).float()
        votes = torch.einsum("k,knl->nl", weights[:done], one_hot)
        best = (votes + remaining) / total + best * (0.5 / total)
        none = votes[:, NONE_INDEX] / total + none * (0.5 / total)
    decision = decision or Decision()
    types = best[:, 1:]
    floor = torch.tensor([decision.thresholds.get(t, float("-inf")) for t in LABELS[1:]])
    could_pass = (types - none[:, None] > decision.margin - SETTLE_SLACK) & (types >= floor - SETTLE_SLACK)
    return ~could_pass.any(-1)


def confident_none(known_probs: torch.Tensor, weights: torch.Tensor, confidence: float) -> torch.Tensor:
    """(N,) True where every member run so far votes no relation with a weighted mean P(NONE) of at least
    ``confidence``: the early exit. Unlike :func:`settled_as_none` it is a bet (the members not run yet could still
    outvote them), so its confidence is calibrated on dev pairs (drugprot.ensemble.early_exit)."""
    import torch

    done = known_probs.size(0)
    known = torch.as_tensor(weights, dtype=torch.float32)[:done]
    mean_none = torch.einsum("k,kn->n", known, known_probs[:, :, NONE_INDEX]) / float(known.sum())
    return (known_probs.argmax(-1) == NONE_INDEX).all(0) & (mean_none >= confidence)


def closed_pairs(known_probs: torch.Tensor, weights: torch.Tensor, mode: str, decision: Decision | None,
                 early_exit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(settled, exited), each (N,): the pairs the members not run yet may skip, settled exactly or, with an
    ``early_exit`` confidence, left early (:func:`confident_none`; a pair is never both)."""
    import torch

    settled = settled_as_none(known_probs, weights, mode, decision)
    if early_exit is None:
        return settled, torch.zeros_like(settled)
    return settled, confident_none(known_probs, weights, early_exit) & ~settled


def decode(candidates: Sequence[Candidate], member_probs: torch.Tensor, vote_mode: str = "hard",
           threshold: float = 0.0, *, weights: torch.Tensor | None = None,
           decision: Decision | None = None) -> list[PredictedRelation]:
    """Vote (M, N, L) member probabilities into relations for the N candidates (NONE and low scores dropped).

    ``decision`` (default: the argmax rule) turns the vote's ranking into relations."""
    if not candidates:
        return []
    decision = decision or Decision()
    ranking, scores = combine(member_probs, vote_mode, weights, multilabel=decision.multilabel)
    member_labels = member_probs.argmax(-1)
    relations = []
    for i, label in decision.choose(ranking):
        cand, value = candidates[i], float(scores[i, label])
        if value < threshold:
            continue
        relations.append(PredictedRelation(cand.pmid, cand.chemical.id, cand.gene.id, LABELS[label], round(value, 6),
                                           tuple(LABELS[int(v)] for v in member_labels[:, i])))
    return relations


@dataclass(frozen=True)
class VoteRule:
    """How one model's members vote and decide: what decoding and the skipping of settled pairs both read."""

    mode: str = "hard"
    weights: tuple[int, ...] | None = None  # votes each member casts (a greedy selection may pick one twice)
    decision: Decision = field(default_factory=Decision)

    def __post_init__(self):
        if self.mode not in VOTE_MODES:
            raise ValueError(f"vote must be 'hard' or 'soft', got {self.mode!r}")

    def weight_tensor(self, members: int) -> torch.Tensor:
        import torch

        return torch.ones(members) if self.weights is None else torch.tensor([float(w) for w in self.weights])

    def decode(self, candidates: Sequence[Candidate], member_probs: torch.Tensor,
               threshold: float = 0.0) -> list[PredictedRelation]:
        weights = None if self.weights is None else self.weight_tensor(len(self.weights))
        return decode(candidates, member_probs, self.mode, threshold, weights=weights, decision=self.decision)

    def closed(self, known_probs: torch.Tensor, members: int,
               early_exit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`closed_pairs` under this rule, for an ensemble of ``members``."""
        return closed_pairs(known_probs, self.weight_tensor(members), self.mode, self.decision, early_exit)
