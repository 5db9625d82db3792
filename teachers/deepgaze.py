"""DeepGaze IIE and DeepGaze II teachers (log-density saliency).

**DeepGaze IIE** (Linardos, Kümmerer, Press & Bethge 2021) is built with exactly the module
structure of the reference ``DeepGazeIIE`` (matthias-k/DeepGaze, ``deepgaze_pytorch/deepgaze2e.py``)
so that the published ``deepgaze2e.pth`` (release v1.0.0, a bare state dict) loads strictly:
``models.{0..3}`` are four backbones -- ResNet-50 "ShapeNet-C", EfficientNet-B5, DenseNet-201,
ResNeXt-50 32x4d -- each tapped at the published layers (:data:`BACKBONES`) and feeding 30
readout components (3 trained instances × 10 cross-validation folds).  Each component is a
saliency network (layer norm, 1×1 conv 8-16-1, separate biases, softplus), a fixation-selection
network (1×1 conv 128-16-1) and a :class:`~teachers.deepgaze_modules.Finalizer` (blur with a
learned sigma, weighted centre bias, log-softmax).  The prediction is the equal-weight mixture
of all 4×30 component densities.  The state dict has 5,461 entries and 104,048,808 parameters
(see ``tests/data/deepgaze2e_keys.txt``).

**DeepGaze II** (Kümmerer, Wallis, Gatys & Bethge 2017): VGG-19 tapped at conv5_1, relu5_1,
relu5_2, conv5_3, relu5_4 (2,560 channels), readout of 1×1 convolutions 16-32-2-1 with softplus
between them, and the same finalizer; ≈20.07 M parameters.  There is no public PyTorch
checkpoint: it loads a state dict in this layout, or ``"random"`` for the architecture only.

Both models take RGB 0..255 images, downsample them by 2 (nearest) for the backbone, read out
at 1/32 of the input resolution, and return a log density at the input resolution.  The centre
bias, a second input in the reference, is held by the teacher: a log-density template
(``centerbias_mit1003.npy``, 1024×1024, published with the reference) resized to each input
size the way the reference README does (``scipy.ndimage.zoom(order=0, mode='nearest')``) and
renormalised; without a template the centre bias is uniform (the finalizers' centre-bias term
is then a constant that the normalisation removes).

``input_size`` is (384, 512): a 4:3 size that batches COCO (mostly 640×480) at a moderate cost
and gives a 12×16 readout grid.  DeepGaze was trained on MIT1003 at about 35 px/degree with a
1024-px long side, so larger inputs (e.g. 768×1024) give predictions closer to its training
scale at ~4× the compute.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from teachers import backbones
from teachers.base import Teacher, random_init
from teachers.deepgaze_modules import (
    Bias,
    Conv2dMultiInput,
    DeepGazeMixture,
    FeatureExtractor,
    Finalizer,
    LayerNorm,
    LayerNormMultiInput,
    centerbias_for,
    downsample_input,
    full_precision,
    mixture,
    readout_input,
)
from teachers.registry import register
from teachers.weights import WeightsError, file_digest, load_state_dict, load_strict, resolve, resolve_all


#: (backbone builder, layers tapped (names inside the backbone Sequential), total tapped channels)
BACKBONES: list[tuple[Callable[[], nn.Module], list[str], int]] = [
    (backbones.shapenet_c, [
        "1.module.layer3.0.conv2",
        "1.module.layer3.3.conv2",
        "1.module.layer3.5.conv1",
        "1.module.layer3.5.conv2",
        "1.module.layer4.1.conv2",
        "1.module.layer4.2.conv2",
    ], 2048),
    (backbones.efficientnet_b5, [
        "1._blocks.24._depthwise_conv",
        "1._blocks.26._depthwise_conv",
        "1._blocks.35._project_conv",
    ], 2416),
    (backbones.densenet201, [
        "1.features.denseblock4.denselayer32.norm1",
        "1.features.denseblock4.denselayer32.conv1",
        "1.features.denseblock4.denselayer31.conv2",
    ], 2048),
    (backbones.resnext50, [
        "1.layer3.5.conv1",
        "1.layer3.5.conv2",
        "1.layer3.4.conv2",
        "1.layer4.2.conv2",
    ], 2560),
]

#: readout components per backbone in the published DeepGaze IIE (3 instances × 10 folds)
COMPONENTS = 30
DOWNSAMPLE = 2
READOUT_FACTOR = 16
SALIENCY_MAP_FACTOR = 2
INITIAL_SIGMA = 8.0
DEFAULT_INPUT_SIZE = (384, 512)
#: smallest image side DeepGaze IIE accepts: EfficientNet-B5's fixed "same" padding cannot fit its
#: 5×5 kernels on a half-resolution input under 32 pixels
MIN_SIDE = 64

#: the DeepGaze II taps: VGG-19 layer names, 512 channels each
DEEPGAZE2_TAPS = ["conv5_1", "relu5_1", "relu5_2", "conv5_3", "relu5_4"]
#: layers whose outputs DeepGaze II gives as hint features (finest first)
DEEPGAZE2_HINTS = ["relu2_2", "relu3_4", "relu4_4", "relu5_4"]


# --------------------------------------------------------------------------- readout networks


def saliency_network(channels: int) -> nn.Sequential:
    """Per-component saliency readout: C → 8 → 16 → 1 with layer norms, biases and softplus."""
    return nn.Sequential(OrderedDict([
        ("layernorm0", LayerNorm(channels)),
        ("conv0", nn.Conv2d(channels, 8, 1, bias=False)),
        ("bias0", Bias(8)),
        ("softplus0", nn.Softplus()),
        ("layernorm1", LayerNorm(8)),
        ("conv1", nn.Conv2d(8, 16, 1, bias=False)),
        ("bias1", Bias(16)),
        ("softplus1", nn.Softplus()),
        ("layernorm2", LayerNorm(16)),
        ("conv2", nn.Conv2d(16, 1, 1, bias=False)),
        ("bias2", Bias(1)),
        ("softplus3", nn.Softplus()),
    ]))


def fixation_selection_network() -> nn.Sequential:
    """Per-component fixation selection: (saliency, no scanpath) → 128 → 16 → 1."""
    return nn.Sequential(OrderedDict([
        ("layernorm0", LayerNormMultiInput([1, 0])),
        ("conv0", Conv2dMultiInput([1, 0], 128, 1, bias=False)),
        ("bias0", Bias(128)),
        ("softplus0", nn.Softplus()),
        ("layernorm1", LayerNorm(128)),
        ("conv1", nn.Conv2d(128, 16, 1, bias=False)),
        ("bias1", Bias(16)),
        ("softplus1", nn.Softplus()),
        ("conv2", nn.Conv2d(16, 1, 1, bias=False)),
    ]))


def backbone_mixture(builder: Callable[[], nn.Module], taps: list[str], channels: int,
                     components: int = COMPONENTS) -> DeepGazeMixture:
    return DeepGazeMixture(
        features=FeatureExtractor(builder(), taps),
        saliency_networks=[saliency_network(channels) for _ in range(components)],
        fixation_selection_networks=[fixation_selection_network() for _ in range(components)],
        finalizers=[Finalizer(sigma=INITIAL_SIGMA, learn_sigma=True, saliency_map_factor=SALIENCY_MAP_FACTOR)
                    for _ in range(components)],
        downsample=DOWNSAMPLE,
        readout_factor=READOUT_FACTOR,
    )


# --------------------------------------------------------------------------- centre bias


class CenterBias:
    """A centre-bias log-density template, resized and renormalised per image size (cached)."""

    def __init__(self, template: np.ndarray | None = None, source: str = "uniform"):
        self.template = None if template is None else np.asarray(template, dtype=np.float64)
        self.source = source
        self._cache: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = {}

    def __call__(self, height: int, width: int, device, dtype=torch.float32) -> torch.Tensor:
        """The ``[H, W]`` centre-bias log density on ``device``."""
        key = (height, width, str(device), dtype)
        if key not in self._cache:
            if len(self._cache) > 16:
                self._cache.clear()
            cb = centerbias_for(self.template, height, width)
            self._cache[key] = torch.from_numpy(cb).to(device=device, dtype=dtype)
        return self._cache[key]


def load_centerbias(spec: str | None) -> CenterBias:
    """``None`` → uniform; else a path or known name (via :func:`resolve`) of a 2-d ``.npy`` log density."""
    if spec is None:
        warnings.warn("DeepGaze: no centre bias given; using a uniform centre bias "  # (the CLI's one warning: line)
                      "(pass centerbias='centerbias_mit1003' for the published one)", stacklevel=2)
        return CenterBias(None, "uniform")
    path = resolve(spec)
    try:
        template = np.load(path, allow_pickle=False)
    except Exception as e:
        raise WeightsError(f"cannot read centre bias {path}: {e}") from e
    if template.ndim != 2 or min(template.shape) < 1 or not np.all(np.isfinite(template)):
        raise WeightsError(f"centre bias {path}: expected a finite 2-d log density, got shape {template.shape}")
    return CenterBias(template.astype(np.float64), str(path))


# --------------------------------------------------------------------------- teachers


class _DeepGazeTeacher(Teacher):
    output_kind = "log_density"
    input_size = DEFAULT_INPUT_SIZE

    def __init__(self, centerbias: CenterBias | None = None):
        super().__init__()
        self.centerbias = centerbias if centerbias is not None else CenterBias()

    @classmethod
    def weights_digest_of(cls, paths: list[Path]) -> str:
        """The weights file's sha256, then the centre bias's (it changes the labels too): see :func:`_with_centerbias`."""
        return file_digest(paths[0]) + "".join(_centerbias_digest(p) for p in paths[1:])

    def batch_centerbias(self, images: torch.Tensor) -> torch.Tensor:
        cb = self.centerbias(images.shape[2], images.shape[3], images.device, images.dtype)
        return cb.expand(images.shape[0], -1, -1)

    def log_density(self, images: torch.Tensor, centerbias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.log_density(images, self.batch_centerbias(images))


class DeepGazeIIE(_DeepGazeTeacher):
    """DeepGaze IIE; ``state_dict()`` keys are those of the reference ``DeepGazeIIE``.

    ``hint_features`` are the outputs of layer1..layer4 of the ShapeNet-C ResNet-50 backbone
    (``models.0``) on the half-resolution input: 256/512/1024/2048 channels at 1/8, 1/16, 1/32
    and 1/64 of the input resolution.
    """

    name = "deepgaze2e"
    hint_layout = ((256, 8), (512, 16), (1024, 32), (2048, 64))
    cuda_graphs = True  # about 39,000 torch operations per forward pass (120 readout heads)

    def __init__(self, centerbias: CenterBias | None = None, components: int = COMPONENTS):
        super().__init__(centerbias)
        self.models = nn.ModuleList(
            backbone_mixture(builder, taps, channels, components) for builder, taps, channels in BACKBONES
        )

    def log_density(self, images: torch.Tensor, centerbias: torch.Tensor) -> torch.Tensor:
        """``images`` RGB 0..255 ``[B,3,H,W]``, ``centerbias`` log density ``[B,H,W]`` → ``[B,1,H,W]``."""
        if min(images.shape[2], images.shape[3]) < MIN_SIDE:
            raise ValueError(f"{self.name}: images must be at least {MIN_SIDE}×{MIN_SIDE} pixels "
                             f"(EfficientNet-B5 backbone), got {tuple(images.shape[2:])}")
        return mixture([model(images, centerbias) for model in self.models])

    def hint_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = downsample_input(images.float(), DOWNSAMPLE)
        normalizer, wrapped = self.models[0].features.features
        net = wrapped.module
        x = net.maxpool(net.relu(net.bn1(net.conv1(normalizer(x)))))
        hints = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            hints.append(x)
        return hints


class DeepGazeII(_DeepGazeTeacher):
    """DeepGaze II on VGG-19; layout ``features.features.<vgg layer>``, ``readout_network.conv{0..3}``,
    ``finalizer``.

    ``hint_features`` are VGG-19's relu2_2, relu3_4, relu4_4 and relu5_4 on the half-resolution
    input: 128/256/512/512 channels at 1/4, 1/8, 1/16 and 1/32 of the input resolution.
    """

    name = "deepgaze2"
    hint_layout = ((128, 4), (256, 8), (512, 16), (512, 32))

    @classmethod
    def check_weights(cls, name: str, weights: str | None) -> None:
        if weights is None:
            raise WeightsError("DeepGaze II has no public PyTorch checkpoint: pass --weights PATH "
                               "(a state dict in this layout) or use --teacher deepgaze2e")

    def __init__(self, centerbias: CenterBias | None = None):
        super().__init__(centerbias)
        self.features = FeatureExtractor(backbones.vgg19_named(), DEEPGAZE2_TAPS)
        self.readout_network = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(512 * len(DEEPGAZE2_TAPS), 16, 1)),
            ("softplus0", nn.Softplus()),
            ("conv1", nn.Conv2d(16, 32, 1)),
            ("softplus1", nn.Softplus()),
            ("conv2", nn.Conv2d(32, 2, 1)),
            ("softplus2", nn.Softplus()),
            ("conv3", nn.Conv2d(2, 1, 1)),
        ]))
        self.finalizer = Finalizer(sigma=INITIAL_SIGMA, learn_sigma=True, saliency_map_factor=SALIENCY_MAP_FACTOR)

    def log_density(self, images: torch.Tensor, centerbias: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[2], images.shape[3]
        feats = self.features(downsample_input(images, DOWNSAMPLE))
        with full_precision(images):
            x = self.readout_network(readout_input([f.float() for f in feats], height, width, DOWNSAMPLE,
                                                   READOUT_FACTOR))
            return self.finalizer(x, centerbias.float())[:, None]

    def hint_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = downsample_input(images.float(), DOWNSAMPLE)
        wanted = set(DEEPGAZE2_HINTS)
        hints = []
        for name, layer in self.features.features.named_children():
            x = layer(x)
            if name in wanted:
                hints.append(x.clone())
                if len(hints) == len(wanted):
                    break
        return hints


# --------------------------------------------------------------------------- builders


def unwrap_state_dict(obj, *, what: str) -> dict:
    """The state dict inside a loaded checkpoint: a bare one (as published) or under ``state_dict``/``model``."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    raise WeightsError(f"{what}: not a state dict (a mapping of parameter names to tensors)")


