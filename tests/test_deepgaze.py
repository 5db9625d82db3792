"""DeepGaze IIE / II teachers: reference layout, numerics against plain numpy, contract.

``tests/data/deepgaze2e_keys.txt`` lists every key and shape of the published ``deepgaze2e.pth``
as derived from the reference implementation's structure (see the file's header).  All tests are
offline: weights are random (seeded) or synthetic state dicts in the published layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from scipy.special import logsumexp
from torch import nn

import teachers.deepgaze as dg
from teachers import available, build_teacher
from teachers.backbones import IMAGENET_MEAN, IMAGENET_STD, Normalizer
from teachers.base import Teacher
from teachers.deepgaze import (
    DeepGazeII,
    DeepGazeIIE,
    fixation_selection_network,
    parameter_count,
    saliency_network,
    unwrap_state_dict,
)
from teachers.deepgaze_modules import (
    DeepGazeMixture,
    FeatureExtractor,
    Finalizer,
    LayerNorm,
    centerbias_for,
    mixture,
    zoom_nearest,
)
from teachers.blur import gaussian_kernel_size
from teachers.weights import WeightsError, file_digest, load_strict

KEYS_FILE = Path(__file__).parent / "data" / "deepgaze2e_keys.txt"
PUBLISHED_ENTRIES = 5461
PUBLISHED_PARAMETERS = 104_048_808
DEEPGAZE2_PARAMETERS = 20.07e6


def reference_layout() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            rows.append((key, tuple(json.loads(shape))))
    return rows


def uint8_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def randomise(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def iie() -> DeepGazeIIE:
    return build_teacher("deepgaze2e", weights="random")


@pytest.fixture(scope="module")
def dg2() -> DeepGazeII:
    return build_teacher("deepgaze2", weights="random")


# --------------------------------------------------------------------------- plain numpy reference


def np_layernorm(x, w, b, eps=1e-12):
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    v = x.var(axis=(1, 2, 3), keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w[None, :, None, None] + b[None, :, None, None]


def np_conv1x1(x, weight, bias=None):
    out = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)
    return out if bias is None else out + bias[None, :, None, None]


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_saliency(x, sd, prefix=""):
    p = {k[len(prefix):]: v.detach().double().numpy() for k, v in sd.items() if k.startswith(prefix)}
    x = np_softplus(np_conv1x1(np_layernorm(x, p["layernorm0.weight"], p["layernorm0.bias"]), p["conv0.weight"],
                               p["bias0.bias"]))
    x = np_softplus(np_conv1x1(np_layernorm(x, p["layernorm1.weight"], p["layernorm1.bias"]), p["conv1.weight"],
                               p["bias1.bias"]))
    x = np_softplus(np_conv1x1(np_layernorm(x, p["layernorm2.weight"], p["layernorm2.bias"]), p["conv2.weight"],
                               p["bias2.bias"]))
    return x


def np_fixation_selection(x, sd, prefix=""):
    p = {k[len(prefix):]: v.detach().double().numpy() for k, v in sd.items() if k.startswith(prefix)}
    x = np_layernorm(x, p["layernorm0.layernorm_part0.weight"], p["layernorm0.layernorm_part0.bias"])
    x = np_softplus(np_conv1x1(x, p["conv0.conv_part0.weight"], p["bias0.bias"]))
    x = np_softplus(np_conv1x1(np_layernorm(x, p["layernorm1.weight"], p["layernorm1.bias"]), p["conv1.weight"],
                               p["bias1.bias"]))
    return np_conv1x1(x, p["conv2.weight"])


def nearest_index(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """torch's 'nearest' source index (float32 arithmetic, like its CPU kernel)."""
    if scale is None:
        if n_out == n_in:
            return np.arange(n_out)
        if n_out == 2 * n_in:
            return np.arange(n_out) >> 1
        scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * np.float32(scale)).astype(int)
    return np.minimum(idx, n_in - 1)


def np_resize_nearest(x, h, w, scale=None):
    """``x [..., H, W]`` → ``[..., h, w]``."""
    rows = nearest_index(x.shape[-2], h, scale)
    cols = nearest_index(x.shape[-1], w, scale)
    return x[..., rows, :][..., cols]


def np_gaussian_kernel(sigma: float, truncate: float = 3.0) -> np.ndarray:
    radius = math.ceil(truncate * sigma)
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum()


