"""Fetch and unpack archives: resumable HTTP, checksums, safe extraction, a free-space check.

Only the standard library speaks HTTP here (urllib): the archives are plain static files and
one dependency fewer is one failure mode fewer on a fresh GPU box.

An archive is written as `<name>.part` while incomplete and renamed to `<name>` only after its
size and checksum match the table, so an interrupted or corrupted transfer never looks complete.
A `.part` left by an interruption is resumed with an HTTP Range request; a server that ignores
Range (answers 200 with the whole file) restarts the file cleanly instead of appending to it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from captioning.errors import UserError

CHUNK = 1 << 20  # bytes per read: large enough for speed, small enough for a live progress bar
# Statuses worth another try: the server or a proxy is busy or restarting, not refusing us.
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(UserError, RuntimeError):
    """A transfer, checksum or extraction failed; the message says what and where."""


@dataclass(frozen=True)
class Archive:
    name: str  # file name, also the name on a mirror (`<base_url>/<name>`)
    url: str  # the official address
    size: int | None  # published size in bytes; None: unpublished, the server's Content-Length
    # "md5:<hex>" or "sha256:<hex>"; a shorter hex is a prefix of the digest, as torchvision
    # publishes its weights' sha256 in their file names (resnet18-f37072fd.pth)
    checksum: str

    def hasher(self):
        algorithm = self.checksum.split(":", 1)[0]
        if algorithm not in ("md5", "sha256") or not re.fullmatch(r"[0-9a-fA-F]{8,}", self.digest):
            raise DownloadError(f"{self.name}: unsupported checksum {self.checksum!r} (md5:<hex> or sha256:<hex>, "
                                "at least 8 hex digits)")
        return hashlib.new(algorithm)

    @property
    def digest(self) -> str:
        return self.checksum.split(":", 1)[1].lower()

    def matches(self, hexdigest: str) -> bool:
        return hexdigest.startswith(self.digest)


def fetch(archive: Archive, folder: str | Path, *, base_url: str = "", retries: int = 5,
          backoff: float = 2.0, timeout: float = 60.0) -> Path:
    """Download `archive` into `folder` (resuming a `.part`), verify it, return its final path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / archive.name, folder / f"{archive.name}.part"
    if final.is_file() and archive.size in (None, final.stat().st_size):
        return final  # only ever renamed into place after verification
    url = f"{base_url.rstrip('/')}/{archive.name}" if base_url else archive.url
    state = _State(archive)
    if part.is_file() and (archive.size is None or part.stat().st_size <= archive.size):
        state.offset = part.stat().st_size
        _hash_prefix(part, state.hasher)  # hash while streaming: no second pass over 13 GB at the end
    attempt = 0
    with tqdm(total=archive.size, initial=state.offset, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"download {archive.name}") as bar:
        while not state.done():
            before = state.offset
            try:
                _transfer(url, part, state, bar, timeout)
            except _Transient as err:
                if state.offset > before:
                    attempt = 0  # progress was made: a later cut gets a fresh set of retries
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"{url}: giving up after {retries} retries ({err}); {state.offset} "
                                        f"of {state.total or '?'} bytes kept in {part}, run again to resume") from None
                wait = min(backoff * 2 ** (attempt - 1), 60.0)
                tqdm.write(f"download {archive.name}: {err}; retry {attempt}/{retries} in {wait:.0f}s "
                           f"from byte {state.offset}")
                time.sleep(wait)
    if not archive.matches(state.hasher.hexdigest()):
        part.unlink()
        raise DownloadError(f"{url}: checksum mismatch ({archive.checksum.split(':')[0]} {state.hasher.hexdigest()}, "
                            f"expected {archive.digest}); the corrupt file was deleted, run again to re-download")
    os.replace(part, final)
    return final


class _Transient(Exception):
    """A failure another try may fix: kept bytes stay, the transfer resumes from them."""


class _State:
    """Bytes in the `.part` file and their running hash; kept exact when a transfer breaks."""

    def __init__(self, archive: Archive):
        self.archive, self.offset, self.hasher = archive, 0, archive.hasher()
        self.total = archive.size  # None until a server says it, when the table has no size

    def done(self) -> bool:
        return self.total is not None and self.offset >= self.total

    def restart(self) -> None:
        self.offset, self.hasher = 0, self.archive.hasher()


