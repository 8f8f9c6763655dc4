"""Compiled training with shape buckets (drugprot.model.compiled): batch planning, padding, options, and the loss."""

from __future__ import annotations

import copy

import pytest
import torch

from drugprot.config import ConfigError, load_config
from drugprot.model.compiled import bucket_width, compiled_forward, planned_batches, to_bucket

from fixtures_models import SMOKE_CONFIG, train_smoke

BUCKETS = [32, 64, 96, 128]


@pytest.fixture(scope="module")
def encoded(smoke_model_dir, sample_dir):
    from drugprot.candidates import corpus_candidates
    from drugprot.corpus import read_split
    from drugprot.encoding import PairEncoder
    from drugprot.model.artifacts import load_artifact

    member = load_artifact(smoke_model_dir)
    docs = read_split(sample_dir, "training").documents[:6]
    candidates, _ = corpus_candidates(docs, (-10, 16))
    pairs, _ = PairEncoder(member.tokenizer, max_length=128).encode(docs, candidates)
    return member, pairs


def test_bucket_width_is_the_smallest_bucket_that_holds_the_length():
    assert [bucket_width(n, BUCKETS) for n in (1, 32, 33, 128)] == [32, 32, 64, 128]
    with pytest.raises(ValueError, match="a pair of 129 tokens is longer than the largest shape bucket 128"):
        bucket_width(129, BUCKETS)


def test_bucketed_batches_keep_the_budget_after_padding_and_share_a_shape_per_bucket(encoded):
    from drugprot.encoding import iterate_batches

    member, pairs = encoded
    plan = planned_batches(pairs, token_budget=512, max_pairs=16, buckets=BUCKETS, shuffle_seed=3)
    assert sorted(i for batch in plan for i in batch) == list(range(len(pairs)))  # every pair once
    shapes = {}
    for batch in iterate_batches(pairs, plan, member.tokenizer.pad_token_id):
        padded = to_bucket(batch, BUCKETS, member.tokenizer.pad_token_id)
        width = padded.input_ids.shape[1]
        assert width in BUCKETS and width * len(padded.index) <= 512
        assert torch.equal(padded.attention_mask[:, : batch.input_ids.shape[1]], batch.attention_mask)
        assert int(padded.attention_mask[:, batch.input_ids.shape[1]:].sum()) == 0  # padding is masked
        shapes.setdefault(width, set()).add(tuple(padded.input_ids.shape))
    assert all(len(seen) <= 2 for seen in shapes.values()), shapes  # full batches and one last batch per bucket
    assert to_bucket(batch, None, 0) is batch


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.shape_buckets=[64, 32, 128]"], r"train.shape_buckets: must be increasing lengths of at least 8"),
    (["train.shape_buckets=[32, 64]"], r"the largest bucket \(64\) must hold encoder.max_length \(128\)"),
    (["train.compile_mode=reduce-overhead"], r"compile_mode reduce-overhead needs train.compile: true"),
])
def test_compile_options_are_checked_when_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE_CONFIG, overrides)


def test_training_with_shape_buckets_pads_every_micro_batch_to_a_bucket(tmp_path, monkeypatch):
    """The training loop plans its steps with bucket widths and pads each micro-batch to one (eager here)."""
    from drugprot import training

    widths, real = [], training.train_step

    def recording(model, batch, *args, **kwargs):
        widths.extend(part.input_ids.shape[1] for part in ([batch] if hasattr(batch, "input_ids") else batch))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(training, "train_step", recording)
    result = train_smoke(tmp_path, **{"train.epochs": 0.5, "train.shape_buckets": "[32, 64, 96, 128]",
                                      "data.max_train_docs": 6, "data.max_dev_docs": 2})
    assert widths and set(widths) <= set(BUCKETS), sorted(set(widths))
    assert result.evaluations  # it trained and evaluated


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):  # attention's functional dropout
            module.dropout_prob = 0.0
    return model


@pytest.mark.slow
def test_compiled_training_with_buckets_gives_the_eager_loss(encoded):
    """Three optimisation steps on the same batches: torch.compile (inductor on CPU) with bucket padding against
    the eager loop on unpadded batches; dropout off so both see the same function. Slow: compiling on CPU takes
    about a minute of CPU time."""
    from drugprot.encoding import iterate_batches
    from drugprot.model.optim import build_optimizer
    from drugprot.training import train_step

    member, pairs = encoded
    cpu, pad = torch.device("cpu"), member.tokenizer.pad_token_id
    plan = planned_batches(pairs, token_budget=512, max_pairs=16, buckets=BUCKETS, shuffle_seed=1)[:3]
    batches = list(iterate_batches(pairs, plan, pad))
    eager = _without_dropout(copy.deepcopy(member.model))
    compiled = _without_dropout(copy.deepcopy(member.model))
    forward = compiled_forward(compiled, enabled=True, buckets=BUCKETS)
    losses = {"eager": [], "compiled": []}
    for name, model, run, shaped in (("eager", eager, eager, lambda b: b),
                                     ("compiled", compiled, forward, lambda b: to_bucket(b, BUCKETS, pad))):
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, device=cpu)
        for batch in batches:
            loss, _ = train_step(model, shaped(batch), optimizer, device=cpu, precision="fp32", forward=run)
            losses[name].append(float(loss))
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)
    assert len(set(losses["eager"])) == 3  # the steps moved the weights: a real comparison, not one loss thrice


def test_throughput_bench_refuses_an_unknown_loop_before_loading_anything():
    import sys

    sys.path.insert(0, str(SMOKE_CONFIG.parents[1] / "bench"))
    try:
        import train_throughput
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match=r"loops: unknown \['eager'\] \(known: plain, ours, compiled, cuda-graphs\)"):
        train_throughput.measure(encoder="no-such-encoder", loops=("ours", "eager"))
