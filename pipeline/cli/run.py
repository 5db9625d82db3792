"""``pipeline run`` and ``pipeline status``: thin click commands over the manifest runner."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.options import path_or_url

_manifest_arg = click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_set_opt = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                        help="Override a var of the manifest (repeatable); VALUE is read as YAML (8, true, text).")
_workdir_opt = click.option("--workdir", default=None, metavar="PATH|URL", callback=path_or_url,
                            help="Use this workdir instead of the manifest's: a folder (relative to the current "
                                 "directory) or an fsspec URL (s3://bucket/prefix).")
_checksums_opt = click.option("--checksums", is_flag=True,
                              help="Check finished outputs' checksums, not only that every file is there "
                                   "with its size (reads every shard), and that each is what its step made.")


def _root() -> click.Group:
    """The ``pipeline`` group this command runs under: its commands are the manifest's steps."""
    return click.get_current_context().find_root().command


def _check_steps(manifest, option: str, names: tuple[str, ...]) -> None:
    from pipeline.manifest.format import suggest

    for name in names:
        if name not in manifest.steps:
            raise click.BadParameter(f"no step {name!r} in {manifest.path}{suggest(name, manifest.steps)}",
                                     param_hint=option)


@click.command("run")
@_manifest_arg
@click.option("--dry-run", "-n", is_flag=True,
              help="Print the plan (step, action, reason), the commands and each step's missing weights; run nothing.")
@click.option("--force", "-f", multiple=True, metavar="STEP",
              help="Re-run STEP from scratch, and everything downstream of it (repeatable); with --only/--until, "
                   "STEP must be among the steps they select.")
@click.option("--only", multiple=True, metavar="STEP",
              help="Consider only STEP (repeatable); the other steps are not selected (nothing of them runs).")
@click.option("--until", multiple=True, metavar="STEP", help="Consider only STEP and its upstream (repeatable).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1,
              help="Steps that may run at the same time (independent ones, within --cpus/--gpus).")
@click.option("--keep-going", "-k", is_flag=True,
              help="After a step fails, still run the steps that do not depend on it.")
@_set_opt
@_workdir_opt
@click.option("--cpus", type=click.IntRange(min=1), default=None,
              help="CPUs to share among steps' declared resources.  [default: this machine's]")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="GPUs to share among steps' declared resources.  [default: this machine's]")
@_checksums_opt
def run_cmd(manifest, dry_run, force, only, until, jobs, keep_going, sets, workdir, cpus, gpus, checksums):
    """Run the stale steps of MANIFEST in dependency order.

    A step is skipped when its fingerprint (settings, declared inputs, the content of its upstream
    steps' outputs, the code version derived from the source) matches the last successful run and
    its outputs are complete; an interrupted step resumes. Each step runs as `pipeline <command> ...`
    in its own process group, its output prefixed with [step]; the steps die with the runner.
    State: <workdir>/.pipeline/state.json.
    """
    from pipeline.manifest.format import load_manifest
    from pipeline.manifest.runner import run_manifest

    m = _interruptible(load_manifest, manifest, sets, workdir, group=_root())
    _check_steps(m, "--force", force)
    _check_steps(m, "--only", only)
    _check_steps(m, "--until", until)
    if only or until:
        from pipeline.manifest.plan import selection

        left_out = [name for name in force if name not in selection(m, only, until)]
        if left_out:
            one = len(left_out) == 1
            raise click.BadParameter(f"{', '.join(left_out)} {'is' if one else 'are'} not among the steps --only/--until "
                                     f"select: name {'it' if one else 'them'} there too", param_hint="--force")
    sys.exit(_interruptible(run_manifest, m, jobs=jobs, force=force, only=only, until=until, keep_going=keep_going,
                            dry_run=dry_run, cpus=cpus, gpus=gpus, checksums=checksums))


@click.command("status")
@_manifest_arg
@_set_opt
@_workdir_opt
@_checksums_opt
def status_cmd(manifest, sets, workdir, checksums):
    """Show each step of MANIFEST: up to date, stale (and why), never run or failed; its last run and output folder."""
    from pipeline.manifest.format import load_manifest
    from pipeline.manifest.runner import load_state, runner_active, status_rows, table

    m = _interruptible(load_manifest, manifest, sets, workdir, group=_root())
    active = runner_active(m.workdir)
    click.echo(f"{m.path} (workdir {m.workdir}{'; a runner is active' if active else ''})")
    click.echo(table(["step", "state", "last run", "output"],
                     _interruptible(status_rows, m, load_state(m.workdir), checksums=checksums, active=active)))


def _interruptible(fn, *args, **kwargs):
    """``fn(...)``, where Ctrl-C while no step runs (hashing a big input, checking outputs, the report) ends the
    command as an interrupted one: exit status 130 and one line, as in every other command (click's own handling
    says "Aborted!", status 1). While steps run, the runner stops them itself and returns 130."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        click.echo("interrupted (no step was running): run the same command again to carry on", err=True)
        sys.exit(130)
