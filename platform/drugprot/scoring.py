"""Official-equivalent DrugProt scoring (micro P/R/F1 over the 13 types, plus a per-type table).

Rules, as the official scorer applies them: the unit is (PMID, type, chemical, gene); relation types outside the
13 are dropped; argument order is normalised (the CHEMICAL becomes Arg1); duplicates are dropped; a prediction
whose arguments are not a CHEMICAL–GENE pair of the gold entities is ignored; per-type rows cover types present in
the gold, while a predicted type absent from the gold still counts as a false positive in the micro figures.
Training, tuning, ensembles and ``drugprot evaluate`` all call :func:`score`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drugprot.corpus import CHEMICAL, RELATION_TYPES, CorpusError, Document, Problem

Key = tuple[str, str, str, str]  # pmid, type, chemical id, gene id


@dataclass(frozen=True, slots=True)
class Counts:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass(frozen=True, slots=True)
class Score:
    micro: Counts
    per_type: dict[str, Counts] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return self.micro.precision

    @property
    def recall(self) -> float:
        return self.micro.recall

    @property
    def f1(self) -> float:
        return self.micro.f1

    def as_dict(self) -> dict:
        return {**self.micro.as_dict(), "per_type": {t: c.as_dict() for t, c in self.per_type.items()}}

    def table(self) -> str:
        rows = [f"{'type':<24} {'P':>6} {'R':>6} {'F1':>6} {'TP':>6} {'FP':>6} {'FN':>6}"]
        for name, c in [*self.per_type.items(), ("MICRO", self.micro)]:
            rows.append(f"{name:<24} {c.precision:6.3f} {c.recall:6.3f} {c.f1:6.3f} {c.tp:6d} {c.fp:6d} {c.fn:6d}")
        return "\n".join(rows)


def _normalise(documents: dict[str, Document], rows: Iterable[Key]) -> set[Key]:
    """Keep known types on CHEMICAL–GENE pairs of the gold entities, chemical first, de-duplicated."""
    kept: set[Key] = set()
    for pmid, rtype, arg1, arg2 in rows:
        doc = documents.get(pmid)
        if rtype not in RELATION_TYPES or doc is None:
            continue
        first, second = doc.entities.get(arg1), doc.entities.get(arg2)
        if first is None or second is None:
            continue
        if first.type != CHEMICAL:
            first, second = second, first
        if first.type == CHEMICAL and second.is_gene:
            kept.add((pmid, rtype, first.id, second.id))
    return kept


def score(gold: Iterable[Document], predictions: Iterable[Key], pmids: Iterable[str] | None = None) -> Score:
    """Score ``(pmid, type, arg1 id, arg2 id)`` predictions against gold documents; ``pmids`` filters predictions."""
    documents = {d.pmid: d for d in gold}
    allowed = set(pmids) if pmids is not None else None
    gold_keys = _normalise(documents, ((d.pmid, r.type, r.chemical, r.gene) for d in documents.values() for r in d.relations))
    pred_keys = _normalise(documents, (p for p in predictions if allowed is None or p[0] in allowed))
    tp_keys = gold_keys & pred_keys
    micro = Counts(len(tp_keys), len(pred_keys - gold_keys), len(gold_keys - pred_keys))
    per_type = {}
    for rtype in RELATION_TYPES:
        g = {k for k in gold_keys if k[1] == rtype}
        if not g:
            continue
        p = {k for k in pred_keys if k[1] == rtype}
        per_type[rtype] = Counts(len(g & p), len(p - g), len(g - p))
    return Score(micro, per_type)


def read_predictions(path: str | os.PathLike) -> list[Key]:
    """Read an official-format prediction file (``PMID\\tTYPE\\tArg1:Tn\\tArg2:Tm``); bad lines raise with file:line."""
    path = Path(path)
    problems: list[Problem] = []
    rows: list[Key] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            fields = raw.decode("utf-8").rstrip("\r").split("\t")
        except UnicodeDecodeError:
            problems.append(Problem(path, number, "not valid UTF-8"))
            continue
        if len(fields) != 4 or not fields[2].startswith("Arg1:") or not fields[3].startswith("Arg2:"):
            problems.append(Problem(path, number, "expected PMID<TAB>TYPE<TAB>Arg1:Tn<TAB>Arg2:Tm"))
            continue
        rows.append((fields[0], fields[1], fields[2][5:], fields[3][5:]))
    if problems:
        raise CorpusError(problems)
    return rows
