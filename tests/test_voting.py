"""Voting rules (drugprot.inference.vote / decode) on hand-made probability tables: no models needed.

Hard: each member's argmax is a vote, the majority wins, a tie goes to the tied label with the highest mean
probability (never to a label outside the tie). Soft: argmax of the mean probabilities. A pair always gets exactly
one label, even when its gold has several (multi-label pairs).
"""

from __future__ import annotations

import pytest
import torch

from drugprot.candidates import Candidate
from drugprot.corpus import Entity
from drugprot.encoding import LABEL_INDEX, LABELS
from drugprot.ensemble_folder import EnsembleError, check_vote
from drugprot.inference.voting import Decision
from drugprot.inference import decode, vote

L = len(LABELS)
NONE, INH, ACT, SUB = (LABEL_INDEX[x] for x in ("NONE", "INHIBITOR", "ACTIVATOR", "SUBSTRATE"))


def probs(*rows: dict[int, float]) -> torch.Tensor:
    """One member per row: {label index: probability}; the rest of the mass is spread over the other labels."""
    out = torch.zeros((len(rows), 1, L))
    for m, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (L - len(row))
        out[m, 0] = rest
        for label, p in row.items():
            out[m, 0, label] = p
    return out


CASES = [
    # name, member rows, hard label, soft label
    ("unanimous", [{INH: 0.9}, {INH: 0.8}, {INH: 0.7}], INH, INH),
    ("majority beats a confident minority (hard and soft disagree)", [{INH: 0.40, ACT: 0.35}, {INH: 0.40, ACT: 0.35}, {ACT: 0.95}], INH, ACT),
    ("two-way tie goes to the higher mean", [{INH: 0.6}, {ACT: 0.9}], ACT, ACT),
    ("three-way tie goes to the higher mean", [{NONE: 0.5, ACT: 0.3}, {INH: 0.5, ACT: 0.3}, {ACT: 0.45}], ACT, ACT),
    ("tie never goes outside the tied labels", [{INH: 0.30, SUB: 0.29}, {INH: 0.30, SUB: 0.29}, {ACT: 0.31, SUB: 0.30}, {ACT: 0.31, SUB: 0.30}],
     ACT, SUB),
    ("NONE majority", [{NONE: 0.6}, {NONE: 0.55}, {INH: 0.9}], NONE, NONE),
]


@pytest.mark.parametrize("name, rows, hard, soft", CASES, ids=[c[0] for c in CASES])
def test_vote_table(name, rows, hard, soft):
    table = probs(*rows)
    hard_labels, hard_scores, member_labels = vote(table, "hard")
    soft_labels, soft_scores, _ = vote(table, "soft")
    assert int(hard_labels[0]) == hard, name
    assert int(soft_labels[0]) == soft, name
    assert member_labels.shape == (len(rows), 1)
    votes = [int(v) for v in member_labels[:, 0]]
    assert float(hard_scores[0]) == pytest.approx(votes.count(hard) / len(rows))  # hard score = vote share
    assert float(soft_scores[0]) == pytest.approx(float(table[:, 0, soft].mean()))  # soft score = mean probability


def test_one_member_vote_is_its_argmax():
    table = torch.softmax(torch.randn(1, 50, L, generator=torch.Generator().manual_seed(0)), -1)
    for mode in ("hard", "soft"):
        labels, _, _ = vote(table, mode)
        assert torch.equal(labels, table[0].argmax(-1))


def test_vote_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        vote(probs({INH: 0.9}), "majority")


@pytest.mark.parametrize("value", ["Hard", "hard,soft", "both", ""])
def test_check_vote_names_the_value(value):
    with pytest.raises(EnsembleError, match=f"must be one of hard, soft .*got {value!r}"):
        check_vote(value, "--vote")


def _candidate(labels: frozenset[str]) -> Candidate:
    chem = Entity("T1", "CHEMICAL", 0, 7, "aspirin")
    gene = Entity("T2", "GENE", 17, 21, "COX1")
    return Candidate("1", chem, gene, (0, 22), 0, labels)


