"""SACT and ACT (Figurnov et al., "Spatially Adaptive Computation Time for Residual Networks", CVPR 2017)
on torchvision's ResNet-50/101, with a light saliency decoder.

**Blocks.** The four blocks of torchvision's ``resnet50`` (units [3, 4, 6, 3]) or ``resnet101``
([3, 4, 23, 3]) keep torchvision's module names (``resnet.layer1.0.conv1.weight``…), so its ImageNet
weights load strictly (two-stage training: a pretrained ResNet, random halting weights). Each block
of L units runs Algorithm 2 of the paper (Algorithm 1 for ACT), with the paper's indices: ``x_0`` is
the block's input, ``x_l = F_l(x_{l-1})`` the output of unit l; unit 1 changes the shape (stride 2
and/or channels) and always runs everywhere. After unit l < L the halting score is

    h_l = σ(conv3×3(x_l) → 1 channel + W·avgpool(x_l) + b),   b initialised to −3;   h_L = 1

(ACT: one score per image, the pooled term only). With ``tile`` k > 1, h_l is averaged over k×k tiles
(and repeated back), so all positions of a tile halt together. Per position, N is the first unit l
where h_1 + … + h_l ≥ 1 − ε (ε = 0.01; so N ≥ 1 counts unit 1), R = 1 − Σ_{l<N} h_l, the block's
output is Σ_{l<N} h_l x_l + R x_N, and the ponder cost is ρ = N + R (each block's mean over
positions). A position that has halted keeps its value (``x_l = x_{l-1}`` there), which is what
units that still run see in their 3×3 neighbourhood and in the pooled halting term.

At b = −3 every h_l ≈ 0.047, so with ResNet-50's at most 5 scored units per block every unit runs
at first; ResNet-101's 23-unit block starts at about 21 units, as in the paper.

**Two executions, one function.** :attr:`SACT.execution`:

* ``"dense"`` (the reference; always used in training or with gradients on): every unit runs on the
  whole map and its result is kept only where positions are active.
* ``"sparse"`` (inference under ``no_grad``/``inference_mode`` in eval mode): a block stops as soon as
  every position has halted; a unit runs densely while all positions are active and otherwise only
  on the active set, gathered position by position: the first 1×1 convolution on the active set
  dilated by 3×3 (the 3×3 convolution's halo), the 3×3 convolution as one matrix product over the
  active positions' gathered 3×3 neighbourhoods, the last 1×1 convolution and the shortcut on the
  active positions, the batch norms folded into the convolutions; the results are scattered back.
  ACT runs each unit on the images still active. Outputs agree with ``"dense"`` to float rounding.

After each forward, :attr:`SACT.block_stats` gives one :class:`BlockStats` per block (mean ρ, mean N,
unit-positions evaluated; read from the device only when asked, so a forward pass itself reads nothing
back), :meth:`SACT.last_stats` the same as the contract's flat dict, and :attr:`SACT.last_execution`
the path that ran.

**Decoder.** Each block's output goes through a 1×1 convolution to 64 channels and a ReLU; the three
coarser ones are bilinearly up-sampled to the finest (stride 4) and all four summed; a 3×3
convolution gives one logit, bilinearly up-sampled to the input size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from students.base import Student, TrainOutput
from students.registry import StudentOption, register
from students.weights import backbone_file, load_student_weights
from teachers.weights import WeightsError, load_state_dict, load_strict

if TYPE_CHECKING:
    from torchvision.models.resnet import Bottleneck

#: ε of the halting rule: a position halts at the first unit where its cumulative score reaches 1 − ε
EPSILON = 0.01
#: initial bias of every halting score (σ(−3) ≈ 0.047: all units run at first)
HALTING_BIAS = -3.0
#: depth → units per block of torchvision's ``resnet<depth>``
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def imagenet_weights(depth: int):
    """torchvision's ImageNet weights of ``resnet<depth>`` (torchvision is imported here and in the trunk, not
    with this module: the CLI lists students on every start, and torchvision's import takes a second)."""
    from torchvision import models

    return getattr(models, f"ResNet{depth}_Weights").IMAGENET1K_V1
