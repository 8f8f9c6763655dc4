"""Focal loss over soft targets: FL = −Σ_c y_c (1 − p_c)^γ log p_c, averaged over the batch.

With γ = 0 this is exactly cross-entropy (soft-target form); multi-label pairs spread y over their gold types.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), dim=-1)
    if gamma == 0:
        return -(target * log_p).sum(-1).mean()
    weight = (1.0 - log_p.exp()).clamp_min(0.0).pow(gamma)
    return -(target * weight * log_p).sum(-1).mean()
