"""Running a stage script: its `main` under `run_stage`, which reports a user's mistake in one
line (`errors.UserError`), a full disk and an interrupt likewise, and records the stage's time
for the pipeline run's MLflow record (`lineage`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable

from captioning import lineage
from captioning.errors import UserError


def run_stage(stage: str, main: Callable[..., object], *args) -> None:
    """`main(*args)`, with user errors (and a full disk) reported in one line. A stage that ends
    well records its time for the pipeline run's MLflow record (`lineage`)."""
    status = 1
    started = time.perf_counter()
    try:
        main(*args)
        lineage.record_stage(time.perf_counter() - started)
        return
    except UserError as err:
        message = str(err)
    except FileNotFoundError as err:  # an input no earlier stage has made yet (or the user removed)
        message = (f"{err.filename or err}: missing; run the stages before {stage} first (dvc repro {stage} runs "
                   "whatever it needs)")
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        message = (f"no space left on the device{where}: free some space (or point the output elsewhere) "
                   "and run the stage again; nothing half-written was kept")
    except KeyboardInterrupt:
        message = "interrupted; run it again to continue (downloads and training resume where they stopped)"
        status = 130
    # Printed here, after the except block has let go of the traceback: objects it kept alive
    # (a progress bar closing itself) print first, and this line comes last, on a line of its own.
    _stop(stage, message, status)


def _stop(stage: str, message: str, status: int = 1) -> None:
    one_line = " ".join(line.strip() for line in message.splitlines())
    print(f"{stage}: {one_line}", file=sys.stderr, flush=True)
    sys.exit(status)