def test_multi_label_pair_gets_exactly_one_label():
    """A pair whose gold has two types still gets one predicted relation: the vote's argmax."""
    cand = _candidate(frozenset({"INHIBITOR", "DIRECT-REGULATOR"}))
    table = probs({INH: 0.45, LABEL_INDEX["DIRECT-REGULATOR"]: 0.44}, {INH: 0.40, LABEL_INDEX["DIRECT-REGULATOR"]: 0.42},
                  {INH: 0.5})
    for mode, expected in (("hard", "INHIBITOR"), ("soft", "INHIBITOR")):
        relations = decode([cand], table, mode)
        assert [(r.chemical, r.gene, r.type) for r in relations] == [("T1", "T2", expected)]
        assert relations[0].votes == ("INHIBITOR", "DIRECT-REGULATOR", "INHIBITOR")


def test_decode_drops_none_and_low_scores():
    cands = [_candidate(frozenset()), _candidate(frozenset({"INHIBITOR"}))]
    table = torch.cat([probs({NONE: 0.9}, {NONE: 0.8}, {INH: 0.9}), probs({INH: 0.9}, {INH: 0.8}, {ACT: 0.9})], dim=1)
    relations = decode(cands, table, "hard")
    assert [r.type for r in relations] == ["INHIBITOR"]
    assert relations[0].score == pytest.approx(2 / 3, abs=1e-6)
    assert decode(cands, table, "hard", threshold=0.7) == []
    assert decode([], table[:, :0], "hard") == []


# -- weights (a greedy selection picks a member more than once) and calibrated decisions ---------------------------


def test_weights_count_a_member_as_several_votes():
    table = probs({INH: 0.9}, {ACT: 0.6}, {ACT: 0.6})
    assert int(vote(table, "hard")[0][0]) == ACT
    labels, scores, _ = vote(table, "hard", torch.tensor([3.0, 1.0, 1.0]))
    assert int(labels[0]) == INH and float(scores[0]) == pytest.approx(3 / 5)
    repeated = torch.cat([table[:1]] * 3 + [table[1:]])  # weight 3 is the same as three copies
    for mode in ("hard", "soft"):
        assert torch.equal(vote(table, mode, torch.tensor([3.0, 1.0, 1.0]))[0], vote(repeated, mode)[0])


@pytest.mark.parametrize("name, rows, hard, soft", CASES, ids=[c[0] for c in CASES])
def test_default_decision_is_the_argmax_of_the_vote(name, rows, hard, soft):
    from drugprot.inference import combine

    table = probs(*rows)
    for mode, expected in (("hard", hard), ("soft", soft)):
        chosen = Decision().choose(combine(table, mode)[0])
        assert chosen == ([] if expected == NONE else [(0, expected)]), (name, mode)


def test_margin_over_none_and_type_thresholds():
    ranking = torch.zeros((3, L))
    ranking[0, NONE], ranking[0, INH] = 0.50, 0.45  # NONE wins by 0.05
    ranking[1, NONE], ranking[1, ACT] = 0.20, 0.70
    ranking[2, NONE], ranking[2, SUB], ranking[2, INH] = 0.10, 0.50, 0.40
    assert Decision().choose(ranking) == [(1, ACT), (2, SUB)]
    assert Decision(margin=-0.1).choose(ranking) == [(0, INH), (1, ACT), (2, SUB)]
    assert Decision(margin=0.45).choose(ranking) == [(1, ACT)]
    assert Decision(thresholds={"ACTIVATOR": 0.8}).choose(ranking) == [(2, SUB)]


def test_multi_label_adds_the_runner_up_type_when_it_passes():
    ranking = torch.zeros((2, L))
    ranking[0, NONE], ranking[0, INH], ranking[0, ACT] = 0.1, 0.5, 0.4
    ranking[1, NONE], ranking[1, INH], ranking[1, ACT] = 0.1, 0.8, 0.1
    assert Decision(second_type=0.3).choose(ranking) == [(0, INH), (0, ACT), (1, INH)]
    assert Decision(second_type=0.3, thresholds={"ACTIVATOR": 0.45}).choose(ranking) == [(0, INH), (1, INH)]
    cand = _candidate(frozenset({"INHIBITOR", "ACTIVATOR"}))
    table = probs({NONE: 0.1, INH: 0.5, ACT: 0.39})
    assert [r.type for r in decode([cand], table, "soft", decision=Decision(second_type=0.3))] == ["INHIBITOR", "ACTIVATOR"]


