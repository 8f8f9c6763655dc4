"""Documents in, relations out: the one inference path behind evaluation in training, ``drugprot predict``,
the MLflow pyfunc and the Ray Serve deployment.

documents → candidates (GENE interval) → FGEMR gene typing (if a member has a gene typer) → marker encoding →
member probabilities → vote → relations. Voting: ``hard`` takes each member's top label and the majority wins
(ties go to the tied label with the highest mean probability); ``soft`` averages probabilities. A pair gets one
label (its argmax); multi-label training pairs only spread their target mass (see candidates/encoding).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from drugprot.candidates import DEFAULT_INTERVAL, Candidate, document_candidates
from drugprot.corpus import Document, Relation
from drugprot.decision import NONE_INDEX, Decision
from drugprot.encoding import LABELS, EncodedPair, PairEncoder, iterate_batches, token_budget_batches
from drugprot.model.runtime import autocast, bf16_copy, quantize_int8, resolve_device

# bf16 applies on CUDA only (CPU runs fp32); int8 and cascade are CPU only
PRECISIONS = ("bf16", "fp32", "int8", "cascade")
#: cascade: pairs whose bf16 top-2 probability margin is below this are re-scored in fp32. On the development set bf16
#: moved a probability by at most 0.0033 (MiniLM demo champion) and 0.0078 (a better-trained MiniLM), and 0.01 kept
#: every label of both (bench/cpu_predict.py measures it for any model).
CASCADE_MARGIN = 0.01
#: the early exit's calibration (:func:`calibrate_early_exit`): the confidences tried, lowest first, and the share of
#: the full vote's relations it must agree on
EXIT_CONFIDENCES = tuple(round(0.5 + i / 100, 2) for i in range(50))
EXIT_AGREEMENT = 0.999


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


@torch.no_grad()
def pair_probabilities(model, pairs: Sequence[EncodedPair], *, pad_id: int, device: torch.device,
                       precision: str = "bf16", token_budget: int = 16384, max_pairs: int = 256) -> torch.Tensor:
    """Softmax over LABELS for each encoded pair, in the order given; (len(pairs), len(LABELS)) float32 on CPU.
    The encoder's last layer computes the two marker states only (drugprot.model.marker_states)."""
    model.eval()
    out = torch.zeros((len(pairs), len(LABELS)))
    batches = token_budget_batches(pairs, token_budget=token_budget, max_pairs=max_pairs)
    with autocast(device, precision):
        relations = model.relation_states()  # the definitions, encoded once for the whole call
    for members, batch in zip(batches, iterate_batches(pairs, batches, pad_id)):
        batch = batch.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(batch.input_ids, batch.attention_mask, batch.subject, batch.object, relations,
                           markers_only=True)["logits"]
        out[torch.tensor(members)] = torch.softmax(logits.float(), dim=-1).cpu()
    return out


def rescore_close_calls(model, pairs: Sequence[EncodedPair], probs: torch.Tensor, *, margin: float, pad_id: int,
                        device: torch.device) -> int:
    """The cascade's second stage: replace, in place, the probabilities of pairs whose top-2 margin is below
    ``margin`` with the fp32 ``model``'s; returns how many pairs were re-scored."""
    top2 = probs.topk(2, dim=-1).values
    close = ((top2[:, 0] - top2[:, 1]) < margin).nonzero()[:, 0]
    if len(close):
        probs[close] = pair_probabilities(model, [pairs[i] for i in close.tolist()], pad_id=pad_id, device=device,
                                          precision="fp32")
    return len(close)


