"""A store that is a folder on this machine (`file://PATH`): the default, no cloud needed."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from builder.errors import IntegrityError, StoreError
from builder.manifest import blob_key, manifest_key
from builder.stores.base import (
    COPY_CHUNK,
    ProgressCallback,
    Store,
    check_sha256,
    file_size,
)


class FileStore(Store):
    """A folder on this machine. Writes go to a temp file in the same folder, then os.replace,
    so a reader or a second writer only ever sees a whole file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base_url = root.as_uri()
        self.display_url = self.base_url

    def _blob_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / blob_key(sha256)

    def has_blob(self, sha256: str) -> int | None:
        try:
            return self._blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the store at {self.display_url}: {exc}") from None

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        if not overwrite and self._size_to_put(sha256, path) is None:
            return False
        file_size(path)
        target = self._blob_path(sha256)
        digest = hashlib.sha256()

        def copy(out: BinaryIO) -> None:
            with path.open("rb") as source:
                while chunk := source.read(COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    if on_progress:
                        on_progress(len(chunk))
            if digest.hexdigest() != sha256:
                raise IntegrityError(
                    f"{path}: its sha256 is {digest.hexdigest()}, not {sha256}; pack it again"
                )

        self._write_atomically(target, copy)
        return True

    def open_blob(self, sha256: str) -> BinaryIO:
        try:
            return self._blob_path(sha256).open("rb")
        except FileNotFoundError:
            raise self._missing_blob(sha256) from None

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        self._write_atomically(self.root / manifest_key(profile, digest), lambda f: f.write(data))

    def get_manifest(self, profile: str, digest: str) -> bytes:
        try:
            return (self.root / manifest_key(profile, digest)).read_bytes()
        except FileNotFoundError:
            raise self._not_published(profile, digest) from None
        except OSError as exc:
            raise StoreError(f"cannot read the store at {self.display_url}: {exc}") from None

    def _write_atomically(self, target: Path, write: Callable[[BinaryIO], object]) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise StoreError(f"cannot write to the store at {self.display_url}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                # A crash after the rename must not leave a right-sized file of zeros, which
                # has_blob would take for a published blob.
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot write to the store at {self.display_url}: {exc}"
                ) from None
            raise
