"""What a finished ``pipeline run`` shows: the scores of every eval step, and ``<workdir>/report.html``.

:func:`scores_table` is the table ``pipeline run`` prints last: one row per eval step whose metrics file
exists (students and teachers alike), every metric its JSON holds. :func:`write_report` writes a static
page readable offline, fed by the manifest (which steps are eval, train, predict; their outputs), the
state file (what ran, when, how long) and what ``pipeline status`` says of each step (given by the runner):

* the scores table, the speed of every profiled model, and the steps (status as ``pipeline status`` says it,
  seconds);
* each train step's ``curves.png`` and its last epoch;
* image | teacher | student sheets (:mod:`pipeline.score.sheets`) for :data:`SHEETS` held-out images of each eval
  step that scores a checkpoint on teacher labels, from its worst by CC with the teacher to its best (none, and
  a note saying why, where its metrics are not of the checkpoint there now), and a few of the sheets a
  ``predict --compare-teacher`` step wrote (from its worst by CC with the teacher to its best, as those).

Every image the page shows is a PNG under ``<workdir>/report/``, referenced by a relative path, so the
page and that folder can be copied anywhere together; that folder holds nothing else once the page is
written. The page records a digest of the state's step records and of each step's status
(:func:`state_digest`): when neither changed, it is not rewritten (a run with nothing to do changes no file).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Mapping
from urllib.parse import quote, unquote

from pipeline.common.atomic import atomic_open
from pipeline.common.storage import as_path
from pipeline.common.tables import fixed, plural, table
from pipeline.manifest.format import Manifest
from pipeline.manifest.plan import matches

REPORT = "report.html"
ASSETS = "report"
SHEETS = 4  # held-out images per scored student
PREDICT_SHEETS = 6  # sheets shown per predict step that compared with a teacher
REPORT_VERSION = "2"
_DIGEST = re.compile(r'<meta name="pipeline-report" content="([0-9a-f]+)">')


# -- scores ---------------------------------------------------------------------------------------

def _steps(manifest: Manifest, command: str) -> list[str]:
    return [n for n, s in manifest.steps.items() if s.command == command and s.output]


def _model_label(manifest: Manifest, settings: Mapping, doc: Mapping) -> str:
    """``fastsal_a (train_a)`` for a checkpoint a train step made, the teacher's name, else the JSON's model."""
    model = str(doc.get("model", "?")).split("@")[0]
    ckpt = settings.get("checkpoint")
    if ckpt:
        for name in _steps(manifest, "train"):
            if str(as_path(str(ckpt))) == str(as_path(manifest.steps[name].output)):
                return f"{model} ({name})"
    elif settings.get("teacher"):
        return f"teacher {settings['teacher']}"
    return model


def _shown(manifest: Manifest, state: Mapping | None, name: str, states: Mapping[str, str] | None = None) -> str:
    """A step's name in a table of its outputs: ``NAME (stale)`` when they are not of the step as the manifest
    declares it now: by ``states`` ({step: what ``pipeline status`` says}: not ``up to date``, an upstream output
    changed on disk included), else by ``state``'s record alone (it did not run since its settings or its model
    changed, or it failed)."""
    if states is not None:
        return name if states.get(name) == "up to date" else f"{name} (stale)"
    rec = (state or {}).get("steps", {}).get(name) or {}
    current = state is None or (rec.get("status") == "done" and matches(rec, manifest, name, state))
    return name if current else f"{name} (stale)"


def eval_scores(manifest: Manifest, state: Mapping | None = None,
                states: Mapping[str, str] | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """(metric names in order of appearance, rows [step, model, images, *metrics], data descriptions).

    With ``state``: a step whose metrics are not of the step as the manifest declares it now (it did not run
    since its settings or its model changed, or it failed) is written ``NAME (stale)``."""
    metrics, found = [], []
    for name in _steps(manifest, "eval"):
        path = as_path(manifest.steps[name].output)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        values = doc.get("metrics") or {}
        metrics += [m for m in values if m not in metrics]
        found.append((name, doc, values))
    rows, data = [], []
    for name, doc, values in found:
        cells = [f"{values[m]:.4f}" if isinstance(values.get(m), (int, float)) else "-" for m in metrics]
        rows.append([_shown(manifest, state, name, states), _model_label(manifest, manifest.steps[name].settings, doc),
                     str(doc.get("images", "-")), *cells])
        data.append(str(doc.get("data", "")))
    return metrics, rows, data


def scores_table(manifest: Manifest, state: Mapping | None = None,
                 states: Mapping[str, str] | None = None) -> str | None:
    """The table ``pipeline run`` ends with (None when no eval step has written its metrics), the page's scores."""
    metrics, rows, data = eval_scores(manifest, state, states)
    if not rows:
        return None
    return table(["step", "model", "images", *metrics, "data"], [r + [d] for r, d in zip(rows, data)])


