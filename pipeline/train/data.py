"""Reading labelled shards for training and evaluation, with webdataset.

Shard order and the sample shuffle buffer are seeded by (seed, epoch), so an epoch sees the
same batches in the same order whether or not the run was interrupted before it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds

from pipeline.label.shards import shard_tars, verify_dataset


class DataError(Exception):
    """The labelled shards cannot be used for training (missing, unfinished, mixed)."""


@dataclass(frozen=True)
class LabelSet:
    """A finished label folder: its shards and what their labels are."""

    folder: Path
    tars: tuple[str, ...]
    label_key: str  # e.g. "deepgaze.npy" or "salgan.png"
    label_kind: str  # log_density | probability_map
    teacher: str
    count: int
    image_size: tuple[int, int]  # (H, W) of the stored images and labels
    counts: tuple[int, ...] = ()  # images in each tar of ``tars``

    def images_in(self, tars) -> int:
        per_tar = dict(zip(self.tars, self.counts))
        return sum(per_tar[t] for t in tars)


def open_label_set(folder: str | Path) -> LabelSet:
    folder = Path(folder)
    reason = verify_dataset(folder, check_digest=False)
    if reason:
        raise DataError(f"not a finished label folder: {reason} (run `pipeline label` first)")
    index = json.loads((folder / "labels.json").read_text())
    tars = tuple(shard_tars(folder))
    per_tar = {Path(s["tar"]).name: int(s["count"]) for s in index["shards"]}
    return LabelSet(folder, tars, index["label_extension"], index["label_kind"], index["teacher"], index["count"],
                    tuple(index["image_size"]), tuple(per_tar[Path(t).name] for t in tars))


def check_same_labels(first: LabelSet, other: LabelSet) -> None:
    """Two label sets a run may mix (or train on one, validate on the other): one teacher, one size."""
    if (first.label_key, first.image_size) != (other.label_key, other.image_size):
        (h1, w1), (h2, w2) = first.image_size, other.image_size
        raise DataError(f"{other.folder} holds {other.label_key} labels at {h2}x{w2}, but {first.folder} holds "
                        f"{first.label_key} at {h1}x{w1}: one teacher and one size per run")


def open_label_sets(folders) -> LabelSet:
    """Several finished label folders of one teacher, read as one set (their shards in order)."""
    sets = [open_label_set(f) for f in folders]
    if not sets:
        raise DataError("no label folder given")
    first = sets[0]
    for other in sets[1:]:
        check_same_labels(first, other)
    return LabelSet(first.folder, tuple(t for s in sets for t in s.tars), first.label_key, first.label_kind,
                    first.teacher, sum(s.count for s in sets), first.image_size,
                    tuple(c for s in sets for c in s.counts))


def split_shards(tars: tuple[str, ...], val_shards: int) -> tuple[list[str], list[str]]:
    """The last ``val_shards`` shards are held out for validation."""
    if val_shards >= len(tars):
        raise DataError(f"--val-shards {val_shards} leaves no training shard (there are {len(tars)})")
    cut = len(tars) - val_shards
    return list(tars[:cut]), list(tars[cut:])


def _all_shards(src):
    return src


def decode(sample: dict, label_key: str, label_kind: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A raw tar sample → (uint8 image [3,H,W], float label [1,H,W], key)."""
    bgr = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
    image = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()
    raw = sample[label_key]
    if label_kind == "log_density":
        import io

        target = torch.from_numpy(np.load(io.BytesIO(raw)).astype(np.float32))
    else:
        target = torch.from_numpy(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)).float() / 255.0
    return image, target[None], sample["__key__"]


def epoch_order(tars, *, seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The shard order of one epoch: a permutation seeded by (seed, epoch), or as given."""
    order = list(tars)
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def node_shards(order: list[str], rank: int, world: int) -> list[str]:
    """The shards node ``rank`` of ``world`` reads from ``order`` (as ``webdataset.split_by_node`` splits)."""
    return order[rank::world]


def shard_loader(labels: LabelSet, tars: list[str], *, batch_size: int, epoch: int = 0, seed: int = 0,
                 shuffle_buffer: int = 0, workers: int = 0, drop_last: bool = False, split_nodes: bool = True,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``tars``: split by node (torch.distributed rank; unless ``split_nodes`` is off)
    and by worker, decoded in the workers."""
    order = epoch_order(tars, seed=seed, epoch=epoch, shuffle=bool(shuffle_buffer))
    ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=wds.split_by_node if split_nodes else _all_shards,
                        workersplitter=wds.split_by_worker, empty_check=False)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed * 7_919 + epoch))
    ds = ds.map(lambda s: decode(s, labels.label_key, labels.label_kind))
    ds = ds.batched(batch_size, partial=not drop_last)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(workers, len(order)),
                                       persistent_workers=False, pin_memory=pin_memory)
