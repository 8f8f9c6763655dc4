"""Assemble an ensemble folder from member folders, evaluate it on dev, and load it back.

:func:`build_ensemble` copies each (verified) member folder under ``members/NAME/``, evaluates every member and
the vote side by side on the development documents (one stacked forward gives all members' probabilities),
writes ``ensemble.json`` and a sha256 manifest of every file, and moves the staged folder into place.
``drugprot.inference.loading.Predictor.from_ensemble`` verifies the manifest and loads the members as one Predictor.
``ensemble.json`` also records the early exit calibrated on the dev pairs of half A (``drugprot predict
--early-exit``): like every other choice, it never sees half B, whose scores are reported apart and gate promotion.
The halves are the members' own (``data.selection_seed`` of their configs, drugprot.dev_halves).

Members trained on the development documents (``data.final``) leave nothing to score on: the ensemble is built
without a dev evaluation, and ``ensemble.json`` names them under ``trained_on_dev`` (:data:`NO_DEV_SCORE`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drugprot.config import DataConfig
from drugprot.dev_halves import NO_DEV_SCORE
from drugprot.ensemble_folder import (ENSEMBLE_JSON, FORMAT_VERSION, KIND, MEMBERS_DIR, EnsembleError, check_member_name,
                                      check_vote, write_tree_manifest)


def trained_on_dev(info: dict[str, Any]) -> bool:
    """Whether a member's development documents were training documents (a ``data.final`` run)."""
    return bool(((info.get("config") or {}).get("data") or {}).get("final"))


@dataclass
class MemberSource:
    """A member folder to put in an ensemble, with what is known about where it came from."""

    path: Path
    name: str | None = None
    dev_f1_a: float | None = None  # default: the F1 on dev half A recorded in the member's drugprot.json
    seed: int | None = None  # default: train.seed of the member's config
    source: dict[str, Any] = field(default_factory=dict)  # e.g. study, trial_id, run_id
    weight: int = 1  # votes it casts (a greedy selection with replacement may pick a trial more than once)


@dataclass
class Evaluation:
    """Dev scores of each member and of the ensemble, computed from one pass of member probabilities: on the whole
    dev set (per type) and on the held-out half B."""

    split: str
    documents: int
    vote: str
    scores: dict[str, Any]  # name -> drugprot.scoring.Score on all documents; members first, "ensemble" last
    held_out: dict[str, Any]  # the same names -> Score on half B
    halves: dict[str, Any]  # drugprot.dev_halves.DevHalves.describe()
    early_exit: dict[str, Any] | None = None  # drugprot.ensemble.early_exit.calibrate_early_exit on the half-A pairs

    @property
    def ensemble(self):
        return self.scores["ensemble"]

    def table(self) -> str:
        """Per-type F1 rows, then micro P/R/F1, one column per member and one for the ensemble."""
        names = list(self.scores)
        width = max(10, *(len(n) for n in names))
        types: list[str] = []
        for result in self.scores.values():
            types.extend(t for t in result.per_type if t not in types)
        b = self.halves["B"]
        lines = [f"dev: {self.split}, {self.documents} documents, {self.vote} vote; per-type F1, then micro P/R/F1; "
                 f"the last rows on half B only ({b['documents']} documents, seed {self.halves['seed']}), held out "
                 f"from every choice",
                 f"{'type':<24}" + "".join(f" {n:>{width}}" for n in names)]
        for rtype in types:
            lines.append(f"{rtype:<24}" + "".join(
                f" {r.per_type[rtype].f1 if rtype in r.per_type else 0.0:>{width}.4f}" for r in self.scores.values()))
        for label, attr in (("micro P", "precision"), ("micro R", "recall"), ("micro F1", "f1")):
            lines.append(f"{label:<24}" + "".join(f" {getattr(r, attr):>{width}.4f}" for r in self.scores.values()))
        for label, attr in (("B micro P", "precision"), ("B micro R", "recall"), ("B micro F1", "f1")):
            lines.append(f"{label:<24}" + "".join(f" {getattr(r, attr):>{width}.4f}" for r in self.held_out.values()))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        def one(result) -> dict[str, Any]:
            return {"precision": round(result.precision, 6), "recall": round(result.recall, 6), "f1": round(result.f1, 6),
                    "tp": result.micro.tp, "fp": result.micro.fp, "fn": result.micro.fn,
                    "per_type": {t: round(c.f1, 6) for t, c in result.per_type.items()}}

        def micro(result) -> dict[str, Any]:
            return {key: value for key, value in one(result).items() if key != "per_type"}

        return {"split": self.split, "documents": self.documents, "vote": self.vote,
                "ensemble": one(self.ensemble),
                "members": {name: one(r) for name, r in self.scores.items() if name != "ensemble"},
                "halves": self.halves,
                "held_out_b": {"ensemble": micro(self.held_out["ensemble"]),
                               "members": {name: micro(r) for name, r in self.held_out.items() if name != "ensemble"}}}