def np_blur(x, sigma, axes=(-2, -1)):
    k = np_gaussian_kernel(sigma)
    r = len(k) // 2
    for axis in axes:
        moved = np.moveaxis(x, axis, -1)
        padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(r, r)], mode="edge")
        out = sum(k[i] * padded[..., i:i + moved.shape[-1]] for i in range(len(k)))
        x = np.moveaxis(out, -1, axis)
    return x


def np_finalizer(readout, centerbias, sigma, weight, factor=2):
    """``readout [B,1,h,w]``, ``centerbias [B,H,W]`` → log density ``[B,H,W]``."""
    height, width = centerbias.shape[1:]
    hs, ws = height // factor, width // factor
    small = np_resize_nearest(centerbias, hs, ws, scale=factor)
    out = np_resize_nearest(readout[:, 0], hs, ws)
    out = np_blur(out, sigma) + weight * small
    out = np_resize_nearest(out, height, width)
    return out - logsumexp(out, axis=(1, 2), keepdims=True)


# --------------------------------------------------------------------------- reference layout


def test_keys_file_figures():
    rows = reference_layout()
    assert len(rows) == PUBLISHED_ENTRIES
    assert len({k for k, _ in rows}) == len(rows)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(math.prod(s) for k, s in rows if not k.endswith(stats)) == PUBLISHED_PARAMETERS
    keys = dict(rows)
    assert keys["models.0.features.features.1.module.conv1.weight"] == (64, 3, 7, 7)
    assert keys["models.3.finalizers.29.center_bias_weight"] == (1,)
    assert keys["models.3.finalizers.29.gauss.sigma"] == ()


def test_state_dict_matches_reference_layout(iie):
    ours = [(k, tuple(v.shape)) for k, v in iie.state_dict().items()]
    assert ours == reference_layout()  # same keys, same shapes, same order
    assert parameter_count(iie) == PUBLISHED_PARAMETERS


def test_tapped_channels_match_readout(iie):
    x = torch.rand(1, 3, 64, 64) * 255
    for model, (_, taps, channels) in zip(iie.models, dg.BACKBONES):
        with torch.no_grad():
            feats = model.features(x)
        assert len(feats) == len(taps)
        assert sum(f.shape[1] for f in feats) == channels
        assert model.saliency_networks[0].layernorm0.features == channels


def test_builder_loads_published_layout_strictly(tmp_path, monkeypatch):
    """weights=None → the known name 'deepgaze2e'; a wrapped/bare state dict in the file layout loads strictly."""
    dummy = tmp_path / "deepgaze2e.pth"
    dummy.write_bytes(b"stand-in for the published file")
    state = {k: torch.tensor(0.25).expand(s) for k, s in reference_layout()}
    asked = []

    def fake_resolve(spec):
        asked.append(spec)
        return dummy

    monkeypatch.setattr(dg, "resolve", fake_resolve)
    monkeypatch.setattr(dg, "load_state_dict", lambda path: {"state_dict": state})
    model = dg.deepgaze2e(centerbias=None)
    assert asked == ["deepgaze2e"]
    assert model.weights_digest == file_digest(dummy) and not model.weights_random
    assert torch.all(model.models[1].features.features[1]._blocks[24]._depthwise_conv.weight == 0.25)
    assert torch.all(model.models[3].finalizers[29].center_bias_weight == 0.25)
    assert model.name == "deepgaze2e" and model.centerbias.source == "uniform"


def test_default_weights_offline_error(monkeypatch):
    def offline(spec):
        raise WeightsError(f"weights {spec!r} not cached and offline")

    monkeypatch.setattr(dg, "resolve", offline)
    with pytest.raises(WeightsError, match="deepgaze2e"):
        dg.deepgaze2e()


def test_missing_unexpected_and_misshapen_keys_raise(iie):
    sd = dict(iie.state_dict())
    missing = {k: v for k, v in sd.items() if k != "models.2.finalizers.7.gauss.sigma"}
    with pytest.raises(WeightsError, match="1 missing"):
        load_strict(iie, missing, what="test")
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_strict(iie, {**sd, "models.0.extra": torch.zeros(1)}, what="test")
    with pytest.raises(WeightsError, match="wrong shape"):
        load_strict(iie, {**sd, "models.0.finalizers.0.center_bias_weight": torch.zeros(2)}, what="test")