@pytest.mark.parametrize("raw, message", [
    ({"margin": "wide"}, r"ensemble.json: decision: could not convert string to float"),
    ({"thresholds": {"INHIBITS": 0.5}}, r"unknown relation type\(s\) INHIBITS"),
    ({"cutoff": 0.5}, r"unknown key\(s\) cutoff"),
])
def test_bad_decision_entries_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        Decision.from_dict(raw, "ensemble.json: decision")


def test_decision_round_trips():
    decision = Decision(margin=-0.05, thresholds={"INHIBITOR": 0.4}, second_type=0.2)
    assert Decision.from_dict(decision.as_dict()) == decision and not decision.is_argmax and Decision().is_argmax


# -- settling pairs early: an ensemble's later members skip pairs that can no longer be a relation ---------------


def _random_members(generator: torch.Generator, members: int, pairs: int) -> torch.Tensor:
    """Peaked member probabilities, mostly on NONE (as real ones are), often disagreeing."""
    logits = torch.randn((members, pairs, L), generator=generator) * 3
    logits[..., NONE] += torch.rand((members, pairs, 1), generator=generator)[..., 0] * 8
    return logits.softmax(-1)


def _worst_cases(rest: int, pairs: int) -> list[torch.Tensor]:
    """Completions for the members not run yet: every remaining member fully on one type (the bound's worst case),
    each type in turn, plus NONE-only."""
    cases = []
    for label in range(L):
        table = torch.zeros((rest, pairs, L))
        table[..., label] = 1.0
        cases.append(table)
    return cases


DECISIONS = [Decision(), Decision(margin=-0.1), Decision(margin=0.2, thresholds={"INHIBITOR": 0.3}),
             Decision(thresholds={"ACTIVATOR": 0.6}, second_type=0.1)]


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("decision", DECISIONS, ids=["argmax", "negative-margin", "margin-threshold", "second-type"])
@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 1], [2, 1, 1, 1]], ids=["five", "weighted"])
def test_a_settled_pair_yields_no_relation_whatever_the_rest_say(mode, decision, weights):
    from drugprot.inference import combine, settled_as_none

    generator = torch.Generator().manual_seed(len(weights) * 7 + len(DECISIONS))
    weights = torch.tensor(weights, dtype=torch.float32)
    members, pairs = len(weights), 400
    table = _random_members(generator, members, pairs)
    settled_somewhere = open_somewhere = 0
    for done in range(1, members):
        settled = settled_as_none(table[:done], weights, mode, decision)
        settled_somewhere += int(settled.sum())
        completions = _worst_cases(members - done, pairs) + [table[done:], _random_members(generator, members - done, pairs)]
        could_be_relation = torch.zeros(pairs, dtype=torch.bool)
        for rest in completions:
            ranking = combine(torch.cat([table[:done], rest]), mode, weights)[0]
            rows = torch.tensor(sorted({row for row, _ in decision.choose(ranking)}), dtype=torch.long)
            could_be_relation[rows] = True
            assert not settled[rows].any(), f"{mode}: a pair settled after {done} members became a relation"
        if not decision.thresholds:  # then the bound is tight: an unsettled pair can still become a relation
            assert (could_be_relation | settled).all()
        open_somewhere += int((~settled).sum())
    assert settled_somewhere > 0 and open_somewhere > 0  # the table exercises both sides


def test_nothing_settles_while_the_rest_can_outvote_the_known():
    from drugprot.inference import settled_as_none

    table = probs({NONE: 1.0}, {NONE: 1.0}, {NONE: 1.0}, {INH: 1.0}, {INH: 1.0})
    weights = torch.ones(5)
    assert [bool(settled_as_none(table[:k], weights, "hard")[0]) for k in range(1, 6)] == [False, False, True, True, True]
    # soft: three unanimous NONE members settle only when their lead beats the two remaining members' whole mass
    assert not settled_as_none(probs({NONE: 0.6}, {NONE: 0.6}, {NONE: 0.6}), weights, "soft")[0]


