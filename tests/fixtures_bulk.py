"""Fixtures for the format and bulk-prediction tests: a tiny model that predicts relations, corpora in each format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drugprot.config import SAMPLE_DIR
from drugprot.corpus import read_split


@pytest.fixture(scope="session")
def dev_sample():
    return read_split(SAMPLE_DIR, "development").documents


@pytest.fixture(scope="session")
def relation_model_dir(smoke_model_dir, dev_sample, tmp_path_factory) -> Path:
    """The smoke model with its NONE logit lowered by the median margin over the dev sample, so that about half
    the pairs become relations (a model trained for seconds predicts NONE everywhere, which would make every
    comparison of predicted relations vacuous). Saved through ``save_artifact`` (a valid manifest)."""
    from drugprot.encoding import PairEncoder
    from drugprot.inference import Predictor, pair_probabilities
    from drugprot.model.artifacts import load_artifact, save_artifact

    loaded = load_artifact(smoke_model_dir)
    encoder = PairEncoder(loaded.tokenizer, max_length=loaded.info["max_length"], markers=loaded.info["markers"])
    pairs, _ = encoder.encode(dev_sample, Predictor([loaded], device="cpu").candidates(dev_sample))
    logp = pair_probabilities(loaded.model, pairs, pad_id=loaded.tokenizer.pad_token_id, device=torch.device("cpu")).log()
    margin = float((logp[:, 0] - logp[:, 1:].max(-1).values).median()) + 0.011  # off an exact tie
    with torch.no_grad():
        loaded.model.classifier.bias[0] -= margin
    info = {k: v for k, v in loaded.info.items() if k != "format_version"}
    return save_artifact(tmp_path_factory.mktemp("relation-model") / "model", model=loaded.model,
                         tokenizer=loaded.tokenizer, info=info)
