"""Students at serving speed: the ONNX export matches PyTorch, and predict/profile run on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.score.predictors import build_predictor
from pipeline.score.serving import OnnxSession, ServingModel, export_onnx
from students import build_student
from tests.conftest import photo, write_jpeg


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_student("fastsal_a", backbone_weights="none")
    for p in model.parameters():  # a student whose maps are not flat: perturb the decoder's small init
        p.data += 0.05 * torch.randn_like(p)
    path = tmp_path_factory.mktemp("w") / "fastsal_a.pt"
    torch.save({"model": model.state_dict(), "student": "fastsal_a"}, path)
    return path


def test_export_matches_pytorch_with_a_dynamic_batch(weights, tmp_path):
    predictor = build_predictor(student="fastsal_a", weights=str(weights), device="cpu")
    result = export_onnx(predictor, tmp_path / "a.onnx", input_size=(64, 96))
    assert result.max_abs_diff <= 1e-4
    graph = onnx.load(str(tmp_path / "a.onnx"))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["student"] == "fastsal_a" and meta["opset"] == "17" and meta["input_size"] == "64x96"
    assert meta["map_kind"] == "logits"
    session = OnnxSession((tmp_path / "a.onnx").read_bytes())
    for batch in (1, 5):
        x = torch.randint(0, 256, (batch, 3, 64, 96), dtype=torch.uint8)
        with torch.inference_mode():
            want = ServingModel(predictor.model).eval()(x).numpy()
        got = session.run(x.numpy())
        assert got.shape == (batch, 1, 64, 96) and np.abs(got - want).max() <= 1e-4


def test_predict_and_profile_on_onnx_runtime_agree_with_torch(weights, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        write_jpeg(images / f"{name}.jpg", photo(name, 120))
    common = ["--student", "fastsal_a", "--weights", weights, "--device", "cpu", "--images", images, "--no-progress"]
    for runtime in ("torch", "onnx"):
        r = invoke("predict", *common, "--out", tmp_path / runtime, "--runtime", runtime)
        assert r.exit_code == 0, r.output
    for name in ("astronaut", "coffee"):
        a = cv2.imread(str(tmp_path / "torch" / f"{name}.jpg.png"), cv2.IMREAD_GRAYSCALE).astype(int)
        b = cv2.imread(str(tmp_path / "onnx" / f"{name}.jpg.png"), cv2.IMREAD_GRAYSCALE).astype(int)
        assert a.std() > 1 and np.abs(a - b).max() <= 1  # the same maps, to 8-bit rounding

    r = invoke("profile", "--student", "fastsal_a", "--runtime", "onnx", "--image-size", "64x96", "--iters", 2)
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.output and "GFLOPs / image" in r.output
    torch_r = invoke("profile", "--student", "fastsal_a", "--image-size", "64x96", "--iters", 1)
    gflops = [line.split()[-1] for out in (r.output, torch_r.output) for line in out.splitlines()
              if line.startswith("GFLOPs")]
    assert gflops[0] == gflops[1]  # counted on the same PyTorch graph


def test_export_refuses_what_it_cannot_serve(tmp_path):
    r = invoke("export", "--teacher", "classic", "--out", tmp_path / "t.onnx")
    assert r.exit_code == 1 and "ONNX export is for students" in r.output
    r = invoke("export", "--student", "fastsal_a", "--image-size", "100x100", "--out", tmp_path / "s.onnx")
    assert r.exit_code == 1 and "multiples of 32" in r.output
    assert not list(tmp_path.iterdir())


def test_compile_runtime_is_for_students_and_refused_without_a_cpu_compiler(monkeypatch):
    r = invoke("profile", "--teacher", "classic", "--runtime", "compile", "--device", "cpu")
    assert r.exit_code == 1 and "--runtime compile is for students' saliency maps" in r.output
    monkeypatch.setattr("pipeline.score.serving._cxx", lambda: None)  # a CPU toolchain without g++/clang++
    r = invoke("profile", "--student", "fastsal_a", "--runtime", "compile", "--device", "cpu", "--iters", 1)
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: --runtime compile on the CPU needs a C++ compiler for torch.compile's "
                                "inductor (g++ or clang++, or $CXX): install one, or use --runtime torch or onnx")


# compiling a student with inductor takes minutes on a small CPU (2.5 min for FastSal A on the 2-core sandbox
# under load): this end-to-end check runs where CUDA is, with CUDA graphs (mode="reduce-overhead")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile takes minutes on a CPU; run with CUDA")
def test_predict_and_profile_compiled_with_cuda_graphs_agree_with_torch(weights, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        write_jpeg(images / f"{name}.jpg", photo(name, 120))
    common = ["--student", "fastsal_a", "--weights", weights, "--device", "cuda", "--precision", "fp32",
              "--images", images, "--batch-size", 2, "--no-progress"]  # batches of 2 and 1: two graphs
    for runtime in ("torch", "compile"):
        r = invoke("predict", *common, "--out", tmp_path / runtime, "--runtime", runtime)
        assert r.exit_code == 0, r.output
    for name in ("astronaut", "coffee", "chelsea"):
        a = cv2.imread(str(tmp_path / "torch" / f"{name}.jpg.png"), cv2.IMREAD_GRAYSCALE).astype(int)
        b = cv2.imread(str(tmp_path / "compile" / f"{name}.jpg.png"), cv2.IMREAD_GRAYSCALE).astype(int)
        assert a.std() > 1 and np.abs(a - b).max() <= 2  # the same maps (each image its own, not a replayed one)
    r = invoke("profile", "--student", "fastsal_a", "--runtime", "compile", "--device", "cuda", "--iters", 5)
    assert r.exit_code == 0, r.output
    assert "torch.compile" in r.output and "images/s" in r.output
