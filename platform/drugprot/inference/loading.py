"""From a model folder, an ensemble folder or a registry URI to a :class:`~drugprot.inference.plan.Plan` and a
:class:`~drugprot.inference.scorers.Scorer`, held together by a :class:`Predictor`: the one inference path behind
evaluation in training, ``drugprot predict``, bulk prediction, the MLflow pyfunc and the Serve model replica.

documents → Plan.prepare (candidates) → Scorer.probabilities (FGEMR gene typing, marker encoding, members) →
Plan.decode (vote, decision) → relations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from drugprot.candidates import DEFAULT_INTERVAL, Candidate
from drugprot.corpus import Document, Relation
from drugprot.encoding import PairEncoder
from drugprot.inference.options import InferenceOptions, inference_options
from drugprot.inference.plan import Job, Plan
from drugprot.inference.scorers import (CascadeScorer, EarlyExit, PlainScorer, Scorer, SettledPairs, Stage,
                                        StackedScorer)
from drugprot.inference.voting import Decision, PredictedRelation, VoteRule
from drugprot.model.runtime import resolve_device


def build_scorer(members: Sequence, options: InferenceOptions, rule: VoteRule, device: torch.device) -> Scorer:
    """The stages that run ``members`` as ``options`` say. ``execution`` ``auto`` stacks same-architecture members on
    an accelerator (``fold``) and runs members in turn on CPU, where skipping settled pairs beats the stacked forward
    (1.6x with 5 MiniLM members, see bench/cpu_predict.py); a forced stack of incompatible members raises.
    cascade and the early exit run members in turn."""
    problem = options.device_problem(device.type)
    if problem:
        raise ValueError(problem)
    if options.early_exit == "calibrated":
        raise ValueError("early_exit 'calibrated' is resolved from an ensemble folder; load one with from_ensemble")
    for member in members:
        member.model.to(device).eval()
        if member.gene_typer is not None:
            member.gene_typer.to(device).eval()
    # One encoder per member, built once: a Serve replica scores a batch with it on every call.
    encoders = [PairEncoder(m.tokenizer, max_length=m.info["max_length"], markers=m.info["markers"],
                            context=m.info.get("context", "sentence")) for m in members]
    in_turn = options.execution == "loop" or options.precision == "cascade" or options.early_exit is not None
    if len(members) > 1 and not in_turn and not (options.execution == "auto" and device.type == "cpu"):
        from drugprot.model.stacked import stack_incompatibility

        reason = stack_incompatibility(members)
        if reason is not None and options.execution != "auto":
            raise ValueError(f"execution {options.execution!r}: these members cannot run stacked ({reason})")
        if reason is None:
            stacked = StackedScorer([m.model for m in members], pad_id=members[0].tokenizer.pad_token_id,
                                    device=device, precision=options.precision)
            return Scorer(members, [Stage(0, stacked, encoders[0])], device=device, execution="fold")
    stages = []
    for m, (member, encoder) in enumerate(zip(members, encoders)):
        pad_id = member.tokenizer.pad_token_id
        if options.precision == "cascade":
            scorer = CascadeScorer(member.model, pad_id=pad_id, device=device, margin=options.margin)
        else:
            scorer = PlainScorer(member.model, pad_id=pad_id, device=device, precision=options.precision)
        stages.append(Stage(m, scorer, encoder, member if member.gene_typer is not None else None))
    closing = None
    if len(members) > 1 and not rule.decision.multilabel:  # the bounds hold for single-label votes
        closing = (SettledPairs(rule, len(members)) if options.early_exit is None
                   else EarlyExit(rule, len(members), options.early_exit))
    return Scorer(members, stages, device=device, execution="loop", closing=closing)


class Predictor:
    """Loaded members (one model or an ensemble) that map documents to relations: a Plan and a Scorer."""

    def __init__(self, members: Sequence, *, device: str | torch.device = "auto", weights: Sequence[int] | None = None,
                 decision: Decision | None = None, metadata: dict | None = None,
                 options: InferenceOptions | None = None, **option_values):
        """``weights``: how many times each member counts in the vote (a greedy selection may pick one twice);
        ``decision``: how the vote becomes relations (default: argmax); ``options`` (or its fields as keywords):
        how the members run (drugprot.inference.options)."""
        if not members:
            raise ValueError("a Predictor needs at least one member")
        if weights is not None and any(int(w) != w or w < 1 for w in weights):
            raise ValueError(f"weights must be one positive integer per member ({len(members)}), got {list(weights)}")
        self.options = options or inference_options("keyword", **option_values)
        labelling = {bool(getattr(m.model, "multilabel", False)) for m in members}
        if len(labelling) > 1:
            raise ValueError("members mix multi-label and single-label models; their votes mean different things")
        multilabel = labelling.pop()
        if decision is not None and decision.multilabel != multilabel:
            raise ValueError(f"the decision is {'' if decision.multilabel else 'not '}multi-label, but the members are "
                             f"{'' if multilabel else 'not '}(model.multilabel)")
        if multilabel and self.options.early_exit is not None:
            raise ValueError("early_exit bounds single-label votes; multi-label members run every pair")
        self.plan = Plan(len(members), tuple(self.options.interval or DEFAULT_INTERVAL),
                         VoteRule(self.options.vote or "hard", None if weights is None else tuple(int(w) for w in weights),
                                  decision or Decision(multilabel=multilabel)))
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.scorer = build_scorer(list(members), self.options, self.plan.rule, self.device)
        self.metadata = metadata or {}

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "auto", **overrides) -> Predictor:
        """A trained model folder (``drugprot train --out DIR`` → ``DIR/model``) or an ensemble folder."""
        from drugprot.ensemble_folder import ENSEMBLE_JSON
        from drugprot.model.artifacts import load_artifact

        path = model_folder(path)
        if (path / ENSEMBLE_JSON).is_file():
            return cls.from_ensemble(path, device=device, **overrides)
        options = _options(overrides)
        early_exit_for(path, options.early_exit)  # refuses one
        loaded = load_artifact(path, device="cpu")
        options = options.model_copy(update={"interval": options.interval or tuple(loaded.info["interval"])})
        return cls([loaded], device=device, options=options)

    @classmethod
    def from_ensemble(cls, folder: str | Path, *, device: str = "auto", **overrides) -> Predictor:
        """Verify an ensemble folder (every file's sha256, see drugprot.ensemble_folder) and load its members.

        ``overrides``: an ``options`` object or its fields; ``early_exit`` may be ``"calibrated"``: the confidence
        ``ensemble.json`` records."""
        from drugprot.ensemble_folder import EnsembleError, check_vote, read_ensemble_folder
        from drugprot.model.artifacts import load_artifact

        folder = Path(folder)
        meta = read_ensemble_folder(folder)
        if isinstance(overrides.get("vote"), str):
            check_vote(overrides["vote"])
        options = _options(overrides)
        try:
            plan = Plan.from_json(meta, options, where=str(folder / "ensemble.json"))
        except ValueError as error:
            raise EnsembleError(str(error)) from None
        options = options.model_copy(update={"early_exit": early_exit_for(folder, options.early_exit),
                                             "vote": plan.rule.mode, "interval": plan.interval})
        members = [load_artifact(folder / entry["path"], device="cpu") for entry in meta["members"]]
        return cls(members, device=device, metadata=meta, weights=plan.rule.weights, decision=plan.rule.decision,
                   options=options)

    # ---- what the composition offers its callers ------------------------------------------------------------
    @property
    def members(self) -> list:
        return self.scorer.members

    @property
    def vote_mode(self) -> str:
        return self.plan.rule.mode

    @property
    def weights(self) -> torch.Tensor | None:
        return None if self.plan.rule.weights is None else self.plan.rule.weight_tensor(self.plan.members)

    @property
    def decision(self) -> Decision:
        return self.plan.rule.decision

    @property
    def interval(self) -> tuple[int, int]:
        return self.plan.interval

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def cascade_margin(self) -> float:
        return self.options.margin

    @property
    def early_exit(self) -> float | None:
        return self.options.early_exit

    @property
    def execution(self) -> str:
        return self.scorer.execution

    @property
    def scored_pairs(self) -> int:
        return self.scorer.scored_pairs

    @scored_pairs.setter
    def scored_pairs(self, value: int) -> None:
        self.scorer.scored_pairs = value

    @property
    def rescored_pairs(self) -> int:
        return self.scorer.rescored_pairs

    @rescored_pairs.setter
    def rescored_pairs(self, value: int) -> None:
        self.scorer.rescored_pairs = value

    @property
    def exited_pairs(self) -> int:
        return self.scorer.exited_pairs

    @exited_pairs.setter
    def exited_pairs(self, value: int) -> None:
        self.scorer.exited_pairs = value

    def candidates(self, documents: Sequence[Document], interval: tuple[int, int] | None = None) -> list[Candidate]:
        return list(self.plan.prepare(documents, interval).candidates)

    def member_probabilities(self, documents: Sequence[Document], candidates: Sequence[Candidate], *,
                             skip_settled: bool = False) -> torch.Tensor:
        """(M, N, L) probabilities of the candidates (see :class:`~drugprot.inference.scorers.Scorer`)."""
        return self.scorer.probabilities(Job(documents, candidates), skip_settled=skip_settled)

    def decode(self, candidates: Sequence[Candidate], member_probs: torch.Tensor,
               threshold: float = 0.0) -> list[PredictedRelation]:
        """This model's vote (mode, member weights) and decision over (M, N, L) member probabilities."""
        return self.plan.rule.decode(candidates, member_probs, threshold)

    def predict(self, documents: Sequence[Document], *, interval: tuple[int, int] | None = None,
                threshold: float = 0.0) -> list[list[PredictedRelation]]:
        """Relations per document (same order); ``threshold`` drops relations whose score is below it."""
        job = self.plan.prepare(documents, interval)
        relations = self.plan.decode(job, self.scorer.probabilities(job, skip_settled=True), threshold)
        return self.plan.by_document(documents, relations)


def _options(overrides: dict[str, Any]) -> InferenceOptions:
    """An ``options`` object, or options from keywords; nothing else is taken."""
    options = overrides.pop("options", None)
    if options is not None and overrides:
        raise TypeError(f"give options or its fields, not both (got {', '.join(sorted(overrides))})")
    return options or inference_options("keyword", **overrides)


def model_folder(path: str | Path) -> Path:
    """A model or ensemble folder, or a ``drugprot train --out`` folder (its ``model/``)."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() and not (path / "manifest.json").exists() else path


def early_exit_for(path: str | Path, early_exit: float | str | None) -> float | None:
    """The early-exit confidence the model at ``path`` runs with: ``early_exit`` itself, or for ``"calibrated"`` the
    one its ``ensemble.json`` records. Reads no weights, so a driver can check before its workers load the model."""
    from drugprot.ensemble_folder import ENSEMBLE_JSON, EnsembleError

    if early_exit is None:
        return None
    path = model_folder(path)
    if not path.is_dir():
        raise EnsembleError(f"early exit: {path}: no such model folder")
    if not (path / ENSEMBLE_JSON).is_file():
        raise EnsembleError(f"early exit: {path} is a single model; members leave pairs early only in an ensemble")
    if early_exit != "calibrated":
        return float(early_exit)
    calibrated = (json.loads((path / ENSEMBLE_JSON).read_text()).get("early_exit") or {}).get("confidence")
    if calibrated is None:
        raise EnsembleError(f"{path / ENSEMBLE_JSON}: no calibrated early exit (built before calibration, or its dev "
                            f"pairs had no relation); rebuild the ensemble or give a confidence")
    return float(calibrated)


def relation_rows(documents: Sequence[Document], predictions: Sequence[Sequence[PredictedRelation]]) -> list[tuple[str, Relation]]:
    return [(doc.pmid, p.as_relation()) for doc, preds in zip(documents, predictions) for p in preds]


def load_predictor(model: str | Path, *, device: str = "auto", tracking_uri: str | None = None,
                   verify_key: str | Path | None = None, **overrides) -> Predictor:
    """A folder, or a registry URI ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` resolved through MLflow and
    checked against its registered manifest digest; with ``verify_key``, only a model signed by that key.
    ``overrides``: an ``options`` object or its fields."""
    from drugprot.registry import resolve_model_folder

    path = resolve_model_folder(model, tracking_uri=tracking_uri, verify_key=verify_key)
    return Predictor.from_path(path, device=device, **overrides)