# -- the early exit: a pair leaves the members in turn once those so far confidently vote no relation ------------


def test_confident_none_needs_every_member_so_far_on_none_and_the_mean_at_the_confidence():
    from drugprot.inference import confident_none

    table = torch.cat([probs({NONE: 0.9}, {NONE: 0.7}), probs({NONE: 0.9}, {INH: 0.8}), probs({NONE: 0.6}, {NONE: 0.6})], 1)
    weights = torch.ones(5)
    assert confident_none(table, weights, 0.79).tolist() == [True, False, False]  # means 0.8 and 0.6
    assert confident_none(table, weights, 0.81).tolist() == [False, False, False]
    assert confident_none(table, weights, 0.59).tolist() == [True, False, True]
    assert confident_none(table[:1], weights, 0.89).tolist() == [True, True, False]  # member 1 alone decides
    assert confident_none(table, torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0]), 0.84).tolist() == [True, False, False]


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_members_in_turn_replayed_exit_only_by_dropping_relations(mode):
    """The replay of members in turn (what calibration measures): without an exit it decodes exactly like every
    member's table; an exit only drops relations of pairs it left early, and a lower confidence leaves more."""
    from drugprot.ensemble.early_exit import run_in_turn
    from drugprot.inference import combine

    generator = torch.Generator().manual_seed(11)
    table, weights = _random_members(generator, 5, 600), torch.ones(5)
    decision = Decision()

    def rows(filled):
        return {row for row, _ in decision.choose(combine(filled, mode, weights)[0])}

    exact, exact_scored = run_in_turn(table, weights, mode, decision, None)
    full = rows(table)
    assert rows(exact) == full and 0 < len(full) < 600 and exact_scored < 5 * 600
    previous_scored, previous_rows = exact_scored, full
    for confidence in (0.99, 0.9, 0.7, 0.5):
        filled, scored = run_in_turn(table, weights, mode, decision, confidence)
        found = rows(filled)
        assert found <= previous_rows and scored <= previous_scored
        previous_scored, previous_rows = scored, found
    assert previous_scored < exact_scored and previous_rows < full  # the lowest confidence did leave pairs early


def _seeds_of_one_model(generator: torch.Generator, members: int, pairs: int) -> torch.Tensor:
    """Members that mostly agree, as seeds of one configuration do: shared logits per pair plus member noise."""
    shared = torch.randn((1, pairs, L), generator=generator) * 2
    shared[..., NONE] += torch.rand((1, pairs), generator=generator) * 8
    return (shared + torch.randn((members, pairs, L), generator=generator) * 0.6).softmax(-1)


def test_calibration_takes_the_lowest_confidence_that_keeps_the_agreement():
    from drugprot.ensemble.early_exit import EXIT_CONFIDENCES, calibrate_early_exit, run_in_turn
    from drugprot.inference import combine

    table, weights, decision = _seeds_of_one_model(torch.Generator().manual_seed(5), 5, 800), torch.ones(5), Decision()

    def agreement(confidence):
        full = set(decision.choose(combine(table, "hard", weights)[0]))
        found = set(decision.choose(combine(run_in_turn(table, weights, "hard", decision, confidence)[0], "hard", weights)[0]))
        return len(full & found) / len(full | found)

    for target in (0.999, 0.99):
        found = calibrate_early_exit(table, agreement=target)
        assert found is not None and found["agreement"] >= target and found["pairs"] == 800
        at = EXIT_CONFIDENCES.index(found["confidence"])
        assert agreement(found["confidence"]) == pytest.approx(found["agreement"], abs=1e-5)
        assert at == 0 or agreement(EXIT_CONFIDENCES[at - 1]) < target  # the one below would have lost too much
        assert 0 < found["member_pair_share"] < 1
    loose, strict = calibrate_early_exit(table, agreement=0.99), calibrate_early_exit(table, agreement=0.999)
    assert loose["confidence"] < strict["confidence"] and loose["member_pair_share"] < strict["member_pair_share"]
    none_only = torch.zeros((5, 10, L))
    none_only[..., NONE] = 1.0
    assert calibrate_early_exit(table[:1]) is None and calibrate_early_exit(none_only) is None  # nothing to calibrate on