def _transfer(url: str, part: Path, state: _State, bar, timeout: float) -> None:
    """One request from `state.offset`, appending to `part`. Raises _Transient to retry."""
    response = _open(url, state, bar, timeout)
    with response:
        _check_response(url, response, state, bar)
        with open(part, "r+b" if state.offset else "wb") as out:
            out.seek(state.offset)
            out.truncate()
            try:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as err:
                        raise _Transient(f"connection lost at byte {state.offset} ({err})") from None
                    if not chunk:
                        break
                    out.write(chunk)  # a failing disk is not transient: its OSError propagates
                    state.hasher.update(chunk)
                    state.offset += len(chunk)
                    bar.update(len(chunk))
            finally:
                out.flush()
                os.fsync(out.fileno())
    if state.total is None:  # no size anywhere: the body's end is the file's end
        state.total = state.offset
    if state.offset < state.total:
        raise _Transient(f"connection closed at byte {state.offset} of {state.total}")
    if state.offset > state.total:
        part.unlink()
        raise DownloadError(f"{url}: got more than the {state.total} bytes announced; deleted")


def _open(url: str, state: _State, bar, timeout: float):
    """The response to a request from `state.offset`; transient failures raise _Transient."""
    request = urllib.request.Request(url, headers={"User-Agent": "captioning-download/1"})
    if state.offset:
        request.add_header("Range", f"bytes={state.offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and state.offset:  # our offset is past what the server has: start over
            state.restart()
            bar.reset(total=state.archive.size)
            raise _Transient("HTTP 416, restarting from byte 0") from None
        if err.code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {err.code}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        if isinstance(getattr(err, "reason", None), socket.gaierror):  # no DNS: offline, retrying will not help
            raise DownloadError(f"{url}: cannot resolve {urllib.parse.urlsplit(url).hostname} ({err.reason.strerror}): "
                                "no network here? Copy the file in by hand (see the README) or set "
                                "data.base_url to a mirror you can reach") from None
        raise _Transient(str(getattr(err, "reason", err))) from None


def _check_response(url: str, response, state: _State, bar) -> None:
    """Match the response to `state`: a server that ignored Range restarts the file; the size it
    announces must be the table's (or becomes the size, when the table has none)."""
    archive = state.archive
    if state.offset and response.status == 200:
        # The server ignored Range and sends the whole file: start the file again.
        state.restart()
        bar.reset(total=archive.size)
    elif state.offset and not response.headers.get("Content-Range", "").startswith(f"bytes {state.offset}-"):
        raise _Transient(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
    length = response.headers.get("Content-Length")
    if length is not None and archive.size is None:
        state.total = state.offset + int(length)
        bar.reset(total=state.total)
        bar.update(state.offset)
    elif length is not None and state.offset + int(length) != archive.size:
        raise DownloadError(f"{url}: server reports {state.offset + int(length)} bytes, the table says "
                            f"{archive.size}; wrong file or an outdated table")


def _hash_prefix(path: Path, hasher) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)


def check_free_space(folder: str | Path, needed: int, what: str,
                     free_bytes: Callable[[Path], int] | None = None) -> None:
    """Stop before a multi-GB job if `folder`'s disk lacks `needed` bytes (with 1 GB to spare)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(folder)
    margin = 1 << 30
    if free < needed + margin:
        raise DownloadError(
            f"{folder}: {what} needs {_gb(needed + margin)} free (incl. 1 GB margin) but the disk has "
            f"{_gb(free)}; free some space, or make {folder} a symlink to a bigger disk, then run again")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def zip_members(path: str | Path, keep: Callable[[str], bool] = lambda name: True) -> list[zipfile.ZipInfo]:
    """The members of a zip to extract, after refusing any that could escape the target folder."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{path}: not a valid zip archive ({err})") from None
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\\" in name:
            raise DownloadError(f"{path}: member {name!r} would be written outside the target folder; refused")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DownloadError(f"{path}: member {name!r} is a symbolic link; refused (links are never extracted)")
    return [i for i in infos if not i.is_dir() and keep(i.filename)]


def safe_extract(path: str | Path, dest: str | Path, keep: Callable[[str], bool] = lambda name: True,
                 free_bytes: Callable[[Path], int] | None = None) -> Path:
    """Extract the members of zip `path` that `keep` accepts into folder `dest`, atomically.

    Members are checked before anything is written (no absolute paths, no `..`, no links); files
    go to a temporary folder beside `dest`, renamed to `dest` once all are written.
    """
    dest = Path(dest)
    members = zip_members(path, keep)
    check_free_space(dest.parent, sum(m.file_size for m in members), f"extracting {Path(path).name}", free_bytes)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in tqdm(members, desc=f"extract {Path(path).name}", unit="file"):
                target = tmp.joinpath(*PurePosixPath(info.filename).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                # "xb": never follow or overwrite whatever might already be at the target.
                with zf.open(info) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DownloadError(f"{path}: extraction failed ({err}); nothing was kept") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest
