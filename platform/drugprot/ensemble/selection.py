"""Honest ensemble selection from stored dev probabilities: choose on half A of the dev documents, report on half B.

Every finished trial stored its class probabilities on the dev pairs at its best evaluation on half A
(``drugprot.model.dev_probabilities``), so ensembles are chosen and scored here without running any member.

* **Halves** (:func:`drugprot.dev_halves.split_halves`): the one split of the study, by the ``data.selection_seed``
  every trial was trained with (:func:`stored_selection_seed`), so half B has chosen no checkpoint, no trial's fate
  under ASHA and TPE, and nothing here.
* **Candidates**, each chosen on A only, then scored on B (:func:`compare`): the best single trial; the top-k trials
  by F1 on A; the seeds of the best trial's configuration (when the study has several); greedy forward selection
  with replacement (Caruana et al., 2004) up to ``max_size`` votes, ties to fewer members, hard and soft vote tried;
  that greedy ensemble with a calibrated margin over NONE, then with per-type thresholds as well, then (reported,
  used only with ``multi_label``) with a second type per pair.
* **Chosen**: the recipe best on A (ties to fewer members) is the ensemble that is built and registered as it is,
  members, weights, vote and thresholds, so its figures on B stay held out; the promotion gate compares on B too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from drugprot.config import DataConfig
from drugprot.dev_halves import split_halves
from drugprot.encoding import LABELS
from drugprot.ensemble_folder import EnsembleError, check_vote
from drugprot.inference.voting import Decision, combine
from drugprot.scoring import score

MARGINS = tuple(round(-0.3 + 0.05 * i, 2) for i in range(13))  # margin over NONE, on the vote's ranking scale
TYPE_THRESHOLDS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SECOND_TYPE = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
DEFAULT_MAX_SIZE = 10


@dataclass
class TrialProbabilities:
    """One trial's stored dev probabilities with what identifies it."""

    name: str
    keys: Sequence[tuple[str, str, str]]
    probabilities: torch.Tensor  # (len(keys), len(LABELS))
    configuration: str = ""  # the searched parameters but the seed (JSON), to find seeds of one configuration
    record: Any = None  # the TrialRecord it came from
    selection_seed: int | None = None  # the A/B split its checkpoint was chosen on (None: not recorded)


@dataclass
class Half:
    name: str
    documents: list  # drugprot.corpus.Document
    rows: torch.Tensor  # indices into the aligned keys

    @property
    def relations(self) -> int:
        return sum(len(d.relations) for d in self.documents)


@dataclass
class Recipe:
    label: str
    members: dict[int, int]  # trial index -> votes
    vote: str = "hard"
    decision: Decision = field(default_factory=Decision)

    @property
    def size(self) -> int:
        return sum(self.members.values())


@dataclass
class Candidate:
    recipe: Recipe
    f1_a: float
    b: Any  # drugprot.scoring.Score on half B


