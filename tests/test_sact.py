"""SACT / ACT students: the block against Algorithm 2 written out position by position, hand-computed
ponder costs, dense and sparse execution agreeing (with fewer FLOPs), the ponder loss, sizes, weights
and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck

from students import build_student, student_info
from students.sact import ACT, DEPTHS, EPSILON, SACT, AdaptiveBlock, HaltingScore, act, imagenet_weights, sact
from teachers.weights import WeightsError


# -- a small block: Bottleneck units with 16 channels -------------------------------------------------
def randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(1 + 0.1 * torch.randn(c, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))


def small_units(num_units: int = 4, cin: int = 8, planes: int = 4, seed: int = 0) -> nn.Sequential:
    """``num_units`` torchvision bottlenecks, the first with stride 2 and a channel change (cin → 4·planes)."""
    torch.manual_seed(seed)
    c = planes * Bottleneck.expansion
    first = Bottleneck(cin, planes, stride=2, downsample=nn.Sequential(nn.Conv2d(cin, c, 1, stride=2, bias=False),
                                                                      nn.BatchNorm2d(c)))
    units = nn.Sequential(first, *(Bottleneck(c, planes) for _ in range(num_units - 1)))
    with torch.no_grad():
        randomize_bn(units, torch.Generator().manual_seed(seed))
    return units.eval()


def small_block(num_units=4, spatial=True, tile=1, seed=0, scale=0.4, bias=0.0) -> AdaptiveBlock:
    """Halting heads with weights large enough that positions halt after different units."""
    block = AdaptiveBlock(16, num_units, spatial=spatial, tile=tile)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for head in block.heads:
            if head.conv is not None:
                head.conv.weight.copy_(scale * torch.randn(head.conv.weight.shape, generator=gen))
            head.fc.weight.copy_(scale * torch.randn(head.fc.weight.shape, generator=gen))
            head.fc.bias.fill_(bias)
    return block.eval()


def algorithm_2(units: nn.Sequential, heads: nn.ModuleList, inp: torch.Tensor, tile: int, spatial: bool):
    """Algorithm 2 of the paper as written: explicit loops over units and positions (tiled halting:
    the score of a position is the mean of its k×k tile's scores). Returns output and per-position ρ."""
    L = len(units)
    x_hat = inp
    first = units[0](inp)
    B, C, H, W = first.shape
    X = [(b, i, j) for b in range(B) for i in range(H) for j in range(W)]
    a = {p: True for p in X}
    c = {p: 0.0 for p in X}
    R = {p: 1.0 for p in X}
    output = torch.zeros(B, C, H, W, dtype=torch.float64)
    rho = torch.zeros(B, 1, H, W, dtype=torch.float64)
    for l in range(1, L + 1):
        if not any(a.values()):
            break
        full = first if l == 1 else units[l - 1](x_hat)  # F^l(x̂), read only at active positions
        x = torch.empty_like(full)
        for (b, i, j) in X:
            x[b, :, i, j] = full[b, :, i, j] if a[(b, i, j)] else x_hat[b, :, i, j]
        if l < L:
            pooled = heads[l - 1].fc(x.mean((2, 3)))  # W·pool(x) + b: [B,1]
            conv = heads[l - 1].conv(x) if spatial else None  # W̃ ∗ x: [B,1,H,W]
            s = torch.empty(B, H, W)
            for (b, i, j) in X:
                s[b, i, j] = torch.sigmoid(pooled[b, 0] + (conv[b, 0, i, j] if spatial else 0.0))
        for (b, i, j) in X:
            if not a[(b, i, j)]:
                continue
            if l < L:
                i0, j0 = i - i % tile, j - j % tile
                h = float(sum(s[b, i0 + u, j0 + v] for u in range(tile) for v in range(tile))) / tile ** 2
            else:
                h = 1.0
            c[(b, i, j)] += h
            rho[b, 0, i, j] += 1
            if c[(b, i, j)] < 1 - EPSILON:
                output[b, :, i, j] += h * x[b, :, i, j].double()
                R[(b, i, j)] -= h
            else:
                output[b, :, i, j] += R[(b, i, j)] * x[b, :, i, j].double()
                rho[b, 0, i, j] += R[(b, i, j)]
                a[(b, i, j)] = False
        x_hat = x
    return output.float(), rho.float()


@pytest.mark.parametrize("spatial, tile", [(True, 1), (True, 2), (False, 1)], ids=["sact", "sact-tile2", "act"])
def test_block_is_algorithm_2_position_by_position_dense_and_sparse(spatial, tile):
    units, block = small_units(), small_block(spatial=spatial, tile=tile, seed=4)
    inp = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_out, want_rho = algorithm_2(units, block.heads, inp, tile, spatial)
        dense = block(units, inp)
        sparse = block(units, inp, sparse=True)
    assert len(dense.units.unique()) >= 2, "positions (images, for ACT) should halt after different units"
    for got in (dense, sparse):
        torch.testing.assert_close(got.out, want_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.rho, want_rho, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.units, dense.units)
        assert float((got.rho - got.units).min()) >= 0 and float((got.rho - got.units).max()) <= 1  # R
    assert sparse.executed < dense.executed == 4 * 2 * 6 * 6
    assert sparse.executed == int(dense.units.sum())  # the unit ran exactly where positions were active


def test_sact_with_a_zero_3x3_halting_conv_is_act():
    units = small_units()
    s, a = small_block(spatial=True), small_block(spatial=False)
    with torch.no_grad():
        for hs, ha in zip(s.heads, a.heads):
            hs.conv.weight.zero_()
            hs.fc.load_state_dict(ha.fc.state_dict())
    inp = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for sparse in (False, True):
            got, want = s(units, inp, sparse=sparse), a(units, inp, sparse=sparse)
            torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.rho, want.rho)
            # one halting decision per image: ρ constant over positions
            assert torch.equal(got.rho, got.rho.amax((2, 3), keepdim=True).expand_as(got.rho))