BLOCK_CHANNELS = (256, 512, 1024, 2048)
DECODER_WIDTH = 64
STRIDE = 32
EXECUTIONS = ("dense", "sparse")


class BlockStats(NamedTuple):
    """What one block did in the last forward (floats; batch and positions averaged)."""

    ponder: float  # mean ρ = N + R
    units: float  # mean N, the units evaluated per position
    executed: int  # unit-positions whose residual function was computed (halo not counted)
    total: int  # unit-positions of the dense network (L·B·H·W)


class BlockOutput(NamedTuple):
    out: torch.Tensor  # [B,C,H,W] the block's output Σ h_l x_l + R x_N
    rho: torch.Tensor  # [B,1,H,W] per-position ponder cost ρ = N + R
    units: torch.Tensor  # [B,1,H,W] per-position N
    executed: int | torch.Tensor


# -- halting ----------------------------------------------------------------------------------
class HaltingScore(nn.Module):
    """The logit of h_l: ``conv3×3(x) + W·avgpool(x) + b`` (SACT) or ``W·avgpool(x) + b`` (ACT).

    Weights start small and random (normal, std 0.01/√fan_in) so that at first the bias decides.
    """

    def __init__(self, channels: int, spatial: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1, bias=False) if spatial else None
        self.fc = nn.Linear(channels, 1)
        if self.conv is not None:
            nn.init.normal_(self.conv.weight, std=0.01 / (9 * channels) ** 0.5)
        nn.init.normal_(self.fc.weight, std=0.01 / channels ** 0.5)
        nn.init.constant_(self.fc.bias, HALTING_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B,1,H,W]`` (SACT) or ``[B,1,1,1]`` (ACT)."""
        t = self.fc(x.mean((2, 3)))[:, :, None, None]
        return t if self.conv is None else t + conv3x3_to_1(x, self.conv.weight)


def conv3x3_to_1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for a one-channel 3×3 kernel ``[1,C,3,3]``, computed as a 1×1
    convolution to the 9 taps and a shifted sum: the same FLOPs, several times faster on CPU than
    oneDNN's one-output-channel 3×3 convolution."""
    _, c, h, w = x.shape
    taps = F.pad(F.conv2d(x, weight.reshape(c, 9).t().reshape(9, c, 1, 1)), (1, 1, 1, 1))
    out = taps[:, 0:1, 0:h, 0:w]
    for k in range(1, 9):
        i, j = divmod(k, 3)
        out = out + taps[:, k:k + 1, i:i + h, j:j + w]
    return out


def tile_mean(h: torch.Tensor, k: int) -> torch.Tensor:
    """``h`` averaged over k×k tiles and repeated back to its size (the paper's tiled halting)."""
    if k == 1 or h.shape[-1] == 1 and h.shape[-2] == 1:
        return h
    return F.avg_pool2d(h, k).repeat_interleave(k, 2).repeat_interleave(k, 3)


def halting_step(h, active, c, remainder, rho):
    """One unit of the halting bookkeeping (the inner loop of Algorithms 1-2, vectorised).

    ``h``: this unit's halting score (1 after the last unit); ``active``, ``c`` (cumulative score),
    ``remainder`` R and ``rho`` are per position. Returns the weight of this unit's output
    (h while the position continues, R where it halts now, 0 where it halted before) and the updated
    ``active, c, remainder, rho``.
    """
    h = torch.where(active, h, torch.zeros_like(h))
    c = c + h
    still = active & (c < 1 - EPSILON)
    stops = active & ~still
    r_here = torch.where(stops, remainder, torch.zeros_like(remainder))
    weight = torch.where(still, h, r_here)
    rho = rho + active.to(rho.dtype) + r_here
    remainder = torch.where(still, remainder - h, remainder)
    return weight, still, c, remainder, rho


