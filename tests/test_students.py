"""FastSal students: exact sizes, the authors' checkpoints loaded strictly, backbone init, the losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

from students import FastSalA, FastSalC, fastsal_a, fastsal_c, normalize, student_info
from students.fastsal import backbone_weights, from_authors_keys
from students.losses import density_teacher_loss, hint_loss, map_teacher_loss, minmax
from teachers.weights import WeightsError

KEYS_FILE = Path(__file__).parent / "data" / "fastsal_authors_keys.txt"


def authors_layout(variant: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith(variant + " "):
            _, key, shape = line.split()
            out.append((key, () if shape == "-" else tuple(int(s) for s in shape.split("x"))))
    return out


def authors_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every key and shape of the authors' checkpoint (BN statistics sane)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in authors_layout(variant):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=g) / fan_in ** 0.5 + (1.0 if key.endswith("1.weight") else 0.0)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], variant: str, x: torch.Tensor) -> torch.Tensor:
    """The authors' forward pass written out plainly from their state dict (model/fastSal.py)."""
    enc = mobilenet_v2().features
    enc.load_state_dict({k[len("ecer."):]: v for k, v in sd.items() if k.startswith("ecer.")})
    enc.eval()
    taps = []
    for layer in enc:
        x = layer(x)
        taps.append(x)
    e = taps[1:]  # student_e = hooks on features[1..18]
    h = [(0, 1), (1, 3), (3, 6), (6, 13), (13, 18)]
    e1 = torch.cat([e[0], F.pixel_shuffle(torch.cat(e[1:3], 1), 2)], 1)
    levels = [e1] + [F.pixel_shuffle(torch.cat(e[a:b], 1), 2) for a, b in h[2:]]
    adapted = [F.relu(F.conv2d(f, sd[f"adaptation_layer.layers.{i}.conv0.weight"],
                               sd[f"adaptation_layer.layers.{i}.conv0.bias"])) for i, f in enumerate(levels)]
    if variant == "C":
        up = [adapted[0]] + [F.interpolate(a, scale_factor=s, mode="bilinear", align_corners=True)
                             for a, s in zip(adapted[1:], (2, 4, 8))]
        y = F.pixel_shuffle(torch.cat(up, 1), 2)
        return F.conv2d(y, sd["comb.layers.0.1.weight"], sd["comb.layers.0.1.bias"], padding=1)
    blocks = []
    for k, c in enumerate((8, 32, 128, 512), 1):
        inv = InvertedResidual(c, c, 1, 2)
        inv.load_state_dict({n[len(f"adp{k}.inv_block."):]: v for n, v in sd.items()
                             if n.startswith(f"adp{k}.inv_block.")})
        blocks.append(inv.eval())

    def shared(i, a, prev=None):  # Shared_inverted_block.forward
        a = a if prev is None else a + prev
        return a + blocks[i](a)

    f4 = F.pixel_shuffle(shared(3, adapted[3]), 2)
    f3 = F.pixel_shuffle(shared(2, adapted[2], f4), 2)
    f2 = F.pixel_shuffle(shared(1, adapted[1], f3), 2)
    f1 = F.pixel_shuffle(shared(0, adapted[0], f2), 2)
    return F.conv2d(f1, sd["comb.layers.0.0.weight"], sd["comb.layers.0.0.bias"], padding=1)


@pytest.mark.parametrize("name, cls, params, entries", [("fastsal_a", FastSalA, 3_646_715, 394),
                                                         ("fastsal_c", FastSalC, 2_574_049, 322)])
def test_parameter_counts_are_the_papers(name, cls, params, entries):
    model = cls()
    assert sum(p.numel() for p in model.parameters()) == params == student_info(name).params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize("cls", [FastSalA, FastSalC])
def test_output_is_one_logit_map_at_the_input_size_and_levels_match_the_paper(cls):
    model = cls().eval()
    x = normalize(torch.randint(0, 256, (2, 3, 192, 256), dtype=torch.uint8))
    with torch.no_grad():
        assert model(x).shape == (2, 1, 192, 256)
        levels = model.encoder(x)
    assert [tuple(f.shape[1:]) for f in levels] == [(28, 96, 128), (24, 48, 64), (136, 24, 32), (520, 12, 16)]


