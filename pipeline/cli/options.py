"""Option types and option groups the commands share (choice lists come from the registries)."""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from pathlib import Path

import click

import students
import teachers

from pipeline.common.tables import plural
from pipeline.score.serving import DEFAULT_CALIBRATION_IMAGES
from teachers.weights import is_http_url


#: the largest side --image-size takes (a model's input: 8192x8192 is already 0.8 GB as fp32 RGB)
MAX_SIDE = 8192


def image_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", value)
    if not m or not all(16 <= int(v) <= MAX_SIDE for v in m.groups()):
        raise click.BadParameter(f"expected HxW with both from 16 to {MAX_SIDE}, e.g. 192x256; got {value!r}")
    return int(m.group(1)), int(m.group(2))


def must_exist(*names: str, hint: str = "", urls: bool = False) -> None:
    """The local paths given to the running command's parameters ``names`` must exist: a wrong one is a
    usage mistake (exit 2, like any bad option value), not a failure of the work. URLs (``s3://…``) are
    checked when they are read, or here with ``urls`` (a checkpoint: an object, or a run folder's prefix); an
    http(s) URL is refused there: fsspec's http filesystem cannot list a run folder, and it called a file the
    server serves missing (``--weights`` takes http(s) URLs through :mod:`teachers.weights`, not here).
    Called from a command's body, not as a callback: a manifest validates its steps' command lines before
    their upstream steps have made the folders they name."""
    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}
    for name in names:
        value = ctx.params.get(name)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if urls and v is not None and is_http_url(v):
                raise click.BadParameter(HTTP_REFUSED.format(v), ctx=ctx, param=params[name])
            if v is not None and missing(v, urls=urls):
                raise click.BadParameter(f"{v} does not exist{hint}", ctx=ctx, param=params[name])


#: an http(s) URL where a path or an object-storage URL is read (``--weights`` takes them, through teachers.weights)
HTTP_REFUSED = ("{} is an http(s) URL; this option takes a path or an object-storage URL (s3://, gs://…): download "
                "the file first and give its path")


def missing(path, urls: bool = True) -> bool:
    """``path`` (local, or with ``urls`` a URL: an object or a prefix holding some) is not there; a URL whose
    protocol cannot be used is the :class:`~pipeline.common.storage.StorageError` sentence (exit 1)."""
    if "://" not in str(path):
        return not os.path.exists(path)
    if not urls:
        return False
    from pipeline.common.storage import StorageError, as_path

    try:
        return not as_path(path).exists()
    except StorageError as e:
        raise click.ClickException(str(e)) from None


def output_path(value, *, folder: bool = False):
    """An output option's value as :func:`~pipeline.common.storage.as_path` gives it (None stays None), checked
    before any work, writing nothing: for a URL whose protocol cannot be used, the
    :class:`~pipeline.common.storage.StorageError` sentence; for a local path, a folder on its way that is a file,
    or the nearest existing folder not writable (permissions, a read-only filesystem), is one sentence (exit 1).
    ``folder``: the path is a folder to write into, not a file."""
    import tempfile

    from pipeline.common.errors import storage_error
    from pipeline.common.storage import StorageError, as_path, check_bucket, is_url

    try:
        out = None if value is None else as_path(value)
    except StorageError as e:  # (a URL no store reads as given)
        raise click.ClickException(str(e)) from None
    if out is not None and is_url(out):
        try:
            check_bucket(out)  # (and the protocol's package is there)
        except StorageError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:  # noqa: BLE001 - the store's own refusal (credentials, endpoint): its one line
            if not storage_error(e):
                raise
            raise click.ClickException(storage_error(e)) from None
    elif out is not None:
        probe = Path(out) if folder else Path(out).parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent  # the nearest part of the path that exists
        if not probe.is_dir():
            raise click.ClickException(f"cannot write --out {out}: {probe} is a file, not a folder")
        try:  # an unnamed file, gone when closed, asks the filesystem itself (access() says yes to root everywhere)
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            raise click.ClickException(f"cannot write --out {out}: the folder {probe} is not writable "
                                       f"({e.strerror or e})") from None
    return out