# -- sparse execution of one bottleneck unit --------------------------------------------------------
def _fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm folded into the convolution before it: weight, bias (``bn`` may be an
    ``nn.Identity`` where the two were fused already)."""
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    if not isinstance(bn, nn.BatchNorm2d):
        return conv.weight, bias
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


class _Folded(NamedTuple):
    w1: torch.Tensor  # [C, w]   (transposed: rows @ w1)
    b1: torch.Tensor
    w2: torch.Tensor  # [9w, w]  rows ordered (kh, kw, cin)
    b2: torch.Tensor
    w3: torch.Tensor  # [w, C]
    b3: torch.Tensor


def _folded_unit(unit: Bottleneck, cache: dict) -> _Folded:
    """The unit's three convolutions with their batch norms folded in, as matrices.

    Cached until any of the unit's tensors changes: the cache pins the storages it folded (so a
    matching address is the same storage) and compares their version counters (in-place updates).
    """
    tensors = [t for m in (unit.conv1, unit.bn1, unit.conv2, unit.bn2, unit.conv3, unit.bn3)
               for t in (*m.parameters(), *(b for b in m.buffers() if b.is_floating_point()))]
    hit = cache.get(id(unit))
    if hit is not None and len(hit[0]) == len(tensors) and all(
            t.data_ptr() == pin.data_ptr() and t._version == v for t, pin, v in zip(tensors, hit[0], hit[1])):
        return hit[2]
    w1, b1 = _fold(unit.conv1, unit.bn1)
    w2, b2 = _fold(unit.conv2, unit.bn2)
    w3, b3 = _fold(unit.conv3, unit.bn3)
    folded = _Folded(w1.flatten(1).t().contiguous(), b1,
                     w2.permute(0, 2, 3, 1).flatten(1).t().contiguous(), b2,
                     w3.flatten(1).t().contiguous(), b3)
    cache[id(unit)] = (tuple(t.detach() for t in tensors), tuple(t._version for t in tensors), folded)
    return folded


class _Grid:
    """Index arithmetic for one block's [B,H,W] map stored as rows of a channels-last matrix."""

    def __init__(self, b: int, h: int, w: int, device: torch.device) -> None:
        self.b, self.h, self.w = b, h, w
        self.padded_rows = b * (h + 2) * (w + 2)
        d = torch.arange(-1, 2, device=device)
        self.offsets = (d.view(3, 1) * (w + 2) + d.view(1, 3)).view(1, 9)  # 3×3 neighbours, row-major

    def padded(self, idx: torch.Tensor) -> torch.Tensor:
        """Row indices into the map → row indices into the same map zero-padded by one pixel."""
        hw = self.h * self.w
        b, r = idx // hw, idx % hw
        i, j = r // self.w, r % self.w
        return (b * (self.h + 2) + i + 1) * (self.w + 2) + j + 1


