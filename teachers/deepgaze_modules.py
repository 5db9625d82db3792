"""Building blocks shared by the DeepGaze teachers.

The module classes and their parameter names follow the DeepGaze reference implementation
(matthias-k/DeepGaze, ``deepgaze_pytorch/layers.py`` and ``deepgaze_pytorch/modules.py``) so that
its published state dicts load key for key:

* :class:`LayerNorm` (``weight``, ``bias`` of shape ``[C]``): layer norm over C×H×W with a
  per-channel affine transform, eps 1e-12;
* :class:`LayerNormMultiInput` / :class:`Conv2dMultiInput`: one ``layernorm_part{k}`` /
  ``conv_part{k}`` per non-empty input of a tuple of inputs;
* :class:`Bias` (``bias``): a per-channel bias kept apart from its bias-free 1×1 convolution;
* :class:`GaussianFilterNd` (``sigma``, a 0-d tensor): separable Gaussian blur, kernel size
  ``2*ceil(truncate*sigma) + 1`` sampled at integer offsets and normalised to sum 1, edges
  replicated;
* :class:`Finalizer` (``center_bias_weight`` [1], ``gauss.sigma``): readout → log density;
* :class:`FeatureExtractor` (``features``): collects the outputs of named layers of a backbone;
* :class:`DeepGazeMixture`: one backbone with N readout components (the reference's
  ``DeepGazeIIIMixture`` as used by DeepGaze IIE).

It also holds the centre-bias helpers (resize a log-density template the way the reference's
README does, then renormalise).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from teachers.blur import gaussian_filter_1d, gaussian_kernel_size

# --------------------------------------------------------------------------- layers


class LayerNorm(nn.Module):
    """Layer normalisation over (C, H, W) with a per-channel scale ``weight`` and shift ``bias``."""

    def __init__(self, features: int, eps: float = 1e-12):
        super().__init__()
        self.features = features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.features, x.shape[2], x.shape[3])
        weight = self.weight.view(-1, 1, 1).expand(shape)
        bias = self.bias.view(-1, 1, 1).expand(shape)
        return F.layer_norm(x, shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.features}, eps={self.eps}"


class LayerNormMultiInput(nn.Module):
    """A :class:`LayerNorm` per input of a tuple; inputs declared with 0 channels must be ``None``."""

    def __init__(self, features: Sequence[int], eps: float = 1e-12):
        super().__init__()
        self.features = list(features)
        for k, channels in enumerate(self.features):
            if channels:
                setattr(self, f"layernorm_part{k}", LayerNorm(channels, eps=eps))

    def forward(self, inputs):
        if len(inputs) != len(self.features):
            raise ValueError(f"expected {len(self.features)} inputs, got {len(inputs)}")
        out = []
        for k, (channels, x) in enumerate(zip(self.features, inputs)):
            if not channels:
                if x is not None:
                    raise ValueError(f"input {k} is declared empty but is not None")
                out.append(None)
            else:
                out.append(getattr(self, f"layernorm_part{k}")(x))
        return out


class Conv2dMultiInput(nn.Module):
    """The sum of one convolution per non-empty input of a tuple."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, kernel_size, bias: bool = True):
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        for k, channels in enumerate(self.in_channels):
            if channels:
                setattr(self, f"conv_part{k}", nn.Conv2d(channels, out_channels, kernel_size, bias=bias))

    def forward(self, inputs) -> torch.Tensor:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} inputs, got {len(inputs)}")
        out = None
        for k, (channels, x) in enumerate(zip(self.in_channels, inputs)):
            if channels:
                y = getattr(self, f"conv_part{k}")(x)
                out = y if out is None else out + y
        return out


