"""What a bench does when it is run by hand and something it needs is not there (a weights file, a GPU, a label
folder) or an option is wrong: one ``Error:`` line and exit status 1, as `pipeline` itself does, not a traceback.
Errors of any other kind (a bug in the bench or the project) keep their traceback."""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

from pipeline.common.errors import error_message

#: the packages whose exceptions say what the user should fix (DeviceError, WeightsError, TrainError, …)
OURS = ("pipeline", "students", "teachers")


def run(main: Callable[[], object]) -> None:
    """Call ``main`` (a click command or an argparse main), with the project's own errors said in one line."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of the project's own
        if type(e).__module__.split(".")[0] not in OURS:
            raise
        print(f"Error: {error_message(e)}", file=sys.stderr)
        sys.exit(1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """An argparse bench's ``--help``: its docstring as written, and each option's default, as click's
    ``show_default`` gives the click benches. Not for flags, options whose default is None, or whose help says
    its default already."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return (bool(action.option_strings) and action.default is not None and action.default is not argparse.SUPPRESS
                and not isinstance(action.default, bool) and "default" not in (action.help or ""))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # (argparse prints no help line for these)
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if self._shows_default(action):
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def machine_line(device=None) -> str:
    """What a bench's figures were measured on, in one line: the machine, its CPUs, the GPU that ``device`` (a
    ``cuda`` device) names, torch's version and threads, and Python's version."""
    import os
    import platform

    import torch

    dev = torch.device(device) if device is not None else None
    gpu = torch.cuda.get_device_name(dev) if dev is not None and dev.type == "cuda" and torch.cuda.is_available() \
        else None
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu or 'no GPU'}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")
