"""The part of inference that holds weights: member probabilities for jobs.

A *scorer* computes probabilities for encoded pairs, ``probabilities(pairs) -> (k, n, L)`` for the ``k`` members it
holds, in one way each:

* :class:`PlainScorer`: one member, fp32 or bf16 (autocast on CUDA);
* :class:`CascadeScorer`: one member's bf16 copy scores every pair, the fp32 member re-scores the close calls;
* :class:`StackedScorer`: every member in one forward per batch (drugprot.model.stacked).

:class:`Scorer` runs its stages (a scorer with the encoder and, for FGEMR members, the gene typer that make its
pairs) in one loop over a :class:`~drugprot.inference.plan.Job`. Between stages a *pair filter* may close pairs for
the members still to run, whatever scorer they use: :class:`SettledPairs` (no relation whatever they say: exact) or
:class:`EarlyExit` (all members so far confidently say no relation: a calibrated bet).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from drugprot.encoding import LABELS, EncodedPair, PairEncoder, iterate_batches, token_budget_batches
from drugprot.inference.plan import Job
from drugprot.inference.voting import NONE_INDEX, VoteRule
from drugprot.model.runtime import autocast, bf16_copy


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


class PlainScorer:
    """One member: fp32 or bf16 (autocast on CUDA)."""

    members = 1

    def __init__(self, model, *, pad_id: int, device: torch.device, precision: str = "bf16"):
        self.model = model
        self.pad_id, self.device, self.precision = pad_id, device, precision

    def probabilities(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        return pair_probabilities(self.model, pairs, pad_id=self.pad_id, device=self.device, precision=self.precision)[None]


class CascadeScorer:
    """A bf16 copy of one member scores every pair; pairs whose top-2 probability margin is below ``margin`` are
    re-scored by the fp32 member (CPU). ``rescored`` counts them."""

    members = 1

    def __init__(self, model, *, pad_id: int, device: torch.device, margin: float):
        self.model, self.fast = model, bf16_copy(model)
        self.pad_id, self.device, self.margin = pad_id, device, margin
        self.rescored = 0

    def probabilities(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        probs = pair_probabilities(self.fast, pairs, pad_id=self.pad_id, device=self.device, precision="fp32")
        top2 = probs.topk(2, dim=-1).values
        close = ((top2[:, 0] - top2[:, 1]) < self.margin).nonzero()[:, 0]
        if len(close):
            probs[close] = pair_probabilities(self.model, [pairs[i] for i in close.tolist()], pad_id=self.pad_id,
                                              device=self.device, precision="fp32")
        self.rescored += len(close)
        return probs[None]


class StackedScorer:
    """Every member in one forward per batch (``fold``, see drugprot.model.stacked): one encoding for all."""

    def __init__(self, models: Sequence, *, pad_id: int, device: torch.device, precision: str = "bf16"):
        from drugprot.model.stacked import FoldedRelationModel

        self.stacked = FoldedRelationModel(list(models))
        self.members = len(models)
        self.pad_id, self.device, self.precision = pad_id, device, precision

    def probabilities(self, pairs: Sequence[EncodedPair]) -> torch.Tensor:
        from drugprot.model.stacked import stacked_probabilities

        return stacked_probabilities(self.stacked, pairs, pad_id=self.pad_id, device=self.device, precision=self.precision)


class SettledPairs:
    """Closes the pairs that yield no relation whatever the members still to run say (exact: changes no output)."""

    exits = False

    def __init__(self, rule: VoteRule, members: int):
        self.rule, self.members = rule, members

    def closed(self, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(settled, exited) for the (K, n, L) probabilities of the members run so far."""
        return self.rule.closed(known, self.members, None)


class EarlyExit(SettledPairs):
    """Also closes the pairs that every member so far calls no relation with mean P(NONE) >= ``confidence``."""

    exits = True

    def __init__(self, rule: VoteRule, members: int, confidence: float):
        super().__init__(rule, members)
        self.confidence = confidence

    def closed(self, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rule.closed(known, self.members, self.confidence)


@dataclass
class Stage:
    """A scorer with what makes its pairs: the members' encoder and, for an FGEMR member, the member whose gene typer
    types the genes first."""

    first: int  # the index of its first member
    scorer: Any  # PlainScorer | CascadeScorer | StackedScorer
    encoder: PairEncoder
    gene_typer: Any = None  # LoadedModel with a gene_typer

    def pairs(self, documents, candidates, device) -> list[EncodedPair]:
        if self.gene_typer is not None:
            documents = type_genes(documents, self.gene_typer, device)
            by_pmid = {d.pmid: d for d in documents}
            candidates = [dataclasses.replace(c, gene=by_pmid[c.pmid].entities[c.gene.id]) for c in candidates]
        return self.encoder.encode(documents, candidates)[0]


def type_genes(documents, member, device: torch.device) -> list:
    """FGEMR: replace GENE (type unknown) with the member's gene-typer prediction (GENE-Y/GENE-N)."""
    from drugprot.fgemr import apply_gene_types, predict_gene_types

    predicted = predict_gene_types(member.gene_typer, member.tokenizer, documents, device=device,
                                   max_length=member.info["max_length"])
    return apply_gene_types(documents, predicted)


class Scorer:
    """Loaded members in stages: ``probabilities(job)`` is every member's (M, N, L) probabilities.

    Pairs a member cannot encode (too long) get P(NONE) = 1. With ``skip_settled`` the pair filter (if any) closes
    pairs between stages; closed entries keep P(NONE) = 1, so the relations decoded are the same as without skipping
    (bar early exits) but the probabilities are not: callers that keep probabilities leave it off. Counters:
    ``scored_pairs`` (a pair once per member that scored it), ``exited_pairs`` (closed by the early exit) and
    ``rescored_pairs`` (re-scored in fp32 by cascades)."""

    def __init__(self, members: Sequence, stages: Sequence[Stage], *, device: torch.device, execution: str,
                 closing: SettledPairs | None = None):
        self.members, self.stages, self.device, self.execution = list(members), list(stages), device, execution
        self.closing = closing
        self.scored_pairs = self.exited_pairs = 0

    @property
    def rescored_pairs(self) -> int:
        return sum(getattr(stage.scorer, "rescored", 0) for stage in self.stages)

    @rescored_pairs.setter
    def rescored_pairs(self, value: int) -> None:
        for stage in self.stages:
            if hasattr(stage.scorer, "rescored"):
                stage.scorer.rescored = value

    def probabilities(self, job: Job, *, skip_settled: bool = False) -> torch.Tensor:
        result = torch.zeros((len(self.members), job.pairs, len(LABELS)))
        result[:, :, NONE_INDEX] = 1.0
        open_rows = torch.arange(job.pairs)  # pairs not closed yet
        for stage in self.stages:
            if skip_settled and stage.first and self.closing is not None:
                settled, exited = self.closing.closed(result[:stage.first, open_rows])
                self.exited_pairs += int(exited.sum())
                open_rows = open_rows[~(settled | exited)]
                if not len(open_rows):
                    break
            pairs = stage.pairs(job.documents, [job.candidates[i] for i in open_rows.tolist()], self.device)
            if not pairs:
                continue
            probs = stage.scorer.probabilities(pairs)
            self.scored_pairs += len(pairs) * stage.scorer.members
            rows = open_rows[torch.tensor([p.index for p in pairs])]
            result[stage.first:stage.first + stage.scorer.members, rows] = probs
        return result
