"""The one Gaussian blur of the teachers: separable, normalised kernel sampled at integer offsets,
edges replicated (DeepGaze's reference blur; the classic teacher uses it with a 3-sigma truncation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel_size(sigma: float, truncate: float) -> int:
    """The reference's kernel length for ``sigma``: ``2*ceil(truncate*sigma) + 1`` (float32 arithmetic)."""
    return int(2 * torch.ceil(truncate * torch.tensor(sigma, dtype=torch.float32)) + 1)


def gaussian_filter_1d(x: torch.Tensor, dim: int, sigma: torch.Tensor | float, truncate: float = 4.0,
                       kernel_size: int | None = None) -> torch.Tensor:
    """Blur ``x`` along ``dim`` with a normalised Gaussian of std ``sigma``, edges replicated.

    The kernel is sampled at integer offsets from its centre, ``exp(-0.5 (d/sigma)^2)`` divided
    by its sum; it stays differentiable in ``sigma`` (the size is not).
    """
    # a number becomes a tensor on x's device by a fill, not a copy from the host (which would wait for the GPU)
    sigma = (sigma.to(dtype=x.dtype, device=x.device) if isinstance(sigma, torch.Tensor)
             else torch.full((), float(sigma), dtype=x.dtype, device=x.device))
    if kernel_size is None:  # computed in the input's dtype, as the reference does
        size = int(2 * torch.ceil(truncate * sigma.detach()) + 1)
    else:
        size = int(kernel_size)
    if size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be odd, got {size}")
    offsets = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, size)
    pad = (size - 1) // 2
    moved = x.movedim(dim, -1)
    lines = moved.reshape(-1, 1, moved.shape[-1])
    lines = F.pad(lines, (pad, pad), mode="replicate")
    out = F.conv1d(lines, kernel)
    return out.view(moved.shape).movedim(-1, dim)