def _resolve_needed(name: str, weights: str, centerbias: str | None) -> tuple[Path, str | None]:
    """The weights file and the centre bias together: when either cannot be had, one error names both
    (with their URLs and places), not only the first."""
    specs = [weights] + ([centerbias] if centerbias is not None else [])
    paths = resolve_all(specs, who=f"teacher {name}", resolver=lambda s: resolve(s),
                        fetch_hint=f"pipeline weights fetch {name}" if weights == "deepgaze2e" else "")
    return paths[0], (str(paths[1]) if centerbias is not None else None)


def _from_file(make: Callable[[], Teacher], spec: str, what: str,
               adjust: Callable[[dict], dict] | None = None, path: Path | None = None) -> Teacher:
    path = path if path is not None else resolve(spec)
    sd = unwrap_state_dict(load_state_dict(path), what=f"{what} {path}")
    if adjust is not None:
        sd = adjust(sd)
    model = make()
    load_strict(model, sd, what=f"{what} {path}")
    model.weights_digest = file_digest(path)
    model.weights_random = False
    return model


def _centerbias_digest(path: str | Path) -> str:
    return f"+centerbias:{file_digest(path)[:16]}"


def _with_centerbias(model: Teacher, cb: CenterBias) -> Teacher:
    """The centre bias changes the labels, so its digest joins the weights digest."""
    if cb.source != "uniform":
        model.weights_digest = model.weights_digest + _centerbias_digest(cb.source)
    return model


