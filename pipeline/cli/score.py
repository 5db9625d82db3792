"""Commands that score models: ``fixations``, ``eval``, ``predict``, ``profile``.

``eval``, ``predict`` and ``profile`` name their model the same way: exactly one of ``--checkpoint``
(a ``pipeline train`` run folder or checkpoint), ``--teacher`` (with ``--weights``) or ``--student``
(with ``--weights``, e.g. the FastSal authors' files).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import click

import students
import teachers

from pipeline.cli.options import (Checked, FiniteFloat, LocalPath, build_model, calibration_options, echo_result, given,
                                  model_check, model_options, must_exist, output_path, path_or_url, runtime_check,
                                  runtime_option, student_output_check, with_runtime)
from pipeline.cli.options import image_size as parse_size
from pipeline.common.atomic import write_json
from pipeline.common.errors import error_message


def check_input_size(predictor, image_size) -> None:
    """A student's input size (--image-size, else its own) fits it: H and W multiples of its stride, and SACT's
    --tile dividing every block's map; else a usage error (before any work)."""
    if not predictor.student:
        return
    if image_size:
        stride = predictor.model.stride
        if image_size[0] % stride or image_size[1] % stride:
            raise click.BadParameter(f"{predictor.model.name} needs H and W multiples of {stride}, e.g. 192x256; "
                                     f"got {image_size[0]}x{image_size[1]}", param_hint="'--image-size'")
    size = image_size or predictor.input_size
    if size:
        try:
            predictor.model.check_size(*size)
        except ValueError as e:
            raise click.UsageError(f"{predictor.model.name} at {size[0]}x{size[1]}: {e}") from None


def run_at(predictor, image_size) -> None:
    """A student run at ``image_size`` (``--image-size``) instead of its own input size, checked first; the
    predictor's name says so (with a teacher, a usage error :func:`model_check` has said)."""
    check_input_size(predictor, image_size)
    if image_size is None:
        return
    predictor.input_size = tuple(image_size)
    predictor.name = f"{predictor.name} at {image_size[0]}x{image_size[1]}"


#: eval's and predict's --image-size
image_size_option = click.option(
    "--image-size", default=None, callback=parse_size,
    help="Run a student at HxW instead of its own input size (a checkpoint's training size; 192x256 for "
         "--student): these students are fully convolutional, and SACT's computation depends on it.  [default: the "
         "student's own]")


@click.command("fixations")
@click.argument("dataset", type=click.Choice(["salicon", "mit1003", "cat2000"]))
@click.option("--root", type=LocalPath(path_type=Path), required=True,
              help="The dataset as published (SALICON: fixations JSON or fixations/<split>/*.mat + images/; "
                   "MIT1003: ALLSTIMULI/ + ALLFIXATIONMAPS/; CAT2000: Stimuli/ + FIXATIONLOCS/).")
@click.option("--split", type=click.Choice(["train", "val"]), default=None,  # (fixations.SALICON_SPLITS)
              help="SALICON only (and required there): train or val.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), required=True,
              metavar="PATH|URL", callback=path_or_url,
              help="The HDF5 file to write (atomically), or its URL (s3://…: written locally, then uploaded).")
def fixations_cmd(dataset, root, split, out):
    """Convert a fixation dataset (SALICON, MIT1003, CAT2000) once into one HDF5 file for `pipeline eval`."""
    from pipeline.score.fixations import FixationError, convert

    if dataset == "salicon" and split is None:
        raise click.UsageError("salicon needs --split train or --split val (its fixations are published per split)")
    if dataset != "salicon" and split is not None:
        raise click.BadParameter(f"{dataset} has no splits (--split is for salicon only)", param_hint="'--split'")
    must_exist("root")
    out = output_path(out)
    try:
        fs = convert(dataset, root, out, split)
    except FixationError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a file it cannot read, a full disk, a folder that refuses the file: one line
        raise click.ClickException(error_message(e)) from None
    click.echo(f"{out}: {len(fs)} image{'' if len(fs) == 1 else 's'}, {fs.n_fixations} fixation"
               f"{'' if fs.n_fixations == 1 else 's'}, {fs.n_skipped} skipped outside their image")


