"""The weight-free classical teacher (spectral residual + centre bias)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from teachers import build_teacher
from teachers.base import Teacher
from teachers.classic import ClassicTeacher, center_bias
from teachers.weights import WeightsError


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def teacher() -> ClassicTeacher:
    return build_teacher("classic")


@pytest.fixture(scope="module", params=["astronaut", "coffee", "chelsea"])
def photo(request) -> torch.Tensor:
    return _tensor(getattr(data, request.param)())


def test_contract(teacher):
    assert isinstance(teacher, Teacher)
    assert teacher.name == "classic"
    assert teacher.output_kind == "probability_map"
    assert teacher.label_extension == "png"
    assert teacher.input_size is None
    assert teacher.weights_digest == "none"
    assert not teacher.weights_random
    assert not teacher.training
    assert len(teacher.state_dict()) == 0


@pytest.mark.parametrize("weights", [None, "none", "None"])
def test_builder_accepts_no_weights(weights):
    assert isinstance(build_teacher("classic", weights=weights), ClassicTeacher)


@pytest.mark.parametrize("weights", ["random", "deepgaze2e", "/some/file.pth"])
def test_builder_rejects_weights(weights):
    with pytest.raises(WeightsError, match="the classic teacher has no weights"):
        build_teacher("classic", weights=weights)


def test_rejects_non_uint8(teacher):
    with pytest.raises(ValueError):
        teacher(torch.zeros(1, 3, 8, 8))


def test_real_photos(teacher, photo):
    out = teacher(photo)
    _, _, h, w = photo.shape
    assert out.shape == (1, 1, h, w)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) == pytest.approx(1.0)
    assert float(out.std()) > 0.01  # not constant
    # the image matters: the map is not just the centre bias
    corr = np.corrcoef(out.flatten().numpy(), center_bias(h, w).flatten().numpy())[0, 1]
    assert corr < 0.95


def test_deterministic(teacher, photo):
    assert torch.equal(teacher(photo), teacher(photo.clone()))


def test_batch_equals_one_by_one(teacher):
    a = data.astronaut()[100:356, 100:420]
    c = data.chelsea()[:256, :320]
    batch = torch.cat([_tensor(a), _tensor(c), _tensor(a[::-1])])
    together = teacher(batch)
    apart = torch.cat([teacher(batch[i : i + 1]) for i in range(len(batch))])
    assert together.shape == (3, 1, 256, 320)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 8), (1, 1), (3, 200), (65, 2)])
def test_tiny_and_odd_sizes(teacher, shape):
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8, generator=g)
    out = teacher(img)
    assert out.shape == (2, 1, *shape)
    assert torch.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_uniform_image_is_finite(teacher):
    out = teacher(torch.full((1, 3, 48, 64), 128, dtype=torch.uint8))
    assert torch.isfinite(out).all() and float(out.max()) == pytest.approx(1.0)


@pytest.mark.parametrize("centre", [(30, 125), (90, 35)])
def test_peaks_at_a_bright_blob(teacher, centre):
    h, w = 120, 160
    img = np.full((h, w, 3), 100, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 8**2] = 250
    out = teacher(_tensor(img))[0, 0]
    py, px = np.unravel_index(int(out.argmax()), out.shape)
    assert np.hypot(py - centre[0], px - centre[1]) < 12
    # and the blob outshines the image centre (which the centre bias favours)
    assert float(out[centre]) > 2 * float(out[h // 2, w // 2])


def test_module_to_device_plumbing(teacher):
    # nn.Module plumbing: .to() works although the teacher has no parameters
    img = torch.randint(0, 256, (1, 3, 16, 24), dtype=torch.uint8)
    assert teacher.to("cpu")(img).shape == (1, 1, 16, 24)


def test_image_borders_are_not_false_edges(teacher, photo):
    """The FFT wraps around: without mirror padding the border strip lights up on every photo."""
    from teachers.classic import spectral_residual

    gray = photo.float().mean(1, keepdim=True)
    sr = spectral_residual(torch.nn.functional.interpolate(gray, size=(48, 64), mode="area"))[0, 0]
    border = torch.cat([sr[:3].flatten(), sr[-3:].flatten(), sr[:, :3].flatten(), sr[:, -3:].flatten()])
    assert border.mean() < 1.5 * sr[3:-3, 3:-3].mean()
