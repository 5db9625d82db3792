"""``pipeline train``: a student from labelled shards."""

from __future__ import annotations

import click

import students
import teachers
from pipeline.cli.options import (Checked, FiniteFloat, device_name, floats3, given_student_options, increasing_epochs,
                                  must_exist, output_path, path_or_url, ray_address, renamed, student_options)


def _settings_check(ctx: click.Context) -> None:
    """The student, its options, the stage and the hint teacher together (the registries say; nothing is read)."""
    from pipeline.train.loop import settings_mistake

    p = ctx.params
    mistake = settings_mistake(student=p["student"], student_options=given_student_options(ctx), stage=p["stage"],
                               teacher=p.get("teacher"))
    if mistake:
        raise click.UsageError(mistake, ctx)


@click.command("train", cls=Checked, checks=(_settings_check,))
@click.option("--labels", type=click.Path(path_type=str), multiple=True, metavar="PATH|URL", callback=path_or_url,
              default=["data/labels/deepgaze/train2017"],
              help="A finished label folder (the one holding labels.json), or its URL (s3://…); repeat to train on "
                   "several of one teacher.")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=str), metavar="PATH|URL", callback=path_or_url,
              default=f"runs/{students.registry.DEFAULT_STUDENT}",
              help="Run folder: checkpoints/, losses.csv, metrics.csv, curves.png; or a URL (s3://…), written "
                   "through a local copy after every epoch. (--run-dir: the same, for torchrun's command line, "
                   "which reads --run as its own --run-path.) Not inside a label folder.")
@click.option("--student", type=click.Choice(students.available()), default=students.registry.DEFAULT_STUDENT)
@click.option("--stage", type=click.Choice(["finetune", "hint"]), default="finetune",
              help="finetune: on the pseudo-labels; hint: MSE to the teacher's 4 feature maps (Eq. 1).")
@click.option("--epochs", type=click.IntRange(min=1), default=100)
@click.option("--lr", type=FiniteFloat(min=0), default=0.01, help="SGD learning rate.")
@click.option("--momentum", type=FiniteFloat(0, 1), default=0.9)
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.0)
@click.option("--milestones", default="15,30,60", callback=increasing_epochs,
              help="Epochs where the lr is multiplied by --gamma.")
@click.option("--gamma", type=FiniteFloat(min=0), default=0.1)
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--val-shards", type=click.IntRange(min=1), default=1,
              help="Without --val-labels: the last shards of the last --labels folder, held out for validation.")
@click.option("--val-labels", type=click.Path(path_type=str), default=None, metavar="PATH|URL", callback=path_or_url,
              help="Validate on this label folder (e.g. val2017's) instead of holding out training shards.")
@click.option("--shuffle-buffer", type=click.IntRange(min=0), default=1000, help="Samples in the shuffle buffer.")
@click.option("--workers", type=click.IntRange(min=0), default=2, help="DataLoader workers decoding shards.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0)
@click.option("--device", default="auto", callback=device_name, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["auto", "off", "bf16"]), default="auto", help="auto = bf16 on GPU.")
@click.option("--backbone-weights", default="imagenet",
              help="Encoder init (MobileNetV2 for fastsal_*, ResNet-50/101 for sact/act): imagenet (torchvision "
                   "weights, cached or downloaded), none, or a PATH to that torchvision model's state dict.")
@click.option("--init", "init_ckpt", type=click.Path(path_type=str), default=None,
              metavar="PATH|URL", callback=path_or_url,
              help="Start from this checkpoint's model weights (e.g. the hint stage's last checkpoint): a checkpoint "
                   "file or run folder, or its URL (s3://…).")
@click.option("--teacher", type=click.Choice(teachers.available()), default=None,
              help="Hint stage: the teacher run online for hint targets.")
@click.option("--teacher-weights", default=None, help="Hint stage: the teacher's --weights.")
@click.option("--loss-weights", default="1,1,1", callback=floats3,
              help="Density teachers (Eq. 3): weights of KL, 1-cosine and BCE (the paper: 1,1,1; the "
                   "authors' code: 0.5,0.2,0.3).")
@click.option("--gt-maps", type=click.Path(path_type=str), default=None, metavar="PATH|URL", callback=path_or_url,
              help="A folder (or URL) of human saliency maps, each named as its image with .png (or .jpg): their "
                   "BCE joins the teacher's (Eq. 2; map teachers such as salgan), e.g. SALICON's maps/train.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Cap on steps per epoch.")
@click.option("--ray-workers", type=click.IntRange(min=0), default=0,
              help="Train data-parallel on this many Ray Train workers (one GPU each when the cluster has them); "
                   "0: in this process (or in each process torchrun started). --batch-size is per worker.")
@click.option("--address", envvar="RAY_ADDRESS", default=None, callback=ray_address,
              help="With --ray-workers: the Ray cluster (default: $RAY_ADDRESS, else start a local Ray).")