@dataclass
class Comparison:
    names: list[str]
    halves: tuple[Half, Half]
    seed: int
    candidates: list[Candidate]
    chosen: Candidate  # best on A: the ensemble that is built and registered
    multi_label_helps: bool | None

    def table(self) -> str:
        a, b = self.halves
        lines = [f"dev halves (seed {self.seed}): A {len(a.documents)} documents, {a.relations} relations; "
                 f"B {len(b.documents)} documents, {b.relations} relations. Chosen on A, scored on B:",
                 f"{'candidate':<48} {'votes':>5} {'vote':>4} {'F1 A':>7} {'P B':>7} {'R B':>7} {'F1 B':>7}"]
        for c in self.candidates:
            mark = " *" if c is self.chosen else ""
            lines.append(f"{c.recipe.label:<48} {c.recipe.size:>5} {c.recipe.vote:>4} {c.f1_a:>7.4f} "
                         f"{c.b.precision:>7.4f} {c.b.recall:>7.4f} {c.b.f1:>7.4f}{mark}")
        lines.append(f"* chosen on A and built as it is: {self.describe(self.chosen.recipe)}. The B columns are held "
                     f"out: no checkpoint, trial, member, weight or threshold was chosen on B; the promotion gate "
                     f"compares on B as well")
        if self.multi_label_helps is not None:
            lines.append(f"multi-label output on B: {'helps' if self.multi_label_helps else 'does not help'}")
        return "\n".join(lines)

    def describe(self, recipe: Recipe) -> str:
        members = ", ".join(f"{self.names[i]}×{n}" if n > 1 else self.names[i] for i, n in recipe.members.items())
        decision = "" if recipe.decision.is_argmax else f", decision {json.dumps(recipe.decision.as_dict())}"
        return f"{recipe.vote} vote of {members}{decision}"

    def as_dict(self) -> dict[str, Any]:
        def recipe(r: Recipe) -> dict[str, Any]:
            return {"label": r.label, "vote": r.vote, "votes": r.size, "decision": r.decision.as_dict(),
                    "members": [{"trial": self.names[i], "weight": n} for i, n in r.members.items()]}

        def scored(s) -> dict[str, Any]:
            return {"precision": round(s.precision, 6), "recall": round(s.recall, 6), "f1": round(s.f1, 6),
                    "tp": s.micro.tp, "fp": s.micro.fp, "fn": s.micro.fn}

        a, b = self.halves
        return {"seed": self.seed,
                "halves": {h.name: {"documents": len(h.documents), "relations": h.relations} for h in (a, b)},
                "candidates": [{**recipe(c.recipe), "f1_a": round(c.f1_a, 6), "b": scored(c.b),
                                "chosen": c is self.chosen} for c in self.candidates],
                "chosen": {**recipe(self.chosen.recipe), "f1_a": round(self.chosen.f1_a, 6), "b": scored(self.chosen.b)},
                "held_out": "B", "multi_label_helps": self.multi_label_helps}


def stored_selection_seed(trials: Sequence[TrialProbabilities]) -> int:
    """The ``data.selection_seed`` the trials were chosen on (their dev probabilities', else their config's); trials
    chosen on different splits would let one trial's half B choose another's checkpoint, so they are refused."""
    default = DataConfig.model_fields["selection_seed"].default
    seeds: dict[int, list[str]] = {}
    for trial in trials:
        seed = trial.selection_seed
        if seed is None:
            seed = int(((getattr(trial.record, "config", None) or {}).get("data") or {}).get("selection_seed", default))
        seeds.setdefault(seed, []).append(trial.name)
    if len(seeds) > 1:
        found = "; ".join(f"{seed}: {', '.join(names[:3])}" for seed, names in sorted(seeds.items()))
        raise EnsembleError(f"the trials were chosen on different dev splits (data.selection_seed {found}); an "
                            "ensemble needs trials of one split, so that half B stays held out for all of them")
    return next(iter(seeds), default)


def align(trials: Sequence[TrialProbabilities]) -> tuple[list[tuple[str, str, str]], torch.Tensor]:
    """Union of the trials' pair keys (sorted) and ``(T, N, L)`` probabilities; a pair a trial did not score (outside
    its GENE interval) is NONE for it, as it would have predicted."""
    keys = sorted({k for t in trials for k in t.keys})
    position = {k: i for i, k in enumerate(keys)}
    table = torch.zeros((len(trials), len(keys), len(LABELS)))
    table[:, :, 0] = 1.0
    for t, trial in enumerate(trials):
        rows = torch.tensor([position[tuple(k)] for k in trial.keys], dtype=torch.long)
        table[t, rows] = trial.probabilities
    return keys, table


class Scorer:
    """F1 of a recipe on one half, from the aligned probabilities (the official-equivalent scorer)."""

    def __init__(self, keys: Sequence[tuple[str, str, str]], table: torch.Tensor, half: Half):
        self.half = half
        self.keys = [keys[int(i)] for i in half.rows]
        self.table = table[:, half.rows]

    def ranking(self, recipe: Recipe) -> torch.Tensor:
        members = list(recipe.members)
        weights = torch.tensor([float(recipe.members[m]) for m in members])
        return combine(self.table[members], recipe.vote, weights)[0]

    def score(self, recipe: Recipe, ranking: torch.Tensor | None = None):
        ranking = self.ranking(recipe) if ranking is None else ranking
        predicted = [(self.keys[i][0], LABELS[label], self.keys[i][1], self.keys[i][2])
                     for i, label in recipe.decision.choose(ranking)]
        return score(self.half.documents, predicted)

    def f1(self, recipe: Recipe) -> float:
        return self.score(recipe).f1