def test_unwrap_state_dict():
    sd = {"a": torch.zeros(1)}
    assert unwrap_state_dict(sd, what="x") == sd
    assert unwrap_state_dict({"state_dict": sd, "epoch": 3}, what="x") == sd
    assert unwrap_state_dict({"model": sd}, what="x") == sd
    with pytest.raises(WeightsError, match="not a state dict"):
        unwrap_state_dict({"epoch": 3}, what="x")


# --------------------------------------------------------------------------- DeepGaze II


def test_deepgaze2_parameter_count(dg2):
    assert abs(parameter_count(dg2) - DEEPGAZE2_PARAMETERS) / DEEPGAZE2_PARAMETERS < 0.005
    assert dg2.readout_network.conv0.in_channels == 5 * 512
    assert dg2.features.targets == ["conv5_1", "relu5_1", "relu5_2", "conv5_3", "relu5_4"]
    pools = [m for m in dg2.features.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.ceil_mode for p in pools)


def test_deepgaze2_needs_weights():
    with pytest.raises(WeightsError, match="no public PyTorch checkpoint") as e:
        build_teacher("deepgaze2")
    assert "\n" not in str(e.value)


def test_deepgaze2_loads_own_layout(dg2, tmp_path):
    path = tmp_path / "dg2.pth"
    sd = dg2.state_dict()
    # a reference-style VGG normaliser saves constant mean/std buffers: accepted and ignored
    extra = {"features.features.normalize.mean": torch.zeros(3, 1, 1, dtype=torch.float64),
             "features.features.normalize.std": torch.ones(3, 1, 1, dtype=torch.float64)}
    torch.save({**sd, **extra}, path)
    loaded = dg.deepgaze2(weights=str(path), centerbias=None)
    assert loaded.weights_digest == file_digest(path) and not loaded.weights_random
    x = uint8_images(1, 48, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), dg2(x))
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("finalizer.")}, bad)
    with pytest.raises(WeightsError, match="missing"):
        dg.deepgaze2(weights=str(bad), centerbias=None)


# --------------------------------------------------------------------------- numerics vs numpy


