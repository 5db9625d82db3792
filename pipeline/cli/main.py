"""The ``pipeline`` command group: every command of :mod:`pipeline.cli` under one name."""

from __future__ import annotations

import signal
import sys
import warnings

import click

from pipeline import __version__
from pipeline.common.errors import storage_error
from pipeline.cli.label import label_cmd
from pipeline.cli.run import run_cmd, status_cmd
from pipeline.cli.score import eval_cmd, export_cmd, fixations_cmd, predict_cmd, profile_cmd
from pipeline.cli.train import train_cmd
from pipeline.cli.verify import verify_cmd
from pipeline.cli.weights import teachers_cmd, weights_group
from pipeline.train.torchrun import launched


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pipeline")
def cli():
    """Saliency distillation pipeline: label images with teacher networks into WebDataset shards,
    train fast students from them, and score and profile every model."""


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (ours, or a library's) as one ``warning: <sentence>`` line on stderr, no file:line or source."""
    text = " ".join(str(message).split())
    try:
        click.echo(f"warning: {text}", file=file if file is not None else sys.stderr)
    except (OSError, ValueError):
        pass


for _command in (label_cmd, verify_cmd, weights_group, train_cmd, teachers_cmd, fixations_cmd, eval_cmd,
                 predict_cmd, profile_cmd, export_cmd, run_cmd, status_cmd):
    cli.add_command(_command)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    warnings.showwarning = _one_line_warning  # the command line only: tests and notebooks keep their own
    # SIGTERM (`kill PID`, `timeout`, Slurm's and Kubernetes' stop) is taken as Ctrl-C is (label, train, run: one
    # `interrupted:` line, exit status 130, the lock let go; it ended the process at once, status 143, without a word)
    signal.signal(signal.SIGTERM, _terminated)
    peer = launched()
    if peer and peer[0] != 0:  # under torchrun every process parses the same command line: process 0 alone
        click.UsageError.show = lambda self, file=None: None  # says what is wrong with it (the exit code stays 2)
    try:
        cli(prog_name="pipeline")
    except Exception as e:  # noqa: BLE001 - only object storage's own errors (escaping a command) become a line
        if not storage_error(e):
            raise
        click.echo(f"Error: {storage_error(e)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