def _scoring_check(ctx: click.Context) -> None:
    """eval scores against one reference, and its options of the other way of scoring (against labels, or against
    human fixations) would be ignored."""
    if (ctx.params.get("fixations") is None) == (ctx.params.get("labels") is None):
        raise click.UsageError("give exactly one of --fixations FILE.h5 or --labels FOLDER", ctx)
    map_name = ctx.params.get("map_name") or "saliency"
    if map_name != "saliency" and ctx.params.get("fixations") is None:
        raise click.UsageError(f"--map {map_name} is calibrated and scored on human fixations: give --fixations", ctx)
    if ctx.params.get("fixations") is not None and given(ctx, "val_shards"):
        raise click.UsageError("--val-shards goes with --labels (the held-out shards of a label folder); "
                               "--fixations scores every image of the file (--limit takes fewer)", ctx)
    human = given(ctx, "baseline", "sigma_frac") if ctx.params.get("fixations") is None else []
    if human:
        raise click.UsageError(f"{' and '.join(human)} {'goes' if len(human) == 1 else 'go'} with --fixations "
                               "(the human-fixation metrics); --labels scores against the teacher's labels", ctx)


@click.command("eval", cls=Checked, checks=(model_check(), student_output_check, _scoring_check))
@model_options
@click.option("--fixations", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="PATH|URL", callback=path_or_url,
              help="A fixation HDF5 from `pipeline fixations` (or its URL, s3://…): all 8 metrics against human "
                   "fixations.")
@click.option("--labels", type=click.Path(file_okay=False, path_type=str), default=None,
              metavar="PATH|URL", callback=path_or_url,
              help="A finished label folder (or its URL, s3://…): CC, KLDiv, SIM, NSS against the teacher's labels "
                   "in its last shards.")
@click.option("--val-shards", type=click.IntRange(min=0), default=1,
              help="With --labels: how many last shards (0: every shard, for a folder that is all held out).")
@click.option("--baseline", type=click.Choice(["centerbias", "uniform"]), default="centerbias",
              help="IG baseline: the dataset's own fixations pooled and blurred, or uniform.")
@click.option("--sigma", "sigma_frac", type=FiniteFloat(0, 0.5), default=0.034,
              help="Blur of the empirical fixation map (CC, KLDiv, SIM), as a fraction of the image's longer side.")
@click.option("--map", "map_name", type=click.Choice(["saliency", *students.registry.all_maps()]), default="saliency",
              help="Which map of a student to score: its saliency, or an extra map (SACT's ponder map) scored "
                   "as unsupervised saliency: blurred, normalised and mixed with a centre baseline, both fitted "
                   "on the first half of each category of --fixations and scored on the other half.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Score only the first N images (with an extra --map: N of each half).")
@image_size_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--io-threads", type=click.IntRange(min=1), default=4, help="Threads decoding images and scoring.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="PATH|URL", callback=path_or_url,
              help="Write the metrics (means and per image) to this JSON file, or its URL (s3://…: written "
                   "locally, then uploaded).")
