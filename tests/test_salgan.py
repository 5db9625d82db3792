"""The SalGAN teacher: layout, checkpoint loading, the Lasagne converter's kernel flip, preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy.signal import convolve2d, correlate2d

from pipeline.cli.main import cli

from teachers.base import Teacher
from teachers.salgan import BGR_MEAN, SalGAN, convert_lasagne_npz, salgan, save_converted
from teachers.weights import WeightsError, file_digest

# conv positions in the FastSal authors' nn.Sequential (model/salgan_generator.py of feiyanhu/FastSal)
CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28,  # vgg16.features[:30]
                30, 32, 34, 37, 39, 41, 44, 46, 48, 51, 53, 56, 58, 60]  # decoder + 1×1 output
EXPECTED_KEYS = [f"{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")]
# Lasagne W shapes (out, in, kh, kw), in the release's arr_0..arr_53 order
CONV_SHAPES = [
    (64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
    (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
    (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
    (256, 512), (256, 256), (256, 256), (128, 256), (128, 128), (64, 128), (64, 64),
]


def _images(b: int = 1, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def model() -> SalGAN:
    torch.manual_seed(0)
    return salgan(weights="random").eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> tuple:
    """The random model's generator saved as ``{'state_dict': sd}``."""
    path = tmp_path_factory.mktemp("salgan") / "gen.pt"
    torch.save({"state_dict": model.net.state_dict()}, path)
    return path, model.net.state_dict()


@pytest.fixture(scope="module")
def lasagne_npz(tmp_path_factory) -> tuple:
    """A fake release npz in the publisher's layout: arr_{2n} = W (out, in, kh, kw), arr_{2n+1} = b."""
    rng = np.random.default_rng(0)
    shapes = [s + (3, 3) for s in CONV_SHAPES] + [(1, 64, 1, 1)]
    arrays = {}
    for n, shape in enumerate(shapes):
        arrays[f"arr_{2 * n}"] = rng.standard_normal(shape, dtype=np.float32) * 0.05
        arrays[f"arr_{2 * n + 1}"] = rng.standard_normal(shape[:1], dtype=np.float32) * 0.05
    path = tmp_path_factory.mktemp("lasagne") / "gen_modelWeights0090.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_contract_and_parameter_count(model):
    assert isinstance(model, Teacher)
    assert (model.name, model.output_kind, model.input_size) == ("salgan", "probability_map", (192, 256))
    assert model.weights_random and model.weights_digest == "random"
    assert sum(p.numel() for p in model.parameters()) == 31_787_009
    assert len(model.net) == 62


def test_state_dict_keys(model):
    assert list(model.net.state_dict()) == EXPECTED_KEYS
    assert len(EXPECTED_KEYS) == 54 and EXPECTED_KEYS[-1] == "60.bias"


def test_no_weights_is_a_clear_error():
    with pytest.raises(WeightsError, match="--weights") as e:
        salgan()
    assert "gen_modelWeights0090.npz" in str(e.value) and "random" in str(e.value)


def test_checkpoint_round_trip(model, checkpoint):
    path, _ = checkpoint
    loaded = salgan(weights=str(path)).eval()
    assert not loaded.weights_random and loaded.weights_digest == file_digest(path)
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bare_state_dict_loads(tmp_path, checkpoint):
    _, sd = checkpoint
    torch.save(sd, tmp_path / "bare.pth")
    loaded = salgan(weights=str(tmp_path / "bare.pth"))
    assert torch.equal(loaded.net[60].weight, sd["60.weight"])


@pytest.mark.parametrize("change, named", [("drop", "60.bias"), ("add", "61.weight")])
def test_checkpoint_with_wrong_keys(tmp_path, checkpoint, change, named):
    sd = dict(checkpoint[1])
    if change == "drop":
        del sd["60.bias"]
    else:
        sd["61.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=named.replace(".", r"\.")):
        salgan(weights=str(tmp_path / "bad.pt"))


def test_truncated_files(tmp_path, checkpoint, lasagne_npz):
    for src, name in ((checkpoint[0], "cut.pt"), (lasagne_npz[0], "cut.npz")):
        data = src.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match="cannot read"):
            salgan(weights=str(tmp_path / name))


def test_lasagne_encoder_conv_is_cross_correlation(lasagne_npz):
    """conv1_1 (flip_filters=False): PyTorch weight = Lasagne W, checked against scipy's correlate2d."""
    path, arrays = lasagne_npz
    sd = convert_lasagne_npz(path)
    w, b = arrays["arr_0"], arrays["arr_1"]
    x = np.random.default_rng(1).standard_normal((3, 8, 8)).astype(np.float32)
    ours = F.conv2d(torch.from_numpy(x)[None], sd["0.weight"], sd["0.bias"], padding=1)[0].numpy()
    for o in range(4):
        ref = sum(correlate2d(x[c], w[o, c], mode="same") for c in range(3)) + b[o]
        np.testing.assert_allclose(ours[o], ref, rtol=1e-4, atol=1e-4)


