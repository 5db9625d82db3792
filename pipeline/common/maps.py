"""Saliency maps as tensors: resizing a teacher's output to another size, keeping its kind."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_label(maps: torch.Tensor, kind: str, size: tuple[int, int]) -> torch.Tensor:
    """Resize teacher output ``[B,1,h,w]`` to ``size``; a log density stays a normalised log density (its density
    is interpolated, then renormalised: what labels, predict and eval do to maps; pysaliency's resize of a
    baseline, interpolating the log, is :func:`pipeline.score.metrics.resize_log_density`)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if kind == "log_density":
        density = F.interpolate(maps.exp(), size=size, mode="bilinear", align_corners=False)
        density = density / density.sum(dim=(2, 3), keepdim=True)
        return density.clamp_min(torch.finfo(torch.float32).tiny).log()
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