def forced(block: AdaptiveBlock, hs: list[float]) -> AdaptiveBlock:
    """Halting scores set by hand: zero weights and bias logit(h_l)."""
    with torch.no_grad():
        for head, h in zip(block.heads, hs):
            if head.conv is not None:
                head.conv.weight.zero_()
            head.fc.weight.zero_()
            head.fc.bias.fill_(math.log(h / (1 - h)))
    return block


@pytest.mark.parametrize("hs, n, r", [
    ((0.3, 0.5, 0.4), 3, 0.2),  # c = 0.3, 0.8, 1.2: halts at unit 3 with R = 1 − 0.8
    ((0.995, 0.1, 0.1), 1, 1.0),  # h_1 ≥ 1 − ε: only unit 1, R = 1
    ((0.1, 0.1, 0.1), 4, 0.7),  # never reaches 1 − ε: all 4 units, h_4 = 1, R = 1 − 0.3
    ((0.6, 0.395, 0.5), 2, 0.4),  # c = 0.995 ≥ 1 − ε after unit 2 (though < 1): N = 2, R = 1 − h_1
])
def test_ponder_cost_and_remainder_by_hand(hs, n, r):
    units = small_units()
    block = forced(small_block(), hs)
    inp = torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        xs = [units[0](inp)]
        for u in units[1:]:
            xs.append(u(xs[-1]))
        want = sum(h * x for h, x in zip(hs[:n - 1], xs)) + r * xs[n - 1]
        for sparse in (False, True):
            got = block(units, inp, sparse=sparse)
            assert torch.allclose(got.rho, torch.full_like(got.rho, n + r), atol=1e-5)
            assert torch.equal(got.units, torch.full_like(got.units, n))
            torch.testing.assert_close(got.out, want, rtol=1e-4, atol=1e-5)


