"""The learning-rate schedule: warm-up starts at 0 on the first step and peaks exactly at the warm-up step; the
layer-wise decay of the rate down the encoder."""

from __future__ import annotations

import pytest
import torch

from drugprot.model.optim import build_optimizer, linear_schedule


def rates(total: int, warmup: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.0, device=torch.device("cpu"))
    scheduler = linear_schedule(optimizer, total_steps=total, warmup_steps=warmup)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_warm_up_rises_from_zero_to_the_peak_then_decays_to_zero():
    assert rates(10, 4) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])


def test_no_warm_up_starts_at_the_peak():
    assert rates(4, 0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def tiny_relation_model():
    from drugprot.model.encoder import build_encoder
    from drugprot.model.heads import RelationModel

    return RelationModel(build_encoder("tiny-random"), system="multitask")  # 2 layers


def test_layer_decay_gives_each_layer_its_rate_and_keeps_the_schedule_shape():
    model = tiny_relation_model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"), layer_decay=0.5)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"classifier.weight": 1e-3, "entity_head.bias": 1e-3,  # the heads: lr
                "encoder.encoder.layer.1.output.dense.weight": 5e-4,  # top layer: lr * 0.5
                "encoder.encoder.layer.0.attention.self.query.weight": 2.5e-4,  # the layer below: lr * 0.5^2
                "encoder.embeddings.word_embeddings.weight": 1.25e-4}  # embeddings: lr * 0.5^3
    named = dict(model.named_parameters())
    assert {name: rate[id(named[name])] for name in expected} == pytest.approx(expected)
    assert len(rate) == len(named)  # every parameter in exactly one group
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the first group is the top: the reported rate is lr's
    no_decay = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert id(named["encoder.encoder.layer.0.attention.output.LayerNorm.weight"]) in no_decay
    assert id(named["encoder.encoder.layer.0.attention.self.query.weight"]) not in no_decay
    scheduler = linear_schedule(optimizer, total_steps=10, warmup_steps=4)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups] == pytest.approx(
        [g["initial_lr"] / 1e-3 for g in optimizer.param_groups])  # warm-up scales every layer alike


def test_no_layer_decay_keeps_one_rate_in_two_groups():
    optimizer = build_optimizer(tiny_relation_model(), lr=1e-3, weight_decay=0.01, device=torch.device("cpu"))
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 0.01), (1e-3, 0.0)]


def test_layer_decay_refuses_a_model_whose_layers_it_cannot_find():
    from drugprot.errors import DrugprotError

    with pytest.raises(DrugprotError, match=r"train\.layer_decay: cannot find the encoder's unknown number of layers .*"
                                            r"set train\.layer_decay to 1"):
        build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0, device=torch.device("cpu"), layer_decay=0.9)
