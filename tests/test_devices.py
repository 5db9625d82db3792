"""Device and precision: every forward runs on the meta device (no data-dependent Python, no hidden
device-to-host reads), and the bf16 path runs on CPU so it is tested without a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.common.devices import autocast, resolve_device, use_autocast
from students import available as students, build_student, to_log_density
from teachers import available as teachers, build_teacher


def meta_images(b=2, h=192, w=256):
    return torch.empty(b, 3, h, w, dtype=torch.uint8, device="meta")


@pytest.mark.parametrize("name", teachers())
def test_every_teacher_forward_runs_on_the_meta_device(name):
    logging.disable(logging.WARNING)
    try:
        teacher = build_teacher(name, weights=None if name == "classic" else "random").to("meta")
    finally:
        logging.disable(logging.NOTSET)
    with torch.inference_mode():
        out = teacher(meta_images())
    assert out.device.type == "meta" and tuple(out.shape) == (2, 1, 192, 256) and out.dtype == torch.float32


@pytest.mark.parametrize("name", students())
def test_every_student_forward_runs_on_the_meta_device(name):
    model = build_student(name, backbone_weights="none").to("meta").eval()
    with torch.inference_mode():
        x = model.normalize(meta_images())
        out = model(x)
        maps = model.maps(x)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 1, 192, 256)
    assert set(maps) == {"saliency", *model.extra_maps}
    assert all(tuple(m.shape) == (2, 1, 192, 256) for m in maps.values())


def test_bf16_runs_on_cpu_when_asked_and_auto_means_fp32_there():
    cpu = torch.device("cpu")
    assert use_autocast(cpu, "bf16") and not use_autocast(cpu, "auto") and not use_autocast(cpu, "fp32")
    assert not use_autocast(cpu, "off", option="--amp")
    assert resolve_device("cpu") == cpu
    model = build_student("fastsal_a", backbone_weights="none").eval()
    x = model.normalize(torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8))
    with torch.inference_mode(), autocast(cpu, True):
        assert model(x).dtype == torch.bfloat16


def test_deepgaze_readout_and_finalizer_stay_float32_under_autocast():
    logging.disable(logging.WARNING)
    try:
        teacher = build_teacher("deepgaze2", weights="random").eval()
    finally:
        logging.disable(logging.NOTSET)
    seen = {}
    teacher.finalizer.register_forward_hook(lambda m, args, out: seen.update(dtype=out.dtype, readout=args[0].dtype))
    x = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fp32 = teacher(x)
        with autocast(torch.device("cpu"), True):
            bf16 = teacher(x)
    assert seen == {"dtype": torch.float32, "readout": torch.float32}
    assert torch.allclose(to_log_density(bf16, "log_density").exp().sum((2, 3)), torch.ones(2, 1))
    a, b = (to_log_density(y, "log_density").flatten(1).exp() for y in (fp32, bf16))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    assert ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).min() > 0.99