def device_name(ctx, param, value):
    """Click callback: a device name torch knows (``auto``, ``cpu``, ``cuda``, ``cuda:N``…); a mistyped one is a
    usage error (exit status 2) here, before any work. Whether the machine has it is the command's to say."""
    from pipeline.common.devices import DeviceError, resolve_device

    if value is not None and value != "auto":
        try:
            resolve_device(value)
        except DeviceError as e:
            raise click.BadParameter(str(e)) from None
    return value


def path_or_url(ctx, param, value):
    """A local path as ``pathlib`` writes it (``a//b/`` → ``a/b``; ``file:///abs/path`` is ``/abs/path``, so a
    local folder named by URL is locked and tidied as one named by path), a URL (``s3://bucket/key``) as given;
    each of a ``multiple`` option's values. An empty value (an unset shell variable, most likely) is refused: as a
    path it would be the current directory."""
    from pipeline.common.storage import file_path

    def one(v):
        if v is not None and not v.strip():
            raise click.BadParameter("an empty path (an unset shell variable?); write . for the current directory",
                                     ctx=ctx, param=param)
        if v is not None and (local := file_path(v)) is not None:
            v = local
        return v if v is None or "://" in v else str(Path(v))

    return tuple(one(v) for v in value) if isinstance(value, (tuple, list)) else one(value)


