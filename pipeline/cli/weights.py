"""``pipeline weights list|fetch|convert`` and ``pipeline teachers``: models and their weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from pipeline.cli.options import LocalPath
from pipeline.common.tables import table


@click.group("weights")
def weights_group():
    """Fetch published weights into the cache, or convert a release to a PyTorch checkpoint."""


@weights_group.command("list")
def weights_list():
    """List the known weights names, their URLs and cache paths, and whether each is cached and intact."""
    from teachers.weights import KNOWN_WEIGHTS, cache_path, cached_state

    for name, known in sorted(KNOWN_WEIGHTS.items()):
        click.echo(f"{name}\t{known.url}\t{cache_path(name)} ({cached_state(name).summary})")


@weights_group.command("fetch")
@click.argument("spec")
def weights_fetch(spec):
    """Download SPEC into the cache and verify its digest: a teacher (everything it needs), a known
    name or an http(s) URL."""
    from teachers.fetch import fetch
    from teachers.weights import WeightsError

    try:
        lines = fetch(spec)
    except WeightsError as e:
        raise click.ClickException(str(e)) from None
    for line in lines:
        click.echo(line)


@weights_group.command("convert")
@click.argument("src", type=LocalPath(dir_okay=False, path_type=Path))
@click.argument("dst", type=LocalPath(dir_okay=False, path_type=Path))
def weights_convert(src, dst):
    """Convert SalGAN's Lasagne release (gen_modelWeights0090.npz) to a PyTorch checkpoint DST (.pt)."""
    from teachers.salgan import save_converted
    from teachers.weights import WeightsError, file_digest

    if not src.is_file():  # (the house's sentence, with where the file comes from)
        raise click.BadParameter(f"{src} does not exist; `pipeline weights fetch salgan` downloads SalGAN's release "
                                 "and prints this command with its path", param_hint="'SRC'")
    try:
        out = save_converted(src, dst)
    except WeightsError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}  sha256 {file_digest(out)}  (use: --teacher salgan --weights {out})")


@click.command("teachers")
def teachers_cmd():
    """List the teachers: output kind, input size, parameters, and whether their weights are here and intact."""
    from teachers import build_teacher
    from teachers.fetch import weights_status
    from teachers.registry import available

    rows = [("teacher", "output", "input (HxW)", "parameters", "weights")]
    for name in available():
        with warnings.catch_warnings():  # architecture only, to count: nothing of its weights to warn about
            warnings.simplefilter("ignore")
            model = build_teacher(name, weights=None if name == "classic" else "random")
        size = "any" if model.input_size is None else f"{model.input_size[0]}x{model.input_size[1]}"
        rows.append((name, model.output_kind, size, f"{sum(p.numel() for p in model.parameters()):,}",
                     weights_status(name)))
    click.echo(table(rows[0], rows[1:]))
