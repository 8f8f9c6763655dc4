"""From combined label scores to relations: the argmax rule, or thresholds calibrated on held-out dev pairs.

A vote (``drugprot.inference.vote``) gives each candidate pair a *ranking* over LABELS (NONE first): the mean
probability for a soft vote, the vote share (ties broken by the mean probability) for a hard vote. The default
:class:`Decision` keeps today's rule: the best type wins when it ranks above NONE. A calibrated decision moves
that line (``margin``: the best type must beat NONE by more than it; negative values let close calls through),
can ask a per-type minimum (``thresholds``), and can give a pair a second type (``second_type``: the runner-up
type is output too when its ranking reaches this value; the official scorer scores each type on its own).
Multi-label members (``model.multilabel``) give every type that passes (``multilabel``), not only the best.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from drugprot.encoding import LABELS

NONE_INDEX = 0


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
