"""Search-space files: the bundled spaces, conversion to Optuna, application to a config, every error message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from drugprot.config import load_config  # noqa: E402
from drugprot.tuning.space import SpaceError, load_space, parse_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACES = REPO / "search_spaces"
SMOKE = load_config(REPO / "configs" / "smoke.yaml")


@pytest.mark.parametrize("name", ["paper", "smoke", "wide"])
def test_bundled_spaces_load_against_the_smoke_config(name):
    space = load_space(SPACES / f"{name}.yaml", SMOKE)
    names = [p.name for p in space.searched]
    for expected in ("loss.gamma", "loss.lambda", "train.lr", "sampling.interval.lo", "sampling.interval.hi"):
        assert expected in names
    assert space.sets_seed == (name == "smoke")  # each trial gets its own seed; CI's tiny model learns with 13 only
    assert space.max_t(SMOKE) == 4  # 2 epochs, an evaluation every half epoch


def test_paper_space_matches_the_paper():
    space = load_space(SPACES / "paper.yaml", SMOKE)
    by_name = {p.name: p for p in space.params}
    assert (by_name["loss.gamma"].kind, by_name["loss.gamma"].low, by_name["loss.gamma"].high) == ("uniform", 0.0, 5.0)
    assert (by_name["loss.lambda"].low, by_name["loss.lambda"].high) == (0.0, 1.0)
    assert (by_name["train.lr"].kind, by_name["train.lr"].low, by_name["train.lr"].high) == ("loguniform", 1e-5, 1e-4)
    assert by_name["loss.lambda"].when == (("model.system", ("multitask",)),)
    assert (by_name["sampling.interval.lo"].kind, by_name["sampling.interval.lo"].low,
            by_name["sampling.interval.lo"].high) == ("int", -16, -4)
    assert (by_name["sampling.interval.hi"].low, by_name["sampling.interval.hi"].high) == (8, 24)
    assert "train.seed" not in by_name
    assert "model.system" not in by_name and "encoder.name" not in by_name  # both come from the config
    assert (space.scheduler.metric, space.scheduler.mode) == ("dev_f1_a", "max")


def test_wide_space_adds_dropout_warmup_batch_size_and_system():
    searched = {p.name: p for p in load_space(SPACES / "wide.yaml", SMOKE).searched}
    assert {"model.dropout", "train.warmup", "train.batch_pairs", "model.system"} <= set(searched)
    assert searched["train.batch_pairs"].choices == (8, 16, 32)
    assert "train.token_budget" not in searched  # a memory cap only: it changes no optimizer step


def test_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = load_space(SPACES / "paper.yaml", SMOKE).optuna_distributions()
    assert dists["train.lr"] == FloatDistribution(1e-5, 1e-4, log=True)
    assert dists["loss.gamma"] == FloatDistribution(0.0, 5.0)
    assert dists["sampling.interval.lo"] == IntDistribution(-16, -4)  # both ends included
    assert isinstance(load_space(SPACES / "wide.yaml", SMOKE).optuna_distributions()["model.system"],
                      CategoricalDistribution)


def test_apply_maps_the_interval_pair_and_fixed_values():
    space = parse_space({"params": {"sampling.interval": {"lo": {"int": [-9, -5]}, "hi": {"int": [9, 12]}},
                                    "model.dropout": {"fixed": 0.25}, "loss.lambda": {"uniform": [0, 1]}}},
                        "s.yaml", SMOKE)
    config = space.apply(SMOKE, {"sampling.interval.lo": -7, "sampling.interval.hi": 11, "loss.lambda": 0.3})
    assert config.sampling.interval == (-7, 11)
    assert config.model.dropout == 0.25 and config.loss.lambda_ == 0.3
    assert config.train.lr == SMOKE.train.lr  # untouched keys come from the config
    assert space.apply(SMOKE, {"sampling.interval.lo": -6}).sampling.interval == (-6, SMOKE.sampling.interval[1])
    assert space.apply(SMOKE, {"train.seed": 7}).train.seed == 7  # the trial's derived seed


def test_optuna_samples_valid_configs():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(SPACES / "wide.yaml", SMOKE)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=space.seed))
    for _ in range(10):
        trial = study.ask()
        config = space.apply(SMOKE, space.suggest(trial, SMOKE.dump()))
        lo, hi = config.sampling.interval
        assert -16 <= lo <= -4 and 8 <= hi <= 24


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("params:\n  train.lrr: {uniform: [0.1, 0.2]}\n",
     r"bad.yaml: params.train.lrr: unknown config key 'train.lrr' \(train has: .*lr"),
    ("params:\n  trian.lr: {uniform: [0.1, 0.2]}\n", r"bad.yaml: params.trian.lr: unknown config key 'trian.lr' \(sections: "),
    ("params:\n  loss.lambda: {uniform: [0, 1], when: {model.sytem: multitask}}\n",
     r"bad.yaml: params.loss.lambda: when: \{model.sytem: \[multitask\]\}: unknown config key 'model.sytem' "
     r"\(model has: .*system"),
    ("params:\n  model.system: {choice: [baseline, multitask]}\n"
     "  loss.lambda: {uniform: [0, 1], when: {model.system: multitsk}}\n",
     r"bad.yaml: params.loss.lambda: when: \{model.system: \[multitsk\]\}: 'multitsk' is not one of model.system's "
     r"choices \[baseline, multitask\]"),
    ("params:\n  loss.lambda: {uniform: [0, 1], when: {model.system: multitsk}}\n",
     r"bad.yaml: params.loss.lambda: when: \{model.system: \[multitsk\]\}: 'multitsk' is not a valid model.system"),
    ("params:\n  model.dropout: {uniform: [0, 0.3]}\n  loss.lambda: {uniform: [0, 1], when: {model.dropout: 0.1}}\n",
     r"bad.yaml: params.loss.lambda: when: \{model.dropout: \[0.1\]\}: model.dropout is searched as uniform; "
     r"a condition needs a choice"),
    ("params:\n  model.system: {fixed: baseline}\n  loss.lambda: {uniform: [0, 1], when: {model.system: multitask}}\n",
     r"bad.yaml: params.loss.lambda: when: .*: model.system is fixed to 'baseline' in this space, so loss.lambda would "
     r"never be sampled"),
    ("params:\n  loss.lambda: {uniform: [0, 1], when: []}\n", r"bad.yaml: params.loss.lambda: uniform when: expected a "
     r"mapping of config keys to values"),
    ("params:\n  loss.lambda: {fixed: 0.5, when: {model.system: multitask}}\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: params.loss.lambda: fixed when: unknown key"),
    ("params:\n  sampling.interval:\n    lo: {int: [-4, 0]}\n    hi: {int: [8, 24]}\n",
     r"bad.yaml: params.sampling.interval: \[0, 8\] is within the space, and keeps only 62.0% of the development gold "
     r"relations within reach of prediction .* at least 99%; sample lo up to -4"),
    ("params:\n  sampling.interval:\n    lo: {int: [-16, -4]}\n    hi: {int: [0, 24]}\n",
     r"bad.yaml: params.sampling.interval: \[-4, 0\] .* keeps only 74.6% .*; sample hi from 8$"),
    ("params:\n  sampling.interval: {fixed: [-1, 1]}\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: params.sampling.interval: \[-1, 1\] is within the space, and keeps only 79.7%"),
    ("scheduler: {grace_period: 2, grace_epochs: 1}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: scheduler: give grace_period \(evaluations\) or grace_epochs \(epochs\), not both"),
    ("params:\n  loss.gamma: {uniform: [1.0, 1.0]}\n",
     r"bad.yaml: params.loss.gamma: uniform: empty range \[1.0, 1.0\]; use \{fixed: 1.0\}"),
    ("params:\n  loss.gamma: {uniform: [3.0, 1.0]}\n", r"bad.yaml: params.loss.gamma: uniform: low 3.0 > high 1.0"),
    ("params:\n  train.seed: {choice: []}\n", r"bad.yaml: params.train.seed: choice: expected a non-empty list"),
    ("params:\n  train.lr: {loguniform: [0.0, 0.1]}\n", r"bad.yaml: params.train.lr: loguniform: low must be > 0, got 0.0"),
    ("params:\n  loss.gamma: {normal: [0, 1]}\n", r"bad.yaml: params.loss.gamma: unknown distribution 'normal'"),
    ("params:\n  loss.gamma: [0, 1]\n", r"bad.yaml: params.loss.gamma: expected one distribution"),
    ("params:\n  train.lr: {uniform: [1.0e-5, 2.0]}\n",
     r"bad.yaml: params.train.lr: high 2.0 is not a valid train.lr: Input should be less than or equal to 1"),
    ("params:\n  model.system: {choice: [baseline, fgemr]}\n",
     r"bad.yaml: params.model.system: choice 'fgemr' is not a valid model.system: model.system 'fgemr' predicts"),
    # fine markers need FGEMR: a space that could sample them with another system is refused before any trial
    ("params:\n  model.markers: {choice: [coarse, fine]}\n",
     r"bad.yaml: params.model.markers: choice 'fine' is not a valid model.markers: model.markers 'fine' needs "
     r"model.system 'fgemr' \(got 'baseline'\)"),
    ("trials: {checkpoint_every: 0}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: trials.checkpoint_every: .*>= 1"),
    ("params:\n  sampling.interval:\n    lo: {int: [-4, 2]}\n    hi: {int: [0, 8]}\n",
     r"bad.yaml: params.sampling.interval.lo: int \[-4, 2\] allows 2, but the interval needs lo <= 0 <= hi"),
    ("params:\n  sampling.interval:\n    lo: {int: [-4, 0]}\n    hi: {int: [-2, 8]}\n",
     r"bad.yaml: params.sampling.interval.hi: int \[-2, 8\] allows -2, but .*\(hi >= 0\)"),
    ("params:\n  sampling.interval:\n    lo: {int: [0, -4]}\n    hi: {int: [0, 8]}\n",
     r"bad.yaml: params.sampling.interval.lo: int: low 0 > high -4"),
    ("params:\n  sampling.interval:\n    lo: {uniform: [-4, 0]}\n    hi: {int: [0, 8]}\n",
     r"params.sampling.interval.lo: the interval takes integers"),
    ("params:\n  sampling.interval:\n    lo: {int: [-4, 0]}\n", r"params.sampling.interval: missing 'hi'"),
    ("params:\n  sampling.interval: {fixed: [3, 8]}\n  loss.gamma: {uniform: [0, 1]}\n",
     r"params.sampling.interval: value \[3, 8\] is not a valid sampling.interval: must satisfy lo <= 0 <= hi"),
    ("params:\n  loss.gamma: {fixed: 1.0}\n", r"bad.yaml: params: nothing to search"),
    ("params: {}\n", r"bad.yaml: params: expected a non-empty mapping"),
    ("parms:\n  loss.gamma: {uniform: [0, 1]}\n", r"bad.yaml: parms: unknown key"),
    ("scheduler: {metric: accuracy}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: scheduler.metric: expected one of dev_f1_a"),
    ("scheduler: {reduction_factor: 1}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: scheduler.reduction_factor: must be > 1"),
    ("scheduler: {grace_period: 4, max_t: 2}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n",
     r"bad.yaml: scheduler.max_t: 2 is below grace_period 4"),
    ("trials: {retries: 3}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n", r"bad.yaml: trials.retries: unknown key"),
    ("params:\n  train.epochs: {uniform: [1, 3]}\n", r"bad.yaml: scheduler.max_t: required when train.epochs is searched"),
    ("params:\n  loss.gamma: {uniform: [0, 1]\n", r"bad.yaml:\d+: not valid YAML"),
    ("params:\n  loss.gamma: {uniform: [a, 1]}\n", r"bad.yaml: params.loss.gamma: uniform low: expected a number, got 'a'"),
    ("seed: true\nparams:\n  loss.gamma: {uniform: [0, 1]}\n", r"bad.yaml: seed: expected an integer, got True"),
    ("params:\n  sampling.interval:\n    lo: {int: [-4, 0]}\n    hi: {int: [0, 8]}\n    mid: 1\n",
     r"bad.yaml: params.sampling.interval.mid: unknown key"),
    ("params:\n  loss.gamma:\n    lo: {int: [-4, 0]}\n    hi: {int: [0, 8]}\n",
     r"bad.yaml: params: loss.gamma: only sampling.interval takes a \{lo, hi\} pair"),
])
def test_space_errors_name_the_file_parameter_and_key(tmp_path, text, message):
    with pytest.raises(SpaceError, match=message):
        load_space(write(tmp_path, text), SMOKE)


def test_searching_the_system_of_a_fine_marker_config_is_refused(tmp_path):
    fgemr = load_config(REPO / "configs" / "smoke.yaml", ["model.system=fgemr", "model.markers=fine"])
    with pytest.raises(SpaceError, match=r"params.model.system: choice 'multitask' is not a valid model.system: "
                                         r"model.markers 'fine' needs model.system 'fgemr' \(got 'multitask'\)"):
        load_space(write(tmp_path, "params:\n  model.system: {choice: [fgemr, multitask]}\n"), fgemr)


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match=r"nope.yaml: cannot read search space"):
        load_space(tmp_path / "nope.yaml", SMOKE)


def test_cli_reports_a_bad_space_without_traceback(tmp_path, capsys):
    from drugprot.cli import main

    bad = write(tmp_path, "params:\n  train.lrr: {uniform: [0.1, 0.2]}\n")
    code = main(["tune", "--config", str(REPO / "configs" / "smoke.yaml"), "--space", str(bad)])
    assert code == 1
    assert "drugprot tune: error: " in capsys.readouterr().err


def test_space_module_imports_neither_ray_nor_mlflow():
    code = ("import sys; import drugprot.tuning.space, drugprot.tuning; "
            "print(sorted(m for m in ('ray', 'mlflow', 'optuna', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_space_round_trips_through_yaml():
    space = load_space(SPACES / "paper.yaml", SMOKE)
    again = parse_space(yaml.safe_load(space.to_yaml()), space.source, SMOKE)
    assert again.params == space.params and again.scheduler == space.scheduler


def ask(space, config, count: int) -> list[dict]:
    """``count`` trials of the space's define-by-run search, as a study asks them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=space.sampler.tpe(seed=space.seed, startup_trials=space.startup_trials,
                                                          concurrent=1))
    out = []
    for _ in range(count):
        trial = study.ask()
        out.append(space.suggest(trial, config.dump()))
        study.tell(trial, len(out) / count)
    return out


