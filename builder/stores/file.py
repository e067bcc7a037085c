"""A store that is a folder on this machine (`file://PATH`): the default, no cloud needed."""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from builder.errors import IntegrityError, StoreError
from builder.fields import PROFILE_NAME, SHA256
from builder.manifest import blob_key, manifest_key
from builder.stores.base import (
    COPY_CHUNK,
    ProgressCallback,
    Store,
    StoredBlob,
    StoredManifest,
    check_sha256,
    file_size,
)

_BLOB_SUFFIX = ".tar.zst"


class FileStore(Store):
    """A folder on this machine. Writes go to a temp file in the same folder, then os.replace,
    so a reader or a second writer only ever sees a whole file."""

    def __init__(self, root: Path) -> None:
        # Absolute: `pack --out store` names a folder relative to where the user is, and a
        # file:// URL of it must still name that folder from anywhere.
        self.root = root.absolute()
        self.base_url = self.root.as_uri()
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

    # -- maintenance

    def list_manifests(self) -> list[StoredManifest]:
        found = []
        for profile in self._entries(self.root):
            if not (profile.is_dir(follow_symlinks=False) and PROFILE_NAME.match(profile.name)):
                continue
            for digest in self._entries(Path(profile.path)):
                if not SHA256.match(digest.name):
                    continue
                try:
                    info = (Path(digest.path) / "manifest.json").stat()
                except FileNotFoundError:
                    continue  # a pack still writing, or a digest gc just removed
                except OSError as exc:
                    raise self._unreadable(exc) from None
                found.append(StoredManifest(profile.name, digest.name, _time(info.st_mtime)))
        return found

    def list_blobs(self) -> list[StoredBlob]:
        found = []
        for entry in self._entries(self.root / "blobs"):
            sha256 = entry.name[: -len(_BLOB_SUFFIX)]
            if not (entry.name.endswith(_BLOB_SUFFIX) and SHA256.match(sha256)):
                continue  # pack's partial shards and temporary files: pack sweeps those
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._unreadable(exc) from None
            found.append(StoredBlob(sha256, info.st_size, _time(info.st_mtime)))
        return found

    def refresh_blob(self, sha256: str, *, older_than: datetime) -> bool:
        path = self._blob_path(sha256)
        try:
            if _time(path.stat().st_mtime) < older_than:
                os.utime(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot refresh {path}: {exc}") from None
        return True

    def delete_blob(self, sha256: str, *, unmodified_since: datetime) -> bool:
        path = self._blob_path(sha256)
        # A folder offers no conditional delete, so the blob is first moved out of reach (a
        # publisher refreshing it from now on finds it gone and uploads it again), then its
        # time is read once more: refreshed in between, it goes back.
        aside = path.with_name(f".{path.name}.gc-{secrets.token_hex(4)}.tmp")
        try:
            if _time(path.stat().st_mtime) > unmodified_since:
                return False
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc}") from None
        try:
            if _time(aside.stat().st_mtime) > unmodified_since:
                os.replace(aside, path)
                return False
            aside.unlink()
            return True
        except BaseException:
            # Interrupted while it was out of reach: put it back rather than lose a blob
            # that a publisher may have just refreshed.
            if aside.exists():
                os.replace(aside, path)
            raise

    def delete_manifest(self, profile: str, digest: str) -> None:
        path = self.root / manifest_key(profile, digest)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc}") from None
        # The digest's folder, then the profile's, when empty; one that a publisher has just
        # written into stays (rmdir refuses a folder that is not empty).
        for folder in (path.parent, path.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                break

    def _entries(self, folder: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as entries:
                return list(entries)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: OSError) -> StoreError:
        return StoreError(f"cannot read the store at {self.display_url}: {exc}")

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


def _time(mtime: float) -> datetime:
    return datetime.fromtimestamp(mtime, tz=timezone.utc)
