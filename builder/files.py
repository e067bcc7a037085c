"""Files written so that a reader sees the old content or the new, never a part of it, and
work folders that a killed run can leave behind without them piling up."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: str | bytes, *, mode: int | None = None) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`.

    `mode`: the new file's permission bits; None keeps an existing file's, else 0644.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), even when it already exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# --- work folders that a killed run leaves behind, and how they are swept ----------------------

LOCK_NAME = ".lock"
NEW_PREFIX = ".new"  # a work folder's name until it is locked
# Loose temporary files carry no lock: one untouched this long belongs to a dead writer (a live
# one writes to it continuously).
STALE_AFTER_SECONDS = 3600


@contextlib.contextmanager
def work_folder(parent: Path, prefix: str, *, patterns: tuple[str, ...] = ()) -> Iterator[Path]:
    """A fresh folder `parent/<prefix>XXXX`, locked (flock) while this run uses it and removed
    after; leftovers of dead runs with the same prefix (and old files matching `patterns`) are
    swept first, never a live run's."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent, prefix, patterns=(*patterns, f"{NEW_PREFIX}{prefix}*"))
    # Made and locked under a name no sweep of `prefix` matches, then renamed: a sweeper can
    # never find the folder with its lock still free.
    fresh = Path(tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{prefix}", dir=parent))
    lock = (fresh / LOCK_NAME).open("w")
    folder = fresh
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        folder = parent / fresh.name[len(NEW_PREFIX) :]
        fresh.rename(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.close()


def sweep_stale(parent: Path, prefix: str, *, patterns: tuple[str, ...] = ()) -> list[Path]:
    """Remove `parent/<prefix>*` folders whose run is gone (their lock is free, or they have
    none and are old) and loose temporary files matching `patterns` that nobody touched for an
    hour. Returns what went."""
    removed: list[Path] = []
    now = time.time()
    for folder in parent.glob(f"{prefix}*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        lock_path = folder / LOCK_NAME
        try:
            if lock_path.exists():
                with lock_path.open("a") as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live run holds it
                    shutil.rmtree(folder, ignore_errors=True)
            elif now - folder.stat().st_mtime > STALE_AFTER_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                continue
        except OSError:
            continue
        removed.append(folder)
    for pattern in patterns:
        for path in parent.glob(pattern):
            with contextlib.suppress(OSError):
                if path.is_symlink() or now - path.stat().st_mtime <= STALE_AFTER_SECONDS:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
                removed.append(path)
    return removed
