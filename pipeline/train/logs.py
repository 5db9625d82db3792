"""What a training run writes for people: ``losses.csv`` (every step), ``metrics.csv`` (every epoch),
``curves.png``, and the summary table at the end."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from pipeline.common.atomic import atomic_open
from pipeline.common.storage import as_path
from pipeline.common.tables import fixed, table
from pipeline.train.config import EpochResult

LOSS_HEADER = ["epoch", "step", "global_step", "loss"]
METRICS_HEADER = ["epoch", "train_loss", "val_loss", "val_cc", "val_kl", "val_nss", "lr", "seconds", "images"]
VAL_KEYS = tuple(METRICS_HEADER[2:6])
#: steps beyond which curves.png draws the loss per step faintly, under its running mean
SMOOTH_ABOVE = 500


def metrics_header(log_names) -> list[str]:
    """``metrics.csv``'s columns for a student logging ``log_names`` (SACT's ``ponder_N``): the metrics, the
    statistics' means over the epoch's training batches, then over the validation images (``val_ponder_N``)."""
    return METRICS_HEADER + list(log_names) + [f"val_{k}" for k in log_names]


def keep_rows(path: Path, header: list[str], before_epoch: int) -> None:
    """Rewrite ``path`` atomically with its rows of epochs before ``before_epoch`` (an interrupted
    epoch's rows are dropped: that epoch runs again). A row a crash cut short (a tail of NUL bytes) is left
    out with a ``warning:``; a file of other columns (edited, or of another version) is kept beside it as
    ``<name>.old``, said in a ``warning:``, not emptied; one whose columns are those of ``header`` but for its last
    validation columns (a run from before they were logged: SACT's ``val_ponder_N``) keeps its rows, those cells
    empty."""
    rows, bad = [], 0
    if path.is_file():
        lines = path.read_text(errors="replace").splitlines()
        reader = csv.reader(line for line in lines if "\0" not in line)
        first = next(reader, None)
        if first and first == header[:len(first)] and all(h.startswith("val_") for h in header[len(first):]):
            bad = sum(1 for line in lines[1:] if "\0" in line and line.strip("\0"))  # (a tail of NULs alone: none)
            for r in reader:
                if r and (len(r) != len(first) or not r[0].isdigit()):
                    bad += 1
                elif r and int(r[0]) < before_epoch:
                    rows.append(r + [""] * (len(header) - len(first)))
        elif first is not None:
            aside = path.with_name(path.name + ".old")
            os.replace(path, aside)
            print(f"warning: {path} has other columns than this run writes; its rows are kept in {aside}, and "
                  f"{path.name} starts again from this epoch", file=sys.stderr)
    if bad:
        print(f"warning: {path}: left out {bad} unreadable row{'s' if bad > 1 else ''} (cut short by a crash)",
              file=sys.stderr)
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def append_metrics(run: Path, result: EpochResult) -> None:
    """One row of ``metrics.csv`` for a finished epoch, fsynced (a checkpoint follows it)."""
    with open(run / "metrics.csv", "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(
            [result.epoch, f"{result.train_loss:.6g}", *(f"{result.val[k]:.6g}" for k in VAL_KEYS),
             f"{result.lr:.6g}", f"{result.seconds:.2f}", result.images,
             *(f"{v:.6g}" for v in result.logs.values()),
             *(f"{result.val.get('val_' + k, math.nan):.6g}" for k in result.logs)])
        f.flush()
        os.fsync(f.fileno())


def recorded_config(run: Path) -> dict:
    """The run folder's config.json ({} where there is none, or it does not read as settings)."""
    try:
        recorded = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def read_metrics(run: Path, from_epoch: int = 0) -> list[EpochResult]:
    """The epochs of ``metrics.csv`` from ``from_epoch`` on (``run`` may be a URL)."""
    with (as_path(run) / "metrics.csv").open("r", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) >= from_epoch]
    def number(v) -> float:
        return float(v or "nan")  # (a column an older run did not log: empty)

    return [EpochResult(int(r["epoch"]), float(r["train_loss"]),
                        {k: number(v) for k, v in r.items() if k in VAL_KEYS or k.startswith("val_")},
                        float(r["lr"]), float(r["seconds"]), int(r["images"]),
                        {k: number(v) for k, v in r.items() if k not in METRICS_HEADER and not k.startswith("val_")})
            for r in rows]


def curves_behind(run: Path) -> bool:
    """Whether ``curves.png`` is missing or older than ``metrics.csv`` (a run killed between its last checkpoint
    and the plot, or whose disk filled then): a run with nothing left to train draws it again."""
    try:
        logged = (run / "metrics.csv").stat().st_mtime_ns
    except OSError:
        return False
    try:
        return (run / "curves.png").stat().st_mtime_ns < logged
    except OSError:
        return True


def plot_curves(run: Path, to: Path | None = None) -> Path:
    """``curves.png`` (or ``to``): training loss per step, and per epoch the losses (the epoch's mean training loss
    beside the validation loss), the validation metrics the stage has (the hint stage: its loss alone) and the
    student's own statistics (SACT's ponder costs, training means); titled with the run and its student, each
    learning-rate drop a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(run / "losses.csv", newline="") as f:
        losses = list(csv.DictReader(f))
    with open(run / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    # the validation loss, then the metrics the stage has (the hint stage, which trains no head, has none)
    rows = [{k: float(r.get(k) or "nan") for k in ("val_loss", "val_cc", "val_kl", "val_nss")} for r in metrics]
    config = recorded_config(run)
    teacher = config.get("labels_teacher") or "teacher"  # (whose labels the run learnt; older runs: not recorded)
    panels = [(k, t, y) for k, t, y in (("val_loss", "loss per epoch", "loss"),
                                        ("val_cc", f"validation CC vs {teacher}", "CC (higher: closer)"),
                                        ("val_kl", f"validation KL vs {teacher}", "KL divergence (lower: closer)"),
                                        ("val_nss", f"validation NSS vs {teacher}", "NSS (higher: closer)"))
              if not _lacked(k, rows)]
    # the student's own statistics (SACT: each block's mean ponder cost), means over the epoch's training batches,
    # and over the validation images (val_…; empty in the rows of a run from before they were logged)
    extra = [k for k in (metrics[0].keys() if metrics else ()) if k and k not in METRICS_HEADER
             and not k.startswith("val_")]
    fig, axes = plt.subplots(1, 1 + len(panels) + bool(extra), figsize=(4 * (1 + len(panels) + bool(extra)), 3.8),
                             squeeze=False)
    axes = axes[0]
    steps, values = [int(r["global_step"]) for r in losses], [float(r["loss"]) for r in losses]
    many = len(values) > SMOOTH_ABOVE  # (a COCO run's 100,000s of steps are a solid band: their running mean too)
    axes[0].plot(steps, values, lw=0.8, alpha=0.35 if many else 1.0, label="each step")
    if many:
        import numpy as np

        k = len(values) // 100
        mean = np.convolve(values, np.full(k, 1 / k), mode="valid")  # (a window with a NaN loss: NaN, a gap)
        axes[0].plot(steps[k - 1:], mean, lw=1.2, label=f"mean of {k} steps")
        axes[0].legend(fontsize="small")
    axes[0].set(title="training loss per step", xlabel="step", ylabel="loss")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 10_000 else f"{x:g}"))
    epochs = [int(r["epoch"]) + 1 for r in metrics]
    drops = [m + 0.5 for m in config.get("milestones") or () if epochs and m < epochs[-1]]  # lr falls after epoch m

    dot = "o" if len(epochs) <= 30 else None  # (a hundred epochs' markers drew a thick bar)

    def by_epoch(ax) -> None:
        if len(epochs) <= 12:  # every epoch a tick (one epoch alone got ticks 0.945 … 1.050)
            ax.set_xticks(epochs)
            ax.set_xlim(0.5, epochs[-1] + 0.5 if epochs else 1.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole

    for ax, (key, title, ylabel) in zip(axes[1:], panels):
        ax.plot(epochs, [r[key] for r in rows], marker=dot, label="validation")
        if key == "val_loss":
            ax.plot(epochs, [float(r["train_loss"]) for r in metrics], marker=".", ls="--",
                    label="training (mean" + (", with the human maps' term)" if config.get("gt_maps") else ")"))
            ax.legend(fontsize="small")
        for x in drops:
            ax.axvline(x, color="grey", ls=":", lw=1)
        ax.set(title=title, xlabel="epoch" + (" (dotted: learning rate drop)" if drops else ""), ylabel=ylabel)
        by_epoch(ax)
    if extra:
        ax = axes[-1]
        for key in extra:
            line, = ax.plot(epochs, [float(r.get(key) or "nan") for r in metrics], marker=".", ls="--",
                            label=f"{key} (training)")
            ax.plot(epochs, [float(r.get(f"val_{key}") or "nan") for r in metrics], marker=dot, color=line.get_color(),
                    label=f"{key} (validation)")
        ponder = all(k.startswith("ponder_") for k in extra)
        ax.set(title="ponder cost ρ per block" if ponder else "student statistics",
               xlabel="epoch", ylabel="mean (training batches, validation images)")
        # beside the axes: inside them its entries, two per block, covered the points
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        by_epoch(ax)
    student = config.get("student", "?")
    fig.suptitle(f"{Path(str(config.get('run') or run)).name}: {student} ({config.get('stage', '?')} stage)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    to = run / "curves.png" if to is None else to
    with atomic_open(to, "wb") as f:
        f.write(buf.getvalue())
    return to


def _lacked(key: str, vals: list[dict]) -> bool:
    """Whether a validation metric is one the stage has not (the hint stage, which trains no head, reports its
    loss alone: its maps' metrics are NaN beside a finite loss); a run whose values are all NaN shows them."""
    return (key != "val_loss" and not any(math.isfinite(v.get(key, math.nan)) for v in vals)
            and any(math.isfinite(v.get("val_loss", math.nan)) for v in vals))


def summary_table(results: list[EpochResult], earlier: list[EpochResult] = ()) -> str:
    """The run's epochs, one row each: those this call trained (``results``) after the ``earlier`` ones a call
    before it trained (from ``metrics.csv``: a resumed run's table is the whole run's, not its last few epochs)."""
    done = "nothing to do: every epoch is already trained"
    every = [*earlier, *results]
    if not every:
        return done
    keys = [k for k in VAL_KEYS if not _lacked(k, [r.val for r in every])]
    head = ["epoch", "train_loss", *keys, *_stat_columns(every[0]), "lr", "seconds", "img/s"]
    rows = [[str(r.epoch + 1), fixed(r.train_loss), *(fixed(r.val.get(k, math.nan)) for k in keys),
             *(fixed(v, 3) if v == v else "-" for v in _stat_columns(r).values()), f"{r.lr:g}", f"{r.seconds:.1f}",
             f"{r.images / max(r.seconds, 1e-9):.1f}"] for r in every]
    lines = [table(head, rows, align="right")]
    if earlier:
        span = f"{earlier[0].epoch + 1}" + (f"-{earlier[-1].epoch + 1}" if len(earlier) > 1 else "")
        lines.append(f"(epoch{'s' if len(earlier) > 1 else ''} {span} trained before this call, as metrics.csv "
                     "has them)")
    if not results:
        lines.append(done)
    return "\n".join(lines)


def _stat_columns(result: EpochResult) -> dict[str, float]:
    """The summary's columns of the student's statistics: for SACT and ACT the ponder cost Σ over blocks of each
    block's mean ρ (what τ weights in the loss) in training and on the validation images (the computation spent at
    test time), each block's in ``metrics.csv``; any other statistic as it is, of training and validation."""
    stats = result.logs
    if stats and all(k.startswith("ponder_") for k in stats):
        return {"ponder Σ (train)": sum(stats.values()),
                "ponder Σ (val)": sum(result.val.get(f"val_{k}", math.nan) for k in stats)}
    return {**{f"{k} (train)": v for k, v in stats.items()},
            **{f"{k} (val)": result.val.get(f"val_{k}", math.nan) for k in stats}}


def epoch_note(result: EpochResult, epochs: int) -> str:
    """The end of an epoch in one line: ``epoch 3/20 loss 0.4123 val_cc 0.712 … 85.1 img/s``."""
    val = " ".join(f"{k} {fixed(result.val[k])}" for k in VAL_KEYS if result.val.get(k, math.nan) == result.val.get(k))
    rate = result.images / max(result.seconds, 1e-9)
    return (f"epoch {result.epoch + 1}/{epochs} loss {fixed(result.train_loss)}" + (f" {val}" if val else "")
            + f" (epoch {result.seconds:.1f} s, {rate:.1f} img/s)")  # (the bar's own rate counts the whole run)
