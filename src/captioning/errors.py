"""Errors a user can fix, reported as one line.

Every error a user can cause (params, input files, weights, images, annotations, disk space, an
interrupted download) is a `UserError` whose message names the file or key and the fix. Stage
scripts run their `main` under `run_stage`, which prints such an error as `<stage>: <message>` on
stderr, with no traceback, and exits with status 1. Anything else is a bug in the pipeline and
keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem in what the user gave the pipeline; the message says what and how to fix it."""


def run_stage(stage: str, main: Callable[..., object], *args) -> None:
    """`main(*args)`, with user errors (and a full disk) reported in one line."""
    try:
        main(*args)
    except UserError as err:
        _stop(stage, str(err))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        _stop(stage, f"no space left on the device{where}: free some space (or point the output elsewhere) "
                     "and run the stage again; nothing half-written was kept")
    except KeyboardInterrupt:
        _stop(stage, "interrupted; run it again to continue (downloads and training resume where they stopped)",
              status=130)


def _stop(stage: str, message: str, status: int = 1) -> None:
    one_line = " ".join(line.strip() for line in message.splitlines())
    print(f"{stage}: {one_line}", file=sys.stderr, flush=True)
    sys.exit(status)