def best_single(scorer: Scorer, trials: int) -> Recipe:
    f1 = [scorer.f1(Recipe("", {t: 1})) for t in range(trials)]
    best = max(range(trials), key=lambda t: (f1[t], -t))
    return Recipe("best single trial", {best: 1})


def _better_vote(scorer: Scorer, recipe: Recipe) -> Recipe:
    """The recipe with the vote (hard or soft) that scores higher on the scorer's half; ties keep hard."""
    options = [replace(recipe, vote=v) for v in ("hard", "soft")]
    return max(options, key=lambda r: (scorer.f1(r), r.vote == "hard"))


def top_k(scorer: Scorer, trials: int, k: int) -> Recipe:
    f1 = [scorer.f1(Recipe("", {t: 1})) for t in range(trials)]
    ranked = sorted(range(trials), key=lambda t: (-f1[t], t))[:k]
    return _better_vote(scorer, Recipe(f"top-{len(ranked)} by F1", dict.fromkeys(ranked, 1)))


def greedy(scorer: Scorer, trials: int, *, max_size: int, vote: str,
           progress: Callable[[int], None] | None = None) -> Recipe:
    """Forward selection with replacement on the scorer's half: add the trial that helps most, up to ``max_size``
    votes; keep the best prefix. Ties go to fewer distinct members (a repeat first), then to the better trial."""
    check_vote(vote)
    members: dict[int, int] = {}
    best_members, best_f1 = None, -1.0
    for _ in range(max_size):
        def gain(t: int) -> tuple[float, bool, int]:
            trial = {**members, t: members.get(t, 0) + 1}
            return scorer.f1(Recipe("", trial, vote)), t in members, -t

        chosen = max(range(trials), key=gain)
        members = {**members, chosen: members.get(chosen, 0) + 1}
        f1 = scorer.f1(Recipe("", members, vote))
        if progress:
            progress(1)
        if f1 > best_f1:  # strict: an equal prefix is smaller
            best_members, best_f1 = dict(members), f1
    return Recipe("greedy", best_members or {0: 1}, vote)


def calibrate_margin(scorer: Scorer, recipe: Recipe) -> Recipe:
    ranking = scorer.ranking(recipe)
    options = [replace(recipe, decision=Decision(margin=m)) for m in MARGINS]
    best = max(options, key=lambda r: (round(scorer.score(r, ranking).f1, 12), -abs(r.decision.margin)))
    return replace(best, label=f"{recipe.label} + margin")


def calibrate_thresholds(scorer: Scorer, recipe: Recipe) -> Recipe:
    """One pass of coordinate ascent over the 13 types' minimum ranking; a threshold stays only if it helps."""
    ranking = scorer.ranking(recipe)
    current, best_f1 = dict(recipe.decision.thresholds), scorer.score(recipe, ranking).f1
    for rtype in LABELS[1:]:
        for value in TYPE_THRESHOLDS[1:]:
            trial = replace(recipe, decision=replace(recipe.decision, thresholds={**current, rtype: value}))
            f1 = scorer.score(trial, ranking).f1
            if f1 > best_f1:
                best_f1, current = f1, {**current, rtype: value}
    return replace(recipe, label=f"{recipe.label} + type thresholds",
                   decision=replace(recipe.decision, thresholds=current))


def calibrate_second_type(scorer: Scorer, recipe: Recipe) -> Recipe:
    ranking = scorer.ranking(recipe)
    options = [replace(recipe, decision=replace(recipe.decision, second_type=v)) for v in SECOND_TYPE]
    best = max(options, key=lambda r: (scorer.score(r, ranking).f1, r.decision.second_type))
    return replace(best, label=f"{recipe.label} + multi-label")