def test_lasagne_decoder_conv_is_true_convolution(lasagne_npz):
    """uconv5_3 (flip_filters=True, arr_26/27 → 30.*): must equal scipy's convolve2d with the Lasagne W."""
    path, arrays = lasagne_npz
    sd = convert_lasagne_npz(path)
    w, b = arrays["arr_26"][:2], arrays["arr_27"][:2]
    x = np.random.default_rng(2).standard_normal((512, 6, 6)).astype(np.float32)
    xt = torch.from_numpy(x)[None]
    ours = F.conv2d(xt, sd["30.weight"][:2], sd["30.bias"][:2], padding=1)[0].numpy()
    unflipped = F.conv2d(xt, torch.from_numpy(w), torch.from_numpy(b), padding=1)[0].numpy()
    for o in range(2):
        ref = sum(convolve2d(x[c], w[o, c], mode="same") for c in range(512)) + b[o]
        np.testing.assert_allclose(ours[o], ref, rtol=1e-4, atol=1e-3)
        assert not np.allclose(unflipped[o], ref, atol=1e-2)  # the flip matters


def test_lasagne_npz_loads_and_saves(tmp_path, lasagne_npz):
    path, arrays = lasagne_npz
    teacher = salgan(weights=str(path))
    assert teacher.weights_digest == file_digest(path) and not teacher.weights_random
    assert torch.equal(teacher.net[0].weight, torch.from_numpy(arrays["arr_0"]))
    assert torch.equal(teacher.net[58].weight, torch.from_numpy(arrays["arr_50"][:, :, ::-1, ::-1].copy()))
    dst = save_converted(path, tmp_path / "gen.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["gen.pt"]  # no temp file left behind
    converted = salgan(weights=str(dst))
    x = _images()
    with torch.no_grad():
        assert torch.equal(converted(x), teacher(x))


def test_lasagne_npz_with_wrong_layout(tmp_path, lasagne_npz):
    arrays = dict(lasagne_npz[1])
    arrays["arr_26"] = arrays["arr_26"][:, :, :1, :1]
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(WeightsError, match=r"arr_26 .*\(512, 512, 1, 1\)"):
        convert_lasagne_npz(tmp_path / "shape.npz")
    del arrays["arr_53"]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(WeightsError, match="arr_53 is missing"):
        convert_lasagne_npz(tmp_path / "short.npz")


def test_convert_refuses_a_destination_it_would_destroy_or_cannot_write_and_text_arrays(tmp_path, lasagne_npz):
    """`weights convert SRC DST`: DST the source itself or a device is refused before anything is written (the
    release stays as it was); a DST it cannot create, or an array of text, is one sentence naming it. A DST in
    a folder not made yet (data/weights/, which the project's messages suggest, in a fresh clone) is made."""
    path, arrays = lasagne_npz
    before = path.read_bytes()
    for dst, why in ((path, "it is the source itself"), (Path("/dev/null"), "it is not a regular file"),
                     (path / "gen.pt", "File exists")):
        result = CliRunner().invoke(cli, ["weights", "convert", str(path), str(dst)])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"Error: cannot write the checkpoint to {dst}: {why}"), result.output
    assert path.read_bytes() == before and Path("/dev/null").is_char_device()
    result = CliRunner().invoke(cli, ["weights", "convert", str(tmp_path / "gone.npz"), str(tmp_path / "g.pt")])
    assert result.exit_code == 2 and result.output.splitlines()[-1] == (  # where the release comes from
        f"Error: Invalid value for 'SRC': {tmp_path / 'gone.npz'} does not exist; `pipeline weights fetch salgan` "
        "downloads SalGAN's release and prints this command with its path")
    result = CliRunner().invoke(cli, ["weights", "convert", str(path), str(tmp_path / "data" / "weights" / "g.pt")])
    assert result.exit_code == 0 and (tmp_path / "data" / "weights" / "g.pt").is_file(), result.output
    np.savez(tmp_path / "text.npz", **{**arrays, "arr_0": np.zeros(arrays["arr_0"].shape, dtype="U1")})
    with pytest.raises(WeightsError, match=r"arr_0 \(conv 0\) holds <U1 values, not numbers"):
        convert_lasagne_npz(tmp_path / "text.npz")


def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path):
    """Not numpy's advice to load it as a pickle (`allow_pickle=`), nor an `__enter__` error for one .npy array."""
    (tmp_path / "text.npz").write_text("not weights")
    np.save(tmp_path / "one.npy", np.zeros(3))
    for path in (tmp_path / "text.npz", tmp_path / "one.npy"):
        with pytest.raises(WeightsError) as e:
            convert_lasagne_npz(path)
        assert str(e.value) == (f"{path} is not an .npz archive (the Lasagne release, gen_modelWeights0090.npz, is a "
                                "zip of arrays arr_0 … arr_53)")


def test_output_is_a_probability_map(model):
    with torch.no_grad():
        y = model(_images(2, 32, 48))
    assert y.shape == (2, 1, 32, 48) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1
    with pytest.raises(ValueError, match="multiples of 16"):
        model(_images(1, 40, 32))


def test_hint_feature_shapes(model):
    with torch.no_grad():
        hints = model.hint_features(_images(1, 192, 256))
    assert [tuple(h.shape) for h in hints] == [(1, 128, 96, 128), (1, 256, 48, 64), (1, 512, 24, 32), (1, 512, 12, 16)]
    assert all(h.min() >= 0 for h in hints)  # post-ReLU


def test_preprocess_is_bgr_minus_mean(model):
    rgb = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    out = model.preprocess(rgb)
    expected = torch.tensor([30 - BGR_MEAN[0], 20 - BGR_MEAN[1], 10 - BGR_MEAN[2]]).view(1, 3, 1, 1)
    assert torch.allclose(out, expected.expand(1, 3, 16, 16))
    assert BGR_MEAN == (103.939, 116.779, 123.68)


def test_deterministic(model):
    x = _images(1, 32, 32, seed=3)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.numpy().tobytes() == b.numpy().tobytes()
