"""Distillation for serving: one student learns an ensemble's (the teacher's) soft probabilities on the training pairs.

The teacher is any model ``drugprot predict`` loads (``models:/NAME@champion``, a folder); its probabilities come
from the one inference path (``Predictor.member_probabilities``, combined as a weighted soft vote: for a hard-vote
teacher too, the mean probability is the soft target). Training takes them through its target-probabilities input
(``drugprot.training.train(teacher=…)``): L = w·T²·KL(teacher_T ‖ student_T) + (1−w)·L_gold, with ``distill.weight``
= w and ``distill.temperature`` = T from the config. The student can use the members' encoder or a smaller one
(``encoder`` section of its config). It is then compared with its teacher on dev half B (F1 and pairs/s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drugprot.config import RunConfig
from drugprot.inference.loading import Predictor, load_predictor, relation_rows
from drugprot.inference.voting import combine


def teacher_targets(predictor: Predictor) -> Callable[[list, list], torch.Tensor]:
    """``(documents, candidates) -> (candidates, labels)`` soft-vote probabilities of ``predictor``'s members."""

    def targets(documents: list, candidates: list) -> torch.Tensor:
        probabilities = predictor.member_probabilities(documents, candidates)
        return combine(probabilities, "soft", predictor.weights)[0]

    return targets


@dataclass
class Measured:
    name: str
    f1: float
    pairs: int
    seconds: float

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "f1": round(self.f1, 6), "pairs": self.pairs, "seconds": round(self.seconds, 4),
                "pairs_per_s": round(self.pairs_per_s, 2)}


def measure(name: str, predictor: Predictor, documents: Sequence) -> Measured:
    """F1 on ``documents`` and the time ``predict`` takes over their candidate pairs (one warm-up call first)."""
    from drugprot.scoring import score

    predictor.predict(documents[:1])
    started = time.perf_counter()
    predictions = predictor.predict(documents)
    seconds = time.perf_counter() - started
    rows = relation_rows(documents, predictions)
    result = score(documents, [(pmid, r.type, r.chemical, r.gene) for pmid, r in rows])
    return Measured(name, result.f1, len(predictor.candidates(documents)), seconds)


def distill(teacher: str, config: RunConfig, out: str | Path, *, tracking_uri: str | None = None, device: str = "auto",
            progress: bool = True, log: Callable[[str], None] | None = None):
    """Train the student of ``config`` on ``teacher``'s probabilities into ``out`` (``out/model``, as ``drugprot train``)."""
    from drugprot.errors import DrugprotError
    from drugprot.training import train

    if not str(teacher).startswith("models:/") and not Path(teacher).exists():
        raise DrugprotError(f"--teacher {teacher}: no such folder (a model or ensemble folder, or models:/NAME@ALIAS)")
    predictor = load_predictor(teacher, device=device, tracking_uri=tracking_uri)
    chosen_on = predictor.metadata.get("selection_seed")  # an ensemble's members, weights and thresholds: on its A
    if chosen_on is not None and chosen_on != config.data.selection_seed:
        raise DrugprotError(f"--teacher {teacher} was chosen on dev half A of data.selection_seed {chosen_on}, the "
                            f"student's config says {config.data.selection_seed}; set data.selection_seed={chosen_on} "
                            "so that half B stays held out from both")
    config = config.model_copy(update={"distill": config.distill.model_copy(update={"teacher": str(teacher)})})
    return predictor, train(config, out, teacher=teacher_targets(predictor), progress=progress, log=log)