def combine(member_probs: torch.Tensor, mode: str = "hard", weights: torch.Tensor | None = None, *,
            multilabel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (M, N, L) member probabilities (each member counted ``weights[m]`` times, default once).

    Returns (ranking (N, L), score (N, L)): ``soft`` ranks and scores by the weighted mean probability; ``hard``
    scores by the weighted vote share of each member's top label and ranks by that share with ties broken by the
    weighted mean probability (a nudge smaller than one vote). Multi-label members (``multilabel``) vote for every
    type whose probability beats NONE's; a type then needs more than half the votes, so NONE's ranking is one half."""
    if mode not in ("hard", "soft"):
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


#: float slack for :func:`settled_as_none`: a pair within this of passing is not settled (the final vote sums members
#: in another order than the bound)
SETTLE_SLACK = 1e-5


def settled_as_none(known_probs: torch.Tensor, weights: torch.Tensor, mode: str = "hard",
                    decision: Decision | None = None) -> torch.Tensor:
    """(N,) True where a pair yields no relation whatever the members not run yet say.

    ``known_probs``: (K, N, L) probabilities of the first K members; ``weights``: all M members' weights (M >= K).
    The best case of each type is the remaining members' whole weight on it (all their votes and probability
    mass), which is what :func:`combine` and the decision would then see; a pair is settled when no type passes
    the decision even then (tight for the argmax rule and margins; per-type thresholds make it cautious, as the
    decision looks at the best type only). Skipping settled pairs changes no relation, score or vote output."""
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
    outvote them), so its confidence is calibrated on dev pairs (:func:`calibrate_early_exit`)."""
    done = known_probs.size(0)
    known = torch.as_tensor(weights, dtype=torch.float32)[:done]
    mean_none = torch.einsum("k,kn->n", known, known_probs[:, :, NONE_INDEX]) / float(known.sum())
    return (known_probs.argmax(-1) == NONE_INDEX).all(0) & (mean_none >= confidence)


def closed_pairs(known_probs: torch.Tensor, weights: torch.Tensor, mode: str, decision: Decision | None,
                 early_exit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(settled, exited), each (N,): the pairs the members not run yet may skip, settled exactly or, with an
    ``early_exit`` confidence, left early (:func:`confident_none`; a pair is never both)."""
    settled = settled_as_none(known_probs, weights, mode, decision)
    if early_exit is None:
        return settled, torch.zeros_like(settled)
    return settled, confident_none(known_probs, weights, early_exit) & ~settled


def run_in_turn(member_probs: torch.Tensor, weights: torch.Tensor, mode: str, decision: Decision | None,
                early_exit: float | None) -> tuple[torch.Tensor, int]:
    """What members in turn would output, from every member's probabilities: (the (M, N, L) table with P(NONE) = 1
    where a member skipped a closed pair, member-pairs scored). Calibration replays it for each confidence."""
    filled = member_probs.clone()
    open_rows, scored = torch.arange(member_probs.size(1)), member_probs.size(1)
    for m in range(1, member_probs.size(0)):
        settled, exited = closed_pairs(member_probs[:m, open_rows], weights, mode, decision, early_exit)
        skipped = open_rows[settled | exited]
        filled[m:, skipped] = 0.0
        filled[m:, skipped, NONE_INDEX] = 1.0
        open_rows = open_rows[~(settled | exited)]
        scored += len(open_rows)
    return filled, scored


def calibrate_early_exit(member_probs: torch.Tensor, *, weights: torch.Tensor | None = None, mode: str = "hard",
                         decision: Decision | None = None, agreement: float = EXIT_AGREEMENT) -> dict | None:
    """The lowest confidence of :data:`EXIT_CONFIDENCES` whose early exit agrees with the full vote on at least
    ``agreement`` of the relations either outputs on these pairs (every member's (M, N, L) probabilities, dev pairs
    not used to train the members), with the share of member-pairs it leaves to score; None for one member or pairs
    without a relation. Focal-loss members put P(NONE) well below 1 on clear negatives, hence a grid from 0.5."""
    members, pairs = member_probs.shape[:2]
    weights = torch.ones(members) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    decision = decision or Decision()

    def relations(table: torch.Tensor) -> set[tuple[int, int]]:
        return set(decision.choose(combine(table, mode, weights)[0]))

    full = relations(member_probs)
    if members < 2 or not full:
        return None
    for confidence in EXIT_CONFIDENCES:
        filled, scored = run_in_turn(member_probs, weights, mode, decision, confidence)
        found = relations(filled)
        share = len(full & found) / len(full | found)
        if share >= agreement:
            return {"confidence": confidence, "agreement": round(share, 5), "relations": len(full), "pairs": pairs,
                    "member_pair_share": round(scored / (members * pairs), 4)}
    return None


def vote(member_probs: torch.Tensor, mode: str = "hard",
         weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine (M, N, L) member probabilities; returns (labels (N,), scores (N,), member labels (M, N))."""
    ranking, score = combine(member_probs, mode, weights)
    labels = ranking.argmax(-1)
    return labels, score.gather(-1, labels[:, None])[:, 0], member_probs.argmax(-1)


