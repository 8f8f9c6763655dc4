"""drugprot.inference piece by piece on tiny trained models: the options and their rules, the torch-free plan, each
scorer alone, each pair filter over each scorer (an FGEMR ensemble included), and every supported combination of
options once."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from fixtures_models import train_smoke

from drugprot.cli import build_parser
from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split
from drugprot.ensemble.early_exit import run_in_turn
from drugprot.inference.loading import Predictor, build_scorer
from drugprot.inference.options import EXECUTIONS, PRECISIONS, InferenceOptions, given_arguments, inference_options
from drugprot.inference.plan import Plan
from drugprot.inference.scorers import (CascadeScorer, EarlyExit, PlainScorer, Scorer, SettledPairs, StackedScorer,
                                        pair_probabilities)
from drugprot.inference.voting import VoteRule
from drugprot.model.artifacts import load_artifact

CPU = torch.device("cpu")
FGEMR = {"model.system": "fgemr", "model.markers": "fine", "data.max_train_docs": 12, "data.max_dev_docs": 4,
         "train.epochs": 1, "fgemr.epochs": 1, "fgemr.holdout": 0.25, "train.lr": "3e-3"}


@pytest.fixture(scope="module")
def documents():
    return read_split(SAMPLE_DIR, "development").documents[:6]


@pytest.fixture(scope="module")
def fgemr_members(tmp_path_factory):
    """Two FGEMR members (each types genes with its own classifier before encoding), seeds 1 and 2."""
    root = tmp_path_factory.mktemp("fgemr-members")
    for seed in (1, 2):
        train_smoke(root / str(seed), **FGEMR, **{"train.seed": seed})
    return [root / "1" / "model", root / "2" / "model"]


# ---- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, style, message", [
    ({"precision": "fp8"}, "keyword", r"^precision must be one of bf16, fp32, cascade, got 'fp8'$"),
    ({"execution": "fast"}, "flag", r"^--execution must be one of auto, loop, fold, got 'fast'$"),
    ({"cascade_margin": 0.1}, "flag", r"^--cascade-margin applies to --precision cascade only, got --precision bf16$"),
    ({"cascade_margin": 0.1}, "key", r"^cascade_margin: applies to precision cascade only, got precision bf16$"),
    ({"precision": "cascade", "cascade_margin": -0.1}, "key",
     r"^cascade_margin: must be between 0 and 1 \(a probability margin\), got -0.1$"),
    ({"early_exit": "often"}, "flag", r"^--early-exit must be a probability in \(0, 1\] or 'calibrated', got 'often'$"),
    ({"execution": "fold", "precision": "cascade"}, "keyword",
     r"^execution 'fold' cannot stack cascade members; use 'auto' or 'loop'$"),
    ({"execution": "fold", "early_exit": "calibrated"}, "flag",
     r"^--execution 'fold' cannot exit early; members leave pairs early only in turn$"),
    ({"interval": (5, -5)}, "key", r"^interval: LO must not exceed HI, got \(5, -5\)$"),
    ({"votes": "hard"}, "key", r"^votes: Extra inputs are not permitted, got 'hard'$"),
])
def test_each_rule_names_the_options_as_its_reader_spells_them(values, style, message):
    with pytest.raises(ValueError, match=message):
        inference_options(style, **values)


@pytest.mark.parametrize("option, value, choices", [
    ("precision", "int8", "bf16, fp32, cascade"), ("execution", "vmap", "auto, loop, fold")])
def test_a_removed_option_is_refused_with_the_remaining_choices(capsys, option, value, choices):
    """int8 and vmap were removed (no measured win, see docs/benchmarks.md): the flag, a Serve config key and a
    Python keyword each refuse them like any unknown value, listing what remains."""
    for command in (["predict", "--model", "m", "--data", "d", "--out", "o"], ["serve", "--model", "m"]):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args([*command, f"--{option}", value])
        assert exit.value.code == 2
        quoted = ", ".join(f"'{choice}'" for choice in choices.split(", "))
        assert f"argument --{option}: invalid choice: '{value}' (choose from {quoted})" in capsys.readouterr().err
    with pytest.raises(ValueError, match=rf"^{option}: must be one of {choices}, got '{value}'$"):
        inference_options("key", **{option: value})
    with pytest.raises(ValueError, match=rf"^{option} must be one of {choices}, got '{value}'$"):
        inference_options("keyword", **{option: value})


def test_one_precision_default_and_cpu_only_precisions():
    assert InferenceOptions().precision == "bf16" and InferenceOptions().margin == 0.01
    assert InferenceOptions(precision="cascade").device_problem("cuda") == "precision 'cascade' runs on CPU only, not cuda"
    assert InferenceOptions(precision="cascade").device_problem("cpu") is None
    assert InferenceOptions(precision="fp32").device_problem("cuda") is None


def test_predict_and_serve_take_the_same_inference_flags():
    flags = ["--vote", "soft", "--interval", "-5", "5", "--precision", "cascade", "--cascade-margin", "0.02",
             "--execution", "loop", "--early-exit", "0.7"]
    predict = build_parser().parse_args(["predict", "--model", "m", "--data", "d", "--out", "o", *flags])
    serve = build_parser().parse_args(["serve", "--model", "m", *flags])
    assert given_arguments(predict) == given_arguments(serve) == {
        "vote": "soft", "interval": [-5, 5], "precision": "cascade", "cascade_margin": 0.02, "execution": "loop",
        "early_exit": "0.7"}
    assert InferenceOptions(**given_arguments(serve)).early_exit == 0.7
    assert given_arguments(build_parser().parse_args(["serve", "--model", "m", "--early-exit"])) == {
        "early_exit": "calibrated"}


# ---- the plan ----------------------------------------------------------------------------------------------------
def test_the_plan_and_the_options_load_without_torch():
    code = ("import sys; from drugprot.inference.plan import Plan; from drugprot.corpus import read_split; "
            "from drugprot.config import SAMPLE_DIR; "
            "job = Plan(1).prepare(read_split(SAMPLE_DIR, 'development').documents); "
            "assert job.pairs > 0, job; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_plan_from_ensemble_json_reads_vote_weights_decision_and_interval():
    meta = {"vote": "soft", "interval": [-3, 4], "members": [{"weight": 2}, {}],
            "decision": {"margin": -0.1, "thresholds": {"INHIBITOR": 0.3}}}
    plan = Plan.from_json(meta, InferenceOptions(), where="e/ensemble.json")
    assert (plan.members, plan.interval, plan.rule.mode, plan.rule.weights) == (2, (-3, 4), "soft", (2, 1))
    assert plan.rule.decision.margin == -0.1 and plan.rule.decision.thresholds == {"INHIBITOR": 0.3}
    overridden = Plan.from_json(meta, InferenceOptions(vote="hard", interval=(0, 1)), where="e/ensemble.json")
    assert (overridden.rule.mode, overridden.interval) == ("hard", (0, 1))
    with pytest.raises(ValueError, match=r"e/ensemble.json: decision: unknown key\(s\) cutoff"):
        Plan.from_json({**meta, "decision": {"cutoff": 1}}, InferenceOptions(), where="e/ensemble.json")
    assert Plan.from_json({"interval": [-1, 2]}, InferenceOptions(), where="m/drugprot.json") == Plan(1, (-1, 2))


# ---- each scorer alone ---------------------------------------------------------------------------------------------
def _pairs(member, documents):
    job = Plan(1).prepare(documents)
    (stage,) = build_scorer([member], InferenceOptions(), VoteRule(), CPU).stages
    return stage.pairs(job.documents, job.candidates, CPU)


def test_each_scorer_alone(smoke_members, documents):
    member = load_artifact(smoke_members[0])
    pairs = _pairs(member, documents)
    pad = member.tokenizer.pad_token_id
    fp32 = pair_probabilities(member.model, pairs, pad_id=pad, device=CPU, precision="fp32")
    assert torch.equal(PlainScorer(member.model, pad_id=pad, device=CPU, precision="fp32").probabilities(pairs), fp32[None])
    # the cascade with margin 1 re-scores every pair in fp32; with margin 0 it is its bf16 copy alone
    everything = CascadeScorer(member.model, pad_id=pad, device=CPU, margin=1.0)
    assert torch.equal(everything.probabilities(pairs), fp32[None]) and everything.rescored == len(pairs)
    alone = CascadeScorer(member.model, pad_id=pad, device=CPU, margin=0.0)
    assert alone.rescored == 0 and torch.allclose(alone.probabilities(pairs), fp32[None], atol=0.05)
    members = [load_artifact(p) for p in smoke_members]
    stacked = StackedScorer([m.model for m in members], pad_id=pad, device=CPU, precision="fp32")
    each = torch.stack([pair_probabilities(m.model, pairs, pad_id=pad, device=CPU, precision="fp32") for m in members])
    torch.testing.assert_close(stacked.probabilities(pairs), each, atol=1e-5, rtol=1e-4)


# ---- each pair filter over each scorer -------------------------------------------------------------------------------
SCORERS = {"fp32": {"precision": "fp32", "execution": "loop"}, "cascade": {"precision": "cascade"},
           "fold": {"precision": "fp32", "execution": "fold"}}


def _members(kind, smoke_members, fgemr_members):
    return [load_artifact(p) for p in (fgemr_members if kind == "fgemr" else smoke_members)]


@pytest.mark.parametrize("kind", ["tiny", "fgemr"])
@pytest.mark.parametrize("scorer", list(SCORERS))
def test_each_pair_filter_over_each_scorer(kind, scorer, smoke_members, fgemr_members, documents):
    """No filter, settled pairs and the early exit over each scorer: settled pairs change no relation, the early exit
    does what the replay of every member's probabilities says; a stacked scorer is one stage, so nothing closes."""
    if kind == "fgemr" and scorer == "fold":
        with pytest.raises(ValueError, match="FGEMR members type genes with their own classifiers"):
            Predictor(_members(kind, smoke_members, fgemr_members), device="cpu", **SCORERS[scorer])
        return
    rule = VoteRule("hard")
    predictor = Predictor(_members(kind, smoke_members, fgemr_members), device="cpu", **SCORERS[scorer])
    job = predictor.plan.prepare(documents)
    full = predictor.scorer.probabilities(job)
    assert predictor.scorer.execution == ("fold" if scorer == "fold" else "loop")
    members = len(predictor.members)
    for closing in (SettledPairs(rule, members), EarlyExit(rule, members, 0.5)):
        scorer_ = Scorer(predictor.members, predictor.scorer.stages, device=CPU, execution=predictor.execution,
                         closing=closing)
        found = scorer_.probabilities(job, skip_settled=True)
        if scorer == "fold":
            assert torch.equal(found, full) and scorer_.scored_pairs == members * job.pairs
            continue
        expected, scored = run_in_turn(full, torch.ones(members), "hard", None, getattr(closing, "confidence", None))
        assert scorer_.scored_pairs == scored <= members * job.pairs
        assert torch.equal(found.argmax(-1), expected.argmax(-1))
        if not closing.exits:
            assert rule.decode(job.candidates, found) == rule.decode(job.candidates, full)