class LocalPath(click.Path):
    """A :class:`click.Path` that refuses an empty value as :func:`path_or_url` does (``Path("")`` is the current
    directory), and a URL in one sentence (``s3://b/k`` became ``s3:/b/k does not exist``); ``file://`` names a
    local path."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            path_or_url(ctx, param, value)
        if isinstance(value, str) and "://" in value:
            from pipeline.common.storage import file_path

            if file_path(value) is None:
                self.fail(f"{value} is a URL; this option reads a local or shared-filesystem path only (copy the "
                          "files to one)", param, ctx)
            value = file_path(value)
        return super().convert(value, param, ctx)


class FiniteFloat(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf`` (click lets ``nan`` past every bound)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def ray_address(ctx, param, value: str | None) -> str | None:
    """``--address`` given on the command line is host:port, or what Ray itself takes besides (``auto``: the
    cluster `ray start` runs on this machine; ``ray://host:port``: Ray Client): anything else is a usage mistake,
    found before any work. (``$RAY_ADDRESS`` is checked only when Ray is used: a command that runs no Ray ignores
    it.)"""
    source = ctx.get_parameter_source(param.name)
    if not value or source is None or source.name != "COMMANDLINE" or value == "auto" or value.startswith("ray://"):
        return value
    from pipeline.common.ray_cluster import RayClusterError, split_address

    try:
        split_address(value)
    except RayClusterError:
        raise click.BadParameter(f"{value!r} is not a Ray cluster address: give the head's host:port, as "
                                 "`ray start --head` prints it (e.g. 10.0.0.5:6379)") from None
    return value


def increasing_epochs(ctx, param, value: str) -> tuple[int, ...]:
    """Comma-separated epochs, each at least 1, increasing (``""``: none)."""
    epochs = ints(ctx, param, value)
    if any(e < 1 for e in epochs) or list(epochs) != sorted(set(epochs)):
        raise click.BadParameter(f"expected increasing epochs of at least 1, e.g. 15,30,60; got {value!r}")
    return epochs


def ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def floats3(ctx, param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or not any(parts):
        raise click.BadParameter(f"expected three comma-separated numbers of at least 0, not all 0 (KL,CC,BCE), "
                                 f"got {value!r}")
    return parts


def student_options(fn=None, *, training: bool = True):
    """Every option a registered student declares (``--tau``, ``--tile``…), gathered into one
    ``student_options`` dict argument holding those given (the student's defaults fill the rest). Without
    ``training`` (the commands that run a model), an option that weights the training loss alone is hidden from
    ``--help`` (still parsed, and refused: :func:`pipeline.score.predictors.options_mistake`)."""
    if fn is None:
        return functools.partial(student_options, training=training)
    declared = students.registry.all_options()
    owners = {name: [n for n in students.available() if any(o.name == name for o in students.student_info(n).options)]
              for name in declared}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in declared if kwargs.get(name) is not None}
        return fn(*args, student_options=given, **{k: v for k, v in kwargs.items() if k not in declared})

    def checked(ctx, param, value, opt):
        if value is None:
            return None
        value = opt.type(value)
        problem = opt.problem(value)
        if problem:
            raise click.BadParameter(problem)
        return value

    for name, opt in reversed(declared.items()):
        kind = click.Choice([str(c) for c in opt.choices]) if opt.choices else opt.type
        wrapper = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None,
                               callback=functools.partial(checked, opt=opt), hidden=opt.training_only and not training,
                               help=f"{opt.help} ({', '.join(owners[name])}; default {opt.default}).")(wrapper)
    return wrapper


def given_student_options(ctx: click.Context) -> dict:
    """The student options given, from a parsed context (before :func:`student_options` gathers them)."""
    return {name: ctx.params[name] for name in students.registry.all_options() if ctx.params.get(name) is not None}


class Checked(click.Command):
    """A command whose options are also checked together once parsed (``checks``: each takes the click context
    and raises a :class:`click.UsageError`). They run when the command line is parsed, and so also when `pipeline
    run` loads a manifest step of the command (it parses the step's options the same way), before any step runs."""

    def __init__(self, *args, checks=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.checks = tuple(checks)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        if not ctx.resilient_parsing:
            try:
                for check in self.checks:
                    check(ctx)
            except KeyboardInterrupt:  # (a check may import the model registries: Ctrl-C then is as at start-up)
                raise SystemExit(130) from None
        return rest


def given(ctx: click.Context, *names: str) -> list[str]:
    """Of the parameters ``names``, those given (on the command line, or as a manifest step's options), as their
    flags."""
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [flags[n] for n in names if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]


def student_output_check(ctx: click.Context) -> None:
    """--student-output with --checkpoint or --teacher would be ignored: a usage error."""
    p = ctx.params
    if p.get("student") is None and given(ctx, "student_output"):
        model = "--checkpoint" if p.get("checkpoint") else "--teacher" if p.get("teacher") else None
        if model is not None:
            raise click.UsageError(f"--student-output goes with --student, not {model} (a checkpoint records its "
                                   "student's output; a teacher's map is its own)", ctx)


def model_options(fn=None, *, students_only: bool = False):
    """--checkpoint | --teacher | --student (+ --weights and the student's options), --student-output, --device,
    --precision. ``students_only`` (export: a student's graph, traced on the CPU in fp32): no --teacher, --device
    or --precision."""
    if fn is None:
        return functools.partial(model_options, students_only=students_only)
    opts = [
        click.option("--checkpoint", type=click.Path(path_type=str), default=None,
                     metavar="PATH|URL", callback=path_or_url,
                     help="A `pipeline train` run folder (its latest checkpoint) or checkpoint file, or its URL "
                          "(s3://…, downloaded to a temporary file)."),
        None if students_only else click.option("--teacher", type=click.Choice(teachers.available()), default=None,
                                                help="A teacher, by name."),
        click.option("--student", type=click.Choice(students.available()), default=None,
                     help="A student by name, loaded from --weights (e.g. the FastSal authors' coco_A.pth)."),
        click.option("--weights", default=None,
                     help=f"Weights of {'' if students_only else '--teacher or '}--student: a path, an http(s) URL "
                          "or a known name; for a student also imagenet (its ImageNet backbone alone), and for "
                          "profile and export random (the architecture alone)."),
        click.option("--student-output", type=click.Choice(["softmax", "sigmoid"]), default="softmax",
                     help="With --student: its map is softmax over pixels (density-teacher training, "
                          "the authors' coco_* files) or sigmoid (SalGAN-teacher training, salicon_*)."),
        None if students_only else click.option("--device", default="auto", callback=device_name,
                                                help="auto, cpu, cuda or cuda:N."),
        None if students_only else click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
                                                default="auto", help="auto = bf16 autocast on GPU, fp32 on CPU."),
    ]
    opts = [o for o in opts if o is not None]
    fn = student_options(fn, training=False)
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def renamed(message: str, options: dict[str, str]) -> str:
    """A teachers' or students' message with the options it names (``--weights``, ``--teacher``) as the command
    calls them (``{"--weights": "--teacher-weights"}``)."""
    for name, instead in options.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", instead, message)
    return message


def build_model(checkpoint, teacher, student, weights, student_output, device, precision, require_weights=True,
                student_options=None, map_name="saliency", options: dict[str, str] | None = None):
    """The predictor the model options name; ``options``: those options as this command calls them
    (:func:`renamed`)."""
    from pipeline.score.predictors import PredictorError, build_predictor, options_mistake
    from teachers.weights import WeightsError

    if checkpoint is not None and is_http_url(checkpoint):
        raise click.BadParameter(HTTP_REFUSED.format(checkpoint), param_hint="'--checkpoint'")
    if checkpoint is not None and missing(checkpoint):
        raise click.BadParameter(f"{checkpoint} does not exist", param_hint="'--checkpoint'")
    mistake = options_mistake(checkpoint=checkpoint, teacher=teacher, student=student, weights=weights,
                              require_weights=require_weights, student_options=student_options)
    if mistake:  # a usage mistake, said (exit status 2) before any model is read or built
        raise click.UsageError(renamed(mistake, options or {}))
    try:
        return build_predictor(checkpoint=checkpoint, teacher=teacher, student=student, weights=weights,
                               student_output=student_output, device=device, precision=precision,
                               require_weights=require_weights, student_options=student_options,
                               map_name=map_name)
    except (PredictorError, WeightsError, ValueError) as e:
        raise click.ClickException(renamed(str(e), options or {})) from None


def one_line(text: str) -> str:
    """``text`` with its control characters written as Python escapes (``\\n``, ``\\x1b``): one line on a terminal."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: m.group().encode("unicode_escape").decode(), text)


def echo_result(result, failures: list[dict], describe, limit: int = 10, listed: str = "") -> None:
    """Print ``result.table()``, then the first ``limit`` failures (``describe(failure)`` each) on stderr; ``listed``:
    where every failure is written, said when some are not shown."""
    click.echo(result.table())
    for f in failures[:limit]:  # one line each, whatever a file's name holds (a newline, a terminal escape)
        click.echo(f"failed: {one_line(describe(f))}", err=True)
    if len(failures) > limit:
        click.echo(f"… and {plural(len(failures) - limit, 'more failure')}"
                   + (f" (every one is listed in {listed})" if listed else ""), err=True)
        # the causes behind the first few, counted (a second one would stay hidden), their numbers aside: "image
        # too small (10x8)" and "(12x6)" are one cause
        reasons = Counter(re.sub(r"\d+", "N", str(f.get("reason", ""))) for f in failures).most_common()
        if len(reasons) > 1:
            click.echo("failures by reason:", err=True)
            for reason, n in reasons[:5]:
                click.echo(f"  {n:>7}  {one_line(reason)}", err=True)
            if len(reasons) > 5:
                click.echo(f"  {sum(n for _, n in reasons[5:]):>7}  ({plural(len(reasons) - 5, 'other reason')})",
                           err=True)


def calibration_options(fn):
    """--calibration PATH and --calibration-images N: the images an int8 student is calibrated on."""
    fn = click.option("--calibration-images", type=click.IntRange(min=1), default=DEFAULT_CALIBRATION_IMAGES,
                      show_default=True,
                      help="How many of --calibration's images calibrate the int8 ranges (in sorted order).")(fn)
    return click.option("--calibration", type=LocalPath(file_okay=False, path_type=str), default=None,
                        help="A label folder (its stored images) or a folder of images: what the int8 "
                             "activation ranges are calibrated on (use images like those the student will "
                             "see).")(fn)


def runtime_option(fn):
    """--runtime, and the calibration options --runtime onnx-int8 needs."""
    fn = calibration_options(fn)
    return click.option(
        "--runtime", type=click.Choice(["torch", "onnx", "onnx-int8", "compile"]), default="torch",
        help="torch: PyTorch; onnx: the student exported in memory and run by ONNX Runtime on the CPU "
             "(needs the onnx extra); onnx-int8: the same, quantized to int8 on --calibration's images; "
             "compile: the student under torch.compile on --device (CUDA graphs on CUDA; needs a C++ compiler "
             "on the CPU).")(fn)


def runtime_check(ctx: click.Context) -> None:
    """--runtime with the model and --calibration (for :class:`Checked`)."""
    runtime, calibration = ctx.params.get("runtime", "torch"), ctx.params.get("calibration")
    if runtime != "torch" and ctx.params.get("teacher"):
        raise click.UsageError(f"--runtime {runtime} serves a student (--checkpoint or --student); a teacher runs "
                               "with --runtime torch", ctx)
    if runtime != "onnx-int8" and calibration is not None:
        raise click.UsageError("--calibration is for --runtime onnx-int8", ctx)
    if runtime == "onnx-int8" and calibration is None:
        raise click.UsageError("--runtime onnx-int8 needs --calibration: a label folder or a folder of images", ctx)
    if runtime == "onnx-int8":
        from pipeline.score.quantize import quantize_mistake

        if mistake := quantize_mistake(ctx.params.get("student")):  # (a checkpoint's: once it is read)
            raise click.UsageError(mistake, ctx)


def model_check(require_weights: bool = True):
    """A check (for :class:`Checked`) of how the model options name a model, made before anything is read or built
    (and by `pipeline run` when it loads a manifest, before any step runs): one model, its weights, the student's
    options, ``--map`` (a map the student has) and ``--image-size`` (a student's: a teacher runs at its own)."""

    def check(ctx: click.Context) -> None:
        from pipeline.score.predictors import options_mistake

        p, options = ctx.params, given_student_options(ctx)
        teacher, student = p.get("teacher"), p.get("student")
        mistake = options_mistake(checkpoint=p.get("checkpoint"), teacher=teacher, student=student,
                                  weights=p.get("weights"), require_weights=require_weights, student_options=options)
        if mistake:
            raise click.UsageError(mistake, ctx)
        if student:
            try:
                students.check_options(student, options)
            except ValueError as e:
                raise click.UsageError(str(e), ctx) from None
        map_name = p.get("map_name") or "saliency"
        if map_name != "saliency" and teacher:
            raise click.UsageError(f"--map {map_name} is a student's map; a teacher has its saliency map alone", ctx)
        if map_name != "saliency" and student:
            has = students.student_info(student).cls.extra_maps
            if map_name not in has:
                raise click.UsageError(f"{student} has no {map_name!r} map "
                                       + (f"(its maps: saliency, {', '.join(has)})" if has else "(only saliency)"), ctx)
        if teacher and p.get("image_size") and ctx.command.name in ("eval", "predict"):
            raise click.BadParameter("a teacher runs at its own input size; --image-size goes with a student "
                                     "(--checkpoint or --student)", ctx,
                                     param=next(q for q in ctx.command.params if q.name == "image_size"))

    return check


def with_runtime(predictor, runtime: str, input_size=None, *, calibration=None,
                 calibration_images: int = DEFAULT_CALIBRATION_IMAGES):
    """``predictor`` itself (torch), or the same student served by ONNX Runtime (int8 with ``calibration``) or
    compiled (the options were checked together by :func:`runtime_check`)."""
    if runtime == "torch":
        return predictor
    from pipeline.score.predictors import PredictorError
    from pipeline.score.serving import compile_predictor, onnx_predictor

    try:
        if runtime == "compile":
            return compile_predictor(predictor)
        return onnx_predictor(predictor, input_size, calibration=calibration, calibration_images=calibration_images)
    except (PredictorError, ValueError) as e:
        raise click.ClickException(str(e)) from None
