"""FastSal (Hu & McGuinness, ICPR 2020): a MobileNetV2 encoder tapped at 18 points and a tiny decoder.

The encoder is torchvision's ``mobilenet_v2().features``. The outputs of ``features[1..18]`` are
grouped by resolution into four levels, each brought to one stride by ``PixelShuffle(2)`` (for a
192×256 input)::

    level 0  28 ch @ 96×128   features[1] (16 ch) ++ shuffle(features[2,3]: 2×24 ch)
    level 1  24 ch @ 48×64    shuffle(features[4..6]: 3×32 ch)
    level 2 136 ch @ 24×32    shuffle(features[7..13]: 4×64 + 3×96 ch)
    level 3 520 ch @ 12×16    shuffle(features[14..18]: 3×160 + 320 + 1280 ch)

Decoders:

* **FastSal (C)**: 1×1 conv + ReLU adaptation layers 28→128, 24→256, 136→512, 520→512 (the
  widths of SalGAN's decoder, so the same layers serve hint pretraining), bilinear up-sampling of
  levels 1..3 to H/2×W/2, concatenation (1408 ch), PixelShuffle(2), 3×3 conv to one logit.
* **FastSal (A)**: adaptation 28→8, 24→32, 136→128, 520→512, then top-down from the coarsest level
  through modified inverted residual blocks (MobileNetV2's, expansion 2, with the up-sampled
  previous level added to the input) and PixelShuffle(2) between levels; 3×3 conv 2→1.

Both are :class:`students.base.Student` s: logits ``[B, 1, H, W]`` at the input resolution from
ImageNet-normalised RGB (:func:`students.base.normalize`); FastSal (C)'s adapted features are its hint
features. A density-teacher student's map is ``softmax`` over pixels; a map-teacher
student's is ``sigmoid``.

**The authors' checkpoints** (``weights/{coco,salicon}_{A,C}.pth`` of github.com/feiyanhu/FastSal,
``{'student_model': state_dict[, 'optimizer': ...]}``) load strictly through this key mapping
(:func:`from_authors_keys`)::

    ecer.N.…                               → encoder.features.N.…       (312 entries, BN buffers included)
    adaptation_layer.layers.I.convJ.{w,b}  → adapt.I.0.{w,b}            (J is 0; also accepted: .J.)
    adp{K}.inv_block.…                     → blocks.{K-1}.inv.…         (A only: 4 × 18 entries)
    comb.layers.0.J.{w,b}                  → head.{w,b}                 (the 3×3 output conv)

The authors' (A) state dict has 394 entries, (C) 322.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from students.base import Student
from students.weights import backbone_file, load_student_weights
from students.registry import register
from teachers.weights import WeightsError, load_state_dict, load_strict

#: taps features[1..18] grouped into the four levels (finest first)
LEVEL_TAPS = ((1, 2, 3), (4, 5, 6), tuple(range(7, 14)), tuple(range(14, 19)))
LEVEL_CHANNELS = (28, 24, 136, 520)
#: the encoder's stride: input height and width must be multiples of it
STRIDE = 32


def backbone_weights():
    """The torchvision ImageNet weights the authors started from (``mobilenet_v2(pretrained=True)``).
    torchvision is imported here and in the builders, not with this module: the CLI lists students on every
    start, and torchvision's import takes a second."""
    from torchvision.models import MobileNet_V2_Weights

    return MobileNet_V2_Weights.IMAGENET1K_V1


class Encoder(nn.Module):
    """MobileNetV2 features; ``forward`` returns the four levels (finest first)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2().features
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if h % STRIDE or w % STRIDE:
            raise ValueError(f"FastSal: input height and width must be multiples of {STRIDE}, got {h}×{w}")
        taps = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            taps[i] = x
        first, *rest = LEVEL_TAPS
        level0 = torch.cat([taps[1], self.shuffle(torch.cat([taps[i] for i in first[1:]], 1))], 1)
        return [level0, *(self.shuffle(torch.cat([taps[i] for i in group], 1)) for group in rest)]


def _adaptation(widths: tuple[int, ...]) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1), nn.ReLU(inplace=True))
        for cin, cout in zip(LEVEL_CHANNELS, widths)
    )


class ModifiedInvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (expansion 2) with the previous level added first.

    As in the authors' ``Shared_inverted_block``: ``x = x + prev; return x + block(x)``, where
    torchvision's block already adds its own identity (stride 1, same width).
    """

    def __init__(self, channels: int, expansion: int = 2) -> None:
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual

        self.inv = InvertedResidual(channels, channels, stride=1, expand_ratio=expansion)

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        if prev is not None:
            x = x + prev
        return x + self.inv(x)