def _default_centerbias(centerbias: str | None, weights: str | None) -> str | None:
    """``"auto"``: the published MIT1003 centre bias with real weights, uniform with random ones."""
    if centerbias == "auto":
        return None if weights == "random" else "centerbias_mit1003"
    return centerbias


def _centerbias(centerbias: str | None, spec: str | None) -> CenterBias:
    """The centre bias ``spec`` names (:func:`_default_centerbias`); ``"auto"`` with random weights is uniform by
    design, without the warning a forgotten one gets."""
    return CenterBias() if spec is None and centerbias == "auto" else load_centerbias(spec)


def build_deepgaze2e(*, weights: str | None = None, centerbias: str | None = "auto",
                     name: str = "deepgaze2e") -> DeepGazeIIE:
    """DeepGaze IIE with ``weights``: ``None`` → the published ``deepgaze2e`` checkpoint (known
    name), ``"random"`` → seeded random initialisation, else a path/URL/known name of a state dict
    in the reference layout.  ``centerbias``: ``"auto"`` (the published ``centerbias_mit1003``
    with real weights, uniform with random ones), ``None`` (uniform) or a path/known name of a
    ``.npy`` log-density template."""
    cb: list[CenterBias] = []  # loaded in make(), i.e. after the weights resolved: their error comes first
    cb_spec = _default_centerbias(centerbias, weights)

    def make() -> DeepGazeIIE:
        if not cb:
            cb.append(_centerbias(centerbias, cb_spec))
        model = DeepGazeIIE(cb[0])
        model.name = name
        return model

    if weights == "random":
        return _with_centerbias(random_init(make), cb[0])
    spec = "deepgaze2e" if weights is None else weights
    path, cb_spec = _resolve_needed(name, spec, cb_spec)
    model = _from_file(make, spec, "DeepGaze IIE weights", path=path)
    return _with_centerbias(model, cb[0])