def type_genes(documents: Sequence[Document], member, device: torch.device) -> list[Document]:
    """FGEMR: replace GENE (type unknown) with the member's gene-typer prediction (GENE-Y/GENE-N)."""
    from drugprot.fgemr import apply_gene_types, predict_gene_types

    predicted = predict_gene_types(member.gene_typer, member.tokenizer, documents, device=device,
                                   max_length=member.info["max_length"])
    return apply_gene_types(documents, predicted)


def candidate_pairs(documents: Sequence[Document], interval: tuple[int, int]) -> list[Candidate]:
    """Every document's candidates in order; the Serve ingress calls this without loading a model."""
    pairs: list[Candidate] = []
    for doc in documents:
        pairs.extend(document_candidates(doc, interval))
    return pairs


class Predictor:
    """Loaded members (one model or an ensemble) that map documents to relations."""

    def __init__(self, members: Sequence, *, vote: str = "hard", interval: tuple[int, int] = DEFAULT_INTERVAL,
                 device: str | torch.device = "auto", precision: str = "bf16", metadata: dict | None = None,
                 execution: str = "auto", weights: Sequence[int] | None = None, decision: Decision | None = None,
                 cascade_margin: float = CASCADE_MARGIN, early_exit: float | None = None):
        """``weights``: how many times each member counts in the vote (a greedy selection may pick one twice);
        ``decision``: how the vote becomes relations (default: argmax). ``execution``: ``auto`` stacks
        same-architecture members on an accelerator (``fold``, see drugprot.model.stacked) and runs members in turn
        on CPU, where skipping settled pairs beats the stacked forward (1.6x with 5 MiniLM members, see
        bench/cpu_predict.py); ``loop``, ``fold`` or ``vmap`` force one (a forced stack of incompatible members
        raises). ``precision``: ``int8`` quantizes each member's Linear layers for CPU (members then run in turn);
        ``cascade`` (CPU) scores every pair with a bf16 copy of each member and re-scores in fp32 the pairs whose
        top-2 probability margin is below ``cascade_margin`` (members run in turn). Members in turn count their
        work: ``scored_pairs`` (a pair once per member that scored it) and ``rescored_pairs`` (of those, re-scored
        in fp32 by the cascade). ``early_exit`` (a confidence, see :func:`confident_none`; members then run in
        turn): ``predict`` also stops on a pair once every member so far votes no relation that confidently
        (``exited_pairs`` counts them); approximate, so an ensemble folder records a confidence calibrated on dev
        (``from_ensemble(early_exit="calibrated")``)."""
        if not members:
            raise ValueError("a Predictor needs at least one member")
        if execution not in ("auto", "loop", "fold", "vmap"):
            raise ValueError(f"execution must be 'auto', 'loop', 'fold' or 'vmap', got {execution!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not 0.0 <= cascade_margin <= 1.0:
            raise ValueError(f"cascade_margin must be between 0 and 1 (a probability margin), got {cascade_margin!r}")
        if early_exit is not None and not 0.0 < early_exit <= 1.0:
            raise ValueError(f"early_exit must be a probability in (0, 1], got {early_exit!r}")
        if early_exit is not None and execution in ("fold", "vmap"):
            raise ValueError(f"execution {execution!r} cannot exit early; members leave pairs early only in turn")
        self.members = list(members)
        self.vote_mode = vote
        if weights is not None and (len(weights) != len(self.members) or any(int(w) != w or w < 1 for w in weights)):
            raise ValueError(f"weights must be one positive integer per member ({len(self.members)}), got {list(weights)}")
        self.weights = None if weights is None else torch.tensor([float(w) for w in weights])
        labelling = {bool(getattr(m.model, "multilabel", False)) for m in self.members}
        if len(labelling) > 1:
            raise ValueError("members mix multi-label and single-label models; their votes mean different things")
        multilabel = labelling.pop()
        if decision is not None and decision.multilabel != multilabel:
            raise ValueError(f"the decision is {'' if decision.multilabel else 'not '}multi-label, but the members are "
                             f"{'' if multilabel else 'not '}(model.multilabel)")
        if multilabel and early_exit is not None:
            raise ValueError("early_exit bounds single-label votes; multi-label members run every pair")
        self.decision = decision or Decision(multilabel=multilabel)
        self.interval = tuple(interval)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = precision
        self.metadata = metadata or {}
        for member in self.members:
            member.model.to(self.device).eval()
            if member.gene_typer is not None:
                member.gene_typer.to(self.device).eval()
        self.cascade_margin = cascade_margin
        self.early_exit = early_exit
        self.scored_pairs = self.rescored_pairs = self.exited_pairs = 0
        self._bf16_models = []
        if precision in ("int8", "cascade"):
            if self.device.type != "cpu":
                raise ValueError(f"precision {precision!r} runs on CPU only, not {self.device}")
            if execution in ("fold", "vmap"):
                raise ValueError(f"execution {execution!r} cannot stack {precision} members; use 'auto' or 'loop'")
            for member in self.members:
                if precision == "int8":
                    member.model = quantize_int8(member.model)
                else:
                    self._bf16_models.append(bf16_copy(member.model))
        # One encoder per member, built once: a Serve replica calls member_probabilities for every batch.
        self._encoders = [PairEncoder(m.tokenizer, max_length=m.info["max_length"], markers=m.info["markers"],
                                      context=m.info.get("context", "sentence"))
                          for m in self.members]
        self._stacked = None
        self.execution = "loop"
        on_cpu_by_default = execution == "auto" and self.device.type == "cpu"
        in_turn = execution == "loop" or precision in ("int8", "cascade") or early_exit is not None
        if not on_cpu_by_default and not in_turn and len(self.members) > 1:
            from drugprot.model.stacked import stack_incompatibility, stack_models

            strategy = "fold" if execution == "auto" else execution
            reason = stack_incompatibility(self.members, strategy)
            if reason is not None and execution != "auto":
                raise ValueError(f"execution {execution!r}: these members cannot run stacked ({reason})")
            if reason is None:
                self._stacked = stack_models([m.model for m in self.members], strategy)
                self.execution = strategy

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "auto", **overrides) -> Predictor:
        """A trained model folder (``drugprot train --out DIR`` → ``DIR/model``) or an ensemble folder."""
        from drugprot.ensemble_folder import ENSEMBLE_JSON
        from drugprot.model.artifacts import load_artifact

        path = model_folder(path)
        if (path / ENSEMBLE_JSON).is_file():
            return cls.from_ensemble(path, device=device, **overrides)
        early_exit_for(path, overrides.get("early_exit"))  # refuses one
        loaded = load_artifact(path, device="cpu")
        interval = overrides.pop("interval", tuple(loaded.info["interval"]))
        return cls([loaded], interval=interval, device=device, **overrides)

    @classmethod
    def from_ensemble(cls, folder: str | Path, *, device: str = "auto", **overrides) -> Predictor:
        """Verify an ensemble folder (every file's sha256, see drugprot.ensemble_folder) and load its members.

        ``overrides``: ``vote``, ``interval``, ``precision``, ``execution`` (``auto``/``loop``/``fold``/``vmap``),
        ``early_exit`` (a confidence, or ``"calibrated"``: the one ``ensemble.json`` records)."""
        from drugprot.ensemble_folder import EnsembleError, check_vote, read_ensemble_folder
        from drugprot.model.artifacts import load_artifact

        folder = Path(folder)
        meta = read_ensemble_folder(folder)
        try:
            decision = Decision.from_dict(meta.get("decision"), f"{folder / 'ensemble.json'}: decision")
        except ValueError as error:
            raise EnsembleError(str(error)) from None
        if "early_exit" in overrides:
            overrides["early_exit"] = early_exit_for(folder, overrides["early_exit"])
        members = [load_artifact(folder / entry["path"], device="cpu") for entry in meta["members"]]
        weights = [entry.get("weight", 1) for entry in meta["members"]]
        vote = check_vote(overrides.pop("vote", meta["vote"]))
        interval = tuple(overrides.pop("interval", None) or meta["interval"])
        return cls(members, vote=vote, interval=interval, device=device, metadata=meta,
                   weights=weights if any(w != 1 for w in weights) else None, decision=decision, **overrides)

    def candidates(self, documents: Sequence[Document], interval: tuple[int, int] | None = None) -> list[Candidate]:
        return candidate_pairs(documents, interval or self.interval)

    def member_probabilities(self, documents: Sequence[Document], candidates: Sequence[Candidate], *,
                             skip_settled: bool = False) -> torch.Tensor:
        """(M, N, L) probabilities; pairs a member cannot encode (too long) get P(NONE) = 1.

        Stacked members share one encoding and one forward per batch; otherwise each member runs in turn.
        ``skip_settled`` (members in turn only): a member skips the pairs that the members before it already
        settled as no relation (:func:`settled_as_none`) or, with ``early_exit``, left early; the skipped entries
        keep P(NONE) = 1. The relations decoded from the result are the same as without skipping (bar early exits);
        the probabilities are not, so callers that keep probabilities (ensemble building, distillation) leave it
        off."""
        result = torch.zeros((len(self.members), len(candidates), len(LABELS)))
        result[:, :, NONE_INDEX] = 1.0
        if self._stacked is not None:
            from drugprot.model.stacked import stacked_probabilities

            first = self.members[0]
            pairs, _ = self._encoders[0].encode(documents, candidates)
            if pairs:
                result[:, torch.tensor([p.index for p in pairs])] = stacked_probabilities(
                    self._stacked, pairs, pad_id=first.tokenizer.pad_token_id, device=self.device, precision=self.precision)
            return result
        weights = torch.ones(len(self.members)) if self.weights is None else self.weights
        open_rows = torch.arange(len(candidates))  # pairs not settled yet
        for m, (member, encoder) in enumerate(zip(self.members, self._encoders)):
            if skip_settled and m and not self.decision.multilabel:  # the bound holds for single-label votes
                settled, exited = closed_pairs(result[:m, open_rows], weights, self.vote_mode, self.decision,
                                               self.early_exit)
                self.exited_pairs += int(exited.sum())
                open_rows = open_rows[~(settled | exited)]
                if not len(open_rows):
                    break
            docs, cands = documents, [candidates[i] for i in open_rows.tolist()]
            if member.gene_typer is not None:
                docs = type_genes(documents, member, self.device)
                by_pmid = {d.pmid: d for d in docs}
                cands = [dataclasses.replace(c, gene=by_pmid[c.pmid].entities[c.gene.id]) for c in cands]
            pairs, _ = encoder.encode(docs, cands)
            if not pairs:
                continue
            pad_id = member.tokenizer.pad_token_id
            if self.precision == "cascade":
                probs = pair_probabilities(self._bf16_models[m], pairs, pad_id=pad_id, device=self.device, precision="fp32")
                self.rescored_pairs += rescore_close_calls(member.model, pairs, probs, margin=self.cascade_margin,
                                                           pad_id=pad_id, device=self.device)
            else:
                probs = pair_probabilities(member.model, pairs, pad_id=pad_id, device=self.device, precision=self.precision)
            self.scored_pairs += len(pairs)
            result[m, open_rows[torch.tensor([p.index for p in pairs])]] = probs
        return result

    def decode(self, candidates: Sequence[Candidate], member_probs: torch.Tensor,
               threshold: float = 0.0) -> list[PredictedRelation]:
        """This model's vote (mode, member weights) and decision over (M, N, L) member probabilities; what
        ``predict`` and the Serve deployment (which batches probabilities across requests) both call."""
        return decode(candidates, member_probs, self.vote_mode, threshold, weights=self.weights, decision=self.decision)

    def predict(self, documents: Sequence[Document], *, interval: tuple[int, int] | None = None,
                threshold: float = 0.0) -> list[list[PredictedRelation]]:
        """Relations per document (same order); ``threshold`` drops relations whose score is below it."""
        candidates = self.candidates(documents, interval)
        relations = self.decode(candidates, self.member_probabilities(documents, candidates, skip_settled=True), threshold)
        results: dict[str, list[PredictedRelation]] = {d.pmid: [] for d in documents}
        for relation in relations:
            results[relation.pmid].append(relation)
        return [results[d.pmid] for d in documents]


