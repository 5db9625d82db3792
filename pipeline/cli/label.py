"""``pipeline label``: teacher labels into WebDataset shards."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import students
import teachers
from pipeline.cli.options import (Checked, LocalPath, device_name, echo_result, given, image_size, must_exist,
                                  path_or_url, ray_address)


def _source_check(ctx: click.Context) -> None:
    """The options of the other source would be ignored; a folder source needs its folder."""
    source, images = ctx.params["source"], ctx.params.get("images")
    if source == "folder" and images is None:
        raise click.UsageError("source 'folder' needs --images DIR", ctx)
    if source == "coco":
        other = ["--images"] if images is not None else []
    else:
        given = ctx.get_parameter_source
        other = [f"--{n.replace('_', '-')}" for n in ("coco_root", "split")
                 if given(n) is not click.core.ParameterSource.DEFAULT]
    if other:
        raise click.UsageError(f"{' and '.join(other)} {'is' if len(other) == 1 else 'are'} for source "
                               f"{'folder' if source == 'coco' else 'coco'}; source {source} reads "
                               + ("--coco-root's --split" if source == "coco" else "--images"), ctx)


@click.command("label", cls=Checked, checks=(_source_check,))
@click.argument("source", type=click.Choice(["coco", "folder"]))
@click.option("--teacher", required=True, type=click.Choice(teachers.available()),
              help="Teacher network that makes the labels (deepgaze = DeepGaze IIE).")
@click.option("--weights", default=None,
              help="Teacher weights: a local path, an http(s) URL, a known name, or 'random' "
                   "(architecture only: labels are then meaningless). Default: the teacher's own.")
@click.option("--coco-root", type=LocalPath(path_type=Path), default=Path("data/coco"),
              help="COCO folder holding annotations/ and <split>/ (source coco).")
@click.option("--split", default="val2017", help="COCO split, e.g. train2017, val2017, test2017 (source coco).")
@click.option("--images", type=LocalPath(file_okay=False, path_type=Path), default=None,
              help="Folder of images, searched recursively (source folder).")
@click.option("--out", default="data/labels", metavar="PATH|URL", callback=path_or_url,
              help="Output root, a folder or an fsspec URL (s3://bucket/prefix); shards go to "
                   "<out>/<teacher>/<split or folder name>/.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, help="Images per shard.")
@click.option("--image-size", default="192x256", callback=image_size,
              help="Training resolution HxW of the stored jpg and label.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Images per teacher forward pass.")
@click.option("--jpeg-quality", type=click.IntRange(50, 100), default=95, help="Quality of the stored jpg.")
@click.option("--device", default="auto", callback=device_name, help="auto, cpu, cuda or cuda:N (cuda:N in-process; a Ray GPU actor uses the one GPU Ray gives it).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="auto = bf16 autocast on GPU, fp32 on CPU (recorded, resolved, in every shard).")
@click.option("--decode", type=click.Choice(["auto", "cpu", "cpu-reduced", "device"]), default="auto",
              help="Where JPEGs are decoded and resized: auto = on the teacher's GPU when it runs on one (nvJPEG), "
                   "except salgan's, else cpu-reduced, and on resuming where the folder's finished shards were; "
                   "cpu (OpenCV, on the --io-threads threads); cpu-reduced (the same, a JPEG at least twice the "
                   "size it is shrunk to decoded at 1/2, 1/4 or 1/8 of it); device (the teacher's device). "
                   "Recorded in every marker; see docs/benchmarks.md for which is faster.")
@click.option("--io-threads", type=click.IntRange(min=1), default=4,
              help="Threads per worker for reading, decoding and encoding images.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray",
              help="ray: actors on a local or existing Ray cluster; local: one worker in this process.")
@click.option("--address", envvar="RAY_ADDRESS", default=None, callback=ray_address,
              help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray).")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="GPUs to label on (Ray), each with --workers-per-gpu actors. Default: every GPU of the "
                   "cluster; 0 forces CPU workers.")
@click.option("--workers-per-gpu", type=click.IntRange(min=1), default=None,
              help="Ray GPU actors sharing each GPU, each with --io-threads threads: more keep a fast GPU busy "
                   "with a light teacher. Default: the teacher's (4 for salgan, 1 for the others); see "
                   "docs/benchmarks.md.")
@click.option("--cpu-workers", type=click.IntRange(min=1), default=1, help="CPU actors when no GPU is used.")
@click.option("--retries", type=click.IntRange(min=0), default=2, help="Retries of a failed shard.")
@click.option("--max-failure-rate", type=click.FloatRange(0, 1), default=0.01,
              help="Exit non-zero when more than this fraction of images failed.")
@click.option("--overwrite", is_flag=True,
              help="Label every shard again: each new shard replaces its old one as it is written (a refused run "
                   "deletes nothing).")
@click.option("--overwrite-changed", is_flag=True,
              help="Relabel finished shards made with other settings or whose images are not the ones this run "
                   "plans (an image left the source, or was replaced) and remove shards beyond the plan; the others "
                   "are kept.")
@click.option("--retry-failed", is_flag=True,
              help="Relabel the failed images of finished shards (each such shard is rewritten in plan order).")
@click.option("--allow-outside-root", is_flag=True,
              help="Label image paths that resolve outside the image folder (.., absolute, symlinks out).")
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=64 * 1024**2,
              help="Bigger image files are per-image failures.")
@click.option("--progress/--no-progress", default=True, help="Show progress (a bar on a terminal, else lines).")
def label_cmd(source, teacher, weights, coco_root, split, images, out, shard_size, image_size, batch_size,
              jpeg_quality, device, precision, decode, io_threads, executor, address, gpus, workers_per_gpu, cpu_workers,
              retries, max_failure_rate, overwrite, overwrite_changed, retry_failed, allow_outside_root,
              max_image_bytes, progress):
    """Label a COCO split or a folder of images with a teacher into WebDataset shards.

    Re-running the same command skips finished shards (per-image failures included) and redoes partial ones.
    """
    from pipeline.common.errors import error_message
    from pipeline.common.storage import as_path, check_bucket, is_url
    from pipeline.label.driver import exit_code, label, run_error
    from pipeline.label.worker import LabelConfig
    from pipeline.label.sources import coco_records, folder_records, left_out_note, other_outputs

    must_exist("coco_root" if source == "coco" else "images")
    if executor == "local":  # (a manifest may set them and switch the executor with --set: a warning, not a refusal)
        ray_only = given(click.get_current_context(), "address", "gpus", "workers_per_gpu", "cpu_workers")
        if ray_only:
            click.echo(f"warning: {', '.join(ray_only)} {'is' if len(ray_only) == 1 else 'are'} for --executor ray; "
                       "--executor local labels in this process and ignores "
                       f"{'it' if len(ray_only) == 1 else 'them'}", err=True)
    stride = max(students.student_info(n).stride for n in students.available())  # (every student's: 32)
    if any(side % stride for side in image_size):
        click.echo(f"warning: --image-size {image_size[0]}x{image_size[1]}: the students train on sizes whose sides "
                   f"are multiples of {stride} (their strides); `pipeline train` will refuse these labels", err=True)
    try:
        check_bucket(out)  # a misspelt bucket: before any image is labelled
        if source == "coco":
            records, name = coco_records(coco_root, split, allow_outside_root=allow_outside_root), split
        else:
            name = images.resolve().name
            # every teacher's label folders, when --out is inside --images: their previews are not inputs; nor
            # are other runs' outputs there (`predict`'s maps: they were labelled as photos)
            labels_here = [] if is_url(out) else [Path(out) / t for t in teachers.available()]
            others = other_outputs(images, labels_here)
            skipped: list[str] = []
            records = folder_records(images, allow_outside_root=allow_outside_root, exclude=[*labels_here, *others],
                                     others=skipped)
            if skipped:
                click.echo(left_out_note(skipped), err=True)
        if weights and Path(weights).expanduser().is_file():  # a Ray actor on another node, in another folder
            weights = str(Path(weights).expanduser().resolve())  # (the digest recorded is the file's: unchanged)
        config = LabelConfig(teacher=teacher, weights=weights, image_size=image_size, batch_size=batch_size,
                             jpeg_quality=jpeg_quality, device=device, precision=precision, io_threads=io_threads,
                             max_image_bytes=max_image_bytes, decode=decode)
        summary = label(records, as_path(out) / teacher / name, config, shard_size=shard_size, overwrite=overwrite,
                        overwrite_changed=overwrite_changed, retry_failed=retry_failed, executor=executor,
                        address=address, gpus=gpus, cpu_workers=cpu_workers, workers_per_gpu=workers_per_gpu,
                        retries=retries, progress=progress)
    except KeyboardInterrupt:
        again = ("the same command, with --overwrite, labels every shard again" if overwrite
                 else "run the same command again to label the rest")
        click.echo(f"interrupted: the finished shards are kept (each has its marker); {again}", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure is one "Error: <sentence>" line, never a traceback
        raise click.ClickException(error_message(e)) from None
    echo_result(summary, summary.failures, lambda f: f"{f['key']} ({f['file']}): {f['reason']}",
                listed=f"the shard-NNNNNN.json markers of {summary.folder}, under \"failures\"")
    for warning in summary.warnings:
        click.echo(f"warning: {warning}", err=True)
    code = exit_code(summary, max_failure_rate)
    if code:
        click.echo(f"Error: {run_error(summary, max_failure_rate)}", err=True)
    sys.exit(code)
