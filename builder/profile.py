"""The profile: the input contract (docs/design.md#profile). Loading validates every key."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from builder.base import BaseSnapshot, snapshot_from_bytes, universal_newlines
from builder.errors import FormatError, ProfileError
from builder.fields import CONTROL_CHARACTERS, install_dir_problem
from builder.secrets import has_credentials, malformed_userinfo, redact_url, register_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
PYTHON_PATTERN = re.compile(r"^3\.\d{1,2}$")
# The forms of uv's --python-platform that name a Linux target (the worker is always Linux).
PLATFORM_PATTERN = re.compile(
    r"^(x86_64|aarch64)-(manylinux_2_\d{1,2}|manylinux2014|unknown-linux-gnu)$|^linux$"
)
DEFAULT_INSTALL_DIR = "/shared-packages"


@dataclass(frozen=True)
class Target:
    base_image: str
    base_packages: Path
    python: str
    platform: str
    interpreter: str
    install_dir: str = DEFAULT_INSTALL_DIR
    base_image_download_bytes: int | None = None
    base_image_bytes: int | None = None


@dataclass(frozen=True)
class Policy:
    constraints: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_shadow: tuple[str, ...] = ()
    prune: tuple[str, ...] = ()  # patterns and presets, as written


@dataclass(frozen=True)
class Index:
    name: str
    url: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    """A loaded profile: the file's contract, the bytes it was read from, and its base
    snapshot, read once here so that no later stage reads either file again."""

    path: Path
    name: str
    description: str
    target: Target
    heavy: tuple[str, ...]
    light: tuple[str, ...] = ()
    policy: Policy = field(default_factory=Policy)
    indexes: tuple[Index, ...] = ()
    data: bytes = b""  # the profile file's bytes
    snapshot: BaseSnapshot = field(default_factory=lambda: BaseSnapshot(None, {}))

    @property
    def text(self) -> str:
        """The profile file as text, newlines as Python's text mode reads them."""
        return universal_newlines(self.data.decode("utf-8"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def sources(self) -> str:
        """sha256 of the profile and its base snapshot: what a lock records as its `sources`."""
        return hashlib.sha256(self.data + b"\0" + self.snapshot.data).hexdigest()

    def index_for(self, package: str) -> Index | None:
        wanted = canonicalize_name(package)
        for index in self.indexes:
            if wanted in index.packages:
                return index
        return None


_TOP_KEYS = {"name", "description", "target", "heavy", "light", "policy", "index"}
_TARGET_KEYS = {
    "base_image",
    "base_packages",
    "python",
    "platform",
    "interpreter",
    "install_dir",
    "base_image_download_bytes",
    "base_image_bytes",
}
_TARGET_REQUIRED = {"base_image", "base_packages", "python", "platform", "interpreter"}
_POLICY_KEYS = {"constraints", "exclude", "allow_shadow", "prune"}

# [policy] prune presets (docs/design.md#pruning; builder/prune.py says why these files).
PRUNE_PRESETS: dict[str, tuple[str, ...]] = {
    "@dev-files": (
        "nvidia/*/include/*",  # CUDA and cuDNN headers of the nvidia-* wheels
        "nvidia/*/lib/*.a",  # their static archives
        "torch/include/*",  # headers for building C++ extensions against torch
        "torch/share/cmake/*",  # CMake package files, same purpose
        "torch/lib/*.a",
    ),
}


def prune_pattern_problem(pattern: str, *, presets: bool = True) -> str | None:
    """Why `pattern` is not a prune pattern (a preset, or an fnmatch pattern relative to the
    install folder), or None. A lock holds patterns with presets expanded: `presets` False."""
    if pattern.startswith("@") and presets:
        if pattern in PRUNE_PRESETS:
            return None
        return f"unknown preset (known: {', '.join(PRUNE_PRESETS)})"
    if not pattern or CONTROL_CHARACTERS.search(pattern) or pattern.startswith("@"):
        return "must be a non-empty pattern without control characters"
    if pattern.startswith("/") or ".." in pattern.split("/"):
        return "must be relative to the install folder, without '..'"
    if pattern.strip("*/?") == "":
        return "would remove everything"
    return None


def expand_prune(patterns: Iterable[str]) -> tuple[str, ...]:
    """Presets replaced by their patterns, duplicates dropped, order kept: what the lock
    records, so what was pruned is written down in full."""
    out: list[str] = []
    for pattern in patterns:
        for item in PRUNE_PRESETS.get(pattern, (pattern,)):
            if item not in out:
                out.append(item)
    return tuple(out)


_INDEX_KEYS = {"name", "url", "packages"}


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; any problem raises ProfileError naming the file and key."""
    path = Path(path)
    try:
        data = path.read_bytes()
        raw = tomllib.loads(universal_newlines(data.decode("utf-8")))
    except FileNotFoundError:
        raise ProfileError(path, None, "no such profile file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, None, f"not valid TOML: {exc}") from None
    except RecursionError:
        raise ProfileError(path, None, "not valid TOML: nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProfileError(path, None, f"cannot read: {exc}") from None
    return parse_profile(raw, path, data)


def parse_profile(raw: dict[str, Any], path: Path, data: bytes = b"") -> Profile:
    _reject_unknown(raw, _TOP_KEYS, path, "")
    name = _string(raw, "name", path, "name")
    if not NAME_PATTERN.match(name):
        raise ProfileError(
            path, "name", f"{name!r} must match [a-z0-9-]+ (lowercase, digits, dashes)"
        )
    description = _string(raw, "description", path, "description", required=False) or ""
    target, snapshot = _parse_target(_table(raw, "target", path, required=True), path)
    heavy_table = _table(raw, "heavy", path, required=True)
    _reject_unknown(heavy_table, {"requirements"}, path, "heavy")
    heavy = _requirements(heavy_table, "requirements", path, "heavy.requirements", required=True)
    if not heavy:
        raise ProfileError(path, "heavy.requirements", "lists no requirement")
    light_table = _table(raw, "light", path, required=False)
    _reject_unknown(light_table, {"requirements"}, path, "light")
    light = _requirements(light_table, "requirements", path, "light.requirements", required=False)
    policy = _parse_policy(_table(raw, "policy", path, required=False), path)
    indexes = _parse_indexes(raw.get("index", []), path)
    _check_heavy_light_disjoint(heavy, light, path)
    return Profile(
        path=path,
        name=name,
        description=description,
        target=target,
        heavy=heavy,
        light=light,
        policy=policy,
        indexes=indexes,
        data=data,
        snapshot=snapshot,
    )


def _parse_target(table: dict[str, Any], path: Path) -> tuple[Target, BaseSnapshot]:
    _reject_unknown(table, _TARGET_KEYS, path, "target")
    for key in sorted(_TARGET_REQUIRED - table.keys()):
        raise ProfileError(path, f"target.{key}", "is required")
    values = {key: _string(table, key, path, f"target.{key}") for key in _TARGET_REQUIRED}
    if not PYTHON_PATTERN.match(values["python"]):
        raise ProfileError(path, "target.python", f'{values["python"]!r} must look like "3.10"')
    if not PLATFORM_PATTERN.match(values["platform"]):
        raise ProfileError(
            path,
            "target.platform",
            f"{values['platform']!r} is not a Linux platform uv knows "
            "(for example x86_64-manylinux_2_28)",
        )
    if not PurePosixPath(values["interpreter"]).is_absolute():
        raise ProfileError(path, "target.interpreter", "must be an absolute path")
    install_dir = _string(table, "install_dir", path, "target.install_dir", required=False)
    install_dir = (install_dir or DEFAULT_INSTALL_DIR).rstrip("/") or "/"
    problem = install_dir_problem(install_dir)
    if problem:
        raise ProfileError(path, "target.install_dir", problem)
    snapshot = _read_snapshot(path, values["base_packages"])
    assert snapshot.path is not None
    sizes = {}
    for key in ("base_image_download_bytes", "base_image_bytes"):
        value = table.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ProfileError(path, f"target.{key}", "must be a positive integer (bytes)")
        sizes[key] = value
    target = Target(
        base_image=values["base_image"],
        base_packages=snapshot.path,
        python=values["python"],
        platform=values["platform"],
        interpreter=values["interpreter"],
        install_dir=install_dir,
        **sizes,
    )
    return target, snapshot


def _read_snapshot(path: Path, value: str) -> BaseSnapshot:
    """The base snapshot the profile names, read and checked now: a loop of links, a NUL in the
    name or text that is not UTF-8 is the profile's error, not a crash later on."""
    key = "target.base_packages"
    try:
        resolved = (path.parent / value).resolve()
        data = resolved.read_bytes()
    except FileNotFoundError:
        raise ProfileError(
            path, key, f"base snapshot {path.parent / value} does not exist"
        ) from None
    except IsADirectoryError:
        raise ProfileError(path, key, f"base snapshot {path.parent / value} is a folder") from None
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a link loop (3.10-3.12)
        raise ProfileError(path, key, f"cannot read base snapshot {value!r}: {exc}") from None
    try:
        return snapshot_from_bytes(data, resolved)
    except FormatError as exc:
        raise ProfileError(path, key, f"base snapshot {exc}") from None


def _parse_policy(table: dict[str, Any], path: Path) -> Policy:
    _reject_unknown(table, _POLICY_KEYS, path, "policy")
    constraints = _requirements(table, "constraints", path, "policy.constraints", required=False)
    exclude = _names(table, "exclude", path, "policy.exclude")
    allow_shadow = _names(table, "allow_shadow", path, "policy.allow_shadow")
    prune = _string_list(table, "prune", path, "policy.prune", required=False)
    for number, pattern in enumerate(prune):
        problem = prune_pattern_problem(pattern)
        if problem:
            raise ProfileError(path, f"policy.prune[{number}]", f"{pattern[:80]!r} {problem}")
    return Policy(
        constraints=constraints, exclude=exclude, allow_shadow=allow_shadow, prune=tuple(prune)
    )


def _parse_indexes(value: Any, path: Path) -> tuple[Index, ...]:
    if not isinstance(value, list):
        raise ProfileError(path, "index", "must be an array of tables ([[index]])")
    indexes: list[Index] = []
    owner: dict[str, str] = {}
    for number, table in enumerate(value):
        key = f"index[{number}]"
        if not isinstance(table, dict):
            raise ProfileError(path, key, "must be a table")
        _reject_unknown(table, _INDEX_KEYS, path, key)
        name = _string(table, "name", path, f"{key}.name")
        if not NAME_PATTERN.match(name):
            raise ProfileError(path, f"{key}.name", f"{name!r} must match [a-z0-9-]+")
        if any(index.name == name for index in indexes):
            raise ProfileError(path, f"{key}.name", f"index {name!r} is defined twice")
        url = _string(table, "url", path, f"{key}.url")
        if not re.match(r"^(https?|file)://", url):
            raise ProfileError(
                path, f"{key}.url", f"{redact_url(url)!r} must be an http(s):// or file:// URL"
            )
        if has_credentials(url) or malformed_userinfo(url):
            register_url(url)
            raise ProfileError(
                path,
                f"{key}.url",
                f"{redact_url(url)} carries credentials (a user name, password or token in the"
                " URL); a profile is committed to git: give them at run time instead, with"
                f" --index {name}=URL or uv's UV_INDEX_{name.upper().replace('-', '_')}_USERNAME"
                " and _PASSWORD",
            )
        packages = _names(table, "packages", path, f"{key}.packages")
        if not packages:
            raise ProfileError(path, f"{key}.packages", "lists no package")
        for package in packages:
            if package in owner:
                raise ProfileError(
                    path,
                    f"{key}.packages",
                    f"{package} is already taken from index {owner[package]!r}",
                )
            owner[package] = name
        indexes.append(Index(name=name, url=url.rstrip("/"), packages=packages))
    return tuple(indexes)


def _check_heavy_light_disjoint(heavy: tuple[str, ...], light: tuple[str, ...], path: Path) -> None:
    heavy_names = {canonicalize_name(Requirement(r).name) for r in heavy}
    for requirement in light:
        name = canonicalize_name(Requirement(requirement).name)
        if name in heavy_names:
            raise ProfileError(
                path, "light.requirements", f"{name} is also under [heavy]; list it in one place"
            )


def _reject_unknown(table: dict[str, Any], allowed: set[str], path: Path, where: str) -> None:
    for key in sorted(set(table) - allowed):
        full = f"{where}.{key}" if where else key
        raise ProfileError(path, full, f"unknown key (allowed here: {', '.join(sorted(allowed))})")


def _table(raw: dict[str, Any], key: str, path: Path, *, required: bool) -> dict[str, Any]:
    if key not in raw:
        if required:
            raise ProfileError(path, key, "table is required")
        return {}
    value = raw[key]
    if not isinstance(value, dict):
        raise ProfileError(path, key, "must be a table")
    return value


def _string(raw: dict[str, Any], key: str, path: Path, full: str, *, required: bool = True) -> str:
    if key not in raw:
        if required:
            raise ProfileError(path, full, "is required")
        return ""
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(path, full, "must be a non-empty string")
    return value.strip()


def _string_list(raw: dict[str, Any], key: str, path: Path, full: str, required: bool) -> list[str]:
    if key not in raw:
        if required:
            raise ProfileError(path, full, "is required")
        return []
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProfileError(path, full, "must be an array of strings")
    return value


def _requirements(
    raw: dict[str, Any], key: str, path: Path, full: str, *, required: bool
) -> tuple[str, ...]:
    parsed: list[str] = []
    for item in _string_list(raw, key, path, full, required):
        try:
            requirement = Requirement(item)
        except InvalidRequirement as exc:
            raise ProfileError(path, full, f"{item!r} is not a valid requirement: {exc}") from None
        if requirement.url:
            raise ProfileError(
                path, full, f"{item!r}: direct URL requirements cannot be verified; use an index"
            )
        parsed.append(str(requirement))
    return tuple(parsed)


def _names(raw: dict[str, Any], key: str, path: Path, full: str) -> tuple[str, ...]:
    names: list[str] = []
    for item in _string_list(raw, key, path, full, required=False):
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", item):
            raise ProfileError(path, full, f"{item!r} is not a package name")
        names.append(canonicalize_name(item))
    return tuple(names)