SPEED_HEAD = ["step", "model", "path", "input size", "inputs", "device", "batch", "params (M)", "GFLOPs / image",
              "ms / batch", "images/s"]


def speed_rows(manifest: Manifest, state: Mapping | None = None,
               states: Mapping[str, str] | None = None) -> list[list[str]]:
    """One row per execution path (SACT: dense and sparse) of every profile step whose JSON exists: what a fast
    student is for, beside the scores. A step whose JSON is not of the step as declared now is ``NAME (stale)``."""
    rows = []
    for name in _steps(manifest, "profile"):
        try:
            doc = json.loads(as_path(manifest.steps[name].output).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        size = doc.get("input_size") or ["?", "?"]
        step = [_shown(manifest, state, name, states), _model_label(manifest, manifest.steps[name].settings, doc)]
        where = [f"{size[0]}x{size[1]}", _inputs(doc.get("inputs")),
                 f"{doc.get('device', '?')} {doc.get('precision', '')}".strip(),
                 str(doc.get("batch_size", "-")), _number(doc, "params", ".2f", 1e-6)]
        modes = doc.get("modes") or [doc]
        for mode in modes:  # (a model of one path, FastSal's "dense": "-", beside SACT's dense and sparse)
            rows.append([*step, str(mode.get("mode", "-")) if len(modes) > 1 else "-", *where, _number(mode, "gflops", ".3f"),
                         _number(mode, "latency_ms", ".1f"), _number(mode, "images_per_s", ".1f")])
    return rows


def _inputs(value: object) -> str:
    """A profile's ``inputs`` in short: ``noise`` (one image of random noise) or ``N images`` (real ones)."""
    if value == "random":
        return "noise"
    m = re.match(r"(\d+) images? of ", str(value))
    return plural(int(m[1]), "image") if m else str(value) if value else "-"


def _number(doc: Mapping, key: str, fmt: str, scale: float = 1.0) -> str:
    value = doc.get(key)
    return format(value * scale, fmt) if isinstance(value, (int, float)) else "-"


def speed_table(manifest: Manifest, state: Mapping | None = None,
                states: Mapping[str, str] | None = None) -> str | None:
    """The speed of every profiled model (None when no profile step has written its JSON)."""
    rows = speed_rows(manifest, state, states)
    return table(SPEED_HEAD, rows) if rows else None


# -- the page -------------------------------------------------------------------------------------

def state_digest(state: Mapping, manifest: Manifest, states: Mapping[str, str]) -> str:
    """What the report depends on: in the state file each step's fingerprint, status and end time; in the
    manifest its name, its steps and each one's status (``states``, {step: what ``pipeline status`` says of it},
    :func:`pipeline.manifest.runner.step_states`, whose staleness covers the tables' ``(stale)`` marks: a step
    deleted from the manifest, edited and not run since, or whose input went missing left the page as it was)."""
    steps = state.get("steps", {})
    key = [[n, r.get("fingerprint"), r.get("status"), r.get("ended")] for n, r in sorted(steps.items())]
    doc = [REPORT_VERSION, key, manifest.path.name, [[name, states.get(name)] for name in manifest.steps]]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def report_path(manifest: Manifest) -> Path:
    return Path(manifest.workdir) / REPORT


def up_to_date(manifest: Manifest, state: Mapping, states: Mapping[str, str]) -> bool:
    path = report_path(manifest)
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return False
    m = _DIGEST.search(head)
    return bool(m) and m.group(1) == state_digest(state, manifest, states)


def _last_epoch(run: Path) -> dict[str, str]:
    try:
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    return rows[-1] if rows else {}


def _chosen_keys(doc: Mapping, n: int) -> dict[str, str]:
    """Up to ``n`` held-out images of an eval step's metrics, spread over its per-image CC (:func:`_spread`); {}
    when it lists none."""
    return _spread({r["key"]: r["cc"] for r in doc.get("per_image") or ()
                    if isinstance(r, dict) and isinstance(r.get("cc"), (int, float)) and r.get("key")}, n)


def _spread(ccs: Mapping[str, float], n: int) -> dict[str, str]:
    """Up to ``n`` of the keys of ``ccs`` ({key: CC}), spread over their CC from the worst to the best: {key: where
    it ranks, counted from the best, e.g. "worst of 12", "8th best of 12", "best of 12"}."""
    rows = sorted((cc, key) for key, cc in ccs.items())
    if not rows:
        return {}
    at = sorted({round(i * (len(rows) - 1) / max(n - 1, 1)) for i in range(n)})

    def rank(i: int) -> str:
        k = len(rows) - i  # 1: the best
        if i == 0 or k == 1:
            return f"{'worst' if i == 0 else 'best'} of {len(rows)}"
        nth = f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"
        return f"{nth} best of {len(rows)}"

    return {rows[i][1]: rank(i) for i in at}


def _student_sheets(manifest: Manifest, name: str, folder: Path, checkpoint: Path,
                    doc: Mapping) -> list[tuple[str, str]]:
    """Sheets for held-out images of eval step ``name`` (``checkpoint`` scored on labels, ``doc`` its metrics),
    from its worst image by CC with the teacher to its best (the first ones where its metrics list none): [(file
    relative to the workdir, caption)]."""
    import numpy as np

    from pipeline.score import sheets
    from pipeline.score.predictors import student_predictor
    from pipeline.train.data import open_label_set, shard_loader, split_shards
    from students import to_log_density

    settings = manifest.steps[name].settings
    labels = open_label_set(str(settings["labels"]))
    val_shards = int(settings.get("val_shards", 1))
    _, held_out = split_shards(labels.tars, val_shards) if 0 < val_shards < len(labels.tars) else ((), labels.tars)
    predictor = student_predictor(str(checkpoint), device="cpu")
    student = predictor.name.split("@")[0]
    wanted = _chosen_keys(doc, SHEETS)
    made = {}
    folder.mkdir(parents=True, exist_ok=True)
    for imgs, targets, keys in shard_loader(labels, list(held_out), batch_size=SHEETS, workers=0):
        picked = [i for i, k in enumerate(keys) if k in wanted] if wanted else range(len(keys))
        rgbs = [imgs[i].permute(1, 2, 0).numpy() for i in picked]
        for rgb, i, logd in zip(rgbs, picked, predictor.log_densities(rgbs) if rgbs else []):
            key = keys[i]
            teacher = to_log_density(targets[i][None], labels.label_kind)[0, 0].numpy().astype(np.float32)
            png = sheets.sheet_png(rgb, teacher, logd, teacher_name=f"teacher {labels.teacher}",
                                   student_name=student, title=key)
            path = folder / f"{key}.png"
            with atomic_open(path, "wb") as f:
                f.write(png)
            cc = sheets.agreement(teacher, logd)
            where = f" ({wanted[key]} by CC)" if wanted.get(key) else ""
            made[key] = (str(path.relative_to(manifest.workdir)),
                         f"{key}: CC {cc:.3f}{where}, at the labels' {rgb.shape[0]}x{rgb.shape[1]}")
        if len(made) >= (len(wanted) or SHEETS):
            break
    order = list(wanted) if wanted else list(made)  # worst to best
    return [made[k] for k in order if k in made]


def _img(src: str, alt: str) -> str:
    """``src``: a relative path (a file named `photo #1.jpg.png` is written `photo%20%231.jpg.png`)."""
    return f'<img src="{html.escape(quote(src))}" alt="{html.escape(alt)}">'


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#222;
background:#fff;padding:0 16px}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #bbb;padding:4px 10px;text-align:left}
th{background:#eef}table.scores td{font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd;margin:4px 0;display:block}
figure{margin:8px 0}figcaption{font-size:.9em;color:#555}.note{color:#666;font-size:.9em}
"""


def _steps_html(manifest: Manifest, state: Mapping, states: Mapping[str, str]) -> str:
    """The steps, each with its state as ``pipeline status`` says it (a failed one's error with it)."""
    records = state.get("steps", {})
    rows = [[n, s.command, states.get(n, "never run"),
             f"{records[n]['seconds']:.1f}" if isinstance((records.get(n) or {}).get("seconds"), (int, float))
             else "-"] for n, s in manifest.steps.items()]
    return "<h2>Steps</h2>" + _html_table(["step", "command", "status", "seconds"], rows)


def _curves_html(manifest: Manifest, name: str, state: str, assets: Path, warnings: list[str]) -> str:
    """Train step ``name``'s curves and last epoch, both of one ``metrics.csv``: a run stopped between an epoch's
    row and its plot has its curves drawn again here (its own ``curves.png``, an output of the step, is left);
    where that fails (a crash's half-written row), its ``curves.png`` as it is, and a warning. Shown also when the
    step is not up to date, ``state`` saying why, as ``pipeline status`` does."""
    from pipeline.train.logs import curves_behind, plot_curves

    run = Path(manifest.steps[name].output)
    dst = assets / name / "curves.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    redrawn = False
    if curves_behind(run):
        try:
            plot_curves(run, to=dst)
            redrawn = True
        except Exception as e:  # noqa: BLE001 - one step's curves failing leaves the rest of the page
            warnings.append(f"{name}: its curves could not be drawn again from {run / 'metrics.csv'} ({e}); "
                            "the page shows its curves.png as it is")
    if not redrawn:
        shutil.copyfile(run / "curves.png", dst)
    last = _last_epoch(run)
    summary = ", ".join(f"{k} {_four(last[k])}" for k in ("train_loss", "val_loss", "val_cc", "val_kl", "val_nss")
                        if last.get(k))
    epochs = int(last["epoch"]) + 1 if last.get("epoch", "").isdigit() else "?"
    note = "" if state == "up to date" else \
        f'<p class="note">{html.escape(f"({state}): the curves of its last run")}</p>'
    return (f"<h3>{html.escape(name)}</h3>{note}<figure>{_img(f'{ASSETS}/{name}/curves.png', name + ' curves')}"
            f"<figcaption>{html.escape(f'after epoch {epochs}: {summary}')}</figcaption></figure>")


def _four(value: str) -> str:
    """A metrics.csv value as the tables show one (4 decimals; "nan" and what does not read as it is)."""
    try:
        return fixed(float(value))
    except ValueError:
        return value


def _scored_elsewhere(doc: Mapping, checkpoint: Path, workdir: Path) -> str:
    """What eval metrics ``doc`` say of the checkpoint they scored when it is not ``checkpoint`` ("" when it is,
    also in a moved workdir, where they name it where the workdir was)."""
    scored = str(doc.get("model", "")).partition("@")[2]
    if not scored:
        return ""
    was, now = Path(scored).resolve(), Path(str(checkpoint)).resolve()
    if was == now or (was.name == now.name and not was.is_relative_to(workdir.resolve())):
        return ""
    return f"its metrics are of {scored}, the checkpoint now is {checkpoint}"


def _eval_sheets_html(manifest: Manifest, name: str, state: str, assets: Path, warnings: list[str]) -> str:
    """Sheets of eval step ``name`` (a checkpoint scored on labels; ``state``: the step's, as ``pipeline status``
    says it), or why there are none: drawn from a checkpoint its metrics are not of, they would be captioned and
    ranked with another checkpoint's scores."""
    from pipeline.train.checkpoints import checkpoint_path

    head = f"<h3>{html.escape(name)}: held-out images</h3>"

    def left_out(why: str) -> str:
        return head + f'<p class="note">{html.escape(f"({why}): no sheets drawn")}</p>'

    if state != "up to date":  # (stale: why, failed: its error, never run…: as `pipeline status` says)
        return left_out(state)
    try:
        doc = json.loads(as_path(manifest.steps[name].output).read_text())
        checkpoint = checkpoint_path(str(manifest.steps[name].settings["checkpoint"]))
        elsewhere = _scored_elsewhere(doc, checkpoint, Path(manifest.workdir))
        if elsewhere:
            return left_out(f"stale: {elsewhere}")
        made = _student_sheets(manifest, name, assets / name, checkpoint, doc)
    except Exception as e:  # noqa: BLE001 - one step's sheets failing leaves the rest of the page
        warnings.append(f"no sheets for {name}: {e}")
        return ""
    return head + "".join(f"<figure>{_img(src, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                          for src, cap in made)


def _predict_sheets_html(manifest: Manifest, name: str, state: str, assets: Path, warnings: list[str]) -> str:
    """Up to :data:`PREDICT_SHEETS` of the sheets predict step ``name`` drew beside its teacher's maps, from its
    worst by CC with the teacher to its best (the first by name where it lists no CC; its own outputs: shown also
    when the step is not up to date, ``state`` saying why, as ``pipeline status`` does)."""
    from pipeline.score.predict import compare_folder

    workdir, out = Path(manifest.workdir), Path(manifest.steps[name].output)
    try:
        doc = json.loads((out / "predictions.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(doc, dict) or not doc.get("compare_sheets"):
        return ""
    src_dir = compare_folder(out, "png")  # not doc's compare_sheets: absolute, of where a moved workdir was
    listed = doc.get("cc_with_teacher") or {}
    missing = [k for k in listed if not (src_dir / f"{k}.png").is_file()]
    if missing:
        warnings.append(f"{len(missing)} of the {len(listed)} sheets {out / 'predictions.json'} lists are missing "
                        f"from {src_dir} (e.g. {missing[0]}.png)")
    # from its worst by CC with the teacher to its best, as an eval step's (the heading's mean is of them all)
    picked = _spread({k: v for k, v in listed.items() if isinstance(v, (int, float)) and k not in missing},
                     PREDICT_SHEETS)
    files = [src_dir / f"{k}.png" for k in picked] if picked else sorted(src_dir.rglob("*.png"))[:PREDICT_SHEETS]
    figs = []
    for f in files:
        dst = assets / name / f.relative_to(src_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        rel = str(f.relative_to(src_dir))[: -len(".png")]
        cc = listed.get(rel)
        cap = rel + (f": CC {cc:.3f}" if isinstance(cc, (int, float)) else "") + \
            (f" ({picked[rel]} by CC)" if rel in picked else "")
        figs.append(f"<figure>{_img(str(dst.relative_to(workdir)), cap)}<figcaption>{html.escape(cap)}"
                    "</figcaption></figure>")
    if not figs:
        return ""
    ccs = [v for v in listed.values() if isinstance(v, (int, float))]
    mean = f"; mean CC with teacher {doc.get('compare_teacher')}: {sum(ccs) / len(ccs):.3f}" if ccs else ""
    note = "" if state == "up to date" else \
        f'<p class="note">{html.escape(f"({state}): the sheets of its last run")}</p>'
    return (f"<h3>{html.escape(name)}: {len(files)} of {doc.get('maps', '?')} maps at full size{html.escape(mean)}"
            "</h3>" + note + "".join(figs)
            + f'<p class="note">all sheets: {html.escape(os.path.relpath(src_dir, workdir))}</p>')


def build_html(manifest: Manifest, state: Mapping, states: Mapping[str, str], *, warnings: list[str]) -> str:
    workdir = Path(manifest.workdir)
    assets = workdir / ASSETS
    parts = [f"<h1>Run report: {html.escape(str(manifest.path))}</h1>",
             f'<p class="note">workdir {html.escape(str(workdir))}; written '
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}</p>"]

    metrics, rows, data = eval_scores(manifest, state, states)
    parts.append("<h2>Scores</h2>")
    if rows:
        parts.append(_html_table(["step", "model", "images", *metrics, "data"],
                                 [r + [d] for r, d in zip(rows, data)], "scores"))
        parts.append('<p class="note">On teacher labels, CC, KLDiv, SIM and NSS compare each model with the '
                     "teacher's maps of held-out images: the teacher's own row is the ceiling (its maps as the labels "
                     "stored them), lower is better for KLDiv, higher for the others.</p>")
    else:
        parts.append("<p>No eval step has written its metrics yet.</p>")

    speed = speed_rows(manifest, state, states)
    if speed:
        parts.append("<h2>Speed</h2>" + _html_table(SPEED_HEAD, speed, "scores")
                     + '<p class="note">From each profile step on its own device: GFLOPs counted by torch\'s FLOP '
                       "counter (executed ones, for a model that skips work), milliseconds per batch and images/s "
                       "timed after warm-up passes, on one image of random noise (inputs: noise) or on real images "
                       "(their mean: what counts for a model whose work depends on the image, as SACT's).</p>")

    parts.append(_steps_html(manifest, state, states))

    train = [n for n in _steps(manifest, "train") if (Path(manifest.steps[n].output) / "curves.png").is_file()]
    if train:
        parts.append("<h2>Training</h2>" + "".join(
            _curves_html(manifest, name, states.get(name, "never run"), assets, warnings) for name in train))

    sheets_html = []
    for name in _steps(manifest, "eval"):
        settings = manifest.steps[name].settings
        if settings.get("checkpoint") and settings.get("labels") and Path(manifest.steps[name].output).is_file():
            sheets_html.append(_eval_sheets_html(manifest, name, states.get(name, "never run"), assets, warnings))
    sheets_html += [_predict_sheets_html(manifest, name, states.get(name, "never run"), assets, warnings)
                    for name in _steps(manifest, "predict")]
    sheets_html = [h for h in sheets_html if h]
    if sheets_html:
        parts.append("<h2>Image | teacher | student</h2>" + "".join(sheets_html))
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta name="pipeline-report" content="{state_digest(state, manifest, states)}">'
            f"<title>{html.escape(manifest.path.name)}: run report</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_report(manifest: Manifest, state: Mapping, states: Mapping[str, str], *,
                 force: bool = False) -> tuple[Path, bool, list[str]]:
    """Write ``<workdir>/report.html`` (and its images under ``<workdir>/report/``) unless it is up to date
    (``states``: {step: what ``pipeline status`` says of it}).

    Returns (its path, whether it was written, warnings about parts left out)."""
    path = report_path(manifest)
    if not force and up_to_date(manifest, state, states):
        return path, False, []
    warnings: list[str] = []
    text = build_html(manifest, state, states, warnings=warnings)
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))
    _clear_assets(Path(manifest.workdir), text)
    return path, True, warnings


def _clear_assets(workdir: Path, page: str) -> None:
    """Delete what ``<workdir>/report/`` holds that ``page`` does not show (the sheets of a run that drew more, a
    step since removed): once the page is written, so that neither it nor the page before it points at a file
    gone. One that cannot be deleted is left (the page is written)."""
    shown = set(referenced_images(page))
    for f in sorted((workdir / ASSETS).rglob("*"), reverse=True):  # a folder's files before it
        with contextlib.suppress(OSError):
            if f.is_dir():
                f.rmdir()  # (when empty)
            elif f.relative_to(workdir).as_posix() not in shown:
                f.unlink()


def referenced_images(page: str) -> list[str]:
    """The ``src`` of every ``<img>`` of a report page (relative to the workdir)."""
    return [unquote(html.unescape(s)) for s in re.findall(r'<img src="([^"]+)"', page)]


__all__ = ["REPORT", "eval_scores", "referenced_images", "scores_table", "speed_table", "state_digest",
           "write_report"]
