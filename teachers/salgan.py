"""SalGAN's generator (Pan et al. 2017) as a teacher, loadable from either published weights format.

Layer layout (one ``nn.Sequential``, 62 modules, state-dict keys ``0.weight`` … ``60.bias``) follows
``model/salgan_generator.py`` of github.com/feiyanhu/FastSal: torchvision ``vgg16().features[:30]``
(indices 0..29, no pool5), then the mirrored decoder from index 30::

    30 conv 512  32 conv 512  34 conv 512  (35 ReLU)  36 up×2
    37 conv 512  39 conv 512  41 conv 512  (42 ReLU)  43 up×2
    44 conv 256  46 conv 256  48 conv 256  (49 ReLU)  50 up×2
    51 conv 128  53 conv 128               (54 ReLU)  55 up×2
    56 conv 64   58 conv 64   60 conv 1×1  61 sigmoid

Preprocessing follows imatge-upc/salgan ``scripts/models/layers.py`` (``RGBtoBGRLayer``): RGB in 0..255
is flipped to BGR and the BGR ImageNet mean is subtracted, no rescaling.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from teachers.base import Teacher, random_init
from teachers.registry import register
from teachers.weights import KNOWN_WEIGHTS, WeightsError, cache_path, load_state_dict, load_strict, resolve

BGR_MEAN = (103.939, 116.779, 123.68)
# conv widths; "M" = 2×2 max-pool, "U" = nearest ×2 upsample; every conv is 3×3 pad 1 + ReLU
_ENCODER = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_DECODER = [512, 512, 512, "U", 512, 512, 512, "U", 256, 256, 256, "U", 128, 128, "U", 64, 64]
_N_ENCODER_CONVS = 13
#: ReLU outputs closing the decoder blocks conv2, conv3, conv4, conv5 (strides 2, 4, 8, 16), finest first;
#: the same modules FastSal hooks as its decoder hints (model/utils.py, which lists them coarsest first)
HINT_INDICES = (54, 49, 42, 35)

MISSING_WEIGHTS = (
    "salgan needs --weights: either the original Lasagne release gen_modelWeights0090.npz "
    "(linked from the imatge-upc/salgan README: {url}; `pipeline weights fetch salgan` downloads it to {path}, "
    "and `pipeline weights convert {path} data/weights/salgan_generator.pt` makes a PyTorch checkpoint of it) "
    "or a PyTorch generator checkpoint "
    "({{'state_dict': sd}}, keys 0.weight..60.bias, as used by the FastSal authors); "
    "--weights random is for testing only (its labels mean nothing)"
)


def _conv_shapes() -> list[tuple[int, tuple[int, ...]]]:
    """(Sequential index, weight shape) of the 27 convs, in order."""
    shapes, index, cin = [], 0, 3
    for v in _ENCODER + _DECODER:
        if v in ("M", "U"):
            index += 1
        else:
            shapes.append((index, (v, cin, 3, 3)))
            index, cin = index + 2, v
    shapes.append((index, (1, cin, 1, 1)))
    return shapes


def build_generator() -> nn.Sequential:
    """The generator with PyTorch's default initialisation."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _ENCODER + _DECODER:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "U":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU()]
            cin = v
    layers += [nn.Conv2d(cin, 1, kernel_size=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


class SalGAN(Teacher):
    """SalGAN generator: uint8 RGB → sigmoid probability map at the input resolution."""

    name = "salgan"
    #: four workers per GPU, decoding on the CPUs (``cpu-reduced``): on an H100 with 16 cores, 640x480 photos,
    #: 2,242-2,390 images/s (0.81-0.86 of the bare forward pass), against 2,045-2,061 decoding on the GPU; about
    #: 1,900 with two workers and 1,450 with one (docs/benchmarks.md)
    workers_per_gpu = 4
    decode_on_gpu = False
    output_kind = "probability_map"
    input_size = (192, 256)
    hint_layout = ((128, 2), (256, 4), (512, 8), (512, 16))

    def __init__(self) -> None:
        super().__init__()
        #: the generator; its state dict is the checkpoint format (``0.weight`` … ``60.bias``)
        self.net = build_generator()
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def check_weights(cls, name: str, weights: str | None) -> None:
        if weights is None:
            raise WeightsError(MISSING_WEIGHTS.format(url=KNOWN_WEIGHTS["salgan_lasagne"].url,
                                                      path=cache_path("salgan_lasagne")))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float RGB 0..255 → BGR minus the ImageNet BGR mean (SalGAN's ``RGBtoBGRLayer``)."""
        h, w = images.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"salgan: input height and width must be multiples of 16, got {h}×{w}")
        return images.flip(1) - self.bgr_mean

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    def hint_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Decoder ReLU outputs 128@/2, 256@/4, 512@/8, 512@/16 (modules 54, 49, 42, 35)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"salgan: expected uint8 RGB [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
        x, found = self.preprocess(images.float()), {}
        for i, layer in enumerate(self.net[: max(HINT_INDICES) + 1]):
            x = layer(x)
            if i in HINT_INDICES:
                found[i] = x
        return [found[i] for i in HINT_INDICES]


def convert_lasagne_npz(src: str | Path) -> dict[str, torch.Tensor]:
    """The Lasagne release (``arr_0`` … ``arr_53``: W, b per conv) → a state dict for ``SalGAN.net``.

    imatge-upc/salgan ``scripts/models/vgg16.py`` builds the encoder convs with ``flip_filters=False``
    (cross-correlation, like PyTorch), while ``models/generator.py`` builds the decoder convs with
    Lasagne's default ``flip_filters=True`` (true convolution): those kernels are flipped in both
    spatial axes here. Lasagne's W is (out, in, kh, kw) like PyTorch's.
    """
    try:
        with open(src, "rb") as f:
            zipped = f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # the start only (zipfile.is_zipfile reads
            # the end, and would call a truncated download "not an archive")
    except OSError as e:
        raise WeightsError(f"cannot read Lasagne weights {src}: {e.strerror or e}") from e
    if not zipped:  # np.load would try it as a pickle, or hand back one .npy array
        raise WeightsError(f"{src} is not an .npz archive (the Lasagne release, gen_modelWeights0090.npz, is a zip "
                           "of arrays arr_0 … arr_53)")
    try:
        with np.load(src, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # truncated zip…
        raise WeightsError(f"cannot read Lasagne weights {src}: {e}") from e
    shapes = _conv_shapes()
    expected = [f"arr_{i}" for i in range(2 * len(shapes))]
    missing = [k for k in expected if k not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        first = f"{missing[0]} is missing" if missing else f"unexpected array {extra[0]}"
        raise WeightsError(
            f"{src}: expected {len(expected)} arrays arr_0..arr_{len(expected) - 1}, got {len(arrays)}; {first}"
        )
    sd: dict[str, torch.Tensor] = {}
    for n, (index, w_shape) in enumerate(shapes):
        w, b = arrays[f"arr_{2 * n}"], arrays[f"arr_{2 * n + 1}"]
        for key, arr, shape in ((f"arr_{2 * n}", w, w_shape), (f"arr_{2 * n + 1}", b, w_shape[:1])):
            if arr.shape != shape:
                raise WeightsError(f"{src}: {key} (conv {n}) has shape {arr.shape}, expected {shape}")
            if arr.dtype.kind not in "fiu":
                raise WeightsError(f"{src}: {key} (conv {n}) holds {arr.dtype} values, not numbers")
        if n >= _N_ENCODER_CONVS:  # decoder + output conv: Lasagne true convolution → cross-correlation
            w = w[:, :, ::-1, ::-1]
        # a fresh C-ordered copy: a flipped 1×1 kernel counts as contiguous yet has negative strides
        sd[f"{index}.weight"] = torch.from_numpy(w.astype(np.float32, order="C", copy=True))
        sd[f"{index}.bias"] = torch.from_numpy(b.astype(np.float32, order="C", copy=True))
    return sd


def save_converted(src: str | Path, dst: str | Path) -> Path:
    """Convert the Lasagne npz ``src`` and write ``{'state_dict': sd}`` to ``dst`` atomically (a new file or
    one it replaces; never ``src`` itself, a folder or a device)."""
    dst = Path(dst)
    if dst.exists() and (dst.resolve() == Path(src).resolve() or not dst.is_file()):
        why = "the source itself" if dst.is_file() else "not a regular file"
        raise WeightsError(f"cannot write the checkpoint to {dst}: it is {why}; give a new .pt path")
    sd = convert_lasagne_npz(src)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)  # (data/weights/, which the project suggests, is not in a clone)
        with open(tmp, "wb") as f:
            torch.save({"state_dict": sd}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        raise WeightsError(f"cannot write the checkpoint to {dst}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):  # (no temp file when its folder is missing or a file)
            tmp.unlink(missing_ok=True)
    return dst


@register("salgan", SalGAN)
def salgan(*, weights: str | None = None) -> SalGAN:
    """SalGAN from a Lasagne ``.npz`` release, a PyTorch checkpoint, or ``"random"`` (testing only)."""
    SalGAN.check_weights("salgan", weights)
    if weights == "random":
        return random_init(SalGAN)
    model = SalGAN()
    path = resolve(weights)
    if path.suffix.lower() == ".npz":
        sd = convert_lasagne_npz(path)
    else:
        sd = load_state_dict(path)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise WeightsError(f"{path}: expected a state dict or {{'state_dict': sd}}, got {type(sd).__name__}")
    load_strict(model.net, sd, what=f"salgan weights {path}")
    model.weights_digest = SalGAN.weights_digest_of([path])
    return model
