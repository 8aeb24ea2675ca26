"""Errors a user can fix, reported as one line.

Every error a user can cause (params, input files, weights, images, annotations, disk space, an
interrupted download) is a `UserError` whose message names the file or key and the fix. Stage
scripts run their `main` under `stage.run_stage`, which prints such an error as
`<stage>: <message>` on stderr, with no traceback, and exits with status 1. Anything else is a bug
in the pipeline and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave the pipeline; the message says what and how to fix it."""


class InputError(UserError, ValueError):
    """A file a stage reads is missing or malformed; the message names it."""
