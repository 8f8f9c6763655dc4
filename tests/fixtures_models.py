"""Shared fixtures: tiny trained models on the bundled sample (import the fixtures you use into your test module).

Training a tiny random BERT on the 40-document sample takes a few seconds on one core, so the models are real
artifacts produced by ``drugprot.training.train``, made once per test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"


def smoke_config(**overrides):
    """The smoke config with dotted-key overrides, e.g. smoke_config(**{"train.seed": 3})."""
    from drugprot.config import load_config

    return load_config(SMOKE_CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def train_smoke(run_dir: Path, **overrides):
    from drugprot.training import train

    return train(smoke_config(**overrides), run_dir, progress=False, log=lambda _: None)


@pytest.fixture(scope="session")
def smoke_model_dir(tmp_path_factory) -> Path:
    """A trained tiny baseline model folder (``…/model``) with a sha256 manifest."""
    run = tmp_path_factory.mktemp("smoke-model")
    train_smoke(run, **{"train.epochs": 1, "train.lr": "3e-3"})
    return run / "model"


@pytest.fixture(scope="session")
def smoke_members(tmp_path_factory) -> list[Path]:
    """Three tiny baseline models of the same architecture, seeds 1, 2, 3 (an ensemble's members)."""
    members = []
    for seed in (1, 2, 3):
        run = tmp_path_factory.mktemp(f"member-{seed}")
        train_smoke(run, **{"train.epochs": 1, "train.lr": "3e-3", "train.seed": seed})
        members.append(run / "model")
    return members


def opinionated_member(source: Path, out: Path) -> Path:
    """A copy of a smoke member whose head is sharpened ×10 and re-centred on the development sample, so it predicts
    every label with clear margins (the 1-epoch smoke models predict NONE everywhere). A real, verified artifact."""
    import torch

    from drugprot.config import SAMPLE_DIR
    from drugprot.corpus import read_split
    from drugprot.inference import Predictor
    from drugprot.model.artifacts import load_artifact, save_artifact

    member = load_artifact(source)
    documents = read_split(SAMPLE_DIR, "development").documents
    head = member.model.classifier
    with torch.no_grad():
        head.weight.mul_(10.0)
        head.bias.mul_(10.0)
        predictor = Predictor([member], vote="soft", device="cpu")
        log_p = predictor.member_probabilities(documents, predictor.candidates(documents))[0].clamp_min(1e-30).log()
        head.bias.sub_(log_p.mean(0))
    info = {k: v for k, v in member.info.items() if k != "format_version"}
    return save_artifact(out, model=member.model, tokenizer=member.tokenizer, info=info)


@pytest.fixture(scope="session")
def relation_members(smoke_members, tmp_path_factory) -> list[Path]:
    """The three smoke members made opinionated: an ensemble whose members predict relations and disagree."""
    root = tmp_path_factory.mktemp("opinionated")
    return [opinionated_member(path, root / f"member-{i}") for i, path in enumerate(smoke_members)]
