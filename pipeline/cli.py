"""The ``pipeline`` command line: thin click commands over the library functions."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from pipeline import __version__


def _image_size(ctx, param, value: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", value or "")
    if not m or int(m.group(1)) < 16 or int(m.group(2)) < 16:
        raise click.BadParameter(f"expected HxW with both at least 16, e.g. 192x256; got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _teacher_names() -> list[str]:
    from teachers import available

    return available()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pipeline")
def cli():
    """Saliency distillation pipeline: label images with teacher networks into WebDataset shards,
    train fast students from them, and score and profile every model."""


@cli.command("label")
@click.argument("source", type=click.Choice(["coco", "folder"]))
@click.option("--teacher", required=True, type=click.Choice(_teacher_names()),
              help="Teacher network that makes the labels (deepgaze = DeepGaze IIE).")
@click.option("--weights", default=None,
              help="Teacher weights: a local path, an http(s) URL, a known name, or 'random' "
                   "(architecture only: labels are then meaningless). Default: the teacher's own.")
@click.option("--coco-root", type=click.Path(path_type=Path), default=Path("data/coco"),
              help="COCO folder holding annotations/ and <split>/ (source coco).")
@click.option("--split", default="val2017", help="COCO split, e.g. train2017, val2017, test2017 (source coco).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of images, searched recursively (source folder).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/labels"),
              help="Output root; shards go to <out>/<teacher>/<split or folder name>/.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, help="Images per shard.")
@click.option("--image-size", default="192x256", callback=_image_size,
              help="Training resolution HxW of the stored jpg and label.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Images per teacher forward pass.")
@click.option("--jpeg-quality", type=click.IntRange(50, 100), default=95, help="Quality of the stored jpg.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (Ray GPU actors use their own GPU).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="auto = bf16 autocast on GPU, fp32 on CPU.")
@click.option("--io-threads", type=click.IntRange(min=1), default=4,
              help="Threads per worker for reading, decoding and encoding images.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray",
              help="ray: actors on a local or existing Ray cluster; local: one worker in this process.")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray).")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="GPU actors (one GPU each). Default: every GPU of the cluster; 0 forces CPU workers.")
@click.option("--cpu-workers", type=click.IntRange(min=1), default=1, help="CPU actors when no GPU is used.")
@click.option("--retries", type=click.IntRange(min=0), default=2, help="Retries of a failed shard.")
@click.option("--max-failure-rate", type=click.FloatRange(0, 1), default=0.01,
              help="Exit non-zero when more than this fraction of images failed.")
@click.option("--overwrite", is_flag=True, help="Delete existing shards in the output folder and start over.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def label_cmd(source, teacher, weights, coco_root, split, images, out, shard_size, image_size, batch_size,
              jpeg_quality, device, precision, io_threads, executor, address, gpus, cpu_workers, retries,
              max_failure_rate, overwrite, progress):
    """Label a COCO split or a folder of images with a teacher into WebDataset shards.

    Re-running the same command skips finished shards and redoes partial ones.
    """
    from pipeline.label import LabelError, exit_code, label
    from pipeline.labeler import LabelConfig
    from pipeline.sources import SourceError, coco_records, folder_records
    from teachers.weights import WeightsError

    try:
        if source == "coco":
            records, name = coco_records(coco_root, split), split
        else:
            if images is None:
                raise click.UsageError("source 'folder' needs --images DIR")
            records, name = folder_records(images), images.resolve().name
        config = LabelConfig(teacher=teacher, weights=weights, image_size=image_size, batch_size=batch_size,
                             jpeg_quality=jpeg_quality, device=device, precision=precision, io_threads=io_threads)
        summary = label(records, out / teacher / name, config, shard_size=shard_size, overwrite=overwrite,
                        executor=executor, address=address, gpus=gpus, cpu_workers=cpu_workers,
                        retries=retries, progress=progress)
    except (SourceError, LabelError, WeightsError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary.table())
    for f in summary.failures[:10]:
        click.echo(f"failed: {f['key']} ({f['file']}): {f['reason']}", err=True)
    if len(summary.failures) > 10:
        click.echo(f"… and {len(summary.failures) - 10} more failures (see the shards' json markers)", err=True)
    code = exit_code(summary, max_failure_rate)
    if code:
        click.echo(f"error: {summary.failed} of {summary.planned_images} images failed "
                   f"(more than --max-failure-rate {max_failure_rate})" if not summary.shards_failed else
                   f"error: shards failed: {', '.join(summary.shards_failed)}", err=True)
    sys.exit(code)


@cli.group("weights")
def weights_group():
    """Fetch published weights into the cache, or convert a release to a PyTorch checkpoint."""


@weights_group.command("list")
def weights_list():
    """List the known weights names, their URLs and cache paths."""
    from teachers.weights import KNOWN_WEIGHTS, cache_path

    for name, known in sorted(KNOWN_WEIGHTS.items()):
        state = "cached" if cache_path(name).is_file() else "not cached"
        click.echo(f"{name}\t{known.url}\t{cache_path(name)} ({state})")


@weights_group.command("fetch")
@click.argument("spec")
def weights_fetch(spec):
    """Download SPEC (a known name or an http(s) URL) into the cache and verify its digest."""
    from teachers.weights import WeightsError, file_digest, resolve

    try:
        path = resolve(spec)
    except WeightsError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{path}  sha256 {file_digest(path)}")


@weights_group.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
def weights_convert(src, dst):
    """Convert SalGAN's Lasagne release (gen_modelWeights0090.npz) to a PyTorch checkpoint DST (.pt)."""
    from teachers.salgan import save_converted
    from teachers.weights import WeightsError, file_digest

    try:
        out = save_converted(src, dst)
    except WeightsError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}  sha256 {file_digest(out)}  (use: --teacher salgan --weights {out})")