@dataclass
class BuiltEnsemble:
    path: Path
    meta: dict[str, Any]
    evaluation: Evaluation | None

    @property
    def dev_f1(self) -> float | None:
        return self.meta.get("dev", {}).get("ensemble", {}).get("f1") if self.meta.get("dev") else None


EVALUATION_CHUNK = 32  # documents per progress step


def evaluate(predictor, documents: Sequence, names: Sequence[str], *, selection_seed: int, split: str = "development",
             vote: str | None = None, progress: bool = False) -> Evaluation:
    """Score each member alone (its argmax) and the vote on ``documents`` and on their half B (``selection_seed``)
    with the official-equivalent scorer; calibrate the early exit on the half-A pairs.

    ``progress`` shows a bar over the documents on stderr (the members run on chunks of them)."""
    import torch
    from tqdm import tqdm

    from drugprot.dev_halves import score_halves, split_halves
    from drugprot.encoding import LABELS
    from drugprot.ensemble.early_exit import calibrate_early_exit
    from drugprot.inference.voting import decode

    vote = vote or predictor.vote_mode
    candidates, chunks = [], []
    with tqdm(total=len(documents), unit="doc", desc="dev evaluation", disable=not progress, file=sys.stderr,
              mininterval=1.0, dynamic_ncols=True) as bar:
        for start in range(0, len(documents), EVALUATION_CHUNK):
            part = documents[start:start + EVALUATION_CHUNK]
            found = predictor.candidates(part)
            candidates.extend(found)
            chunks.append(predictor.member_probabilities(part, found))
            bar.update(len(part))
    probabilities = torch.cat(chunks, dim=1) if chunks else torch.zeros((len(predictor.members), 0, len(LABELS)))
    halves = split_halves(documents, selection_seed)
    scores: dict[str, Any] = {}
    held_out: dict[str, Any] = {}

    def add(name: str, relations) -> None:
        by_half = score_halves(halves, [(r.pmid, r.type, r.chemical, r.gene) for r in relations])
        scores[name], held_out[name] = by_half["all"], by_half["b"]

    for m, name in enumerate(names):
        add(name, decode(candidates, probabilities[m:m + 1], "hard"))
    add("ensemble", decode(candidates, probabilities, vote, weights=predictor.weights,
                           decision=predictor.decision))  # ``vote`` may override the model's
    on_a = torch.tensor([i for i, c in enumerate(candidates) if c.pmid in halves.a_pmids], dtype=torch.long)
    early_exit = calibrate_early_exit(probabilities[:, on_a], weights=predictor.weights, mode=vote,
                                      decision=predictor.decision)
    return Evaluation(split, len(documents), vote, scores, held_out, halves.describe(), early_exit)


def selection_seed(infos: Sequence[dict[str, Any]], names: Sequence[str]) -> int:
    """The members' common ``data.selection_seed`` (their configs'; the default where a config has none): members
    whose checkpoints were chosen on different splits leave no half that none of them has seen, so they are refused."""
    default = DataConfig.model_fields["selection_seed"].default
    seeds: dict[int, list[str]] = {}
    for name, info in zip(names, infos):
        data = (info.get("config") or {}).get("data") or {}
        seeds.setdefault(int(data.get("selection_seed", default)), []).append(name)
    if len(seeds) > 1:
        found = "; ".join(f"{seed}: {', '.join(n)}" for seed, n in sorted(seeds.items()))
        raise EnsembleError(f"the members were trained on different dev splits (data.selection_seed {found}); "
                            "choose members of one split, so that half B stays held out for all of them")
    return next(iter(seeds), default)


def member_info(path: Path) -> dict[str, Any]:
    from drugprot.model.artifacts import INFO, verify_manifest

    path = Path(path)
    if not path.is_dir():
        raise EnsembleError(f"member {path}: no such folder")
    verify_manifest(path)
    return json.loads((path / INFO).read_text())


def dev_documents(info: dict[str, Any], *, data_dir: str | Path | None = None, split: str | None = None):
    """The development documents a member was scored on (its config's data section), or ``data_dir``/``split``."""
    from drugprot.corpus import read_split

    data = (info.get("config") or {}).get("data") or {}
    own = data_dir is None and split is None  # exactly what the members were scored on, max_dev_docs included
    folder = Path(data_dir or data.get("dir") or "")
    split = split or data.get("dev_split") or "development"
    if not folder.is_dir():
        raise EnsembleError(f"dev data {folder}: no such corpus folder (the members were trained on it); "
                            "pass --data DIR [--split NAME] to evaluate the ensemble on a corpus that exists here")
    documents = read_split(folder, split).documents
    limit = data.get("max_dev_docs") if own else None
    return (documents[:limit] if limit else documents), split


