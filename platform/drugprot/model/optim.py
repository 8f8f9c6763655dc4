"""AdamW (fused, on CPU and CUDA) with linear warm-up and decay; shared by the relation model and the FGEMR gene typer.

Fused because training skips a step with a non-finite gradient on the device, through the ``found_inf`` tensor
that only the fused implementation honours.
"""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def linear_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule: the rate rises from 0 at step 0 to the peak at ``warmup_steps``, then falls to 0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
