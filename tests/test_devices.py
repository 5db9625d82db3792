"""Device and precision: every forward runs on the meta device (no data-dependent Python, no hidden
device-to-host reads), and the bf16 path runs on CPU so it is tested without a GPU."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.common.devices import DeviceError, autocast, available, resolve_device, use_autocast
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


def test_a_cuda_device_that_is_not_there_is_one_sentence_before_any_work(monkeypatch, tmp_path, sample_labels):
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(DeviceError, match=r"^--device cuda: PyTorch sees no CUDA GPU on this machine; use --device "
                                          r"cpu \(or auto\)$"):
        available(torch.device("cuda"))
    assert available(torch.device("cpu")) == torch.device("cpu")
    samples = Path(__file__).resolve().parents[1] / "samples" / "coco"
    for args in (["label", "coco", "--teacher", "classic", "--coco-root", str(samples), "--executor", "local",
                  "--out", str(tmp_path / "labels")],
                 ["train", "--labels", str(sample_labels), "--run", str(tmp_path / "run"), "--backbone-weights",
                  "none"]):
        r = CliRunner().invoke(cli, [*args, "--device", "cuda:1", "--no-progress"])
        assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
            "Error: --device cuda:1: PyTorch sees no CUDA GPU on this machine; use --device cpu (or auto)"), r.output
    assert not (tmp_path / "labels" / "classic" / "val2017" / "labels.json").exists()
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available(torch.device("cuda:1")) == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"^--device cuda:2: this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)$"):
        available(torch.device("cuda:2"))


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


# --------------------------------------------------------------------------- bf16 labels against fp32 labels

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"
LABEL_SIZE = (96, 128)  # small, so that every teacher labels in seconds on CPU


def _one_name_per_network() -> list[str]:
    """Every registered teacher, once per network (``deepgaze`` is DeepGaze IIE under another name)."""
    from teachers.registry import teacher_class

    first: dict[type, str] = {}
    for name in teachers():
        first.setdefault(teacher_class(name), name)
    return sorted(first.values())


def _varied(name: str, images: torch.Tensor):
    """Teacher ``name`` whose maps vary over the image. The published weights are not here, and the random
    initialisation gives nearly flat maps (a CC of flat maps measures nothing), so every convolution is drawn
    again from N(0, gain / fan_in) with a fixed seed: gain 2 keeps the VGG networks' activations at scale,
    gain 1 keeps the deep DeepGaze IIE backbones out of the chaotic regime, where a 1-grey-level change of
    the image changes the map as much as bf16 does. SalGAN's output layer is set so its logits are about
    N(0, 2) on these images (not saturated at 1). DeepGaze IIE keeps 2 of its 30 readouts per backbone (they
    run in fp32 under autocast either way): its forward then takes seconds."""
    logging.disable(logging.WARNING)
    try:
        teacher = build_teacher(name, weights=None if name == "classic" else "random").eval()
    finally:
        logging.disable(logging.NOTSET)
    teacher.input_size = None  # label at LABEL_SIZE
    if name == "classic":
        return teacher
    iie = hasattr(teacher, "models")
    if iie:
        for mixture in teacher.models:
            for part in ("saliency_networks", "fixation_selection_networks", "finalizers", "scanpath_networks"):
                setattr(mixture, part, torch.nn.ModuleList(list(getattr(mixture, part))[:2]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in (m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * ((1.0 if iie else 2.0) / conv.weight[0].numel()) ** 0.5)
            if conv.bias is not None:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
        if name == "salgan":
            logits = teacher.net[:-2](teacher.preprocess(images.float()))
            out = teacher.net[-2]
            scale = 2.0 / logits.std()
            out.weight.mul_(scale)
            out.bias.mul_(scale).sub_(logits.mean() * scale)
    return teacher


def _read_labels(folder: Path) -> dict[str, np.ndarray]:
    """Each label of a finished folder as a map over the image (log densities exponentiated)."""
    import cv2

    from pipeline.label.shards import tar_samples

    index = json.loads((folder / "labels.json").read_text())
    ext = index["label_extension"]
    maps = {}
    for shard in index["shards"]:
        for sample in tar_samples(folder / shard["tar"]):
            raw = sample[ext]
            if ext.endswith(".npy"):
                maps[sample["__key__"]] = np.exp(np.load(io.BytesIO(raw)).astype(np.float64))
            else:
                maps[sample["__key__"]] = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE) / 255.0
    return maps


@pytest.mark.parametrize("name", _one_name_per_network())
def test_bf16_labels_agree_with_fp32_labels_within_the_tolerance_their_shards_record(name, tmp_path, monkeypatch):
    """Every teacher labels real photos in bf16 (autocast, as on a GPU) within the tolerance each bf16 shard
    records: Pearson CC with the fp32 label of the same image at least ``vs_fp32_cc_min``."""
    import cv2

    import pipeline.label.worker
    from pipeline.label.driver import label
    from pipeline.label.sources import folder_records
    from pipeline.label.worker import LabelConfig

    records = folder_records(SAMPLES)[:2]
    images = torch.from_numpy(np.stack([
        cv2.resize(cv2.cvtColor(cv2.imread(r.path), cv2.COLOR_BGR2RGB), LABEL_SIZE[::-1], interpolation=cv2.INTER_AREA)
        for r in records])).permute(0, 3, 1, 2).contiguous()
    teacher = _varied(name, images)
    monkeypatch.setattr(pipeline.label.worker, "build_teacher", lambda *a, **k: teacher)
    maps = {}
    for precision in ("fp32", "bf16"):
        config = LabelConfig(teacher=name, weights=None if name == "classic" else "random", image_size=LABEL_SIZE,
                             batch_size=2, io_threads=1, device="cpu", precision=precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RANDOM weights
            label(records, tmp_path / precision, config, executor="local", progress=False)
        maps[precision] = _read_labels(tmp_path / precision)
    marker = json.loads((tmp_path / "bf16" / "shard-000000.json").read_text())
    assert marker["precision"] == "bf16" and marker["device"] == "cpu"
    assert json.loads((tmp_path / "fp32" / "shard-000000.json").read_text())["tolerance"] is None
    cc_min = marker["tolerance"]["vs_fp32_cc_min"]
    assert cc_min >= 0.999
    for key, fp32 in maps["fp32"].items():
        assert fp32.std() / fp32.mean() > 0.05, f"{name}: the fp32 map of {key} is flat: a CC would mean nothing"
        bf16 = maps["bf16"][key]
        cc = np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1]
        assert cc >= cc_min, f"{name}: bf16 label of {key} has CC {cc:.5f} with the fp32 one"


def _labels_by_decode(name: str, photos: Path, paths: tuple[str, ...], out: Path, monkeypatch) -> dict:
    """Each label of the first two photos of ``photos`` by decode path: ``name``'s teacher re-initialised as
    :func:`_varied` does, fp32 on the CPU, ``LABEL_SIZE``; each path's marker records it."""
    import cv2

    import pipeline.label.worker
    from pipeline.label.driver import label
    from pipeline.label.sources import folder_records
    from pipeline.label.worker import LabelConfig

    records = folder_records(photos)[:2]
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(
        cv2.resize(cv2.imread(r.path)[..., ::-1], LABEL_SIZE[::-1]))).permute(2, 0, 1) for r in records])
    teacher = _varied(name, images)
    monkeypatch.setattr(pipeline.label.worker, "build_teacher", lambda *a, **k: teacher)
    maps = {}
    for decode in paths:
        config = LabelConfig(teacher=name, weights=None if name == "classic" else "random", image_size=LABEL_SIZE,
                             batch_size=2, io_threads=1, device="cpu", precision="fp32", decode=decode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RANDOM weights
            label(records, out / decode, config, executor="local", progress=False)
        assert json.loads((out / decode / "shard-000000.json").read_text())["decode"] == decode
        maps[decode] = _read_labels(out / decode)
    return maps


@pytest.mark.parametrize("name", _one_name_per_network())
def test_labels_of_photos_decoded_on_the_device_are_close_to_those_of_the_cpu_decode(name, tmp_path, monkeypatch):
    """`--decode device` (torchvision's decoder and torch's resize, as on a GPU) gives every teacher's labels of
    real photos close to `--decode cpu`'s (OpenCV): Pearson CC at least 0.99 per map. Not as close as bf16 is
    to fp32 (0.993-0.999 here, against 0.999), which is why the decode path is part of the shard identity;
    each marker records it."""
    maps = _labels_by_decode(name, SAMPLES, ("cpu", "device"), tmp_path, monkeypatch)
    for key, cpu in maps["cpu"].items():
        cc = np.corrcoef(cpu.ravel(), maps["device"][key].ravel())[0, 1]
        assert cc >= 0.99, f"{name}: the label of {key} decoded on the device has CC {cc:.5f} with the CPU one"


@pytest.mark.parametrize("name", _one_name_per_network())
def test_labels_of_photos_decoded_reduced_are_close_to_those_of_the_whole_decode(name, tmp_path, monkeypatch):
    """`--decode cpu-reduced` (the default on a CPU) decodes a JPEG at least twice the size it is shrunk to at
    1/2, 1/4 or 1/8 of it; on photos of COCO's usual 640×480 (here two sample photos enlarged to it) every
    teacher's labels stay close to those of the whole decode (`cpu`): Pearson CC at least 0.985 per map (with
    these re-initialised teachers 0.990-0.993 for SalGAN, as far as `device` lies from `cpu`, 0.997-0.999 for
    the others), which is why the path is part of the shard identity; the shards record each photo's full
    size."""
    import cv2

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(SAMPLES.glob("*.jpg"))[:2]:
        big = cv2.resize(cv2.imread(str(path)), (640, 480), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(photos / path.name), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    maps = _labels_by_decode(name, photos, ("cpu", "cpu-reduced"), tmp_path, monkeypatch)
    for sample in wds.WebDataset(str(tmp_path / "cpu-reduced" / "shard-000000.tar"), shardshuffle=False):
        meta = json.loads(sample["json"])
        assert (meta["height"], meta["width"]) == (480, 640)
    for key, whole in maps["cpu"].items():
        assert whole.std() / whole.mean() > 0.05, f"{name}: the map of {key} is flat: a CC would mean nothing"
        cc = np.corrcoef(whole.ravel(), maps["cpu-reduced"][key].ravel())[0, 1]
        assert cc >= 0.985, f"{name}: the label of {key} decoded reduced has CC {cc:.5f} with the whole decode's"


# --------------------------------------------------------------------------- no forward waits for the GPU


@pytest.mark.parametrize("name", teachers())
def test_no_teacher_forward_copies_host_data_to_its_device(name, monkeypatch):
    """A tensor made from host data on the device inside a forward (``torch.tensor(…, device=x.device)``) is a
    blocking copy on a GPU: the forward waits for everything queued before it. On the meta device such a
    construction is caught here, on CPU (reads back from the device cannot run on meta at all)."""
    logging.disable(logging.WARNING)
    try:
        teacher = build_teacher(name, weights=None if name == "classic" else "random").to("meta").eval()
    finally:
        logging.disable(logging.NOTSET)
    with torch.inference_mode():
        teacher(meta_images())  # the first forward at a size may fill caches (DeepGaze's centre bias per size)
        made = []
        for fn in ("tensor", "as_tensor"):
            real = getattr(torch, fn)

            def spy(data, *args, _real=real, _fn=fn, **kwargs):
                out = _real(data, *args, **kwargs)
                if out.device.type == "meta" and not (isinstance(data, torch.Tensor) and data.device.type == "meta"):
                    made.append(f"torch.{_fn}({type(data).__name__}) onto the device")
                return out

            monkeypatch.setattr(torch, fn, spy)
        teacher(meta_images())
    assert made == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", teachers())
def test_no_teacher_forward_synchronises_with_the_gpu(name):
    """Under ``torch.cuda.set_sync_debug_mode("error")`` every teacher's forward and the label resize run
    without a host-device synchronisation (after a first forward at that size, which may fill caches)."""
    from pipeline.common.maps import resize_label

    logging.disable(logging.WARNING)
    try:
        teacher = build_teacher(name, weights=None if name == "classic" else "random").to("cuda").eval()
    finally:
        logging.disable(logging.NOTSET)
    x = torch.randint(0, 256, (2, 3, 192, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = x.pin_memory().to("cuda", non_blocking=True)
    with torch.inference_mode():
        for precision in ("fp32", "bf16"):
            with autocast(torch.device("cuda"), precision == "bf16"):
                teacher(x)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    maps = resize_label(teacher(x).float(), teacher.output_kind, (96, 128))
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            assert tuple(maps.shape) == (2, 1, 96, 128) and bool(torch.isfinite(maps).all())


# --------------------------------------------------------------------------- CUDA graphs


def test_graphed_forward_on_a_cpu_is_the_module_itself():
    from pipeline.common.cuda_graphs import GraphedForward

    calls = []
    graphed = GraphedForward(lambda x: calls.append(x) or x * 2)
    x = torch.ones(2, 3)
    for _ in range(3):
        assert torch.equal(graphed(x), x * 2)
    assert len(calls) == 3 and graphed.graphs == {} and graphed.failed is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["deepgaze", "classic"])
def test_a_teacher_replayed_as_cuda_graphs_gives_the_eager_labels_bit_for_bit(name):
    """The label worker replays DeepGaze as CUDA graphs: every batch after the first of its shape (bf16 and
    fp32, two shapes, new images each time) gives the eager forward's maps exactly (cuDNN deterministic, as
    the worker sets it)."""
    from pipeline.common.cuda_graphs import GraphedForward

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    logging.disable(logging.WARNING)
    try:
        teacher = build_teacher(name, weights=None if name == "classic" else "random").to("cuda").eval()
    finally:
        logging.disable(logging.NOTSET)
    teacher.to(memory_format=torch.channels_last)
    graphed = GraphedForward(teacher)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for bf16 in (True, False):
            for b in (3, 3, 2, 3, 2, 2):
                x = torch.randint(0, 256, (b, 3, 192, 256), dtype=torch.uint8, generator=gen).to("cuda")
                x = x.contiguous(memory_format=torch.channels_last)
                with autocast(torch.device("cuda"), bf16):
                    eager = teacher(x).clone()
                    replayed = graphed(x).clone()
                assert torch.equal(eager, replayed), (name, bf16, b)
    assert graphed.failed is None and len(graphed.graphs) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_forward_that_cuda_graphs_cannot_capture_runs_eagerly_after_one_warning():
    from pipeline.common.cuda_graphs import GraphedForward

    def reads_back(x):
        return x * float(x.sum())  # a read from the device: not allowed while capturing

    graphed = GraphedForward(reads_back)
    x = torch.arange(4.0, device="cuda")
    with torch.inference_mode():
        assert torch.equal(graphed(x), reads_back(x))
        with pytest.warns(RuntimeWarning, match="CUDA graphs off"):
            out = graphed(x)
        assert torch.equal(out, reads_back(x)) and graphed.failed and graphed.graphs == {}
        assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not the failed capture's
        assert torch.equal(graphed(x + 1), reads_back(x + 1))