class Bias(nn.Module):
    """Adds a learned per-channel ``bias`` to a ``[B, C, H, W]`` tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


# --------------------------------------------------------------------------- Gaussian blur
# the kernel and the 1-d filter are in teachers.blur


class GaussianFilterNd(nn.Module):
    """Separable Gaussian blur over ``dims`` with a (by default frozen) scalar parameter ``sigma``."""

    def __init__(self, dims: Sequence[int], sigma: float, truncate: float = 4.0, kernel_size: int | None = None,
                 trainable: bool = False):
        super().__init__()
        self.dims = list(dims)
        self.sigma = nn.Parameter(torch.tensor(float(sigma), dtype=torch.float32), requires_grad=trainable)
        self.truncate = truncate
        self.kernel_size = kernel_size
        #: the kernel length of sigma's value, computed once in float32 (at construction and when a state dict
        #: loads), so a forward pass that does not learn sigma reads no value back from the device
        self.frozen_size: int | None = None
        self._freeze_size()
        self.register_load_state_dict_post_hook(lambda module, keys: module._freeze_size())

    def _freeze_size(self) -> None:
        sigma = self.sigma.detach()
        if sigma.device.type != "meta":
            self.frozen_size = gaussian_kernel_size(float(sigma.float().cpu()), self.truncate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.kernel_size
        if size is None and not (self.sigma.requires_grad and torch.is_grad_enabled()):
            size = self.frozen_size  # sigma is not being learnt: its length as loaded
        for dim in self.dims:
            x = gaussian_filter_1d(x, dim, self.sigma, truncate=self.truncate, kernel_size=size)
        return x


# --------------------------------------------------------------------------- finalizer


def full_precision(x: torch.Tensor):
    """Autocast off around the readout, blur and finalizer: a log density in bf16 loses the tails that
    the label keeps (and a bf16 sigma would change the blur's kernel length)."""
    return torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False)


class Finalizer(nn.Module):
    """Readout ``[B, 1, h, w]`` + centre bias ``[B, H, W]`` → log density ``[B, H, W]``.

    Steps (as in the reference): the centre bias is downsampled by ``saliency_map_factor``
    (nearest, output ``floor(H/f) × floor(W/f)``); the readout is upsampled to that size
    (nearest); it is blurred with a Gaussian (truncate 3); ``center_bias_weight`` times the
    downsampled centre bias is added; the result is upsampled (nearest) to ``H × W`` and
    normalised so that ``logsumexp`` over the pixels is 0.
    """

    def __init__(self, sigma: float, kernel_size: int | None = None, learn_sigma: bool = False,
                 center_bias_weight: float = 1.0, learn_center_bias_weight: bool = True,
                 saliency_map_factor: int = 4):
        super().__init__()
        self.saliency_map_factor = saliency_map_factor
        self.gauss = GaussianFilterNd([2, 3], sigma, truncate=3, kernel_size=kernel_size, trainable=learn_sigma)
        self.center_bias_weight = nn.Parameter(torch.tensor([float(center_bias_weight)]),
                                               requires_grad=learn_center_bias_weight)

    def forward(self, readout: torch.Tensor, centerbias: torch.Tensor) -> torch.Tensor:
        height, width = centerbias.shape[1], centerbias.shape[2]
        small_cb = F.interpolate(centerbias[:, None], scale_factor=1 / self.saliency_map_factor,
                                 recompute_scale_factor=False)
        out = F.interpolate(readout, size=small_cb.shape[2:])
        out = self.gauss(out)
        out = out + self.center_bias_weight * small_cb
        out = F.interpolate(out, size=(height, width))[:, 0]
        return out - out.logsumexp(dim=(1, 2), keepdim=True)


# --------------------------------------------------------------------------- feature extraction


class _EnoughFeatures(Exception):
    """Raised by the last needed hook to cut a backbone's forward pass short."""


class FeatureExtractor(nn.Module):
    """Runs ``features`` and returns the outputs of the named submodules ``targets`` (in order).

    Outputs are copied when produced (later in-place ReLUs must not change them) and the forward
    pass stops as soon as every target has been seen, which leaves the results unchanged.  The
    hooks only act during this module's own forward, so ``features`` (or parts of it) can be run
    directly as well.
    """

    def __init__(self, features: nn.Module, targets: Sequence[str]):
        super().__init__()
        self.features = features
        self.targets = list(targets)
        self._outputs: dict[str, torch.Tensor] = {}
        self._active = False
        modules = dict(features.named_modules())
        missing = [t for t in self.targets if t not in modules]
        if missing:
            raise KeyError(f"no such layer(s) in the backbone: {missing}")
        for target in self.targets:
            modules[target].register_forward_hook(self._hook(target))

    def _hook(self, name: str):
        def fn(_module, _inputs, output):
            if not self._active:
                return None
            self._outputs[name] = output.clone()
            if len(self._outputs) == len(self.targets):
                raise _EnoughFeatures

        return fn

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._outputs = {}
        self._active = True
        try:
            self.features(x)
        except _EnoughFeatures:
            pass
        finally:
            self._active = False
        outputs, self._outputs = self._outputs, {}
        return [outputs[t] for t in self.targets]


