"""On CUDA a student's inference forward never waits for the GPU: no ``.item()``, no data-dependent shape, no
host copy inside it (each would stall a serving loop at batch 1). ``torch.cuda.set_sync_debug_mode("error")``
turns any synchronising call into an error; the teachers are checked elsewhere.

SACT's sparse path is left out by design: it reads how many positions are still active (``int(active.sum())``,
``nonzero``) to skip work, which is a synchronisation per unit; its dense path must be free of them."""

from __future__ import annotations

import pytest
import torch

from students import build_student

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: synchronisations exist only between a host and a GPU")


@pytest.mark.parametrize("name,options,execution", [
    ("fastsal_a", {}, "dense"),
    ("fastsal_c", {}, "dense"),
    ("sact", {"tile": 1}, "dense"),
    ("act", {}, "dense"),
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_student_forward_is_sync_free_after_warm_up(name, options, execution, precision):
    model = build_student(name, backbone_weights="none", **options).cuda().eval()
    model.set_execution(execution)
    images = torch.randint(0, 256, (2, 3, 192, 256), dtype=torch.uint8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
        model(model.normalize(images))  # warm-up: cuDNN's algorithm choice and lazy inits may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                logits = model(model.normalize(images))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (2, 1, 192, 256) and bool(torch.isfinite(logits.float()).all())