def test_input_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        FastSalA()(torch.zeros(1, 3, 100, 128))


@pytest.mark.parametrize("variant, build", [("A", fastsal_a), ("C", fastsal_c)])
def test_authors_checkpoint_loads_strictly_and_matches_their_forward(tmp_path, variant, build):
    sd = authors_state_dict(variant)
    path = tmp_path / f"coco_{variant}.pth"
    torch.save({"student_model": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    model = build(weights=str(path)).eval()
    x = normalize(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        got, want = model(x), reference_forward(sd, variant, x)
    assert got.shape == want.shape == (2, 1, 64, 96)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert len(model.weights_digest) == 64


def test_authors_keys_after_their_own_renaming_load_too():
    sd = authors_state_dict("C")
    renamed = {k.replace(".conv0.", ".0."): v for k, v in sd.items()}  # what their load_weight() returns
    assert from_authors_keys(renamed, "C").keys() == from_authors_keys(sd, "C").keys() == FastSalC().state_dict().keys()


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("adaptation_layer.layers.2.conv0.bias"), "1 missing"),
    (lambda sd: sd.update({"dcer.0.weight": torch.zeros(1)}), "1 unexpected"),
    (lambda sd: sd.update({"comb.layers.0.0.weight": torch.zeros(1, 3, 3, 3)}), "wrong shape"),
])
def test_a_checkpoint_that_does_not_fit_is_an_error_not_a_partial_load(tmp_path, damage, message):
    sd = authors_state_dict("A")
    damage(sd)
    torch.save({"student_model": sd}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=message):
        fastsal_a(weights=str(tmp_path / "bad.pth"))


def test_c_weights_into_a_is_refused(tmp_path):
    torch.save({"student_model": authors_state_dict("C")}, tmp_path / "coco_C.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        fastsal_a(weights=str(tmp_path / "coco_C.pth"))


# -- backbone initialisation -------------------------------------------------------------------
@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "hub" / "checkpoints"


def test_imagenet_backbone_offline_and_uncached_is_one_clear_error(empty_hub):
    with pytest.raises(WeightsError) as e:
        fastsal_a(backbone_weights="imagenet")
    msg = str(e.value)
    assert backbone_weights().url in msg and str(empty_hub / "mobilenet_v2-b0353104.pth") in msg


def test_the_authors_weights_by_name_offline_say_where_to_get_them(empty_hub):
    with pytest.raises(WeightsError) as e:
        fastsal_a(weights="fastsal_coco_a")
    msg = str(e.value)
    assert "https://github.com/feiyanhu/FastSal/raw/master/weights/coco_A.pth" in msg
    assert str(empty_hub / "coco_A.pth") in msg


def test_imagenet_backbone_with_a_wrong_digest_is_refused(empty_hub):
    empty_hub.mkdir(parents=True)
    torch.save(mobilenet_v2().state_dict(), empty_hub / "mobilenet_v2-b0353104.pth")
    with pytest.raises(WeightsError, match="corrupt or partial download"):
        fastsal_a(backbone_weights="imagenet")


def test_backbone_from_a_torchvision_state_dict_file(tmp_path):
    reference = mobilenet_v2()
    torch.save(reference.state_dict(), tmp_path / "mnv2.pth")
    model = fastsal_c(backbone_weights=str(tmp_path / "mnv2.pth"))
    for k, v in reference.features.state_dict().items():
        assert torch.equal(model.encoder.features.state_dict()[k], v), k


def test_backbone_file_of_another_network_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a torchvision mobilenet_v2"):
        fastsal_a(backbone_weights=str(tmp_path / "other.pth"))


def test_a_mistyped_backbone_name_is_said_as_such():
    """`imagnet` read as 'weights file not found … nor a known name: centerbias_mit1003, deepgaze2e, …' (the
    teachers' names), never naming imagenet."""
    with pytest.raises(WeightsError, match=r"^backbone weights 'imagnet': give imagenet, none or the path \(or URL\) "
                                           r"of a torchvision mobilenet_v2 state dict$"):
        fastsal_a(backbone_weights="imagnet")
    with pytest.raises(WeightsError, match=r"^weights file not found: /no/such\.pth"):
        fastsal_a(backbone_weights="/no/such.pth")


# -- losses --------------------------------------------------------------------------------
def test_hint_loss_is_the_sum_over_levels_of_the_mean_squared_error():
    s = [torch.ones(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    t = [torch.zeros(2, 3, 4, 4), torch.full((2, 5, 2, 2), 2.0)]
    assert float(hint_loss(s, t)) == pytest.approx(1.0 + 4.0)
    with pytest.raises(ValueError, match="level 1"):
        hint_loss(s, [t[0], torch.zeros(2, 5, 4, 4)])


def test_map_teacher_loss_is_bce_of_the_sigmoid_against_teacher_and_ground_truth():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    pseudo = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]]])
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    s = torch.sigmoid(logits)

    def bce(y):
        return float(-(y * s.log() + (1 - y) * (1 - s).log()).mean())

    assert float(map_teacher_loss(logits, pseudo)) == pytest.approx(bce(pseudo), rel=1e-6)
    assert float(map_teacher_loss(logits, pseudo, gt)) == pytest.approx(bce(pseudo) + bce(gt), rel=1e-6)


