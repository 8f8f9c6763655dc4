"""The learning-rate schedule: warm-up starts at 0 on the first step and peaks exactly at the warm-up step."""

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