# ---- every supported combination, once ----------------------------------------------------------------------------
def supported_combinations():
    """Every combination of options the rules accept."""
    for precision, execution, early_exit, vote, margin in itertools.product(
            PRECISIONS, EXECUTIONS, (None, 0.7), ("hard", "soft"), (None, 0.0)):
        try:
            yield InferenceOptions(precision=precision, execution=execution, early_exit=early_exit, vote=vote,
                                   cascade_margin=margin)
        except ValueError:
            continue


def test_the_supported_combinations_are_these():
    combinations = list(supported_combinations())
    # per vote: fp32 and bf16 each 3 executions exact + 2 in turn with the exit; cascade 2 × 2 × 2 margins
    assert len(combinations) == 2 * (2 * (3 + 2) + 2 * 2 * 2) == 36
    assert not any(o.execution == "fold" and (o.early_exit or o.precision == "cascade") for o in combinations)


def _labels(predictions) -> list[tuple]:
    return [(r.pmid, r.chemical, r.gene, r.type) for preds in predictions for r in preds]


@pytest.fixture(scope="module")
def loop_relations(smoke_members, documents):
    """The members in turn in fp32, per vote: what every exact combination must output."""
    return {vote: _labels(Predictor([load_artifact(p) for p in smoke_members], device="cpu", execution="loop",
                                    vote=vote, precision="fp32").predict(documents[:3])) for vote in ("hard", "soft")}


@pytest.mark.parametrize("options", list(supported_combinations()), ids=lambda o: "-".join(
    str(v) for v in (o.precision, o.execution, o.early_exit, o.vote, o.cascade_margin)))
def test_every_supported_combination_runs_on_the_tiny_ensemble(options, smoke_members, documents, loop_relations):
    predictor = Predictor([load_artifact(p) for p in smoke_members], device="cpu", options=options)
    predictions = predictor.predict(documents[:3])
    assert len(predictions) == 3 and predictor.scorer.scored_pairs > 0
    if options.precision in ("bf16", "fp32") and options.early_exit is None:  # exact paths: the loop's relations
        assert _labels(predictions) == loop_relations[options.vote]
