"""Files in and out: atomic writes, JSON reads and file digests, one spelling each.

Output is written to a temporary name beside the target, then renamed: an interrupted stage
therefore never leaves a half-written file that DVC could cache as a result.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from captioning.errors import InputError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success rename it over `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj) -> None:
    """Strict JSON: NaN and Infinity, which JSON.parse and most metrics readers reject, raise here."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv_atomic(path: str | Path, rows: list[dict]) -> None:
    """Rows of one shape as CSV with a header (DVC's plot files); no rows: a header of `step` alone."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["step"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_json(path: str | Path, missing: str = "") -> object:
    """Parse a JSON file; a missing or malformed one is an InputError naming it (and `missing`, the fix)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing{'; ' + missing if missing else ''}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in chunks (weights and archives are large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
