"""Focal loss over soft targets: FL = −Σ_c y_c (1 − p_c)^γ log p_c, averaged over the batch.

With γ = 0 this is exactly cross-entropy (soft-target form); multi-label pairs spread y over their gold types.

Why ``(1 − p_c)`` is not computed as ``1 − exp(log p_c)``: when one logit leads the others by about 19 or more,
``p_c`` rounds to exactly 1 in fp32, ``(1 − p_c)^γ`` becomes ``0^γ``, and for 0 < γ < 1 its gradient is infinite
(NaN once multiplied by zero), which poisons the whole batch through gradient clipping. Instead
``log(1 − p_c) = logsumexp_{j≠c} z_j − logsumexp_j z_j`` is computed directly from the logits: finite for any
logits, so the weight ``exp(γ · log(1 − p_c))`` and its gradient are finite for every γ ≥ 0.

Distillation (Hinton et al., 2015) adds T²·KL(teacher_T ‖ student_T), both distributions softened by T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=-1)
    if gamma == 0:
        return -(target * log_p).sum(-1).mean()
    return -(target * (gamma * log_one_minus_softmax(logits)).exp() * log_p).sum(-1).mean()


def adaptive_threshold_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-label loss with a learned threshold (ATLOP: Zhou et al., 2021): the NONE logit is the threshold class.

    Each gold type of a pair must beat the threshold (a softmax over the gold types and the threshold), and the
    threshold must beat every other type (a softmax over the threshold and the non-gold types). A pair may then be
    given every type whose logit exceeds NONE's, with no threshold to fit afterwards. ``target`` marks gold types
    with any positive mass (a multi-label pair shares its mass); a negative pair has only NONE.
    """
    logits = logits.float()
    gold = target > 0
    gold[:, 0] = False  # the threshold class is never a gold type
    threshold = torch.zeros_like(gold)
    threshold[:, 0] = True
    masked = torch.finfo(logits.dtype).min
    gold_side = logits.masked_fill(~(gold | threshold), masked).log_softmax(-1)
    other_side = logits.masked_fill(gold, masked).log_softmax(-1)
    return (-(gold_side * gold).sum(-1) - other_side[:, 0]).mean()


def log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 − softmax(logits))`` per class, from the logits of the other classes (shape of ``logits``)."""
    classes = logits.size(-1)
    others = logits.unsqueeze(-2).expand(*logits.shape[:-1], classes, classes)
    own = torch.eye(classes, dtype=torch.bool, device=logits.device)
    return others.masked_fill(own, float("-inf")).logsumexp(-1) - logits.logsumexp(-1, keepdim=True)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(log teacher / T) ‖ softmax(logits / T)), averaged over the batch (T² keeps gradients on the
    gold loss's scale). ``teacher`` holds probabilities (rows sum to 1)."""
    soft_teacher = F.softmax(teacher.float().clamp_min(1e-8).log() / temperature, dim=-1)
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, soft_teacher, reduction="batchmean") * temperature ** 2