def test_a_conditional_parameter_is_sampled_only_where_its_condition_holds():
    space = load_space(SPACES / "wide.yaml", SMOKE)
    proposals = ask(space, SMOKE, 24)
    systems = {values["model.system"] for values in proposals}
    assert {"multitask", "baseline"} <= systems
    for values in proposals:
        assert ("loss.lambda" in values) == (values["model.system"] == "multitask"), values
    # the condition can also name a key the space leaves to the config: the paper space with a baseline config
    # never samples lambda, with a multitask config always
    paper = load_space(SPACES / "paper.yaml", SMOKE)
    assert not any("loss.lambda" in values for values in ask(paper, SMOKE, 4))
    multitask = load_config(REPO / "configs" / "smoke.yaml", ["model.system=multitask"])
    assert all("loss.lambda" in values for values in ask(load_space(SPACES / "paper.yaml", multitask), multitask, 4))


def test_each_trial_gets_its_own_seed_from_the_study_seed_and_its_number():
    from drugprot.tuning.space import trial_seed

    space = load_space(SPACES / "paper.yaml", SMOKE)
    seeds = [values["train.seed"] for values in ask(space, SMOKE, 6)]
    assert seeds == [trial_seed(space.seed, number) for number in range(6)]
    assert len(set(seeds)) == 6 and all(0 <= seed < 2 ** 31 for seed in seeds)
    assert seeds == [values["train.seed"] for values in ask(space, SMOKE, 6)]  # deterministic
    assert trial_seed(1, 0) != trial_seed(0, 0)
    assert [space.apply(SMOKE, {"train.seed": seed}).train.seed for seed in seeds] == seeds
    # a space that sets the seed itself (drugprot ensemble --reseed does) keeps it
    reseed = parse_space({"params": {"train.seed": {"choice": [3, 4]}}}, "reseed", SMOKE)
    assert all(values["train.seed"] in (3, 4) for values in ask(reseed, SMOKE, 4))