def readout_input(features: list[torch.Tensor], height: int, width: int, downsample: int,
                  readout_factor: int) -> torch.Tensor:
    """Resize every feature map (nearest) to ``ceil(H/downsample/readout_factor)`` × ... and concatenate."""
    shape = [math.ceil(height / downsample / readout_factor), math.ceil(width / downsample / readout_factor)]
    return torch.cat([F.interpolate(f, size=shape) for f in features], dim=1)


def downsample_input(x: torch.Tensor, downsample: int) -> torch.Tensor:
    """The reference's input downsampling: nearest, by ``1/downsample``."""
    return F.interpolate(x, scale_factor=1 / downsample, recompute_scale_factor=False)


def mixture(log_densities: Sequence[torch.Tensor]) -> torch.Tensor:
    """Equal-weight mixture of log densities ``[B, 1, H, W]``: logsumexp over them − log N."""
    stacked = torch.cat(list(log_densities), dim=1)
    return (stacked - math.log(stacked.shape[1])).logsumexp(dim=1, keepdim=True)


class DeepGazeMixture(nn.Module):
    """One backbone feeding N readout components, averaged in probability space.

    Attribute names follow the reference's ``DeepGazeIIIMixture``: ``features``,
    ``saliency_networks``, ``scanpath_networks`` (all ``None`` here: no scanpath input),
    ``fixation_selection_networks``, ``finalizers``.
    """

    def __init__(self, features: FeatureExtractor, saliency_networks, fixation_selection_networks, finalizers,
                 downsample: int = 2, readout_factor: int = 16):
        super().__init__()
        if not (len(saliency_networks) == len(fixation_selection_networks) == len(finalizers)):
            raise ValueError("need as many saliency networks, fixation selection networks and finalizers")
        self.downsample = downsample
        self.readout_factor = readout_factor
        self.features = features
        self.saliency_networks = nn.ModuleList(saliency_networks)
        self.scanpath_networks = nn.ModuleList([None] * len(saliency_networks))
        self.fixation_selection_networks = nn.ModuleList(fixation_selection_networks)
        self.finalizers = nn.ModuleList(finalizers)

    def forward(self, x: torch.Tensor, centerbias: torch.Tensor) -> torch.Tensor:
        """``x`` RGB 0..255 ``[B, 3, H, W]``, ``centerbias`` ``[B, H, W]`` → ``[B, 1, H, W]``."""
        height, width = x.shape[2], x.shape[3]
        feats = self.features(downsample_input(x, self.downsample))  # under the caller's autocast (bf16 on GPU)
        with full_precision(x):
            readin = readout_input([f.float() for f in feats], height, width, self.downsample, self.readout_factor)
            outs = []
            for saliency, selection, finalizer in zip(self.saliency_networks, self.fixation_selection_networks,
                                                      self.finalizers):
                r = selection((saliency(readin), None))
                outs.append(finalizer(r, centerbias.float())[:, None])
            return mixture(outs)


# --------------------------------------------------------------------------- centre bias


def zoom_nearest(template: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-d array to ``height × width`` like ``scipy.ndimage.zoom(order=0, mode='nearest')``.

    That is what the reference README does to the centre-bias template: output pixel ``i`` reads
    input pixel ``round(i * (n_in - 1) / (n_out - 1))`` (corners aligned, halves rounded up).
    """

    def index(n_in: int, n_out: int) -> np.ndarray:
        if n_out == 1:
            return np.zeros(1, dtype=np.intp)
        step = (n_in - 1) / (n_out - 1)
        return np.clip(np.floor(np.arange(n_out) * step + 0.5).astype(np.intp), 0, n_in - 1)

    template = np.asarray(template)
    return template[np.ix_(index(template.shape[0], height), index(template.shape[1], width))]


def log_normalize(log_density: np.ndarray) -> np.ndarray:
    """Subtract ``logsumexp`` so that the array is a normalised log density."""
    m = float(np.max(log_density))
    return log_density - (m + math.log(float(np.sum(np.exp(log_density - m)))))


def centerbias_for(template: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """The centre-bias log density for a ``height × width`` image (float64).

    ``template`` is a log density over any grid (the published one is 1024×1024) or ``None`` for
    a uniform centre bias (every pixel ``-log(H*W)``).
    """
    if template is None:
        return np.full((height, width), -math.log(height * width), dtype=np.float64)
    return log_normalize(zoom_nearest(np.asarray(template, dtype=np.float64), height, width))
