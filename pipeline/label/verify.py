"""Check a finished label folder: every tar against its marker, ``labels.json`` against the markers,
and (``deep``) that every image and label decodes. Reports what is wrong; changes nothing."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.common import images
from pipeline.common.errors import error_message
from pipeline.common.tables import table
from pipeline.common.storage import as_path, local_file
from pipeline.label.config import recorded_settings
from pipeline.label.shards import (folders_below, index_problem, marker_path, marker_problem, planned_keys, tar_path,
                                   tar_samples)
from teachers.weights import file_digest

#: the settings every marker of one folder (and its labels.json) must agree on
IDENTITY = ("encoding_version", "teacher", "weights_digest", "weights_random", "label_kind", "label_extension",
            "label_version", "precision", "tolerance", "decode", "image_size", "jpeg_quality")
_SHARD = re.compile(r"shard-\d{6}")
_PER_SHARD = 3  # sample-level problems listed per shard before "and N more"


class VerifyError(Exception):
    """The folder cannot be checked at all (not a folder)."""


@dataclass
class VerifyReport:
    folder: Path
    deep: bool = False
    shards: int = 0
    samples: int = 0
    failed: int = 0  # images the markers list as failed when labelled (not a problem of the folder)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard or file, what is wrong)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        return table(("shard", "problem"), self.problems, rule=True)

    def summary(self) -> str:
        what = "every tar matches its marker and labels.json" + (", every image and label decodes" if self.deep else "")
        return (f"OK: {self.folder}: {self.shards} shards, {self.samples} samples, {self.failed} images failed "
                f"when labelled; {what}")


def _first_difference(want: list[str], have: list[str]) -> str:
    for i in range(max(len(want), len(have))):
        a = want[i] if i < len(want) else "nothing"
        b = have[i] if i < len(have) else "nothing"
        if a != b:
            return f"sample {i}: marker {a}, tar {b}"
    return "none"


def _decode_problem(sample: dict, label_ext: str, size: tuple[int, int] | None, teacher: str | None) -> str:
    """"" when the sample's jpg, label and json decode to what the folder's settings say, else what does not."""
    for member in ("jpg", label_ext):  # the sizes their headers state first: a small member may state gigabytes
        stated = images.stated_size(sample[member])
        if size and stated is not None and stated != size:
            return f"{member} is {'x'.join(map(str, stated))}, expected {size[0]}x{size[1]} (HxW)"
    try:
        rgb = images.decode_image(sample["jpg"])
    except images.ImageError as e:
        return f"jpg: {e}"
    if size and rgb.shape[:2] != size:
        return f"jpg is {rgb.shape[1]}x{rgb.shape[0]}, the folder's --image-size is {size[0]}x{size[1]} (HxW)"
    raw = sample[label_ext]
    try:
        if label_ext.endswith(".npy"):
            label = np.load(io.BytesIO(raw), allow_pickle=False)
            if not np.isfinite(label.astype(np.float32)).all():
                return f"{label_ext}: not finite everywhere"
        else:
            label = images.opencv().imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
            if label is None:
                return f"{label_ext}: cannot decode"
    except (ValueError, OSError, EOFError, cv2.error) as e:
        return f"{label_ext}: cannot decode ({error_message(e)})"
    if size and tuple(label.shape) != size:
        return f"{label_ext} is {'x'.join(map(str, label.shape))}, expected {size[0]}x{size[1]}"
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        return f"json: cannot decode ({error_message(e)})"
    if not isinstance(meta, dict) or (teacher and meta.get("teacher") != teacher):
        return f"json: not this folder's teacher ({meta.get('teacher') if isinstance(meta, dict) else meta!r})"
    return ""


def _check_shard(folder: Path, name: str, marker: dict, reference: dict, deep: bool,
                 report: VerifyReport) -> None:
    def problem(text: str) -> None:
        report.problems.append((name, text))

    for key in IDENTITY:
        if key in reference and marker.get(key) != reference[key]:
            problem(f"{key} is {marker.get(key)!r}, the folder's is {reference[key]!r}")
    keys, failures = marker["keys"], marker["failures"]  # their shape is checked (marker_problem)
    if marker["count"] != len(keys):
        problem(f"marker count {marker['count']} but {len(keys)} keys")
    planned = planned_keys(marker)
    if marker["planned"] != len(planned):
        problem(f"marker plans {marker['planned']} images but lists {len(planned)}")
    labelled_or_failed, labelled = keys + [f["key"] for f in failures], set(keys)  # (one set: per key was N²)
    if sorted(labelled_or_failed) != sorted(planned):
        problem("marker's labelled and failed keys are not the keys it planned")
    elif "planned_keys" in marker and keys != [k for k in planned if k in labelled]:
        problem("marker's keys are not in plan order")
    tar = tar_path(folder, name)
    if not tar.is_file():
        return problem("tar missing")
    with local_file(tar) as local:  # a tar on object storage: downloaded once for the checksum and the samples
        _check_tar(local, marker, deep, report, problem)


def _check_tar(tar: Path, marker: dict, deep: bool, report: VerifyReport, problem) -> None:
    keys = marker["keys"]
    size = tar.stat().st_size
    if size != marker.get("bytes"):
        problem(f"tar is {size} bytes, its marker says {marker.get('bytes')}")
    elif file_digest(tar) != marker.get("sha256"):
        problem("tar sha256 does not match its marker")
    label_ext = marker.get("label_extension", "")
    expected = sorted(["jpg", "json", label_ext])
    shape = marker.get("image_size")
    shape = tuple(shape) if isinstance(shape, list) and len(shape) == 2 else None
    found, bad = [], []
    try:
        for sample in tar_samples(tar):
            found.append(sample["__key__"])
            members = sorted(k for k in sample if k != "__key__")
            if members != expected:
                bad.append(f"{sample['__key__']} holds {', '.join(members)} (expected {', '.join(expected)})")
            elif deep:
                why = _decode_problem(sample, label_ext, shape, marker.get("teacher"))
                if why:
                    bad.append(f"{sample['__key__']}: {why}")
    except Exception as e:  # noqa: BLE001 - any unreadable tar is a problem to report, not a crash
        return problem(f"tar unreadable after {len(found)} samples: {error_message(e)}")
    if found != keys:
        problem(f"tar keys differ from the marker's ({_first_difference(keys, found)})")
    for text in bad[:_PER_SHARD]:
        problem(text)
    if len(bad) > _PER_SHARD:
        problem(f"… and {len(bad) - _PER_SHARD} more samples like these")
    report.samples += len(found)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return e


def verify_labels(folder: str | Path, deep: bool = False) -> VerifyReport:
    """Check ``folder`` (a ``pipeline label`` output folder, or its URL); the report lists every problem found."""
    folder = as_path(folder)
    if not folder.is_dir():
        raise VerifyError(f"not a folder: {folder}")
    report = VerifyReport(folder=folder, deep=deep)
    names = sorted({p.stem for p in folder.glob("shard-*.json") if _SHARD.fullmatch(p.stem)}
                   | {p.stem for p in folder.glob("shard-*.tar") if _SHARD.fullmatch(p.stem)})
    index = _read_json(folder / "labels.json")
    if index is None:
        report.problems.append(("labels.json", "missing: labelling is not finished (re-run pipeline label)"))
    elif isinstance(index, Exception) or index_problem(index):
        why = error_message(index) if isinstance(index, Exception) else index_problem(index)
        report.problems.append(("labels.json", f"unreadable: {why}"))
        index = None
    markers: dict[str, dict] = {}
    for name in names:
        raw = _read_json(marker_path(folder, name))
        if raw is None:
            report.problems.append((name, "tar without a marker (an unfinished shard: re-run pipeline label)"))
        elif isinstance(raw, Exception):
            report.problems.append((name, f"marker unreadable: {error_message(raw)}"))
        elif marker_problem(raw):
            report.problems.append((name, f"marker malformed: {marker_problem(raw)}"))
        elif raw.get("shard", name) != name:
            report.problems.append((name, f"marker names shard {raw.get('shard')!r}"))
        else:
            markers[name] = recorded_settings(raw)  # (older markers have their decode path from their settings)
    reference = ({k: index[k] for k in IDENTITY if k in index} if index else
                 {k: v for k, v in next(iter(markers.values()), {}).items() if k in IDENTITY})
    for name, marker in markers.items():
        _check_shard(folder, name, marker, reference, deep, report)
        report.failed += len(marker["failures"])
    report.shards = len(markers)
    if not names:
        below = folders_below(folder)
        missing = ("labels.json", "missing: labelling is not finished (re-run pipeline label)")
        if below and missing in report.problems:  # an --out root: not an unfinished label folder
            report.problems.remove(missing)
        report.problems.append(("-", "no shards in this folder" + below))
    if index:
        listed = {}
        for entry in index["shards"]:  # each a {tar, count, sha256} (index_problem)
            name = Path(entry["tar"]).stem
            listed[name] = entry
            marker = markers.get(name)
            if marker is None:
                report.problems.append((name or "labels.json", "listed in labels.json but not a finished shard"))
            elif (entry["sha256"], entry["count"]) != (marker["sha256"], marker["count"]):
                report.problems.append((name, "labels.json's sha256 or count differs from the marker's"))
        for name in markers:
            if name not in listed:
                report.problems.append((name, "not listed in labels.json"))
        count = sum(m["count"] for m in markers.values())
        if index.get("count") != count or index.get("failed") != report.failed:
            report.problems.append(("labels.json", f"says {index.get('count')} labelled, {index.get('failed')} "
                                                   f"failed; the markers {count} and {report.failed}"))
    report.problems.sort(key=lambda p: (p[0].startswith("shard-"), p[0]))  # stable: a shard's rows stay in order
    return report
