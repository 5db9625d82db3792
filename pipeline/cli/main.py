"""The ``pipeline`` command group: every command of :mod:`pipeline.cli` under one name."""

from __future__ import annotations

import click

from pipeline import __version__
from pipeline.cli.label import label_cmd
from pipeline.cli.run import run_cmd, status_cmd
from pipeline.cli.score import eval_cmd, export_cmd, fixations_cmd, predict_cmd, profile_cmd
from pipeline.cli.train import train_cmd
from pipeline.cli.verify import verify_cmd
from pipeline.cli.weights import teachers_cmd, weights_group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pipeline")
def cli():
    """Saliency distillation pipeline: label images with teacher networks into WebDataset shards,
    train fast students from them, and score and profile every model."""


for _command in (label_cmd, verify_cmd, weights_group, train_cmd, teachers_cmd, fixations_cmd, eval_cmd,
                 predict_cmd, profile_cmd, export_cmd, run_cmd, status_cmd):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