def build_ensemble(members: Sequence[MemberSource | Path | str], out: str | Path, *, vote: str = "hard",
                   interval: tuple[int, int] | None = None, documents: Sequence | None = None,
                   split: str = "development", evaluate_on_dev: bool = True, source: dict[str, Any] | None = None,
                   device: str = "cpu", log: Callable[[str], None] | None = None, decision=None,
                   selection: dict[str, Any] | None = None, progress: bool = False) -> BuiltEnsemble:
    """Write an ensemble folder at ``out`` (which must not exist or be empty) and return it with its dev scores.

    ``documents`` are the dev documents (default: the first member's dev split, see :func:`dev_documents`).
    The interval defaults to the first member's (members are given best first). ``decision``
    (a :class:`drugprot.inference.voting.Decision`) and ``selection`` (the A/B table it came from) are recorded in
    ``ensemble.json``.
    """
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    check_vote(vote)
    sources = [m if isinstance(m, MemberSource) else MemberSource(Path(m)) for m in members]
    if not sources:
        raise EnsembleError("an ensemble needs at least one member")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EnsembleError(f"--out {out}: already exists and is not empty; choose another folder or remove it")
    infos = [member_info(s.path) for s in sources]
    entries, names = [], []
    for i, (src, info) in enumerate(zip(sources, infos)):
        seed = src.seed if src.seed is not None else ((info.get("config") or {}).get("train") or {}).get("seed")
        name = check_member_name(src.name or (f"m{i + 1}-seed{seed}" if seed is not None else f"m{i + 1}"))
        if name in names:
            raise EnsembleError(f"member name {name!r} is used twice; give the members distinct names")
        names.append(name)
        dev_f1_a = src.dev_f1_a if src.dev_f1_a is not None else (info.get("dev") or {}).get("dev_f1_a")
        entries.append({"name": name, "path": f"{MEMBERS_DIR}/{name}", "dev_f1_a": dev_f1_a, "seed": seed,
                        "encoder": info.get("encoder"), "system": info.get("system"), "markers": info.get("markers"),
                        "max_length": info.get("max_length"), "interval": info.get("interval"), "source": src.source,
                        "weight": int(src.weight)})
    intervals = {tuple(e["interval"]) for e in entries if e["interval"]}
    chosen = tuple(interval) if interval else tuple(entries[0]["interval"] or ())
    if len(intervals) > 1 and not interval:
        say(f"members were trained with different GENE intervals {sorted(intervals)}; the ensemble uses {list(chosen)}")
    encoders = sorted({str(e["encoder"]) for e in entries})
    split_seed = selection_seed(infos, names)
    seen_dev = [name for name, info in zip(names, infos) if trained_on_dev(info)]
    if seen_dev and evaluate_on_dev:
        say(f"members {', '.join(seen_dev)} trained on the development documents: no dev score is computed")
        evaluate_on_dev = False

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for src, entry in zip(sources, entries):
            shutil.copytree(src.path, staging / entry["path"])
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "kind": KIND, "vote": vote, "interval": list(chosen),
            "encoder": encoders[0] if len(encoders) == 1 else encoders, "members": entries, "dev": None,
            "selection_seed": split_seed,
            "source": source or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if decision is not None and not decision.is_argmax:
            meta["decision"] = decision.as_dict()
        if selection is not None:
            meta["selection"] = selection
        if seen_dev:
            meta.update(trained_on_dev=seen_dev, dev_score=NO_DEV_SCORE)
        evaluation = None
        if evaluate_on_dev:
            if documents is None:
                documents, split = dev_documents(infos[0])
            predictor = _unverified_predictor(staging, meta, device=device)
            evaluation = evaluate(predictor, documents, names, selection_seed=split_seed, split=split, vote=vote,
                                  progress=progress)
            meta["dev"] = evaluation.as_dict()
            if evaluation.early_exit is not None:
                meta["early_exit"] = evaluation.early_exit
            meta["execution"] = predictor.execution
        (staging / ENSEMBLE_JSON).write_text(json.dumps(meta, indent=1))
        write_tree_manifest(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuiltEnsemble(out, meta, evaluation)


def _unverified_predictor(staging: Path, meta: dict[str, Any], *, device: str):
    """The staged ensemble as a Predictor, before its manifest exists (only build_ensemble may skip the check)."""
    from drugprot.inference.loading import Predictor
    from drugprot.inference.voting import Decision
    from drugprot.model.artifacts import load_artifact

    members = [load_artifact(staging / entry["path"], device="cpu") for entry in meta["members"]]
    weights = [entry["weight"] for entry in meta["members"]]
    return Predictor(members, vote=meta["vote"], interval=tuple(meta["interval"]), device=device, metadata=meta,
                     weights=weights if any(w != 1 for w in weights) else None,
                     decision=Decision.from_dict(meta.get("decision")))
