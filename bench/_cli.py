"""What a bench does when it is run by hand and something it needs is not there (a weights file, a GPU, a label
folder) or an option is wrong: one ``Error:`` line and exit status 1, as `pipeline` itself does, not a traceback.
Errors of any other kind (a bug in the bench or the project) keep their traceback."""

from __future__ import annotations

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