def test_per_position_halting_by_hand(monkeypatch):
    """Two positions with different hand-set scores halt apart; halted ones keep their value."""
    units = small_units(num_units=3)
    block = small_block(num_units=3)
    inp = torch.randn(1, 8, 4, 2, generator=torch.Generator().manual_seed(6))  # 2×1 map after unit 1
    h = {1: torch.tensor([0.995, 0.2]).view(1, 1, 2, 1), 2: torch.tensor([0.3, 0.5]).view(1, 1, 2, 1)}
    monkeypatch.setattr(block, "score", lambda l, x: h[l])
    with torch.no_grad():
        got = block(units, inp)
        x1 = units[0](inp)
        x2 = units[1](x1)
        x3 = units[2](torch.cat([x1[:, :, :1], x2[:, :, 1:]], 2))  # position 0 froze at x1
    # position 0: N = 1, R = 1, ρ = 2; position 1: c = 0.2, 0.7, 1.7: N = 3, R = 0.3, ρ = 3.3
    torch.testing.assert_close(got.rho.flatten(), torch.tensor([2.0, 3.3]))
    torch.testing.assert_close(got.out[:, :, 0], x1[:, :, 0])
    torch.testing.assert_close(got.out[:, :, 1], 0.2 * x1[:, :, 1] + 0.5 * x2[:, :, 1] + 0.3 * x3[:, :, 1])


# -- the whole student -----------------------------------------------------------------------------
def calibrated(cls=SACT) -> SACT:
    """A random-backbone student whose batch-norm statistics come from a few random images (sane
    activations), with halting heads random enough that positions halt apart."""
    torch.manual_seed(0)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
        for block in model.blocks:
            for head in block.heads:
                c = head.fc.in_features
                if head.conv is not None:
                    nn.init.normal_(head.conv.weight, std=1.5 / (9 * c) ** 0.5)
                nn.init.normal_(head.fc.weight, std=1.5 / c ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, SACT]:
    """Built once (a ResNet-50 takes a while to initialise); tests change copies."""
    return {"sact": calibrated(SACT), "act": calibrated(ACT)}


def variant(models, name: str, tile: int = 1, bias: float | None = None) -> SACT:
    model = copy.deepcopy(models[name])
    model.tile = tile
    for block in model.blocks:
        block.tile = tile
        for head in block.heads:
            if bias is not None:
                head.fc.bias.data.fill_(bias)
    return model


def run(model: SACT, x: torch.Tensor, execution: str):
    model.execution = execution
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        maps = model.maps(x)
    assert model.last_execution == execution
    return maps, counter.get_total_flops(), model.block_stats


@pytest.mark.parametrize("name, tile, bias", [("sact", 1, 1.0), ("sact", 2, 1.0), ("act", 1, 0.0), ("sact", 1, 20.0)],
                         ids=["tile1", "tile2", "act", "all-halt-at-once"])
def test_dense_and_sparse_agree_and_sparse_computes_less(models, name, tile, bias):
    model = variant(models, name, tile, bias)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    dense, dense_flops, dense_stats = run(model, x, "dense")
    sparse, sparse_flops, sparse_stats = run(model, x, "sparse")
    assert set(dense) == set(sparse) == {"saliency", *model.extra_maps}  # (ACT: saliency alone)
    for key in dense:
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-4, atol=1e-4 * float(dense[key].abs().max()))
    assert [s.ponder for s in sparse_stats] == pytest.approx([s.ponder for s in dense_stats], abs=1e-5)
    assert [s.units for s in sparse_stats] == [s.units for s in dense_stats]
    executed = sum(s.executed for s in sparse_stats)
    assert all(s.executed == s.total for s in dense_stats)
    assert executed == sum(s.units * s.total / b.num_units for s, b in zip(sparse_stats, model.blocks))
    if bias == 20.0:  # h ≥ 0.99 everywhere: every block stops after its first unit
        assert [s.units for s in sparse_stats] == [1, 1, 1, 1]
        assert sparse_flops < 0.45 * dense_flops
    else:  # some positions (images, for ACT) run more units than others
        assert any(abs(s.units - round(s.units)) > 1e-3 for s in sparse_stats)
    assert sparse_flops < dense_flops


