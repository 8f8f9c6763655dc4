"""The development documents in two halves: every decision is made on A, B is kept for reports and the promotion gate.

A study makes many choices from development scores: each trial's best checkpoint, what ASHA and TPE rank, the
ensemble's members, vote weights, thresholds and early-exit calibration. Made on the whole development set, they
leave no document that has not steered the result, and the reported score is optimistic. So the documents are split
once, by ``data.selection_seed``; training, tuning and ensemble building all take the same split from here, and a
figure on B is held out from every one of those choices.

The split: documents ordered by their number of gold relations (then PMID) are taken two at a time, and a seeded coin
sends one of each two to A, the other to B, so both halves hold similar numbers of documents and relations.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drugprot.corpus import Document
from drugprot.scoring import Key, Score, score

SELECTION_METRIC = "dev_f1_a"  # what every decision ranks by: checkpoints, ASHA, TPE, ensemble members
#: The development score of a model trained on the development documents (``data.final``), wherever one is recorded.
NO_DEV_SCORE = "none (trained on train+dev)"


@dataclass(frozen=True)
class DevHalves:
    """The two halves of a development set (documents in their original order) and the seed that split them."""

    seed: int
    a: tuple[Document, ...]
    b: tuple[Document, ...]

    @property
    def a_pmids(self) -> frozenset[str]:
        return frozenset(d.pmid for d in self.a)

    @property
    def b_pmids(self) -> frozenset[str]:
        return frozenset(d.pmid for d in self.b)

    def describe(self) -> dict[str, int | dict[str, int]]:
        """Sizes for a report or a run record: the seed, then documents and gold relations per half."""
        return {"seed": self.seed, **{name: {"documents": len(docs), "relations": sum(len(d.relations) for d in docs)}
                                      for name, docs in (("A", self.a), ("B", self.b))}}


def split_halves(documents: Sequence[Document], seed: int) -> DevHalves:
    """Split ``documents`` into halves with similar relation counts (see the module docstring)."""
    rng = random.Random(seed)
    ordered = sorted(documents, key=lambda d: (len(d.relations), d.pmid))
    to_a: set[str] = set()
    for i in range(0, len(ordered), 2):
        pair = ordered[i:i + 2]
        rng.shuffle(pair)
        to_a.add(pair[0].pmid)
    return DevHalves(seed, tuple(d for d in documents if d.pmid in to_a), tuple(d for d in documents if d.pmid not in to_a))


def score_halves(halves: DevHalves, predicted: Iterable[Key]) -> dict[str, Score]:
    """The official-equivalent score of ``predicted`` on A (for decisions), B (held out) and all documents."""
    predicted = list(predicted)
    return {"a": score(halves.a, predicted), "b": score(halves.b, predicted),
            "all": score(halves.a + halves.b, predicted)}
