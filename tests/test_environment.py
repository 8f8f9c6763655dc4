"""The ecosystem's environment variables: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > the default, and
``--address`` > ``RAY_ADDRESS`` > a private local Ray, for every command that has those flags; plus the exit-status
convention shared by every command (2 only for argparse usage errors, 1 for refused input or a failed run)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from drugprot.cli import build_parser, main, resolve_environment
from drugprot.config import SAMPLE_DIR
from drugprot.mlflow_store import normalize_tracking_uri
from test_ensemble import biased_ensemble, biased_members  # noqa: F401
from test_registry import registered, store  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
DEAD_PORT = 6419

# the smallest valid command line of each command that has the flag
STORE_COMMANDS = {
    "predict": ["predict", "--model", "m", "--data", "d", "--out", "o"],
    "tune": ["tune"],
    "ensemble": ["ensemble", "--study", "s"],
    "serve": ["serve", "--model", "m"],
    "distill": ["distill", "--teacher", "models:/m@champion", "--config", "c.yaml", "--out", "o"],
    "manifest": ["manifest", "-"],
}
RAY_COMMANDS = {"tune": (["tune"], "address"), "serve": (["serve", "--model", "m"], "address"),
                "predict": (STORE_COMMANDS["predict"] + ["--ray"], "ray_address")}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    found = {a.dest for a in parser._actions}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _dests(sub)
    return found


def test_the_tables_cover_every_command_with_a_store_or_a_ray_address():
    commands = _subcommands(build_parser())
    assert {name for name, sub in commands.items() if "tracking_uri" in _dests(sub)} == set(STORE_COMMANDS)
    assert {name for name, sub in commands.items() if _dests(sub) & {"address", "ray_address"}} == set(RAY_COMMANDS)


@pytest.mark.parametrize("command", sorted(STORE_COMMANDS))
def test_tracking_uri_flag_then_environment_then_default(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = STORE_COMMANDS[command]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_environment(build_parser().parse_args(argv)).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert resolve_environment(build_parser().parse_args(argv)).tracking_uri == f"sqlite:///{tmp_path / 'from-env.db'}"
    flagged = build_parser().parse_args(argv + ["--tracking-uri", "http://127.0.0.1:5999"])
    assert resolve_environment(flagged).tracking_uri == "http://127.0.0.1:5999"


@pytest.mark.parametrize("command", sorted(RAY_COMMANDS))
def test_ray_address_flag_then_environment_then_local(command, monkeypatch):
    argv, dest = RAY_COMMANDS[command]
    flag = "--" + dest.replace("_", "-")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert getattr(resolve_environment(build_parser().parse_args(argv)), dest) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert getattr(resolve_environment(build_parser().parse_args(argv)), dest) == "10.0.0.1:6379"
    assert getattr(resolve_environment(build_parser().parse_args(argv + [flag, "auto"])), dest) == "auto"


def test_predict_reads_a_registry_model_from_the_store_in_the_environment(registered, store, tmp_path, capsys, monkeypatch):  # noqa: F811
    flagged, from_env = tmp_path / "flag.tsv", tmp_path / "env.tsv"
    common = ["predict", "--model", "models:/dp@champion", "--data", str(SAMPLE_DIR), "--device", "cpu"]
    assert main([*common, "--tracking-uri", store.uri, "--out", str(flagged)]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert main([*common, "--out", str(from_env)]) == 0, capsys.readouterr().err
    assert from_env.read_text() == flagged.read_text() and flagged.read_text().strip()


def test_serve_hands_its_replicas_the_resolved_store(registered, store, tmp_path, monkeypatch):  # noqa: F811
    """The replica gets the absolute store resolved by the CLI, so it needs neither the variable nor the folder."""
    from drugprot.cli.serve import serve_options
    from drugprot.serving.options import parse_options
    from drugprot.serving.service import ModelService

    relative = Path(store.uri[len("sqlite:///"):]).relative_to(Path.cwd().parent)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///../{relative}")
    args = resolve_environment(build_parser().parse_args(["serve", "--model", "models:/dp@champion"]))
    options = parse_options(serve_options(args) | {"warmup_rounds": 0})
    assert options.tracking_uri == normalize_tracking_uri(store.uri)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # a replica on another node, in another folder, without the variable
    info = ModelService.load(options).model_info()  # what the model deployment's replica runs
    assert (info.name, info.version, info.alias) == ("dp", "1", "champion")


def test_ensemble_reads_the_store_in_the_environment(registered, store, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert main(["ensemble", "--study", "nope", "--no-log", "--out", str(tmp_path / "e")]) == 1
    assert f"no study named 'nope' in {normalize_tracking_uri(store.uri)}" in capsys.readouterr().err


def test_tune_reads_the_store_and_the_cluster_from_the_environment(tmp_path, fresh_drugprot, monkeypatch):
    monkeypatch.setenv("DRUGPROT_CONNECT_TIMEOUT", "2")
    argv = ["tune", "--config", str(REPO / "configs/smoke.yaml"), "--space", str(REPO / "search_spaces/smoke.yaml"),
            "--name", "x", "--storage", str(tmp_path / "storage")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{DEAD_PORT}")
    done = fresh_drugprot(argv)
    assert done.returncode == 1
    assert f"--tracking-uri http://127.0.0.1:{DEAD_PORT}: no MLflow server answers" in done.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{DEAD_PORT}")
    start = time.monotonic()
    done = fresh_drugprot(argv)
    assert done.returncode == 1
    assert f"--address 127.0.0.1:{DEAD_PORT}: no Ray cluster answers" in done.stderr
    assert time.monotonic() - start < 60 and done.stdout.endswith("ray initialized: False\n")


# ---- exit status ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["nosuchcommand"],
    ["predict", "--data", "d", "--out", "o"],  # missing --model
    ["evaluate", "--gold", "g", "--pred", "p", "--bogus"],
    ["data", "stats", "--interval", "1"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "usage: drugprot" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["data", "stats", "--interval", "1", "5"], "--interval: must satisfy LO <= 0 <= HI, got 1 5"),
    (["evaluate", "--gold", str(SAMPLE_DIR), "--pred", "/nonexistent/pred.tsv"], "/nonexistent/pred.tsv"),
    (["train", "--set", "train.lr=-1", "--out", "/nonexistent/run"], "train.lr"),
    (["predict", "--model", "models:/x", "--data", str(SAMPLE_DIR), "--out", "o"], "expected models:/NAME@ALIAS"),
])
def test_refused_input_exits_1_with_the_reason(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"drugprot {argv[0]}: error:" in err and message in err


def test_a_failed_check_exits_1(make_corpus, capsys):
    root = make_corpus(abstracts="1\tAspirin.\tText.\n", entities="1\tT1\tCHEMICAL\t0\t3\tAsp\n1\tT2\tGENE\t0\t9\tx\n")
    assert main(["data", "check", "--data", str(root)]) == 1
    assert "training: INVALID" in capsys.readouterr().out


def test_logging_a_model_leaves_the_environment_variables_as_they_were(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; afterwards it must not look like the user's choice."""
    import os

    from drugprot.ensemble.publish import _tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///kept.db")
    with _tracking(f"sqlite:///{tmp_path / 'm.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("m.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ and os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///kept.db"