def test_sparse_sees_weights_changed_after_a_sparse_forward(models):
    """The sparse path caches each unit's batch-norm-folded matrices; changed weights must not be stale."""
    model = variant(models, "sact", bias=1.0)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    run(model, x, "sparse")
    with torch.no_grad():
        for unit in model.resnet.layer1[1:]:
            unit.conv2.weight.mul_(-1.5)  # in place
        model.resnet.layer2[1].bn1.running_var = model.resnet.layer2[1].bn1.running_var * 2  # replaced
    dense, sparse = run(model, x, "dense")[0], run(model, x, "sparse")[0]
    torch.testing.assert_close(sparse["saliency"], dense["saliency"], rtol=1e-4, atol=1e-5)


def test_sparse_is_only_used_for_inference(models):
    model = variant(models, "sact", bias=1.0)
    model.execution = "sparse"
    x = torch.randn(1, 3, 64, 64)
    model(x)  # gradients on: the dense reference
    assert model.last_execution == "dense"
    with torch.inference_mode():
        model(x)
    assert model.last_execution == "sparse"
    with pytest.raises(ValueError, match="execution must be one of dense, sparse"):
        model.execution = "perforated"


def test_maps_give_the_ponder_map_at_the_input_size(models):
    model = variant(models, "sact", bias=1.0)
    with torch.no_grad():
        maps = model.maps(torch.randn(2, 3, 64, 96))
    assert set(maps) == {"saliency", *SACT.extra_maps} and SACT.extra_maps == ("ponder",)
    assert maps["saliency"].shape == maps["ponder"].shape == (2, 1, 64, 96)
    lo, hi = len(model.blocks), sum(b.num_units + 1 for b in model.blocks)
    assert lo <= float(maps["ponder"].min()) and float(maps["ponder"].max()) <= hi
    assert float(maps["ponder"].std()) > 0  # spatially adaptive


@pytest.fixture(scope="module")
def fresh() -> SACT:
    return SACT(tau=0.01)


