"""Feature backbones used by the DeepGaze teachers, in the module layouts their checkpoints expect.

Every backbone here is an ``nn.Sequential`` of ``(Normalizer, network)`` so that, wrapped in a
:class:`teachers.deepgaze_modules.FeatureExtractor`, its parameters are named
``features.1.<network keys>`` -- the layout of the DeepGaze reference implementation
(``deepgaze_pytorch/features/*.py`` in matthias-k/DeepGaze), which the published
``deepgaze2e.pth`` was saved from.  All networks are built with random weights: their
pretrained values come from the DeepGaze checkpoint itself, never from torchvision or the
EfficientNet release.

* :func:`shapenet_c` -- torchvision ResNet-50 inside ``Sequential(module=...)`` (the reference
  fakes a ``DataParallel`` wrapper around Geirhos' Stylized-ImageNet ResNet-50 "ShapeNet-C").
* :func:`efficientnet_b5` -- EfficientNet-B5 with the parameter names of the
  ``efficientnet_pytorch`` package (``_conv_stem``, ``_blocks.N._depthwise_conv``...), written out
  here so that no extra dependency is needed; see :class:`EfficientNet` for the padding rule.
* :func:`densenet201`, :func:`resnext50` -- torchvision DenseNet-201 / ResNeXt-50 32x4d.
* :func:`vgg19_named` -- the 16 convolutions of VGG-19 named ``conv1_1 ... relu5_4``, max-pools
  with ``ceil_mode=True`` (DeepGaze II).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

#: ImageNet statistics used by every backbone's input normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalizer(nn.Module):
    """RGB 0..255 → ImageNet-normalised input.

    Holds no state in the checkpoint (the reference keeps its mean/std out of it too): the mean and std
    are non-persistent buffers, which move with the module, so a forward pass copies nothing from the host
    (a copy that would wait for the GPU).  Like the reference, the subtraction and division are done in place
    against float64 constants, so a float32 input is rounded back to float32 after each step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x / 255.0
        t -= self.mean
        t /= self.std
        return t


# --------------------------------------------------------------------------- torchvision nets


def shapenet_c() -> nn.Sequential:
    """ResNet-50 as ``Sequential(Normalizer, Sequential(module=resnet50))``."""
    import torchvision  # here, not at import: it takes a second (the CLI imports this module)

    resnet = torchvision.models.resnet50(weights=None)
    return nn.Sequential(Normalizer(), nn.Sequential(OrderedDict([("module", resnet)])))


def densenet201() -> nn.Sequential:
    import torchvision

    return nn.Sequential(Normalizer(), torchvision.models.densenet201(weights=None))


def resnext50() -> nn.Sequential:
    import torchvision

    return nn.Sequential(Normalizer(), torchvision.models.resnext50_32x4d(weights=None))


# --------------------------------------------------------------------------- EfficientNet-B5


class SamePadConv2d(nn.Conv2d):
    """A TensorFlow-style "same" convolution whose zero padding is fixed at construction.

    The padding is the one "same" padding would need for a square input of ``image_size``
    pixels; it is applied unchanged whatever the real input size is.  The pad module is a child
    named ``static_padding`` with no state, so the parameter names are those of ``nn.Conv2d``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, image_size, stride=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias)
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(image_size / sh) - 1) * sh + kh - image_size, 0)
        pad_w = max((math.ceil(image_size / sw) - 1) * sw + kw - image_size, 0)
        if pad_h or pad_w:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (``efficientnet_pytorch`` names)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, *, image_size: int,
                 se_ratio: float = 0.25, bn_eps: float = 1e-3, bn_momentum: float = 0.01):
        super().__init__()
        self.expand = expand
        self.use_skip = stride == 1 and in_ch == out_ch
        mid = in_ch * expand

        def conv(i, o, k, **kw):
            return SamePadConv2d(i, o, k, image_size=image_size, **kw)

        def bn(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        if expand != 1:
            self._expand_conv = conv(in_ch, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = conv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        squeezed = max(1, int(in_ch * se_ratio))
        self._se_reduce = conv(mid, squeezed, 1)
        self._se_expand = conv(squeezed, mid, 1)
        self._project_conv = conv(mid, out_ch, 1, bias=False)
        self._bn2 = bn(out_ch)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand != 1:
            x = _swish(self._bn0(self._expand_conv(x)))
        x = _swish(self._bn1(self._depthwise_conv(x)))
        s = F.adaptive_avg_pool2d(x, 1)
        s = self._se_expand(_swish(self._se_reduce(s)))
        x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.use_skip:  # drop-connect is an identity at inference
            x = x + inputs
        return x


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if out < 0.9 * scaled:
        out += divisor
    return int(out)


#: EfficientNet-B0 stages: (kernel, repeats, stride, expand, in, out); SE ratio 0.25 throughout
_B0_STAGES = [
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
]


class EfficientNet(nn.Module):
    """EfficientNet in the ``efficientnet_pytorch`` parameter layout.

    Padding rule: like the copy of ``efficientnet_pytorch`` vendored in the DeepGaze reference
    (``deepgaze_pytorch/features/efficientnet_pytorch``), *every* convolution uses static "same"
    padding computed for the model's native square resolution (456 for B5), not for the
    resolution the block actually sees.  For stride-1 convolutions this is ordinary symmetric
    padding; stride-2 convolutions pad (0, 1) for 3x3 and (1, 2) for 5x5 kernels.
    """

    def __init__(self, width: float = 1.6, depth: float = 2.2, image_size: int = 456, num_classes: int = 1000):
        super().__init__()
        bn = dict(eps=1e-3, momentum=0.01)
        stem = _round_filters(32, width)
        self._conv_stem = SamePadConv2d(3, stem, 3, stride=2, bias=False, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(stem, **bn)
        blocks = []
        for kernel, repeats, stride, expand, cin, cout in _B0_STAGES:
            cin, cout = _round_filters(cin, width), _round_filters(cout, width)
            for i in range(int(math.ceil(depth * repeats))):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand,
                                          image_size=image_size))
        self._blocks = nn.ModuleList(blocks)
        head = _round_filters(1280, width)
        self._conv_head = SamePadConv2d(cout, head, 1, bias=False, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(head, **bn)
        self._fc = nn.Linear(head, num_classes)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        x = _swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return _swish(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.extract_features(x)
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def efficientnet_b5() -> nn.Sequential:
    return nn.Sequential(Normalizer(), EfficientNet(width=1.6, depth=2.2, image_size=456))


# --------------------------------------------------------------------------- VGG-19


def vgg19_named() -> nn.Sequential:
    """VGG-19's convolutional part with layers named ``normalize, conv1_1, relu1_1, ..., pool5``.

    Same layer sequence and shapes as torchvision's ``vgg19().features`` (3x3 convolutions with
    padding 1 and bias, in-place ReLUs), with ``ceil_mode=True`` max-pools as in DeepGaze.
    """
    widths = [64, 128, 256, 512, 512]
    layers: OrderedDict[str, nn.Module] = OrderedDict(normalize=Normalizer())
    cin = 3
    for b, width in enumerate(widths, start=1):
        for i in range(1, (2 if b <= 2 else 4) + 1):
            layers[f"conv{b}_{i}"] = nn.Conv2d(cin, width, 3, padding=1)
            layers[f"relu{b}_{i}"] = nn.ReLU(inplace=True)
            cin = width
        layers[f"pool{b}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
    return nn.Sequential(layers)
