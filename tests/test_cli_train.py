"""``drugprot train`` → ``predict`` → ``evaluate`` in-process, and the exit codes and messages of refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from drugprot.cli import main
from drugprot.config import SAMPLE_DIR
from fixtures_models import SMOKE_CONFIG


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--config", str(SMOKE_CONFIG), "--out", str(out), "--set", "train.epochs=1",
                 "--set", "train.lr=3e-3", "--quiet"])
    assert code == 0
    return out


def test_train_writes_a_run_folder(trained_run):
    assert (trained_run / "model" / "manifest.json").is_file()
    assert (trained_run / "metrics.json").is_file() and (trained_run / "config.yaml").is_file()
    assert "epochs: 1.0" in (trained_run / "config.yaml").read_text()  # the --set override was applied


def test_train_predict_evaluate(trained_run, tmp_path, capsys):
    predictions = tmp_path / "p.tsv"
    assert main(["predict", "--model", str(trained_run), "--data", str(SAMPLE_DIR), "--out", str(predictions),
                 "--device", "cpu"]) == 0
    assert predictions.is_file()
    assert "relations for 10 documents written to" in capsys.readouterr().out
    for line in predictions.read_text().splitlines():
        pmid, rtype, arg1, arg2 = line.split("\t")
        assert arg1.startswith("Arg1:T") and arg2.startswith("Arg2:T")
    assert main(["evaluate", "--gold", str(SAMPLE_DIR), "--pred", str(predictions)]) == 0
    out = capsys.readouterr().out
    assert "micro precision" in out and "recall" in out and "f1" in out


def test_predict_accepts_the_model_folder_itself(trained_run, tmp_path):
    predictions = tmp_path / "p.tsv"
    assert main(["predict", "--model", str(trained_run / "model"), "--data", str(SAMPLE_DIR), "--out", str(predictions),
                 "--device", "cpu"]) == 0


def test_negative_lr_exits_1_naming_the_key(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", str(SMOKE_CONFIG), "--out", str(out), "--set", "train.lr=-1", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "drugprot train: error:" in err and "train.lr" in err and "got -1" in err
    assert not out.exists()


def test_malformed_set_exits_1(tmp_path, capsys):
    assert main(["train", "--config", str(SMOKE_CONFIG), "--out", str(tmp_path / "r"), "--set", "train.lr"]) == 1
    assert "expected key=value" in capsys.readouterr().err


def test_predict_with_a_tampered_model_exits_1_naming_the_file(smoke_model_dir, tmp_path, capsys):  # noqa: F811
    model = Path(shutil.copytree(smoke_model_dir, tmp_path / "model"))
    config = model / "encoder" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    code = main(["predict", "--model", str(model), "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "p.tsv"),
                 "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "drugprot predict: error:" in err and "encoder/config.json" in err and "sha256 mismatch" in err
    assert not (tmp_path / "p.tsv").exists()


def test_predict_missing_model_exits_1(tmp_path, capsys):
    code = main(["predict", "--model", str(tmp_path / "nope"), "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "p")])
    assert code == 1 and "no such folder" in capsys.readouterr().err