def choose(scorer: Scorer, trials: Sequence[TrialProbabilities], *, select: str, top: int, max_size: int,
           multi_label: bool, progress: Callable[[int], None] | None = None) -> tuple[list[Recipe], Recipe]:
    """Every candidate recipe chosen on the scorer's half, and the one ``select`` keeps (best on this half)."""
    n = len(trials)
    single = best_single(scorer, n)
    recipes = [single, top_k(scorer, n, min(top, n))]
    configuration = trials[next(iter(single.members))].configuration
    seeds = [t for t in range(n) if configuration and trials[t].configuration == configuration]
    if len(seeds) > 1:
        recipes.append(_better_vote(scorer, Recipe(f"{len(seeds)} seeds of the best configuration", dict.fromkeys(seeds, 1))))
    options = [greedy(scorer, n, max_size=max_size, vote=v, progress=progress) for v in ("hard", "soft")]
    chosen_greedy = max(options, key=lambda r: (scorer.f1(r), -len(r.members), -r.size, r.vote == "hard"))
    margin = calibrate_margin(scorer, chosen_greedy)
    thresholds = calibrate_thresholds(scorer, margin)
    second = calibrate_second_type(scorer, thresholds)
    recipes += [chosen_greedy, margin, thresholds, second]
    if select == "greedy":
        pool = [chosen_greedy, margin, thresholds] + ([second] if multi_label else [])
    elif select == "top-k":
        pool = [recipes[1]]
    else:
        raise EnsembleError(f"--select must be greedy or top-k, got {select!r}")
    kept = max(pool, key=lambda r: (round(scorer.f1(r), 12), -len(r.members), -r.size, -pool.index(r)))
    return recipes, kept


def compare(trials: Sequence[TrialProbabilities], documents: Sequence, *, select: str = "greedy",
            top: int = 5, max_size: int = DEFAULT_MAX_SIZE, multi_label: bool = False,
            progress: Callable[[int], None] | None = None) -> Comparison:
    """The A/B table of every candidate (see the module docstring), on the trials' own A/B split."""
    if not trials:
        raise EnsembleError("no trial with stored dev probabilities to choose from")
    if max_size < 1:
        raise EnsembleError(f"--max-size must be at least 1, got {max_size}")
    keys, table = align(trials)
    pmids = {d.pmid for d in documents}
    outside = sorted({k[0] for k in keys} - pmids)
    if outside:
        raise EnsembleError(f"the trials' dev probabilities cover document(s) {', '.join(outside[:3])} that are not in "
                            f"the dev documents given ({len(documents)}); pass the dev corpus the study used (--data, --split)")

    def half(name: str, docs: Sequence) -> Half:
        chosen = {d.pmid for d in docs}
        return Half(name, list(docs), torch.tensor([i for i, k in enumerate(keys) if k[0] in chosen], dtype=torch.long))

    seed = stored_selection_seed(trials)
    halves = split_halves(documents, seed)
    a, b = half("A", halves.a), half("B", halves.b)
    on_a, on_b = Scorer(keys, table, a), Scorer(keys, table, b)
    recipes, kept = choose(on_a, trials, select=select, top=top, max_size=max_size, multi_label=multi_label,
                           progress=progress)
    candidates = [Candidate(r, on_a.f1(r), on_b.score(r)) for r in recipes]
    chosen = next(c for c in candidates if c.recipe is kept)
    multi = next((c for c in candidates if c.recipe.decision.second_type is not None), None)
    single_type = next((c for c in candidates if c.recipe.label.endswith("type thresholds")), None)
    helps = None if multi is None or single_type is None else multi.b.f1 > single_type.b.f1
    return Comparison([t.name for t in trials], (a, b), seed, candidates, chosen, helps)


def study_trial_probabilities(records: Sequence, tracking_uri: str, work, *,
                              log: Callable[[str], None]) -> list[TrialProbabilities]:
    """The stored dev probabilities of a study's finished trials (best first); trials without them are named."""
    from drugprot import tracking
    from drugprot.ensemble.members import configuration, is_finished, member_name
    from drugprot.model.dev_probabilities import load_dev_probabilities

    trials, missing = [], []
    for record in records:
        if not is_finished(record):
            continue
        name = member_name(record)
        path = tracking.download_trial_dev_probabilities(record, work / name, tracking_uri)
        if path is None:
            missing.append(str(record.trial_id))
            continue
        stored = load_dev_probabilities(path)
        if stored.labels != LABELS:
            raise EnsembleError(f"trial {record.trial_id}: {path.name} has labels {list(stored.labels)}, expected {list(LABELS)}")
        trials.append(TrialProbabilities(name, stored.keys, stored.probabilities, configuration(record), record,
                                         stored.selection_seed))
    if missing:
        log(f"note: {len(missing)} finished trial(s) have no stored dev probabilities (trained before they were "
            f"kept) and are left out: {', '.join(missing[:5])}")
    return trials