def test_fresh_halting_bias_runs_every_unit(fresh):
    """b = −3: h ≈ 0.047, so with ResNet-50's blocks every unit runs: N = L, ρ = L + 1 − Σ_{l<L} h_l."""
    scores = {}
    hooks = [head.register_forward_hook(lambda m, i, o, k=k, l=l: scores.__setitem__((k, l), torch.sigmoid(o)))
             for k, block in enumerate(fresh.blocks) for l, head in enumerate(block.heads, 1)]
    try:
        with torch.no_grad():
            fresh.forward_train(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    assert [s.units for s in fresh.block_stats] == list(DEPTHS[50])
    assert all(float(h.min()) > 0.03 and float(h.max()) < 0.07 for h in scores.values())
    for k, (block, stats) in enumerate(zip(fresh.blocks, fresh.block_stats)):
        L = block.num_units
        rho = L + 1 - sum(scores[(k, l)] for l in range(1, L))
        assert stats.ponder == pytest.approx(float(rho.mean()), abs=1e-5)


def test_forward_train_gives_a_differentiable_ponder_loss(fresh):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    fresh.zero_grad()
    out = fresh.forward_train(x)
    assert out.logits.shape == (2, 1, 64, 64) and out.logits.requires_grad
    assert tuple(out.logs) == SACT.log_names == ("ponder_1", "ponder_2", "ponder_3", "ponder_4")
    assert not any(v.requires_grad for v in out.logs.values())
    assert float(out.losses["ponder"].detach()) == pytest.approx(0.01 * sum(float(v) for v in out.logs.values()),
                                                                  rel=1e-5)
    out.losses["ponder"].backward()
    for block in fresh.blocks:
        for head in block.heads:
            assert float(head.conv.weight.grad.abs().sum()) > 0 and float(head.fc.weight.grad.abs().sum()) > 0
            # minimising ρ = N + R, R = 1 − Σ_{l<N} h_l, raises every score before N: a negative gradient
            assert float(head.fc.bias.grad) < 0


# -- sizes, registry, weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("sact", SACT), ("act", ACT)])
def test_parameter_count_is_the_registered_one(name, cls):
    model = build_student(name, backbone_weights="none")
    assert type(model) is cls and model.name == name
    assert sum(p.numel() for p in model.parameters()) == student_info(name).params
    assert model.options() == {"depth": 50, "tile": 1, "tau": 0.005}
    assert cls.stride == 32 and cls.backbone_prefix == "resnet."
    assert {o.name: o.default for o in student_info(name).options} == {"depth": 50, "tile": 1, "tau": 0.005}
    assert sum(p.numel() for p in model.resnet.parameters()) == 25_557_032 - 2048 * 1000 - 1000  # resnet50 − fc


def test_backbone_from_a_torchvision_resnet50_file_loads_strictly(tmp_path):
    reference = resnet50()
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    model = sact(backbone_weights=str(tmp_path / "r50.pth"))
    got = model.resnet.state_dict()
    want = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    # the backbone prefix covers exactly torchvision's keys (what --init requires to be present)
    assert {k for k in model.state_dict() if k.startswith(SACT.backbone_prefix)} == {"resnet." + k for k in want}
    sd = reference.state_dict()
    sd.pop("layer3.5.conv2.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="1 missing"):
        sact(backbone_weights=str(tmp_path / "bad.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a torchvision resnet50"):
        act(backbone_weights=str(tmp_path / "other.pth"))


def test_imagenet_backbone_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as e:
        sact()
    assert imagenet_weights(50).url in str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / imagenet_weights(50).url.rsplit("/", 1)[1]) in str(e.value)


def test_whole_student_checkpoint_round_trip(tmp_path, models):
    model = variant(models, "sact", tile=2, bias=1.0)
    torch.save({"model": model.state_dict(), "student": "sact"}, tmp_path / "ckpt.pth")
    again = sact(weights=str(tmp_path / "ckpt.pth"), tile=2).eval()
    assert len(again.weights_digest) == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(WeightsError, match="is a sact checkpoint, not act"):
        act(weights=str(tmp_path / "ckpt.pth"))


def test_bad_options_are_one_clear_error_each(models):
    model = variant(models, "sact", tile=4)
    with pytest.raises(ValueError, match=r"tile 4 does not divide block 4's feature map of 2×2"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"tile 4 does not divide block 3's feature map of 4×6"):
        model(torch.randn(1, 3, 64, 96))
    with pytest.raises(ValueError, match="--tile must be at least 1, got 0"):
        build_student("sact", backbone_weights="none", tile=0)
    with pytest.raises(ValueError, match=r"--tau must be at least 0, got -0.1"):
        build_student("sact", backbone_weights="none", tau=-0.1)
    with pytest.raises(ValueError, match=r"--tau must be a finite number, got inf"):
        build_student("sact", backbone_weights="none", tau=float("inf"))
    with pytest.raises(ValueError, match="tile must be an integer ≥ 1, got 0"):  # the class, built directly
        SACT(tile=0)
    with pytest.raises(ValueError, match=r"tau .* must be a finite number ≥ 0, got inf"):
        SACT(tau=float("inf"))
    with pytest.raises(ValueError, match="--depth 34 is not one of 50, 101 for sact"):
        build_student("sact", backbone_weights="none", depth=34)
    with pytest.raises(ValueError, match="depth must be one of 50, 101, got 34"):
        sact(backbone_weights="none", depth=34)
    with pytest.raises(ValueError, match="--tile 2 is not one of 1 for act"):
        build_student("act", backbone_weights="none", tile=2)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))


def test_resnet101_has_23_units_in_block_3():
    model = SACT(depth=101)
    assert [b.num_units for b in model.blocks] == [3, 4, 23, 3]
    assert [len(u) for u in model.resnet.layers] == [3, 4, 23, 3]
    assert model.options()["depth"] == 101
    assert isinstance(model.blocks[2].heads[0], HaltingScore) and len(model.blocks[2].heads) == 22


def test_act_has_no_ponder_map_to_score_as_saliency():
    """ACT halts once per image, so its ponder "map" is one value per image: scored as saliency it only scored
    the centre Gaussian it was mixed with (the same metrics as any flat map). It is refused by name."""
    from pipeline.score.predictors import PredictorError, build_predictor

    assert ACT.extra_maps == () and SACT.extra_maps == ("ponder",)
    with pytest.raises(PredictorError, match=r"act \(untrained\) has no 'ponder' map \(only saliency\)"):
        build_predictor(student="act", weights="random", require_weights=False, map_name="ponder", device="cpu")
