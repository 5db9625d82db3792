"""FastSal's distillation losses (Hu & McGuinness, ICPR 2020, Eqs. 1–3).

All take the student's raw output ``logits`` ``[B, 1, H, W]`` (or its adapted features) and
return a scalar averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Eq. 3 as printed in the paper weighs its three terms equally. The authors' code
#: (``compute_log_prob_3losses``) uses 0.5·KL + 0.2·(1 − cos) + 0.3·BCE; pass those to reproduce it.
PAPER_DENSITY_WEIGHTS = (1.0, 1.0, 1.0)
AUTHORS_CODE_DENSITY_WEIGHTS = (0.5, 0.2, 0.3)


def hint_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 1: mean squared error per level between adapted student features and the teacher's
    intermediate maps, summed over the levels."""
    if len(student) != len(teacher):
        raise ValueError(f"hint loss: {len(student)} student levels vs {len(teacher)} teacher levels")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"hint loss: level {i} student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    return sum(F.mse_loss(s, t.detach()) for s, t in zip(student, teacher))


def map_teacher_loss(logits: torch.Tensor, pseudo: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2: binary cross-entropy of σ(logits) against the teacher's map in [0, 1], plus against
    the ground-truth map when there is one; each the mean over pixels. (``pipeline train --gt-maps`` gives
    the human maps, e.g. SALICON's, the paper's best setting; without it the student learns from the teacher
    alone, its COCO setting.)"""
    loss = F.binary_cross_entropy_with_logits(logits, pseudo.to(logits.dtype))
    if gt is not None:
        loss = loss + F.binary_cross_entropy_with_logits(logits, gt.to(logits.dtype))
    return loss


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per image, min → 0 and max → 1 (a constant map becomes 0)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)).view_as(x)


def density_teacher_loss(logits: torch.Tensor, teacher_log_density: torch.Tensor,
                         weights: tuple[float, float, float] = PAPER_DENSITY_WEIGHTS) -> torch.Tensor:
    """Eq. 3 for a teacher that gives a density ȳ (here as its log): with p = softmax(logits) over pixels,

    ``w_kl · KL(ȳ ‖ p) + w_cos · (1 − cos(p, ȳ)) + w_bce · BCE(σ(logits), minmax(ȳ))``.
    """
    w_kl, w_cos, w_bce = weights
    b = logits.shape[0]
    flat = logits.float().reshape(b, -1)
    log_t = teacher_log_density.float().reshape(b, -1)
    log_t = log_t - log_t.logsumexp(1, keepdim=True)  # exact normalisation after float16 storage
    t = log_t.exp()
    log_p = F.log_softmax(flat, dim=1)
    kl = (torch.xlogy(t, t) - t * log_p).sum(1).mean()
    cos = F.cosine_similarity(log_p.exp(), t, dim=1).mean()
    bce = F.binary_cross_entropy_with_logits(flat, minmax(t))
    return w_kl * kl + w_cos * (1.0 - cos) + w_bce * bce
