"""The ``pipeline`` command group: every command of :mod:`pipeline.cli` under one name."""

from __future__ import annotations

import importlib
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping

import click

from pipeline import __version__
from pipeline.common.errors import storage_error
from pipeline.train.torchrun import launched

#: every command: (its module, its name there, the first sentence of its docstring, which `pipeline --help` shows
#: shortened and tests/test_cli.py keeps equal). A command's module is imported when the command runs, so that
#: `pipeline --help` and `--version` do not import torch (the commands' options come from the model registries).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "label": ("pipeline.cli.label", "label_cmd", "Label a COCO split or a folder of images with a teacher into "
                                                 "WebDataset shards."),
    "verify": ("pipeline.cli.verify", "verify_cmd", "Check a label folder (the one holding labels.json, or its URL: "
                                                    "s3://…): every tar against its marker's sha256 and key list, "
                                                    "labels.json against the markers, and with --deep that every image "
                                                    "and label decodes."),
    "weights": ("pipeline.cli.weights", "weights_group", "Fetch published weights into the cache, or convert a "
                                                         "release to a PyTorch checkpoint."),
    "train": ("pipeline.cli.train", "train_cmd", "Train a student (FastSal, SACT) on labelled shards; re-running "
                                                 "resumes after the last finished epoch."),
    "teachers": ("pipeline.cli.weights", "teachers_cmd", "List the teachers: output kind, input size, parameters, and "
                                                         "whether their weights are here and intact."),
    "fixations": ("pipeline.cli.score", "fixations_cmd", "Convert a fixation dataset (SALICON, MIT1003, CAT2000) once "
                                                         "into one HDF5 file for `pipeline eval`."),
    "eval": ("pipeline.cli.score", "eval_cmd", "Score a model on human fixations (--fixations) or on held-out teacher "
                                               "labels (--labels)."),
    "predict": ("pipeline.cli.score", "predict_cmd", "Write saliency maps (or a student's extra map) for a folder of "
                                                     "images, as PNGs or as one HDF5."),
    "profile": ("pipeline.cli.score", "profile_cmd", "Parameters, GFLOPs per image (torch's FLOP counter) and measured "
                                                     "images/s of a model."),
    "export": ("pipeline.cli.score", "export_cmd", "Export a student for serving: an ONNX graph from uint8 images to "
                                                   "logits, checked against PyTorch."),
    "run": ("pipeline.cli.run", "run_cmd", "Run the stale steps of MANIFEST in dependency order."),
    "status": ("pipeline.cli.run", "status_cmd", "Show each step of MANIFEST: up to date, stale (and why), never run "
                                                 "or failed; its last run and output folder."),
}


class _LazyCommands(Mapping):
    """:data:`COMMANDS` as click's ``Group.commands``: each command's module imported when it is looked up."""

    def __getitem__(self, name: str) -> click.Command:
        module, attr, _ = COMMANDS[name]
        # Ctrl-C and SIGTERM are held while it imports (torch: a second or two; longer from a cold network
        # filesystem, and they wait that long): raised inside one of torch's C++ callbacks they aborted the process
        # (exit 134, a page of C++ frames; 3 of 60 tries), so they are taken once it has imported, where unblocking
        # them delivers them. (Threads the import starts keep them blocked: they go to this, the main, thread.)
        hold = hasattr(signal, "pthread_sigmask")
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if hold else None
        try:
            try:
                command = getattr(importlib.import_module(module), attr)
            finally:
                if hold:
                    signal.pthread_sigmask(signal.SIG_SETMASK, before)
        except KeyboardInterrupt:  # as pipeline.cli.start says (not click's "Aborted!", exit status 1)
            raise SystemExit(130) from None
        return command

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(COMMANDS))

    def __len__(self) -> int:
        return len(COMMANDS)


class _Commands(click.Group):
    """The group of :data:`COMMANDS`; its help lists them by their short help, importing none."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        rows = [(name, click.Command(name, help=COMMANDS[name][2]).get_short_help_str(limit))
                for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
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