def test_density_teacher_loss_matches_eq3_written_out():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 3, 4, generator=g)
    t = torch.rand(2, 1, 3, 4, generator=g) + 0.05
    t = t / t.sum(dim=(2, 3), keepdim=True)
    got = density_teacher_loss(logits, t.log(), (0.5, 0.2, 0.3))
    total = 0.0
    for b in range(2):
        y = logits[b].flatten().double().numpy()
        q = t[b].flatten().double().numpy()
        p = np.exp(y) / np.exp(y).sum()
        kl = (q * np.log(q / p)).sum()
        cos = (p * q).sum() / np.sqrt((p * p).sum() * (q * q).sum())
        f = (q - q.min()) / (q.max() - q.min())
        s = 1 / (1 + np.exp(-y))
        bce = -(f * np.log(s) + (1 - f) * np.log(1 - s)).mean()
        total += 0.5 * kl + 0.2 * (1 - cos) + 0.3 * bce
    assert float(got) == pytest.approx(total / 2, rel=1e-5)


def test_density_loss_is_zero_kl_and_cosine_when_the_student_equals_the_teacher():
    t = torch.rand(1, 1, 4, 4) + 0.1
    log_t = (t / t.sum()).log()
    assert float(density_teacher_loss(log_t, log_t, (1.0, 1.0, 0.0))) == pytest.approx(0.0, abs=1e-6)


def test_minmax_maps_each_image_to_0_1_and_a_constant_map_to_0():
    x = torch.stack([torch.arange(4.0).view(1, 2, 2), torch.full((1, 2, 2), 3.0)])
    assert minmax(x)[0].flatten().tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert minmax(x)[1].abs().sum() == 0


def test_a_student_built_from_python_takes_random_weights_refuses_a_fractional_depth_and_shares_no_output_dict():
    """`weights="random"` is untrained (as `required_weights` and the CLI have it; it was a missing file); an int
    option given 101.9 was built at 101; a term written into one output's default `losses` reached every later one."""
    import torch

    from students import build_student

    model = build_student("fastsal_a", weights="random")
    assert model.options() == {}
    with pytest.raises(ValueError, match=r"--depth takes an int, got 101.9"):
        build_student("sact", backbone_weights="none", depth=101.9)
    with pytest.raises(ValueError, match=r"--tile takes an int, got True"):
        build_student("sact", backbone_weights="none", tile=True)
    out = model.forward_train(torch.zeros(1, 3, 64, 96))
    with pytest.raises(TypeError):
        out.losses["mine"] = torch.tensor(1.0)
    assert dict(model.forward_train(torch.zeros(1, 3, 64, 96)).losses) == {}
