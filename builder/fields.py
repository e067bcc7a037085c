"""Field checks shared by the readers of every file format gpubuild reads.

Each format has one reader (profile.py, base.py, lock.py, manifest.py); they treat what they
read as hostile and use these checks, so that a bad value is a FormatError naming the file and
the field (exit 2), never a traceback later on.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

from builder.errors import FormatError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
PROFILE_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
PACKAGE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
STATE_FOLDER = ".gpubuild"
# In an image layer a file `.wh.NAME` deletes NAME of the layers below (and `.wh..wh..opq` all of
# its folder): a tree that is also an image may hold no such name.
WHITEOUT_PREFIX = ".wh."
# Sizes beyond any package set (a pebibyte): a larger one is a damaged or hostile file, and
# would overflow the init script's 64-bit arithmetic.
MAX_BYTES = 2**50  # the init script's own folder inside the install folder
# Mount points that would hide what the container needs to run: an emptyDir mounted over one
# of them breaks the pod, and extracting into one on a machine destroys it.
_SYSTEM_FOLDERS = frozenset(
    [
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
        "/home",
        "/opt",
        "/srv",
        "/mnt",
        "/media",
    ]
)
_NEVER_BELOW = ("/proc/", "/sys/", "/dev/")


def install_dir_problem(path: str) -> str | None:
    """Why `path` cannot be the install folder (a volume's mount point), or None."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string"
    if CONTROL_CHARACTERS.search(path):
        return "must not hold control characters"
    if not path.startswith("/"):
        return "must be an absolute path"
    if path != "/" and path.endswith("/"):
        return f"{path!r} must be written without a trailing '/'"
    parts = path.split("/")
    if "." in parts or ".." in parts or "//" in path:
        return f"{path!r} must be written without '.', '..' or '//' (normalised it is {posixpath.normpath(path)!r})"
    normal = posixpath.normpath(path)
    if normal == "/":
        return "must be a folder other than /"
    if normal in _SYSTEM_FOLDERS or normal.startswith(_NEVER_BELOW):
        return f"{normal} is a system folder; mounting a volume there breaks the container"
    return None


def normalise_install_dir(path: str) -> str:
    return posixpath.normpath(path)


def relative_path_problem(path: str) -> str | None:
    """Why `path` is not a safe relative path inside the install tree, or None."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string"
    if CONTROL_CHARACTERS.search(path):
        return "must not hold control characters"
    if path.startswith("/"):
        return "must be relative, not absolute"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must not hold '..', '.' or empty parts"
    if parts[0] == STATE_FOLDER:
        return f"must not be inside {STATE_FOLDER}/"
    if any(part.startswith(WHITEOUT_PREFIX) for part in parts):
        return f"must not have a part named {WHITEOUT_PREFIX}* (an image layer's whiteout)"
    return None


class Fields:
    """Typed access to one JSON object of a file, raising FormatError for a bad field.

    `where` names the file (or URL); `prefix` the object's own place in it ("shards[2]").
    """

    def __init__(self, value: object, where: str, prefix: str = "") -> None:
        if not isinstance(value, Mapping):
            raise FormatError(where, prefix or None, "must be a JSON object")
        self.data: Mapping[str, Any] = value
        self.where = where
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str) -> FormatError:
        return FormatError(self.where, self.name(key), problem)

    def only(self, allowed: set[str]) -> None:
        for key in sorted(set(self.data) - allowed):
            raise self.fail(key, f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def get(self, key: str, default: object = ..., *, required: bool = True) -> Any:
        if key not in self.data:
            if required and default is ...:
                raise self.fail(key, "is missing")
            return None if default is ... else default
        return self.data[key]

    def string(self, key: str, *, pattern: re.Pattern[str] | None = None, **kw: Any) -> str:
        value = self.get(key, **kw)
        if value is None and not kw.get("required", True):
            return ""
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        if CONTROL_CHARACTERS.search(value):
            raise self.fail(key, "must not hold control characters")
        if pattern is not None and not pattern.match(value):
            raise self.fail(key, f"{value[:80]!r} is not of the expected form")
        return value

    def integer(self, key: str, *, minimum: int = 0, maximum: int = MAX_BYTES) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(key, f"must be an integer from {minimum} to {maximum}")
        return value

    def array(self, key: str, *, default: object = ...) -> list[Any]:
        value = self.get(key, default)
        if not isinstance(value, list):
            raise self.fail(key, "must be an array")
        return value

    def strings(
        self, key: str, *, pattern: re.Pattern[str] | None = None, default: object = ...
    ) -> list[str]:
        values = self.array(key, default=default)
        for number, value in enumerate(values):
            item = f"{key}[{number}]"
            if not isinstance(value, str):
                raise self.fail(item, "must be a string")
            if CONTROL_CHARACTERS.search(value):
                raise self.fail(item, "must not hold control characters")
            if pattern is not None and not pattern.match(value):
                raise self.fail(item, f"{value[:80]!r} is not of the expected form")
        return values

    def objects(self, key: str, *, default: object = ...) -> list[Fields]:
        return [
            Fields(value, self.where, f"{self.name(key)}[{number}]")
            for number, value in enumerate(self.array(key, default=default))
        ]