def _ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _floats3(ctx, param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter(f"expected three comma-separated numbers (KL,CC,BCE), got {value!r}")
    return parts


@cli.command("train")
@click.option("--labels", type=click.Path(path_type=Path), multiple=True,
              default=[Path("data/labels/deepgaze/train2017")],
              help="A finished label folder (the one holding labels.json); repeat to train on several of one teacher.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=Path("runs/fastsal_a"),
              help="Run folder: checkpoints/, losses.csv, metrics.csv, curves.png.")
@click.option("--student", type=click.Choice(["fastsal_a", "fastsal_c"]), default="fastsal_a")
@click.option("--stage", type=click.Choice(["finetune", "hint"]), default="finetune",
              help="finetune: on the pseudo-labels; hint: MSE to the teacher's 4 feature maps (Eq. 1).")
@click.option("--epochs", type=click.IntRange(min=1), default=100)
@click.option("--lr", type=float, default=0.01, help="SGD learning rate.")
@click.option("--momentum", type=float, default=0.9)
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--milestones", default="15,30,60", callback=_ints, help="Epochs where the lr is multiplied by --gamma.")
@click.option("--gamma", type=float, default=0.1)
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--val-shards", type=click.IntRange(min=1), default=1,
              help="Without --val-labels: the last shards of the last --labels folder, held out for validation.")
@click.option("--val-labels", type=click.Path(path_type=Path), default=None,
              help="Validate on this label folder (e.g. val2017's) instead of holding out training shards.")
@click.option("--shuffle-buffer", type=click.IntRange(min=0), default=1000, help="Samples in the shuffle buffer.")
@click.option("--workers", type=click.IntRange(min=0), default=2, help="DataLoader workers decoding shards.")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["auto", "off", "bf16"]), default="auto", help="auto = bf16 on GPU.")
@click.option("--backbone-weights", default="imagenet",
              help="MobileNetV2 encoder init: imagenet (torchvision weights, cached or downloaded), none, or a PATH.")
@click.option("--init", "init_ckpt", type=click.Path(path_type=Path), default=None,
              help="Start from this checkpoint's model weights (e.g. the hint stage's last checkpoint).")
@click.option("--teacher", default=None, help="Hint stage: the teacher run online for hint targets.")
@click.option("--teacher-weights", default=None, help="Hint stage: the teacher's --weights.")
@click.option("--loss-weights", default="1,1,1", callback=_floats3,
              help="Density teachers (Eq. 3): weights of KL, 1-cosine and BCE (the paper: 1,1,1; the "
                   "authors' code: 0.5,0.2,0.3).")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Cap on steps per epoch.")
@click.option("--ray-workers", type=click.IntRange(min=0), default=0,
              help="Train data-parallel on this many Ray Train workers (one GPU each when the cluster has them); "
                   "0: in this process. --batch-size is per worker.")
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="With --ray-workers: the Ray cluster (default: $RAY_ADDRESS, else start a local Ray).")
@click.option("--restart", is_flag=True, help="Delete the run's checkpoints and logs and start over.")
@click.option("--progress/--no-progress", default=True)
def train_cmd(labels, run_dir, student, stage, epochs, lr, momentum, weight_decay, milestones, gamma, batch_size,
              val_shards, val_labels, shuffle_buffer, workers, seed, device, amp, backbone_weights, init_ckpt, teacher,
              teacher_weights, loss_weights, steps_per_epoch, ray_workers, address, restart, progress):
    """Train a FastSal student on labelled shards; re-running resumes after the last finished epoch."""
    from pipeline.data import DataError
    from pipeline.train import TrainConfig, TrainError, summary_table, train
    from teachers.weights import WeightsError

    config = TrainConfig(labels=tuple(str(p) for p in labels), run=str(run_dir), student=student, stage=stage,
                         epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, milestones=milestones,
                         gamma=gamma, batch_size=batch_size, val_shards=val_shards,
                         val_labels=str(val_labels) if val_labels else None, shuffle_buffer=shuffle_buffer,
                         workers=workers, seed=seed, device=device, amp=amp, backbone_weights=backbone_weights,
                         init=str(init_ckpt) if init_ckpt else None, teacher=teacher,
                         teacher_weights=teacher_weights, loss_weights=loss_weights,
                         steps_per_epoch=steps_per_epoch)
    try:
        if ray_workers:
            from pipeline.train_ray import train_on_ray

            results = train_on_ray(config, workers=ray_workers, address=address, restart=restart, progress=progress)
        else:
            results = train(config, restart=restart, progress=progress)
    except (DataError, TrainError, WeightsError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    click.echo(summary_table(results))
    click.echo(f"checkpoints: {run_dir / 'checkpoints'}   curves: {run_dir / 'curves.png'}")


def _add_commands() -> None:
    from pipeline.model_cmds import COMMANDS
    from pipeline.run_cmd import run_cmd, status_cmd

    for command in (*COMMANDS, run_cmd, status_cmd):
        cli.add_command(command)


_add_commands()


def main() -> None:
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
