"""Multi-label training and decisions (model.multilabel): the adaptive-threshold loss, every type over NONE for a
single model, hard and soft votes of multi-label members, and a two-type gold pair predicted and scored twice."""

from __future__ import annotations

import json

import pytest
import torch

from drugprot.candidates import Candidate
from drugprot.corpus import Entity, read_split
from drugprot.inference.voting import Decision
from drugprot.encoding import LABEL_INDEX, LABELS
from drugprot.inference import decode
from drugprot.model.loss import adaptive_threshold_loss
from drugprot.scoring import score
from fixtures_models import train_smoke

NONE, INH, ACT, SUB = (LABEL_INDEX[x] for x in ("NONE", "INHIBITOR", "ACTIVATOR", "SUBSTRATE"))


def target(*types: int) -> torch.Tensor:
    row = torch.zeros(1, len(LABELS))
    for t in types or (NONE,):
        row[0, t] = 1.0 / max(len(types), 1)
    return row


def logits(**values: float) -> torch.Tensor:
    row = torch.zeros(1, len(LABELS))
    for name, value in values.items():
        row[0, LABEL_INDEX[name.replace("_", "-")]] = value
    return row


def test_the_loss_is_small_only_when_each_gold_type_beats_none_and_none_beats_the_rest():
    two = target(INH, ACT)
    right = logits(INHIBITOR=20.0, ACTIVATOR=20.0, NONE=10.0)
    one_missing = logits(INHIBITOR=20.0, ACTIVATOR=1.0, NONE=10.0)
    extra = logits(INHIBITOR=20.0, ACTIVATOR=20.0, SUBSTRATE=20.0, NONE=10.0)
    # two gold types share their softmax against the threshold: log 2 each is the floor, not a fault
    assert adaptive_threshold_loss(right, two) == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-2)
    assert adaptive_threshold_loss(one_missing, two) > 5.0
    assert adaptive_threshold_loss(extra, two) > 5.0
    negative = target()
    assert adaptive_threshold_loss(logits(NONE=10.0), negative) < 0.01
    assert adaptive_threshold_loss(logits(INHIBITOR=5.0), negative) > 4.0


def test_the_loss_is_finite_and_has_gradients_for_extreme_logits():
    extreme = torch.tensor([[80.0, -80.0] + [0.0] * (len(LABELS) - 2)], requires_grad=True)
    loss = adaptive_threshold_loss(extreme, target(INH))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(extreme.grad).all()


def _candidate() -> Candidate:
    chem, gene = Entity("T1", "CHEMICAL", 0, 1, "a"), Entity("T2", "GENE-Y", 2, 3, "b")
    return Candidate("1", chem, gene, (0, 3), 0, frozenset())


def member(*passing: int, none: float = 0.2) -> torch.Tensor:
    """One member's probabilities: each passing type above NONE, the rest below."""
    row = torch.full((len(LABELS),), 0.01)
    row[NONE] = none
    for t in passing:
        row[t] = none + 0.1
    return (row / row.sum()).view(1, 1, -1)


def test_a_single_multilabel_model_gives_every_type_over_none():
    table = member(INH, ACT)
    relations = decode([_candidate()], table, "hard", decision=Decision(multilabel=True))
    assert sorted(r.type for r in relations) == ["ACTIVATOR", "INHIBITOR"]
    assert [r.type for r in decode([_candidate()], table, "hard")] in (["INHIBITOR"], ["ACTIVATOR"])  # argmax: one


def test_a_hard_vote_of_multilabel_members_needs_a_majority_per_type():
    table = torch.cat([member(INH, ACT), member(INH), member(INH, SUB)])
    relations = decode([_candidate()], table, "hard", decision=Decision(multilabel=True))
    assert [r.type for r in relations] == ["INHIBITOR"]
    assert relations[0].score == pytest.approx(1.0)
    table = torch.cat([member(INH, ACT), member(ACT), member(INH, ACT)])
    assert sorted(r.type for r in decode([_candidate()], table, "hard", decision=Decision(multilabel=True))) == \
        ["ACTIVATOR", "INHIBITOR"]


def test_a_soft_vote_of_multilabel_members_keeps_types_whose_mean_beats_none():
    table = torch.cat([member(INH, ACT), member(INH), member(INH)])
    relations = decode([_candidate()], table, "soft", decision=Decision(multilabel=True))
    assert [r.type for r in relations] == ["INHIBITOR"]


def test_a_decision_round_trips_its_multilabel_flag_and_refuses_a_bad_one():
    assert Decision.from_dict(Decision(multilabel=True).as_dict()).multilabel is True
    with pytest.raises(ValueError, match="decision: multilabel must be true or false, got 'yes'"):
        Decision.from_dict({"multilabel": "yes"})


def test_a_two_type_gold_pair_is_predicted_with_both_types_and_scored_twice(tmp_path, make_corpus):
    """A tiny model trained multi-label on a corpus whose one related pair has two gold types learns both."""
    abstracts = "".join(f"{i}\tAspirin inhibits and activates COX{i} in platelets.\tNothing else.\n" for i in range(1, 9))
    gene = len("Aspirin inhibits and activates ")
    entities = "".join(f"{i}\tT1\tCHEMICAL\t0\t7\tAspirin\n{i}\tT2\tGENE-Y\t{gene}\t{gene + 3 + len(str(i))}\tCOX{i}\n"
                       for i in range(1, 9))
    relations = "".join(f"{i}\tINHIBITOR\tArg1:T1\tArg2:T2\n{i}\tACTIVATOR\tArg1:T1\tArg2:T2\n" for i in range(1, 9))
    corpus = make_corpus("training", abstracts=abstracts, entities=entities, relations=relations)
    make_corpus("development", abstracts=abstracts, entities=entities, relations=relations)
    result = train_smoke(tmp_path / "run", **{"data.dir": str(corpus), "model.multilabel": "true",
                                             "train.epochs": 30, "train.lr": "5e-3", "train.warmup": 0.0})
    info = json.loads((result.model_dir / "drugprot.json").read_text())
    assert info["multilabel"] is True

    from drugprot.inference import Predictor

    predictor = Predictor.from_path(result.model_dir, device="cpu")
    assert predictor.decision.multilabel
    documents = read_split(corpus, "development").documents
    predicted = [(d.pmid, r.type, r.chemical, r.gene) for d, rs in zip(documents, predictor.predict(documents)) for r in rs]
    assert sorted({t for _, t, _, _ in predicted}) == ["ACTIVATOR", "INHIBITOR"]
    scored = score(documents, predicted)
    assert scored.per_type["INHIBITOR"].tp == 8 and scored.per_type["ACTIVATOR"].tp == 8
    assert scored.f1 == pytest.approx(1.0)