@click.option("--progress/--no-progress", default=True)
def eval_cmd(checkpoint, teacher, student, student_options, weights, student_output, device, precision, fixations,
             labels, val_shards, baseline, sigma_frac, map_name, limit, image_size, batch_size, io_threads, out,
             progress):
    """Score a model on human fixations (--fixations) or on held-out teacher labels (--labels)."""
    from pipeline.train.data import DataError
    from pipeline.score.calibrate import evaluate_calibrated
    from pipeline.score.evaluate import evaluate_fixations, evaluate_shards
    from pipeline.common.storage import local_file
    from pipeline.score.fixations import FixationError, read_hdf5

    with interrupted_says("nothing was scored to keep (the scores are printed, and --out written, once every "
                          "image is scored): run the same command again"):
        must_exist("labels", "fixations", urls=True)
        out = output_path(out)
        try:
            fs = None
            if fixations:
                with local_file(fixations) as f:  # on object storage: downloaded, read whole
                    fs = read_hdf5(f)
        except FixationError as e:
            raise click.ClickException(str(e)) from None
        predictor = build_model(checkpoint, teacher, student, weights, student_output, device, precision,
                                student_options=student_options, map_name=map_name)
        run_at(predictor, image_size)
        calibration = None
        try:
            if map_name != "saliency":
                result, calibration = evaluate_calibrated(predictor, fs, batch_size=batch_size, baseline=baseline,
                                                          sigma_frac=sigma_frac, io_threads=io_threads, limit=limit,
                                                          progress=progress)
            elif fs is not None:
                result = evaluate_fixations(predictor, fs, batch_size=batch_size, baseline=baseline,
                                            sigma_frac=sigma_frac, io_threads=io_threads, limit=limit,
                                            progress=progress)
            else:
                result = evaluate_shards(predictor, labels, val_shards=val_shards, batch_size=batch_size, limit=limit,
                                         progress=progress)
        except (DataError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        if fs is not None:
            result.settings["file"] = str(fixations)
        echo_result(result, result.failures, lambda f: f"{f['path']}: {f['reason']}")
        if calibration is not None:
            c = calibration
            click.echo(f"calibration: blur {c.blur_frac:g} of the longer side, centre weight {c.center_weight:g} "
                       f"(AUC-Judd {c.auc_judd:.4f} on {c.images} images; the centre baseline alone "
                       f"{c.center_auc_judd:.4f})")
            if c.center_only:
                click.echo(f"warning: the {map_name} map adds nothing to the centre baseline on the calibration half "
                           "(the best fit scores no better than the centre alone): the scores above are the centre "
                           "baseline's", err=True)
        if out:
            doc = result.to_json()
            if calibration is not None:
                doc["calibration"] = dataclasses.asdict(calibration)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                write_json(out, doc)
            except OSError as e:  # a full disk: the scores are above, the file is not written
                raise click.ClickException(f"cannot write {out} ({error_message(e)}); the scores above were not "
                                           "saved") from None
            click.echo(f"metrics: {out}")
        if not result.per_image:
            raise click.ClickException("no image could be scored")


@contextlib.contextmanager
def interrupted_says(kept: str):
    """Ctrl-C (or SIGTERM) in the block ends the command as `label` and `train` end: exit status 130 and one
    ``interrupted: <kept>`` line saying what is kept, not click's bare ``Aborted!`` (status 1)."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"interrupted: {kept}", err=True)
        raise SystemExit(130) from None


def _predict_check(ctx: click.Context) -> None:
    p = ctx.params
    map_name = p.get("map_name") or "saliency"
    if map_name != "saliency" and (p.get("compare_teacher") or p.get("runtime", "torch") != "torch"):
        raise click.UsageError(f"--map {map_name} goes with --runtime torch and without --compare-teacher (the "
                               "exported graph and the sheets are of the saliency map)", ctx)
    if p.get("compare_weights") and not p.get("compare_teacher"):
        raise click.UsageError("--compare-weights goes with --compare-teacher NAME", ctx)


@click.command("predict", cls=Checked, checks=(model_check(), student_output_check, runtime_check, _predict_check))
@model_options
@click.option("--images", type=LocalPath(file_okay=False, path_type=Path), required=True,
              help="Folder of images (searched recursively; not a label folder).")
@click.option("--out", type=click.Path(path_type=str), required=True, metavar="PATH|URL", callback=path_or_url,
              help="png: a folder (maps mirror the images' relative paths); hdf5: the file to write; either may be "
                   "a URL (s3://…: each file written locally, then uploaded, predictions.json last).")
@click.option("--format", "format_", type=click.Choice(["png", "hdf5"]), default="png",
              help="png: 8-bit maps; hdf5: float32 log densities, one dataset per image (pysaliency HDF5Model).")
@click.option("--compare-teacher", type=click.Choice(teachers.available()), default=None,
              help="Also write a sheet image | teacher | student per image (<out>/compare/<image>.png) and each "
                   "image's CC with this teacher.")
@click.option("--compare-weights", default=None, help="With --compare-teacher: that teacher's --weights.")
@click.option("--map", "map_name", type=click.Choice(["saliency", *students.registry.all_maps()]), default="saliency",
              help="Which map of a student to write: its saliency, or an extra map (SACT's ponder map: each PNG "
                   "scaled from its own minimum to its maximum; hdf5: the raw values).")
@image_size_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--io-threads", type=click.IntRange(min=1), default=4)
@runtime_option
@click.option("--progress/--no-progress", default=True)
def predict_cmd(checkpoint, teacher, student, student_options, weights, student_output, device, precision, images,
                out, format_, compare_teacher, compare_weights, map_name, image_size, batch_size, io_threads, runtime,
                calibration, calibration_images, progress):
    """Write saliency maps (or a student's extra map) for a folder of images, as PNGs or as one HDF5."""
    from pipeline.common.storage import is_url
    from pipeline.score.predict import (NoMaps, SheetClash, label_folder_as_images, predict_folder,
                                        writes_over_images)
    from pipeline.label.sources import SourceError

    must_exist("images", "calibration")
    out = output_path(out, folder=format_ == "png")
    if format_ == "hdf5" and not is_url(out) and Path(out).is_dir():
        raise click.ClickException(f"--out {out} is a folder; --format hdf5 writes one file: give its path")
    not_images = label_folder_as_images(images)
    if not_images:
        raise click.BadParameter(not_images, param_hint="'--images'")
    over = writes_over_images(images, out)
    if over:
        raise click.BadParameter(over, param_hint="'--out'")
    sheets = " and their sheets" if compare_teacher else ""
    if format_ == "png":  # (written atomically, each map is whole; predict_folder takes the old mark away first)
        kept = (f"the maps already written{sheets} are kept, but not {out}/predictions.json, written last to mark the "
                "folder complete: the same command maps every image again")
    else:  # (the file is written under a temporary name, removed on the way out)
        placed = "uploaded" if is_url(out) else "renamed into place"
        kept = (f"{out} is not written (it is {placed} once complete; a file there before is left as it "
                f"was){'; the sheets already written are kept' if compare_teacher else ''}: run the same command "
                "again")
    with interrupted_says(kept):
        predictor = build_model(checkpoint, teacher, student, weights, student_output, device, precision,
                                student_options=student_options, map_name=map_name)
        run_at(predictor, image_size)
        predictor = with_runtime(predictor, runtime, calibration=calibration, calibration_images=calibration_images)
        compare = None
        if compare_teacher:
            compare = build_model(None, compare_teacher, None, compare_weights, student_output, device, precision,
                                  options={"--weights": "--compare-weights", "--teacher": "--compare-teacher"})
        none = ""
        try:
            result = predict_folder(predictor, images, out, fmt=format_, batch_size=batch_size,
                                    io_threads=io_threads, progress=progress, compare=compare)
        except SourceError as e:
            raise click.ClickException(str(e)) from None
        except SheetClash as e:  # a usage mistake: said before anything is written
            raise click.BadParameter(str(e), param_hint="'--compare-teacher'") from None
        except NoMaps as e:  # its failures are shown, then the error
            result, none = e.result, str(e)
        except OSError as e:  # writing the maps: a full disk, a read-only folder (predictions.json is not written)
            raise click.ClickException(f"cannot write the maps to {out} ({error_message(e)})") from None
        echo_result(result, result.failures, lambda f: f"{f['file']}: {f['reason']}")
        if none:
            raise click.ClickException(none)


@click.command("profile", cls=Checked, checks=(model_check(require_weights=False), student_output_check, runtime_check))
@model_options
@click.option("--image-size", default=None, callback=parse_size,
              help="Input HxW.  [default: the model's own: a checkpoint's training size, 192x256 for --student, "
                   "the teacher's input size, else 192x256]")
@click.option("--batch-size", type=click.IntRange(min=1), default=1)
@click.option("--iters", type=click.IntRange(min=1), default=10,
              help="Timed forward passes (after 3 warm-up; 8 with --runtime compile).")
@click.option("--images", type=click.Path(file_okay=False, path_type=str), default=None,
              metavar="PATH|URL", callback=path_or_url,
              help="Real images to measure on (a label folder's stored images, or its URL: s3://…; or a local "
                   "folder of images; the first "
                   "--max-images in sorted order): GFLOPs and the model's statistics are their mean, the timed "
                   "passes take batches of them in turn. SACT's computation depends on the image.  [default: one image of "
                   "random noise]")
@click.option("--max-images", type=click.IntRange(min=1), default=100, show_default=True,
              help="How many of --images' images.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="PATH|URL", callback=path_or_url,
              help="Also write JSON here (a file, or its URL: s3://…).")
@runtime_option
def profile_cmd(checkpoint, teacher, student, student_options, weights, student_output, device, precision, image_size,
                batch_size, iters, images, max_images, out, runtime, calibration, calibration_images):
    """Parameters, GFLOPs per image (torch's FLOP counter) and measured images/s of a model.

    FLOPs count 2 per multiply-add of convolutions and matrix products; resizing, concatenation, pixel shuffle
    and element-wise work are not counted. A student's encoder is also counted alone.

    --student needs no --weights here: an untrained model has the same size and speed (SACT's executed
    computation excepted: it follows its trained halting, so profile its checkpoint for that).
    """
    from pipeline.score.profile import profile

    must_exist("calibration")
    must_exist("images", urls=True)
    out = output_path(out)
    kept = ("nothing was measured to keep (the figures are printed" + (", and --out written," if out else "")
            + " once every pass has run): run the same command again")
    with interrupted_says(kept):
        predictor = build_model(checkpoint, teacher, student, weights, student_output, device, precision,
                                require_weights=False, student_options=student_options)
        check_input_size(predictor, image_size)
        predictor = with_runtime(predictor, runtime, image_size, calibration=calibration,
                                 calibration_images=calibration_images)
        measured_on = None
        if images:
            from pipeline.score.predictors import PredictorError
            from pipeline.score.quantize import calibration_images as load_images

            size = tuple(image_size or predictor.input_size or (192, 256))
            try:  # (what a folder of images leaves out is a note: line, as predict says it)
                measured_on = load_images(images, size, max_images, option="--images")
            except PredictorError as e:
                raise click.ClickException(str(e)) from None
        result = profile(predictor, input_size=image_size, batch_size=batch_size, iters=iters, images=measured_on,
                         images_from=images or "")
    click.echo(result.table())
    name = (predictor.reference if predictor.reference is not None else predictor.model).name  # (not a runtime's)
    if not images and any(m.stats for m in result.modes):
        click.echo(f"note: {name}'s computation depends on the image; --images DIR measures it on real "
                   "ones (the SACT paper's figures are means over a validation set)", err=True)
    if student and weights in (None, "random", "imagenet") and any(m.stats for m in result.modes):
        click.echo(f"note: this {name} is not trained for saliency: where its positions halt, and so its sparse "
                   "GFLOPs and ponder costs, follow its weights; profile a trained checkpoint for its real figures",
                   err=True)
    if out:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, result.to_json())
        except OSError as e:
            raise click.ClickException(f"cannot write {out} ({error_message(e)}); the figures above were not "
                                       "saved") from None
        click.echo(f"profile: {out}")


def _export_check(ctx: click.Context) -> None:
    p = ctx.params
    if (p.get("checkpoint") is None) == (p.get("student") is None):
        raise click.UsageError("name the student with exactly one of --checkpoint or --student", ctx)
    if (p.get("quantize") == "int8") != (p.get("calibration") is not None):
        raise click.UsageError("--quantize int8 needs --calibration (a label folder or a folder of images)"
                               if p.get("calibration") is None else "--calibration is for --quantize int8", ctx)
    if p.get("student") and p.get("weights") is None:
        raise click.UsageError(f"--student {p['student']} needs --weights: a trained file (for a model you trained, "
                               "use --checkpoint RUN_DIR), or random for the architecture alone (e.g. to time it)", ctx)
    if p.get("quantize") == "int8":
        from pipeline.score.quantize import quantize_mistake

        if mistake := quantize_mistake(p.get("student")):  # (a checkpoint's student is known once it is read)
            raise click.UsageError(mistake, ctx)


@click.command("export", cls=Checked, checks=(_export_check, model_check(require_weights=False), student_output_check))
@model_options(students_only=True)
@click.option("--format", "format_", type=click.Choice(["onnx"]), default="onnx", help="The file format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), required=True,
              metavar="PATH|URL", callback=path_or_url,
              help="The file to write, or its URL (s3://…: written locally, then uploaded).")
@click.option("--image-size", default=None, callback=parse_size,
              help="Input HxW of the graph (its batch is dynamic).  [default: a checkpoint's training size, else "
                   "192x256]")
@click.option("--opset", type=click.IntRange(13, 20), default=17,
              help="ONNX opset, 13 to 20 (what torch's exporter writes).")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="int8: ONNX Runtime's static quantization (weights per channel, activations calibrated on "
                   "--calibration's images; QLinear operators), checked by map CC on images after those.")
@calibration_options
def export_cmd(checkpoint, student, student_options, weights, student_output, format_, out, image_size, opset,
               quantize, calibration, calibration_images):
    """Export a student for serving: an ONNX graph from uint8 images to logits, checked against PyTorch."""
    from pipeline.score.predictors import PredictorError
    from pipeline.score.serving import export_onnx

    must_exist("calibration")
    out = output_path(out)
    # a checkpoint must have trained its saliency head (a hint-stage one has not); --student takes --weights random
    predictor = build_model(checkpoint, None, student, weights, student_output, "cpu", "fp32",
                            require_weights=checkpoint is not None, student_options=student_options)
    check_input_size(predictor, image_size)
    try:
        result = export_onnx(predictor, out, input_size=image_size, opset=opset,
                             calibration=calibration if quantize == "int8" else None,
                             calibration_images=calibration_images)
    except (PredictorError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a full disk, a folder gone: nothing is left at --out (the write is atomic)
        raise click.ClickException(f"cannot write {out} ({error_message(e)})") from None
    click.echo(result.table())