@click.option("--restart", is_flag=True, help="Delete the run's checkpoints and logs and start over.")
@click.option("--verify/--no-verify", default=True,
              help="Check every shard's sha256 against its marker before reading it (once per run).")
@click.option("--max-bad-samples", type=click.IntRange(min=0), default=10,
              help="Samples whose image or label does not decode that are skipped (each logged) before the run stops.")
@click.option("--progress/--no-progress", default=True)
@student_options
def train_cmd(labels, run_dir, student, student_options, stage, epochs, lr, momentum, weight_decay, milestones, gamma, batch_size,
              val_shards, val_labels, shuffle_buffer, workers, seed, device, amp, backbone_weights, init_ckpt, teacher,
              teacher_weights, loss_weights, gt_maps, steps_per_epoch, ray_workers, address, restart, verify, max_bad_samples,
              progress):
    """Train a student (FastSal, SACT) on labelled shards; re-running resumes after the last finished epoch."""
    from pipeline.common.errors import error_message
    from pipeline.common.storage import StorageError, as_path
    from pipeline.train.data import DataError
    from pipeline.train.config import TrainConfig, TrainError
    from pipeline.train.logs import read_metrics, summary_table
    from pipeline.train.loop import train
    from teachers.weights import WeightsError

    must_exist("labels", "val_labels", hint=" (label folders are made by `pipeline label`)", urls=True)
    must_exist("gt_maps", urls=True)
    if "://" in run_dir:  # a misspelt bucket: before an epoch is trained (and lost with the staging folder)
        output_path(run_dir)
    from pipeline.train.checkpoints import resumes

    if not resumes(run_dir, restart):  # (a run that resumes reads its checkpoint, not --init)
        must_exist("init_ckpt", urls=True)
    config = TrainConfig(labels=tuple(str(p) for p in labels), run=str(run_dir), student=student,
                         student_options=student_options, stage=stage,
                         epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, milestones=milestones,
                         gamma=gamma, batch_size=batch_size, val_shards=val_shards,
                         val_labels=str(val_labels) if val_labels else None, shuffle_buffer=shuffle_buffer,
                         workers=workers, seed=seed, device=device, amp=amp, backbone_weights=backbone_weights,
                         init=str(init_ckpt) if init_ckpt else None, teacher=teacher,
                         teacher_weights=teacher_weights, loss_weights=loss_weights,
                         gt_maps=str(gt_maps) if gt_maps else None,
                         steps_per_epoch=steps_per_epoch, max_bad_samples=max_bad_samples)
    from pipeline.train.loop import as_places
    from pipeline.train.torchrun import PeerFailed, launched, train_with_torchrun

    peer = launched()  # (rank, local rank, world) under torchrun
    places = as_places({"labels": list(config.labels), "val_labels": config.val_labels})
    if places["val_labels"] in places["labels"] and (not peer or peer[0] == 0):
        click.echo(f"warning: --val-labels {val_labels} is also a --labels folder: the validation scores are on "
                   "training images", err=True)
    if peer and ray_workers:  # (process 0 alone prints it: pipeline.cli.main)
        raise click.UsageError("--ray-workers under torchrun: launch with one of them (torchrun already started "
                               f"{peer[2]} processes)")
    again = "the same command without --restart" if restart else "the same command"  # (with it: anew again)
    try:
        if peer:
            results = train_with_torchrun(config, restart=restart, progress=progress, verify=verify)
        elif ray_workers:
            from pipeline.train.ray_train import train_on_ray

            results = train_on_ray(config, workers=ray_workers, address=address, restart=restart, progress=progress,
                                   verify=verify)
        else:
            results = train(config, restart=restart, progress=progress, verify=verify)
    except PeerFailed:
        raise SystemExit(1) from None  # process 0 said why
    except KeyboardInterrupt:
        if not peer or peer[0] == 0:
            click.echo(f"interrupted: the run resumes after its last finished epoch when {again} runs again", err=True)
        raise SystemExit(130) from None
    except WeightsError as e:  # the teacher's weights: --teacher-weights here
        raise click.ClickException(renamed(str(e), {"--weights": "--teacher-weights"})) from None
    except (DataError, TrainError, StorageError, KeyError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"").replace("the same command runs again", f"{again} runs again")) \
            from None
    except OSError as e:  # a full disk or a folder that refuses writes, while the run writes its logs or curves
        raise click.ClickException(f"cannot write the run's files ({error_message(e)}); the run resumes after its "
                                   f"last saved epoch when {again} runs again") from None
    if peer and peer[0] != 0:
        return  # process 0 reports
    run = as_path(run_dir)
    try:  # the epochs calls before this one trained: the table is the run's
        earlier = [r for r in read_metrics(run) if not results or r.epoch < results[0].epoch]
    except (OSError, KeyError, ValueError):  # (no metrics.csv, or not one this version reads: this call's alone)
        earlier = []
    click.echo(summary_table(results, earlier))
    click.echo(f"checkpoints: {run / 'checkpoints'}   curves: {run / 'curves.png'}")