def sparse_unit(unit: Bottleneck, rows: torch.Tensor, active: torch.Tensor, grid: _Grid, buf: torch.Tensor,
                folded: _Folded) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``unit`` (eval mode, no downsample) only at the active positions of ``rows`` (``[B·H·W, C]``,
    channels-last), writing its output there in place; returns (active row indices, their outputs).

    ``active``: bool ``[B,H,W]``. ``buf``: ``[B·(H+2)·(W+2), width]`` whose one-pixel border is zero
    (interior values are scratch). Inactive positions keep their values and feed the 3×3 halo as is.
    """
    idx = active.view(-1).nonzero().squeeze(1)
    halo = F.max_pool2d(active.unsqueeze(1).to(rows.dtype), 3, 1, 1).view(-1).nonzero().squeeze(1)
    # first 1×1 convolution (+BN+ReLU) on the active set dilated by 3×3, into the padded scratch map
    z = torch.addmm(folded.b1, rows.index_select(0, halo), folded.w1).relu_()
    buf.index_copy_(0, grid.padded(halo), z)
    # 3×3 convolution at the active positions: their gathered neighbourhoods times the kernel matrix
    nb = (grid.padded(idx).unsqueeze(1) + grid.offsets).view(-1)
    cols = buf.index_select(0, nb).view(idx.numel(), -1)
    y = torch.addmm(folded.b2, cols, folded.w2).relu_()
    # last 1×1 convolution (+BN), shortcut, ReLU
    y = torch.addmm(folded.b3, y, folded.w3).add_(rows.index_select(0, idx)).relu_()
    rows.index_copy_(0, idx, y)
    return idx, y


# -- one adaptive block ------------------------------------------------------------------------------
class AdaptiveBlock(nn.Module):
    """The halting scores of one block of ``num_units`` residual units (``num_units − 1`` of them) and
    the block's execution (:meth:`forward` takes the units, which live in the ResNet)."""

    def __init__(self, channels: int, num_units: int, *, spatial: bool = True, tile: int = 1) -> None:
        super().__init__()
        if num_units < 1:
            raise ValueError(f"a block needs at least one unit, got {num_units}")
        self.spatial = spatial
        self.tile = tile
        self.num_units = num_units
        self.heads = nn.ModuleList(HaltingScore(channels, spatial) for _ in range(num_units - 1))
        self._folded: dict = {}

    def score(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """h_l for l = 1 … L−1 (paper indices) at every position; tiled when ``tile`` > 1."""
        h = torch.sigmoid(self.heads[l - 1](x))
        return tile_mean(h, self.tile) if self.spatial else h

    def check_tile(self, h: int, w: int, where: str = "") -> None:
        if self.spatial and (h % self.tile or w % self.tile):
            raise ValueError(f"tile {self.tile} does not divide {where}feature map of {h}×{w}: "
                             f"choose a tile that divides every block's size")

    def forward(self, units: nn.Sequential, x: torch.Tensor, sparse: bool = False, where: str = "") -> BlockOutput:
        if len(units) != self.num_units:
            raise ValueError(f"block built for {self.num_units} units, given {len(units)}")
        return (self._sparse if sparse else self._dense)(units, x, where)

    def _start(self, x: torch.Tensor, where: str):
        b, _, h, w = x.shape
        self.check_tile(h, w, where)
        shape = (b, 1, h, w) if self.spatial else (b, 1, 1, 1)
        active = torch.ones(shape, dtype=torch.bool, device=x.device)
        # the halting bookkeeping in float32 at least, also under autocast
        zeros = torch.zeros(shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        return active, zeros, torch.ones_like(zeros), zeros.clone(), zeros.clone()  # active, c, R, rho, N

    def _h(self, l: int, x: torch.Tensor) -> torch.Tensor:
        if l == self.num_units:
            return torch.ones((), device=x.device)
        h = self.score(l, x)
        return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h

    def _dense(self, units: nn.Sequential, x: torch.Tensor, where: str) -> BlockOutput:
        """Every unit on the whole map; results kept where positions are active (the reference)."""
        x = units[0](x)
        active, c, rem, rho, n = self._start(x, where)
        out = None
        for l in range(1, self.num_units + 1):
            if l > 1:
                x = torch.where(active, units[l - 1](x), x)
            n = n + active.to(n.dtype)
            weight, active, c, rem, rho = halting_step(self._h(l, x), active, c, rem, rho)
            out = weight * x if out is None else out + weight * x
        b, _, h, w = x.shape
        return BlockOutput(out, rho.expand(b, 1, h, w), n.expand(b, 1, h, w), self.num_units * b * h * w)

    @torch.no_grad()
    def _sparse(self, units: nn.Sequential, x: torch.Tensor, where: str) -> BlockOutput:
        """Algorithm 2 evaluating each unit on the active set only, stopping when no position is active."""
        x = units[0](x).contiguous(memory_format=torch.channels_last)
        active, c, rem, rho, n = self._start(x, where)
        b, ch, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).view(b * h * w, ch)  # shares x's storage: x_l in place
        n += 1
        weight, active, c, rem, rho = halting_step(self._h(1, x), active, c, rem, rho)
        out = (weight * x).contiguous(memory_format=torch.channels_last)
        out_rows = out.permute(0, 2, 3, 1).view(b * h * w, ch)
        grid = buf = None
        executed = b * h * w
        for l in range(2, self.num_units + 1):
            count = int(active.sum())
            if count == 0:
                break
            unit = units[l - 1]
            if count == active.numel():  # all active: the unit densely
                x = unit(x).contiguous(memory_format=torch.channels_last)
                rows = x.permute(0, 2, 3, 1).view(b * h * w, ch)
                idx, y, executed = None, None, executed + b * h * w
            elif not self.spatial:  # ACT: the images still active
                imgs = active.view(b).nonzero().squeeze(1)
                sub = unit(x.index_select(0, imgs))
                x.index_copy_(0, imgs, sub.contiguous(memory_format=torch.channels_last))
                idx, y, executed = None, None, executed + imgs.numel() * h * w
            else:
                if grid is None:
                    grid = _Grid(b, h, w, x.device)
                    buf = x.new_zeros(grid.padded_rows, unit.conv1.out_channels)
                idx, y = sparse_unit(unit, rows, active.view(b, h, w), grid, buf, _folded_unit(unit, self._folded))
                executed += idx.numel()
            n += active.to(n.dtype)
            weight, active, c, rem, rho = halting_step(self._h(l, x), active, c, rem, rho)
            if idx is None:
                out.addcmul_(weight, x)
            else:  # (index_add_ is far slower on CPU than gather, add, scatter of unique rows)
                acc = torch.addcmul(out_rows.index_select(0, idx), y, weight.view(-1, 1).index_select(0, idx))
                out_rows.index_copy_(0, idx, acc)
        return BlockOutput(out, rho.expand(b, 1, h, w), n.expand(b, 1, h, w), executed)


# -- the student -------------------------------------------------------------------------------------
class ResNetTrunk(nn.Module):
    """torchvision's ResNet without its classifier, under torchvision's module names."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        from torchvision import models

        r = getattr(models, f"resnet{depth}")()
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    @property
    def layers(self) -> tuple[nn.Sequential, ...]:
        return self.layer1, self.layer2, self.layer3, self.layer4

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class SACT(Student):
    """SACT ResNet-50/101 with a light decoder: saliency logits and the ponder map (see the module docstring).

    ``execution``: ``"dense"`` (default) or ``"sparse"`` (used only in eval mode with gradients off).
    """

    name = "sact"
    stride = STRIDE
    backbone_prefix = "resnet."
    encoder_modules = ("resnet", "blocks")  # (the blocks run the ResNet's units, and their halting)
    extra_maps = ("ponder",)
    log_names = ("ponder_1", "ponder_2", "ponder_3", "ponder_4")
    execution_modes = EXECUTIONS
    #: per-position halting (SACT); ACT sets False
    spatial = True

    @classmethod
    def imagenet_url(cls, **options) -> str | None:
        return imagenet_weights(int(options.get("depth", 50))).url

    def __init__(self, depth: int = 50, tile: int = 1, tau: float = 0.005) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"{self.name}: depth must be one of {', '.join(map(str, DEPTHS))}, got {depth!r}")
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"{self.name}: tile must be an integer ≥ 1, got {tile!r}")
        if not self.spatial and tile != 1:
            raise ValueError(f"{self.name}: halting is per image, tile must be 1, got {tile}")
        if not (math.isfinite(tau) and tau >= 0):  # NaN and inf too
            raise ValueError(f"{self.name}: tau (the ponder cost's weight) must be a finite number ≥ 0, got {tau!r}")
        self.depth, self.tile, self.tau = depth, tile, float(tau)
        self.resnet = ResNetTrunk(depth)
        self.blocks = nn.ModuleList(AdaptiveBlock(c, n, spatial=self.spatial, tile=tile)
                                    for c, n in zip(BLOCK_CHANNELS, DEPTHS[depth]))
        self.lateral = nn.ModuleList(nn.Conv2d(c, DECODER_WIDTH, 1) for c in BLOCK_CHANNELS)
        self.head = nn.Conv2d(DECODER_WIDTH, 1, 3, padding=1)
        for m in (*self.lateral, self.head):  # first logits near 0 whatever the backbone's scale
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        self._execution = "dense"
        #: the last forward's block outputs and their unit counts, for :attr:`block_stats`
        self._last: list[tuple[BlockOutput, int]] = []
        #: the path the last forward took: "dense" or "sparse"
        self.last_execution = ""

    @property
    def execution(self) -> str:
        """``"dense"`` or ``"sparse"``: the inference path (training and gradients always run dense)."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {value!r}")
        self._execution = value

    @property
    def block_stats(self) -> tuple[BlockStats, ...]:
        """One :class:`BlockStats` per block of the last forward."""
        return tuple(BlockStats(float(r.rho.detach().mean()), float(r.units.mean()), int(r.executed),
                                num_units * r.units.numel()) for r, num_units in self._last)

    @property
    def last_ponder(self) -> tuple[float, ...]:
        """Mean ρ of each block in the last forward."""
        return tuple(s.ponder for s in self.block_stats)

    def last_stats(self) -> dict[str, float]:
        """The contract's statistics of the last forward: each block's mean ρ and the fraction of its
        unit-positions whose residual function ran, and ``ponder_total``, the sum of the blocks' mean ρ."""
        out, blocks = {}, self.block_stats
        for k, s in enumerate(blocks, 1):
            out[f"ponder_{k}"] = s.ponder
            out[f"executed_{k}"] = s.executed / s.total
        out["ponder_total"] = sum(s.ponder for s in blocks)
        return out

    def options(self) -> dict:
        return {"depth": self.depth, "tile": self.tile, "tau": self.tau}

    def check_size(self, height: int, width: int) -> None:
        """Multiples of the stride, and a ``tile`` that divides each block's map."""
        super().check_size(height, width)
        for k, block in enumerate(self.blocks):  # block k+1 works at stride 4·2^k
            block.check_tile(height // (4 << k), width // (4 << k), f"block {k + 1}'s ")

    def run_blocks(self, x: torch.Tensor) -> list[BlockOutput]:
        """The four blocks' outputs for normalised images ``x`` (kept for :attr:`block_stats`)."""
        height, width = x.shape[-2:]
        self.check_size(height, width)
        sparse = self._execution == "sparse" and not self.training and not torch.is_grad_enabled()
        self.last_execution = "sparse" if sparse else "dense"
        x = self.resnet.stem(x)
        results = []
        for k, (units, block) in enumerate(zip(self.resnet.layers, self.blocks), 1):
            r = block(units, x, sparse=sparse, where=f"block {k}'s ")
            results.append(r)
            x = r.out
        self._last = [(r, block.num_units) for r, block in zip(results, self.blocks)]
        return results

    def decode(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        fine = feats[0].shape[-2:]
        y = None
        for lat, f in zip(self.lateral, feats):
            f = F.relu(lat(f))
            if f.shape[-2:] != fine:
                f = F.interpolate(f, size=fine, mode="bilinear", align_corners=False)
            y = f if y is None else y + f
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode([r.out for r in self.run_blocks(x)], x.shape[-2:])

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        results = self.run_blocks(x)
        logits = self.decode([r.out for r in results], x.shape[-2:])
        means = [r.rho.mean() for r in results]
        return TrainOutput(logits, losses={"ponder": self.tau * torch.stack(means).sum()},
                           logs={f"ponder_{k}": m.detach() for k, m in enumerate(means, 1)})

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits and (SACT) the ponder map: Σ over blocks of ρ per position, each bilinearly resized to the
        input. (ACT's would be one value per image: it has none, :attr:`extra_maps`.)"""
        results = self.run_blocks(x)
        size = x.shape[-2:]
        maps = {"saliency": self.decode([r.out for r in results], size)}
        if "ponder" in self.extra_maps:
            maps["ponder"] = sum(F.interpolate(r.rho, size=size, mode="bilinear", align_corners=False)
                                 for r in results)
        return maps


class ACT(SACT):
    """ACT: one halting score per image and block (pooled features only)."""

    name = "act"
    spatial = False
    extra_maps = ()  # its ponder map is one value per image: no saliency to score (it would score the centre bias)


# -- builders ---------------------------------------------------------------------------------------
def load_backbone(trunk: ResNetTrunk, depth: int, spec: str) -> None:
    """Initialise the ResNet: ``imagenet`` (torchvision's IMAGENET1K_V1 file, see
    :func:`students.weights.torchvision_backbone`), ``none`` or a PATH to a torchvision
    ``resnet50``/``resnet101`` state dict (its ``fc.*`` classifier is ignored; the rest loads strictly)."""
    path = backbone_file(spec, lambda: imagenet_weights(depth), f"resnet{depth}")
    if path is None:
        return
    sd = load_state_dict(path)
    if not any(k.startswith("layer1.") for k in sd):
        raise WeightsError(f"{path}: no 'layer1.*' keys: not a torchvision resnet{depth} state dict")
    load_strict(trunk, {k: v for k, v in sd.items() if not k.startswith("fc.")},
                what=f"ResNet-{depth} backbone {path}")


def _build(cls: type[SACT], name: str, weights: str | None, backbone_weights: str, depth: int, tile: int,
           tau: float) -> SACT:
    model = cls(depth=depth, tile=tile, tau=tau)
    if weights is not None:
        model.weights_digest = load_student_weights(model, weights, name)
    else:
        load_backbone(model.resnet, depth, backbone_weights)
    return model


def _options(tiles: tuple = ()) -> tuple[StudentOption, ...]:
    return (
        StudentOption("depth", int, 50, "ResNet depth: 50 (units per block 3,4,6,3) or 101 (3,4,23,3)",
                      choices=(50, 101), tensors=True),
        StudentOption("tile", int, 1, "halting shared within k×k tiles of each block's map (k must divide "
                                      "every block's size); 1 = per position", choices=tiles, minimum=1),
        StudentOption("tau", float, 0.005, "weight τ of the ponder cost τ·Σ_blocks mean ρ in the loss",
                      minimum=0, training_only=True),
    )


@register("sact", SACT, params=23_867_277, options=_options(),
          doc="SACT ResNet-50 (spatially adaptive computation time) with a light decoder, ~23.9 M parameters")
def sact(*, weights: str | None = None, backbone_weights: str = "imagenet", depth: int = 50, tile: int = 1,
         tau: float = 0.005) -> SACT:
    """SACT. ``weights``: a whole-student checkpoint (path, URL or known name); without it the ResNet
    starts from ``backbone_weights`` (imagenet, none or PATH) and the halting scores and decoder are random."""
    return _build(SACT, "sact", weights, backbone_weights, depth, tile, tau)


@register("act", ACT, params=23_765_901, options=_options(tiles=(1,)),
          doc="ACT ResNet-50 (adaptive computation time, per image) with a light decoder, ~23.8 M parameters")
def act(*, weights: str | None = None, backbone_weights: str = "imagenet", depth: int = 50, tile: int = 1,
        tau: float = 0.005) -> ACT:
    """ACT (halting per image; ``tile`` must be 1); see :func:`sact`."""
    return _build(ACT, "act", weights, backbone_weights, depth, tile, tau)
