"""AdamW (fused, on CPU and CUDA) with linear warm-up and decay; shared by the relation model and the FGEMR gene typer.

Fused because training skips a step with a non-finite gradient on the device, through the ``found_inf`` tensor
that only the fused implementation honours.
"""

from __future__ import annotations

import re

import torch

from drugprot.errors import DrugprotError

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, device: torch.device,
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, no weight decay on biases and norms.

    ``layer_decay`` below 1 (layer-wise learning-rate decay, the usual recipe for large encoders): the parameters
    above the encoder (the heads) keep ``lr``, its top layer gets ``lr · layer_decay``, each layer below one more
    factor, the embeddings ``lr · layer_decay^(layers + 1)``. Groups run from the top down, so the first group's rate
    is ``lr``'s schedule.
    """
    depth = _layer_depths(model) if layer_decay != 1.0 else None
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = not (param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower())
            groups.setdefault((depth(name) if depth else 0, decays), []).append(param)
    top = max(d for d, _ in groups) if depth else 0
    ordered = sorted(groups, key=lambda key: (-key[0], not key[1]))
    return torch.optim.AdamW([{"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0,
                               "lr": lr * layer_decay ** (top - key[0])} for key in ordered], lr=lr, fused=True)


def _layer_depths(model: torch.nn.Module):
    """name -> depth: 0 the encoder's embeddings, i + 1 its layer i, layers + 1 everything else (the heads).

    The encoder is ``model.encoder`` (a transformers model, ``config.num_hidden_layers`` layers whose parameter
    names hold ``layer.<i>.``); an encoder named otherwise cannot take a layer-wise decay and is refused.
    """
    encoder = getattr(model, "encoder", None)
    layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    names = [name for name, _ in encoder.named_parameters()] if layers else []
    found = {int(match.group(1)) for name in names if (match := _LAYER.search(name))}
    if not layers or found != set(range(layers)) or not any("embeddings" in name for name in names):
        raise DrugprotError(f"train.layer_decay: cannot find the encoder's {layers or 'unknown number of'} layers and "
                         f"its embeddings in its parameter names (layers found: {sorted(found)}); this encoder "
                         f"takes no layer-wise decay: set train.layer_decay to 1")

    def depth(name: str) -> int:
        if not name.startswith("encoder."):
            return layers + 1
        if "embeddings" in name:
            return 0
        match = _LAYER.search(name)
        return int(match.group(1)) + 1 if match else layers + 1

    return depth


def linear_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule: the rate rises from 0 at step 0 to the peak at ``warmup_steps``, then falls to 0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