def test_layernorm_matches_numpy():
    ln = LayerNorm(5)
    randomise(ln, 1)
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 4))
    out = ln(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    ref = np_layernorm(x, ln.weight.detach().double().numpy(), ln.bias.detach().double().numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_readout_networks_match_numpy():
    sal, sel = saliency_network(6), fixation_selection_network()
    randomise(sal, 2)
    randomise(sel, 3)
    x = np.random.default_rng(1).normal(size=(2, 6, 4, 5))
    with torch.no_grad():
        s = sal(torch.tensor(x, dtype=torch.float32))
        out = sel((s, None)).numpy()
    ref_s = np_saliency(x, sal.state_dict())
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, np_fixation_selection(ref_s, sel.state_dict()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.8, 1.3, 2.1])
def test_gaussian_kernel_rule(sigma):
    # the reference's size rule (2*ceil(3 sigma)+1), which scipy's default radius rounds differently at 2.1
    assert gaussian_kernel_size(sigma, 3) == 2 * math.ceil(3 * sigma) + 1
    x = np.random.default_rng(2).normal(size=(3, 11, 13))
    ours = np_blur(x, sigma)
    r = math.ceil(3 * sigma)
    scipy_ref = ndi.gaussian_filter1d(ndi.gaussian_filter1d(x, sigma, axis=1, mode="nearest", radius=r),
                                      sigma, axis=2, mode="nearest", radius=r)
    np.testing.assert_allclose(ours, scipy_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma, weight, shape", [(0.8, 0.7, (20, 27)), (2.1, 1.4, (19, 30)), (3.0, -0.5, (8, 9))])
def test_finalizer_matches_numpy(sigma, weight, shape):
    fin = Finalizer(sigma=sigma, learn_sigma=True, center_bias_weight=weight, saliency_map_factor=2)
    rng = np.random.default_rng(3)
    readout = rng.normal(size=(2, 1, 4, 6))
    cb = rng.normal(size=(2, *shape))
    with torch.no_grad():
        out = fin(torch.tensor(readout, dtype=torch.float32), torch.tensor(cb, dtype=torch.float32)).numpy()
    ref = np_finalizer(readout, cb, sigma, weight)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logsumexp(out.astype(np.float64), axis=(1, 2)), 0, atol=1e-5)


def test_mixture_pipeline_matches_numpy():
    """A whole DeepGazeMixture (tiny backbone, 3 components) against its numpy transcription."""
    torch.manual_seed(0)
    backbone = nn.Sequential(Normalizer(), nn.Conv2d(3, 4, 1))
    comps = 3
    model = DeepGazeMixture(
        FeatureExtractor(backbone, ["1"]),
        [saliency_network(4) for _ in range(comps)],
        [fixation_selection_network() for _ in range(comps)],
        [Finalizer(sigma=s, learn_sigma=True, center_bias_weight=w, saliency_map_factor=2)
         for s, w in [(0.8, 1.0), (1.5, 0.5), (2.1, 1.2)]],
        downsample=2, readout_factor=2,
    )
    for i in range(comps):
        randomise(model.saliency_networks[i], 10 + i)
        randomise(model.fixation_selection_networks[i], 20 + i)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(2, 3, 20, 28)).astype(np.float64)
    cb = rng.normal(size=(2, 20, 28))
    with torch.no_grad():
        out = model(torch.tensor(images, dtype=torch.float32), torch.tensor(cb, dtype=torch.float32)).numpy()

    sd = model.state_dict()
    half = images[:, :, ::2, ::2]
    normed = (half / 255 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    feats = np_conv1x1(normed, sd["features.features.1.weight"].double().numpy(),
                       sd["features.features.1.bias"].double().numpy())
    readin = np_resize_nearest(feats, 5, 7)
    comps_out = []
    for i, fin in enumerate(model.finalizers):
        s = np_saliency(readin, sd, f"saliency_networks.{i}.")
        r = np_fixation_selection(s, sd, f"fixation_selection_networks.{i}.")
        comps_out.append(np_finalizer(r, cb, fin.gauss.sigma.item(), fin.center_bias_weight.item()))
    ref = logsumexp(np.stack(comps_out, axis=1) - np.log(comps), axis=1, keepdims=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_mixture_helper():
    rng = np.random.default_rng(5)
    parts = [rng.normal(size=(2, 1, 3, 4)) for _ in range(4)]
    out = mixture([torch.tensor(p) for p in parts]).numpy()
    np.testing.assert_allclose(out, logsumexp(np.concatenate(parts, axis=1), axis=1, keepdims=True) - np.log(4))


def test_feature_extractor_copies_before_inplace_relu():
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1), nn.Conv2d(2, 2, 1))
    fx = FeatureExtractor(seq, ["2", "0"])
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        a2, a0 = fx(x)
        assert torch.equal(a0, seq[0](x))
        assert (a0 < 0).any()  # taken before the in-place ReLU
        assert torch.equal(a2, seq[2](torch.relu(seq[0](x))))
        assert seq(x).shape == (1, 2, 5, 5)  # hooks are inert outside the extractor


# --------------------------------------------------------------------------- centre bias


def test_centerbias_resize_matches_reference_readme():
    rng = np.random.default_rng(6)
    template = rng.normal(size=(64, 64))
    for h, w in [(48, 64), (37, 53), (64, 64), (100, 130)]:
        ref = ndi.zoom(template, (h / 64, w / 64), order=0, mode="nearest")
        ref = ref - logsumexp(ref)
        np.testing.assert_allclose(centerbias_for(template, h, w), ref, rtol=0, atol=1e-12)
        assert np.array_equal(zoom_nearest(template, h, w), ndi.zoom(template, (h / 64, w / 64), order=0,
                                                                     mode="nearest"))
    np.testing.assert_allclose(centerbias_for(None, 6, 8), np.full((6, 8), -np.log(48)))


