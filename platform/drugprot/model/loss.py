"""Focal loss over soft targets: FL = −Σ_c y_c (1 − p_c)^γ log p_c, averaged over the batch.

With γ = 0 this is exactly cross-entropy (soft-target form); multi-label pairs spread y over their gold types.
Distillation (Hinton et al., 2015) adds T²·KL(teacher_T ‖ student_T), both distributions softened by T.
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


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(log teacher / T) ‖ softmax(logits / T)), averaged over the batch (T² keeps gradients on the
    gold loss's scale). ``teacher`` holds probabilities (rows sum to 1)."""
    soft_teacher = F.softmax(teacher.float().clamp_min(1e-8).log() / temperature, dim=-1)
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, soft_teacher, reduction="batchmean") * temperature ** 2