@pytest.mark.parametrize("eval_every, rungs", [(0.5, [6, 18]), (0.25, [12, 36]), (1.0, [3, 9])])
def test_the_paper_space_cuts_no_earlier_than_three_epochs(eval_every, rungs):
    paper = load_config(REPO / "configs" / "paper-biobert.yaml", [f"train.eval_every={eval_every}"])
    space = load_space(SPACES / "paper.yaml", paper)
    assert space.rungs(paper) == rungs
    assert space.rungs(paper)[0] * eval_every >= 3


@pytest.mark.parametrize("grace, factor, max_t", [(1, 2, 4), (6, 3, 20), (4, 2, 8), (2, 3, 40), (3, 2.5, 50)])
def test_rungs_are_where_ray_asha_cuts(grace, factor, max_t):
    from ray.tune.schedulers import ASHAScheduler

    space = parse_space({"scheduler": {"grace_period": grace, "reduction_factor": factor, "max_t": max_t},
                         "params": {"loss.gamma": {"uniform": [0, 1]}}}, "s.yaml", SMOKE)
    scheduler = ASHAScheduler(time_attr="eval", metric="dev_f1_a", mode="max", max_t=max_t, grace_period=grace,
                              reduction_factor=factor)
    assert space.rungs(SMOKE) == sorted(m for m, _ in scheduler._brackets[0]._rungs if m < max_t)


@pytest.mark.parametrize("interval, percent", [((0, 0), 37.6), ((-1, 1), 79.7), ((-4, 8), 99.1), ((-10, 16), 100.0)])
def test_development_recall_ceiling_of_an_interval(interval, percent):
    from drugprot.tuning.space import dev_interval_ceiling

    assert round(100 * dev_interval_ceiling(*interval), 1) == percent