@register("deepgaze2e", DeepGazeIIE)
def deepgaze2e(*, weights: str | None = None, centerbias: str | None = "auto") -> DeepGazeIIE:
    """DeepGaze IIE (see :func:`build_deepgaze2e`); ``name="deepgaze2e"``."""
    return build_deepgaze2e(weights=weights, centerbias=centerbias, name="deepgaze2e")


@register("deepgaze", DeepGazeIIE)
def deepgaze(*, weights: str | None = None, centerbias: str | None = "auto") -> DeepGazeIIE:
    """``--teacher deepgaze``: DeepGaze IIE under the name ``deepgaze`` (labels ``deepgaze.npy``)."""
    return build_deepgaze2e(weights=weights, centerbias=centerbias, name="deepgaze")


#: constant buffers a reference-style VGG normaliser may have saved; dropped on load
_DEEPGAZE2_OPTIONAL_KEYS = ("features.features.normalize.mean", "features.features.normalize.std")


def _drop_normalizer_constants(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k not in _DEEPGAZE2_OPTIONAL_KEYS}


@register("deepgaze2", DeepGazeII)
def deepgaze2(*, weights: str | None = None, centerbias: str | None = "auto") -> DeepGazeII:
    """DeepGaze II: ``weights`` a path/URL of a state dict in this layout or ``"random"``; there is
    no public PyTorch checkpoint, so ``None`` is an error."""
    DeepGazeII.check_weights("deepgaze2", weights)
    cb_spec, path = _default_centerbias(centerbias, weights), None
    if weights != "random":
        path, cb_spec = _resolve_needed("deepgaze2", weights, cb_spec)  # both missing files in one error
    cb = _centerbias(centerbias, cb_spec)
    if weights == "random":
        return _with_centerbias(random_init(lambda: DeepGazeII(cb)), cb)
    return _with_centerbias(_from_file(lambda: DeepGazeII(cb), weights, "DeepGaze II weights",
                                       adjust=_drop_normalizer_constants, path=path), cb)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "BACKBONES",
    "CenterBias",
    "DeepGazeII",
    "DeepGazeIIE",
    "build_deepgaze2e",
    "deepgaze",
    "deepgaze2",
    "deepgaze2e",
    "load_centerbias",
    "parameter_count",
    "unwrap_state_dict",
]