def test_load_centerbias(tmp_path, monkeypatch):
    yy, xx = np.mgrid[0:32, 0:32]
    template = -((yy - 16) ** 2 + (xx - 16) ** 2) / 50.0
    path = tmp_path / "cb.npy"
    np.save(path, template)
    monkeypatch.setattr(dg, "resolve", lambda spec: path if spec == "centerbias_mit1003" else Path(spec))
    cb = dg.load_centerbias("centerbias_mit1003")
    assert cb.source == str(path)
    t = cb(24, 20, "cpu")
    assert t.shape == (24, 20) and t.dtype == torch.float32
    assert abs(torch.logsumexp(t.double().flatten(), 0).item()) < 1e-5
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 2, 2)))
    with pytest.raises(WeightsError, match="2-d"):
        dg.load_centerbias(str(bad))
    with pytest.warns(UserWarning, match="no centre bias given; using a uniform centre bias"):  # the CLI: warning:
        assert dg.load_centerbias(None).source == "uniform"
    import warnings

    with warnings.catch_warnings():  # random weights (profile, `pipeline teachers`): uniform by design, said nowhere
        warnings.simplefilter("error")
        assert dg.deepgaze2(weights="random").centerbias.source == "uniform"
        assert dg.deepgaze(weights="random").centerbias.source == "uniform"


def test_centerbias_shapes_prediction(dg2, monkeypatch):
    x = uint8_images(1, 48, 64, seed=3)
    with torch.no_grad():
        uniform = dg2(x)
        yy, xx = np.mgrid[0:64, 0:64]
        monkeypatch.setattr(dg2, "centerbias", dg.CenterBias(-((yy - 32.0) ** 2 + (xx - 32.0) ** 2) / 100.0, "t"))
        centred = dg2(x)
    assert not torch.allclose(uniform, centred)
    # a peaked centre bias moves mass to the middle
    assert centred[0, 0, 20:28, 28:36].exp().sum() > uniform[0, 0, 20:28, 28:36].exp().sum()


# --------------------------------------------------------------------------- teacher contract


def test_contract(iie, dg2):
    for t, name in [(iie, "deepgaze2e"), (dg2, "deepgaze2")]:
        assert isinstance(t, Teacher)
        assert t.name == name
        assert t.output_kind == "log_density" and t.label_extension == "npy"
        assert t.input_size == (384, 512)
        assert t.weights_random and t.weights_digest == "random"
        assert not t.training
    with pytest.raises(ValueError):
        iie(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("shape", [(2, 64, 96), (1, 70, 90)])
def test_outputs_are_log_densities_and_deterministic(iie, dg2, shape):
    x = uint8_images(*shape)
    for teacher in (iie, dg2):
        with torch.no_grad():
            a, b = teacher(x), teacher(x)
        assert a.shape == (shape[0], 1, shape[1], shape[2]) and a.dtype == torch.float32
        assert torch.isfinite(a).all()
        np.testing.assert_allclose(torch.logsumexp(a.double().flatten(1), dim=1).numpy(), 0, atol=1e-4)
        assert torch.equal(a, b)


def test_hint_features_finest_first(iie, dg2):
    x = uint8_images(2, 64, 96).float()
    with torch.no_grad():
        for teacher, channels in [(iie, [256, 512, 1024, 2048]), (dg2, [128, 256, 512, 512])]:
            hints = teacher.hint_features(x)
            assert [h.shape[1] for h in hints] == channels
            assert all(h.shape[0] == 2 for h in hints)
            sizes = [h.shape[2] * h.shape[3] for h in hints]
            assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


def test_registry_names(iie):
    assert {"deepgaze", "deepgaze2e", "deepgaze2"} <= set(available())
    alias = build_teacher("deepgaze", weights="random")
    assert isinstance(alias, DeepGazeIIE) and alias.name == "deepgaze"
    x = uint8_images(1, 64, 80, seed=7)
    with torch.no_grad():
        assert torch.equal(alias(x), iie(x))  # seeded random init: the same network


def test_iie_rejects_tiny_images(iie):
    with pytest.raises(ValueError, match="at least 64"):
        iie(uint8_images(1, 63, 100))


def test_centre_bias_joins_the_weights_digest_and_defaults_to_mit1003(tmp_path, monkeypatch):
    """Labels depend on the centre bias, so shards must record which one was used."""
    template = np.log(np.full((16, 16), 1 / 256.0))
    np.save(tmp_path / "cb.npy", template)
    model = dg.deepgaze2(weights="random", centerbias=str(tmp_path / "cb.npy"))
    assert model.weights_digest == "random+centerbias:" + file_digest(tmp_path / "cb.npy")[:16]
    assert dg._default_centerbias("auto", None) == "centerbias_mit1003"
    assert dg._default_centerbias("auto", "random") is None
