"""Distillation mechanics on CPU with tiny models: the loss, a student pulled towards its teacher's probabilities,
and ``drugprot distill`` end to end (teacher = a tiny three-member ensemble folder, student registered with its
teacher recorded)."""

from __future__ import annotations

import json

import pytest
import torch

from drugprot.cli import main
from drugprot.encoding import LABEL_INDEX, LABELS
from drugprot.model.loss import distillation_loss
from fixtures_models import REPO, smoke_config
from test_ensemble import biased_ensemble, biased_members  # noqa: F401  (fixtures)

SMOKE = REPO / "configs" / "smoke.yaml"


def test_distillation_loss_is_zero_at_the_teacher_and_grows_away_from_it():
    teacher = torch.softmax(torch.randn(6, len(LABELS), generator=torch.Generator().manual_seed(0)), -1)
    for temperature in (1.0, 2.0, 5.0):
        assert distillation_loss(teacher.log(), teacher, temperature).item() == pytest.approx(0.0, abs=1e-5)
    logits = torch.zeros(6, len(LABELS), requires_grad=True)
    loss = distillation_loss(logits, teacher, 2.0)
    loss.backward()
    assert loss.item() > 0
    step = logits - logits.grad  # one gradient step moves the student's distribution towards the teacher's
    assert distillation_loss(step, teacher, 2.0) < loss


def test_training_follows_the_teachers_probabilities(tmp_path):
    """A teacher that says INHIBITOR for every pair, with all the loss on it: the student's dev argmax follows."""
    from drugprot.model.dev_probabilities import FILE, load_dev_probabilities
    from drugprot.training import train

    def always_inhibitor(documents, candidates):
        table = torch.full((len(candidates), len(LABELS)), 0.01 / (len(LABELS) - 1))
        table[:, LABEL_INDEX["INHIBITOR"]] = 0.99
        return table

    config = smoke_config(**{"train.epochs": 1, "train.lr": "3e-3", "distill.weight": 1.0, "distill.temperature": 1.0})
    train(config, tmp_path / "student", teacher=always_inhibitor, progress=False, log=lambda _: None)
    stored = load_dev_probabilities(tmp_path / "student" / FILE)
    share = (stored.probabilities.argmax(-1) == LABEL_INDEX["INHIBITOR"]).float().mean().item()
    assert share > 0.9


def test_teacher_giving_the_wrong_shape_is_refused_before_anything_is_written(tmp_path):
    from drugprot.training import train

    with pytest.raises(ValueError, match=r"teacher gave \(1, 14\) probabilities for \d+ training pairs"):
        train(smoke_config(), tmp_path / "run", teacher=lambda docs, cands: torch.zeros(1, len(LABELS)), progress=False,
              log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_cli_distill_compares_on_half_b_and_registers_the_student_with_its_teacher(biased_ensemble, tmp_path, capsys):  # noqa: F811
    from drugprot import mlflow_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(biased_ensemble), "--config", str(SMOKE), "--set", "train.epochs=1",
                 "--set", "distill.temperature=3", "--out", str(out), "--device", "cpu", "--json", "--quiet",
                 "--register", "dp-student", "--tracking-uri", uri]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in summary["half_b"]] == ["teacher", "student"] and summary["temperature"] == 3
    for row in summary["half_b"]:
        assert 0 <= row["f1"] <= 1 and row["pairs"] > 0 and row["pairs_per_s"] > 0
    config = json.loads((out / "model" / "drugprot.json").read_text())["config"]
    assert config["distill"] == {"temperature": 3.0, "weight": 0.5, "teacher": str(biased_ensemble)}
    registration = summary["registration"]
    version = mlflow_store.client(mlflow_store.normalize_tracking_uri(uri)).get_model_version("dp-student", registration["version"])
    assert version.tags["teacher"] == str(biased_ensemble) and version.tags["gate_on"] == "dev half B"
    meta = json.loads((out / "registered" / "ensemble.json").read_text())
    assert meta["source"] == {"selection": "distilled", "teacher": str(biased_ensemble)}


def test_cli_distill_refuses_an_unknown_teacher_before_training(tmp_path, capsys):
    code = main(["distill", "--teacher", str(tmp_path / "nope"), "--config", str(SMOKE), "--out", str(tmp_path / "s")])
    assert code != 0 and f"--teacher {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_distill_refuses_a_teacher_chosen_on_another_split_before_training(biased_ensemble, tmp_path, capsys):  # noqa: F811
    code = main(["distill", "--teacher", str(biased_ensemble), "--config", str(SMOKE), "--set", "data.selection_seed=1",
                 "--out", str(tmp_path / "s"), "--device", "cpu", "--quiet"])
    assert code != 0 and (f"--teacher {biased_ensemble} was chosen on dev half A of data.selection_seed 0, the "
                          "student's config says 1; set data.selection_seed=0") in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