def model_folder(path: str | Path) -> Path:
    """A model or ensemble folder, or a ``drugprot train --out`` folder (its ``model/``)."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() and not (path / "manifest.json").exists() else path


def early_exit_value(value) -> float | str | None:
    """An early exit as given (a flag, a serve option): None, ``"calibrated"`` or a confidence in (0, 1]."""
    if value is None or value == "calibrated":
        return value
    try:
        confidence = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        confidence = float("nan")
    if not 0.0 < confidence <= 1.0:
        raise ValueError("must be a probability in (0, 1] or 'calibrated'")
    return confidence


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


def decode(candidates: Sequence[Candidate], member_probs: torch.Tensor, vote_mode: str = "hard",
           threshold: float = 0.0, *, weights: torch.Tensor | None = None,
           decision: Decision | None = None) -> list[PredictedRelation]:
    """Vote (M, N, L) member probabilities into relations for the N candidates (NONE and low scores dropped).

    ``decision`` (default: the argmax rule) turns the vote's ranking into relations, see drugprot.decision."""
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


def relation_rows(documents: Sequence[Document], predictions: Sequence[Sequence[PredictedRelation]]) -> list[tuple[str, Relation]]:
    return [(doc.pmid, p.as_relation()) for doc, preds in zip(documents, predictions) for p in preds]


def run_options(precision: str, cascade_margin: float | None = None, early_exit: float | str | None = None) -> dict:
    """``load_predictor`` keywords: a precision, and a cascade margin (None: the default) and an early exit (None:
    none; a confidence or ``"calibrated"``) when given."""
    return {"precision": precision, **({} if cascade_margin is None else {"cascade_margin": cascade_margin}),
            **({} if early_exit is None else {"early_exit": early_exit})}


def load_predictor(model: str | Path, *, device: str = "auto", tracking_uri: str | None = None,
                   verify_key: str | Path | None = None, **overrides) -> Predictor:
    """A folder, or a registry URI ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` resolved through MLflow and
    checked against its registered manifest digest; with ``verify_key``, only a model signed by that key."""
    from drugprot.registry import resolve_model_folder

    path = resolve_model_folder(model, tracking_uri=tracking_uri, verify_key=verify_key)
    return Predictor.from_path(path, device=device, **overrides)
