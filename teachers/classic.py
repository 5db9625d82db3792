"""A weight-free classical teacher: spectral residual saliency blended with a centre bias.

Spectral residual (Hou & Zhang, "Saliency Detection: A Spectral Residual Approach", CVPR 2007):
the image, in grey levels and shrunk so its long side is :data:`WORK_SIZE` px, is Fourier
transformed; the log amplitude spectrum minus its 3x3 box-filtered version (the "residual") is
recombined with the original phase, transformed back, squared and blurred with a Gaussian of
:data:`SMOOTH_SIGMA` px (at the work scale). The map is resized to the input size and mixed with an
anisotropic Gaussian centre bias (standard deviations :data:`CENTER_SIGMA` times the image height
and width): both are normalised to sum 1, mixed with weight :data:`BLEND_WEIGHT` on the centre
bias, and divided by their maximum so the result lies in ``[0, 1]`` and peaks at 1.

Everything is torch (``torch.fft``), batched, on the input's device, and deterministic. The
module attributes are read when a teacher is built, so changing them affects later builds only.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from teachers.base import Teacher
from teachers.blur import gaussian_filter_1d, gaussian_kernel_size
from teachers.registry import register
from teachers.weights import WeightsError

#: long side (px) of the image on which the spectral residual is computed (Hou & Zhang use 64)
WORK_SIZE: int = 64
#: std (px, at the work scale) of the Gaussian blur applied to the spectral residual map
SMOOTH_SIGMA: float = 3.0
#: std of the centre bias as a fraction of the image (height, width): anisotropic on non-square images
CENTER_SIGMA: tuple[float, float] = (0.25, 0.25)
#: weight of the centre bias in the mix (0 = spectral residual only, 1 = centre bias only)
BLEND_WEIGHT: float = 0.3

# ITU-R BT.601 luma weights
_LUMA = (0.299, 0.587, 0.114)
_EPS = 1e-8


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, h, w]`` (3-sigma kernel) with replicated borders."""
    if sigma <= 0:
        return x
    size = gaussian_kernel_size(float(sigma), 3.0)
    x = gaussian_filter_1d(x, -1, float(sigma), truncate=3.0, kernel_size=size)
    return gaussian_filter_1d(x, -2, float(sigma), truncate=3.0, kernel_size=size)


def work_shape(height: int, width: int, long_side: int = WORK_SIZE) -> tuple[int, int]:
    """(h, w) with long side ``long_side`` and the aspect ratio of (height, width), each >= 1."""
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def spectral_residual(gray: torch.Tensor, *, smooth_sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """Spectral residual saliency of grey images ``[B, 1, h, w]`` (float) at the same size, >= 0.

    The image is mirror-padded by a quarter of each side before the FFT and cropped after, so the
    FFT's wrap-around does not turn the image borders into false edges.
    """
    h, w = gray.shape[-2:]
    ph, pw = min(h // 4, h - 1), min(w // 4, w - 1)
    padded = F.pad(gray, (pw, pw, ph, ph), mode="reflect") if ph or pw else gray
    spectrum = torch.fft.fft2(padded)
    log_amplitude = torch.log(spectrum.abs() + _EPS)
    phase = torch.angle(spectrum)
    smoothed = F.avg_pool2d(F.pad(log_amplitude, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    residual = log_amplitude - smoothed
    saliency = torch.fft.ifft2(torch.polar(torch.exp(residual), phase)).abs() ** 2
    saliency = _blur(saliency, smooth_sigma)[..., ph : ph + h, pw : pw + w]
    return saliency.clamp_min(0)


def center_bias(height: int, width: int, *, sigma: tuple[float, float] = CENTER_SIGMA,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Anisotropic Gaussian centred in an ``height x width`` image, ``[1, 1, H, W]``, peak 1."""
    sy, sx = max(sigma[0] * height, _EPS), max(sigma[1] * width, _EPS)
    y = (torch.arange(height, device=device, dtype=dtype) + 0.5 - height / 2) / sy
    x = (torch.arange(width, device=device, dtype=dtype) + 0.5 - width / 2) / sx
    return torch.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))[None, None]


def _sum_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class ClassicTeacher(Teacher):
    """Spectral residual + centre bias; no weights; any input size; ``probability_map`` output."""

    name = "classic"
    output_kind = "probability_map"
    input_size = None

    def __init__(self, *, work_size: int | None = None, smooth_sigma: float | None = None,
                 center_sigma: tuple[float, float] | None = None, blend_weight: float | None = None) -> None:
        super().__init__()
        self.work_size = int(WORK_SIZE if work_size is None else work_size)
        self.smooth_sigma = float(SMOOTH_SIGMA if smooth_sigma is None else smooth_sigma)
        cs = CENTER_SIGMA if center_sigma is None else center_sigma
        self.center_sigma = (float(cs[0]), float(cs[1]))
        self.blend_weight = float(BLEND_WEIGHT if blend_weight is None else blend_weight)
        if self.work_size < 1:
            raise ValueError(f"work_size must be >= 1, got {self.work_size}")
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ValueError(f"blend_weight must lie in [0, 1], got {self.blend_weight}")
        self.weights_digest = "none"
        self.weights_random = False
        # a buffer: it moves with the teacher, so no forward copies it from the host (which waits for the GPU)
        self.register_buffer("luma", torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        b, _, height, width = images.shape
        gray = (images.float() / 255.0 * self.luma).sum(dim=1, keepdim=True)
        h, w = work_shape(height, width, self.work_size)
        small = F.interpolate(gray, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        sr = spectral_residual(small, smooth_sigma=self.smooth_sigma)
        sr = F.interpolate(sr, size=(height, width), mode="bilinear", align_corners=False).clamp_min(0)
        sr = torch.nan_to_num(sr, nan=0.0, posinf=0.0, neginf=0.0)
        cb = center_bias(height, width, sigma=self.center_sigma, device=images.device).expand(b, 1, -1, -1)
        mix = (1.0 - self.blend_weight) * _sum_normalise(sr) + self.blend_weight * _sum_normalise(cb)
        peak = mix.amax(dim=(-2, -1), keepdim=True)
        # a blank spectral residual with blend weight 0 leaves nothing: fall back to the centre bias
        mix = torch.where(peak > 0, mix, cb)
        peak = mix.amax(dim=(-2, -1), keepdim=True)
        return (mix / peak).clamp(0.0, 1.0)


    @classmethod
    def check_weights(cls, name: str, weights: str | None) -> None:
        if weights is not None and not (isinstance(weights, str) and weights.strip().lower() == "none"):
            raise WeightsError(f"the classic teacher has no weights (got weights={weights!r}; use none)")


@register("classic", ClassicTeacher)
def classic(*, weights: str | None = None) -> ClassicTeacher:
    """The classical teacher; it has no weights (``weights`` must be ``None`` or ``"none"``)."""
    ClassicTeacher.check_weights("classic", weights)
    return ClassicTeacher()