class FastSal(Student):
    """Shared parts: the encoder and the adaptation layers; subclasses add their decoder.

    Input: ImageNet-normalised RGB (:func:`students.base.normalize`, the authors' ``read_vgg_img``).
    """

    variant = ""
    stride = STRIDE
    backbone_prefix = "encoder."
    encoder_modules = ("encoder",)
    #: adaptation widths (also the hint targets' channels for FastSal C)
    widths: tuple[int, ...] = ()

    @classmethod
    def imagenet_url(cls, **options) -> str | None:
        return backbone_weights().url

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.adapt = _adaptation(self.widths)

    def init_decoder(self) -> None:
        """The decoder's convolutions start small (normal, std 0.01, zero bias: what the authors'
        ``CNN_constructer`` draws, though their ``adaptation_layers`` then redraws its convolutions He-normal,
        std √(2/fan_in)), so the first logits are near 0 whatever the encoder's scale; each inverted residual
        block's last batch norm starts at 0, so the block starts as the identity."""
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(m, nn.Conv2d) and not name.startswith("blocks"):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for block in getattr(self, "blocks", ()):
            nn.init.zeros_(block.inv.conv[-1].weight)

    def adapted_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The adaptation layers' outputs at strides 2, 4, 8, 16 (the hint stage's student side)."""
        return [adapt(f) for adapt, f in zip(self.adapt, self.encoder(x))]


class FastSalC(FastSal):
    name = "fastsal_c"
    variant = "C"
    widths = (128, 256, 512, 512)
    hint_channels = widths  # SalGAN's decoder widths: the hint stage's targets
    hint_strides = (2, 4, 8, 16)

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.PixelShuffle(2), nn.Conv2d(sum(self.widths) // 4, 1, 3, padding=1))
        self.init_decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.adapted_features(x)
        size = feats[0].shape[-2:]
        up = [feats[0], *(F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in feats[1:])]
        return self.head(torch.cat(up, 1))

    def hint_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.adapted_features(x)


class FastSalA(FastSal):
    name = "fastsal_a"
    variant = "A"
    widths = (8, 32, 128, 512)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ModifiedInvertedResidual(c) for c in self.widths)
        self.shuffle = nn.PixelShuffle(2)
        self.head = nn.Conv2d(self.widths[0] // 4, 1, 3, padding=1)
        self.init_decoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.adapted_features(x)
        prev = None
        for feat, block in zip(reversed(feats), reversed(self.blocks)):
            prev = self.shuffle(block(feat, prev))
        return self.head(prev)


# -- the authors' checkpoints ------------------------------------------------------------------
_KEY_RULES = (
    (re.compile(r"^ecer\.(.*)$"), r"encoder.features.\1"),
    (re.compile(r"^adaptation_layer\.layers\.(\d)\.(?:conv)?0\.(weight|bias)$"), r"adapt.\1.0.\2"),
    (re.compile(r"^comb\.layers\.0\.\d\.(weight|bias)$"), r"head.\1"),
)


def from_authors_keys(state_dict: dict, variant: str) -> dict:
    """The authors' ``student_model`` state dict → this module's keys (see the module docstring)."""
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"^adp(\d)\.inv_block\.(.*)$", key)
        if m:
            new = f"blocks.{int(m.group(1)) - 1}.inv.{m.group(2)}"
        else:
            for pattern, repl in _KEY_RULES:
                if pattern.match(key):
                    new = pattern.sub(repl, key)
                    break
        if new.startswith("head.") and variant == "C":
            new = "head.1." + new[len("head."):]
        out[new] = value
    return out


# -- builders ------------------------------------------------------------------------------
def load_backbone(encoder: Encoder, spec: str) -> None:
    """Initialise the MobileNetV2 features: ``imagenet``, ``none`` or a PATH.

    ``imagenet`` is torchvision's ``IMAGENET1K_V1`` file (see :func:`torchvision_backbone`).
    A PATH is a torchvision ``mobilenet_v2`` state dict (``features.*`` keys; the classifier is ignored).
    """
    path = backbone_file(spec, backbone_weights, "mobilenet_v2")
    if path is None:
        return
    sd = load_state_dict(path)
    features = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    if not features:
        raise WeightsError(f"{path}: no 'features.*' keys: not a torchvision mobilenet_v2 state dict")
    load_strict(encoder.features, features, what=f"MobileNetV2 backbone {path}")


def _build(cls, name: str, weights: str | None, backbone_weights: str) -> FastSal:
    model = cls()
    if weights is not None:
        model.weights_digest = load_student_weights(model, weights, name, convert=lambda sd: from_authors_keys(
            sd["student_model"], model.variant) if isinstance(sd.get("student_model"), dict) else sd)
    else:
        load_backbone(model.encoder, backbone_weights)
    return model


@register("fastsal_a", FastSalA, params=3_646_715, doc="FastSal (A): addition decoder, ~3.65 M parameters")
def fastsal_a(*, weights: str | None = None, backbone_weights: str = "imagenet") -> FastSalA:
    """FastSal (A). ``weights``: the authors' checkpoint or one of ours (path, URL or known name);
    without it the encoder starts from ``backbone_weights`` (imagenet, none or PATH)."""
    return _build(FastSalA, "fastsal_a", weights, backbone_weights)


@register("fastsal_c", FastSalC, params=2_574_049, doc="FastSal (C): concatenation decoder, ~2.57 M parameters")
def fastsal_c(*, weights: str | None = None, backbone_weights: str = "imagenet") -> FastSalC:
    """FastSal (C); see :func:`fastsal_a`."""
    return _build(FastSalC, "fastsal_c", weights, backbone_weights)
