"""Reading a checkout: find the deployment files, parse each into builder.checks.model.

The YAML readers (Kubernetes manifests, pipelines) are builder/checks/read_yaml.py; this
module finds the files and reads the rest: Dockerfiles, requirements, gpubuild profiles, locks
and manifests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from builder.checks.model import (
    Checkout,
    Dockerfile,
    Finding,
    LockFile,
    ManifestFile,
    ProfileFile,
    Requirements,
    Where,
)
from builder.checks.read_yaml import read_kubernetes, read_pipeline
from builder.checks.shell import commands_of, logical_lines
from builder.errors import BadInputError, GpubuildError

_SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__"}


_MAX_BYTES = 8 * 1024 * 1024  # no deployment file is this big; a data file is not ours


_K8S_KIND = re.compile(r"^kind:\s*[\"']?(RayService|RayCluster|HelmRelease)[\"']?\s*(#.*)?$", re.M)


def walk(paths: Iterable[Path]) -> Iterator[tuple[Path, str, bool]]:
    """Every file under the given paths with its display name (the path as given, joined) and
    whether the user named it (rather than a folder it is in)."""
    for root in paths:
        if not root.exists():
            raise BadInputError(f"{root}: no such file or folder; give paths to a checkout")
        if root.is_file():
            yield root, str(root), True
            continue
        # os.walk does not follow symbolic links to folders (followlinks=False): a link to
        # `..` cannot loop it. Links among the files are sorted out by _real_file.
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for name in sorted(files):
                path = Path(folder) / name
                yield path, str(path), False


def _real_file(path: Path) -> Path | None:
    """The resolved path of a regular file; None for anything else, such as a dangling link or
    a symbolic link loop (`is_file` is False for those; `resolve` raises RuntimeError on a
    loop before Python 3.13, OSError on other trouble)."""
    try:
        return path.resolve() if path.is_file() else None
    except (OSError, RuntimeError):
        return None


def _head(path: Path, size: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as file:
            return file.read(size).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _too_big(path: Path, display: str, size: int, named: bool) -> Finding | None:
    """A file over _MAX_BYTES is never read (no deployment file is that big), but never skipped
    silently either. One the user named is an error (GB001, exit 1): they asked for it to be
    checked, and a pass would claim it was; the other files are still checked. One found in a
    folder is a warning (GB002) when it may be a deployment file (its name, its first 64 KiB,
    or any .yaml: `kind:` may come later); other big files (a model, a data set) are not
    deployment files at any size, and are left alone like every such file."""
    amount = f"{size} bytes ({size / 2**20:.1f} MiB), over the {_MAX_BYTES // 2**20} MiB"
    if named:
        return Finding(
            display,
            1,
            "GB001",
            f"not read: {amount} that gpubuild check reads of one file",
            "name the deployment's own files (a few KB each), or split this one up",
        )
    if classify(path, _head(path)) is None and not path.name.lower().endswith((".yaml", ".yml")):
        return None
    return Finding(
        display,
        1,
        "GB002",
        f"skipped: {amount} that gpubuild check reads of one file",
        "if it is a deployment file, split it up; if not, `gpubuild check` the deployment's "
        "folders rather than this one",
    )


def classify(path: Path, head: str) -> str | None:
    """The kind of deployment file `path` is, from its name and (for YAML/TOML) its text."""
    name = path.name
    lower = name.lower()
    if name == "Dockerfile" or name.startswith("Dockerfile.") or lower.endswith(".dockerfile"):
        return "dockerfile"
    if re.fullmatch(r"azure-pipelines.*\.ya?ml", lower):
        return "pipeline"
    if lower.endswith(".txt") and "requirements" in lower:
        return "requirements"
    if lower.endswith((".yaml", ".yml")) and _K8S_KIND.search(head):
        return "kubernetes"
    if lower.endswith(".toml") and re.search(r"^\s*\[target\]\s*$", head, re.M):
        return "profile"
    if lower.endswith(".lock") and "# gpubuild: " in head:
        return "lock"
    if name == "manifest.json" and all(f'"{k}"' in head for k in ("format", "digest", "shards")):
        return "manifest"
    return None


def _substitute(text: str, args: Mapping[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        return args.get(name) or (default or "")

    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)", value, text)


def read_dockerfile(text: str, path: Path, display: str) -> Dockerfile:
    dockerfile = Dockerfile(path, display)
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    env: dict[str, tuple[str, Where]] = {}
    seen_from = False
    logical = logical_lines(
        [(line, number) for number, line in enumerate(text.splitlines(), start=1)],
        dockerfile=True,
    )
    for line, pieces in logical:
        number = pieces[0][1]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        instruction, _, rest = stripped.partition(" ")
        instruction = instruction.upper()
        where = Where(display, number)
        if instruction == "ARG" and not seen_from:
            name, _, default = rest.strip().partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
        elif instruction == "FROM":
            seen_from = True
            env = {}
            words = [w for w in rest.split() if not w.startswith("--")]
            if not words:
                continue
            image = _substitute(words[0], global_args)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if image.lower() not in stages:
                dockerfile.froms.append((image, where))
        elif instruction == "ENV":
            env.update(_env_instruction(rest, where))
        elif instruction == "RUN" and not rest.lstrip().startswith("["):
            dockerfile.runs += commands_of(rest, pieces, display)
    dockerfile.env = env
    return dockerfile


def _env_instruction(rest: str, where: Where) -> dict[str, tuple[str, Where]]:
    rest = rest.strip()
    first = rest.split(None, 1)[0] if rest else ""
    if "=" not in first:  # legacy form: ENV KEY value with spaces
        key, _, value = rest.partition(" ")
        return {key: (value.strip(), where)} if key else {}
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    found = {}
    for word in words:
        key, eq, value = word.partition("=")
        if eq:
            found[key] = (value, where)
    return found


def read_requirements(text: str, path: Path, display: str) -> Requirements:
    requirements = Requirements(path, display)
    for number, line in enumerate(text.splitlines(), start=1):
        line = re.split(r"(^|\s)#", line, maxsplit=1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) != "ray":
            continue
        pins = [s.version for s in requirement.specifier if s.operator in ("==", "===")]
        version = pins[0] if pins and "*" not in pins[0] else None
        requirements.ray.append((line, version, Where(display, number)))
    return requirements


def _toml_line(text: str, key: str) -> int:
    match = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def read_profile(text: str, path: Path, display: str, checkout: Checkout) -> None:
    from builder.profile import load_profile

    try:
        profile = load_profile(path)
    except GpubuildError as exc:
        key = getattr(exc, "key", None)
        line = _toml_line(text, key.rsplit(".", 1)[-1]) if key else 1
        match = re.search(r"at line (\d+)", str(exc))
        if match:
            line = int(match.group(1))
        checkout.findings.append(
            Finding(display, line, "GB001", f"not a valid gpubuild profile: {exc}",
                    "fix the profile (docs/design.md#profile); `gpubuild resolve` says the same")
        )  # fmt: skip
        return
    checkout.profiles.append(
        ProfileFile(
            path=path,
            display=display,
            profile=profile,
            base_image_where=Where(display, _toml_line(text, "base_image")),
            python_where=Where(display, _toml_line(text, "python")),
        )
    )


_PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")


def read_lock_file(path: Path, text: str, display: str, checkout: Checkout) -> None:
    from builder.lock import read_lock

    try:
        lock = read_lock(path)
    except GpubuildError as exc:
        checkout.findings.append(
            Finding(display, 1, "GB001", f"not a valid gpubuild lock: {exc}",
                    "write it again with `gpubuild resolve PROFILE`")
        )  # fmt: skip
        return
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _PIN_LINE.match(line)
        if match:
            lines.setdefault(canonicalize_name(match.group(1)), number)
    checkout.locks.append(LockFile(display, lock, lines))


def read_manifest_file(
    data: bytes, display: str, checkout: Checkout, *, from_store: bool = False
) -> None:
    from builder.manifest import manifest_from_bytes

    try:
        manifest = manifest_from_bytes(data, where=display)
    except GpubuildError as exc:
        line = 1
        try:
            json.loads(data)
        except ValueError as error:
            line = getattr(error, "lineno", 1)
        checkout.findings.append(
            Finding(display, line, "GB001", f"not a valid gpubuild manifest: {exc}",
                    "pack it again with `gpubuild pack PROFILE` or `gpubuild publish-cache`")
        )  # fmt: skip
        return
    names: dict[str, int] = {}
    for number, text in enumerate(data.decode(errors="replace").splitlines(), start=1):
        match = re.match(r'^\s*"name":\s*"([^"]+)"', text)
        if match:
            names.setdefault(canonicalize_name(match.group(1)), number)
    checkout.manifests.append(ManifestFile(display, manifest, names, from_store))


def read_checkout(paths: Sequence[Path], extra_profiles: Sequence[Path] = ()) -> Checkout:
    checkout = Checkout()
    seen: set[Path] = set()
    for path, display, named in [*walk(paths), *walk(extra_profiles)]:
        real = _real_file(path)
        if real is None or real in seen:
            continue
        seen.add(real)
        try:
            size = path.stat().st_size
            if size > _MAX_BYTES:
                too_big = _too_big(path, display, size, named)
                if too_big is not None:
                    checkout.findings.append(too_big)
                continue
            data = path.read_bytes()
        except OSError:
            continue
        text = data.decode("utf-8", errors="replace")
        kind = classify(path, text)
        if kind is None:
            continue
        checkout.files.append((display, kind))
        if kind == "kubernetes":
            read_kubernetes(text, display, checkout)
        elif kind == "pipeline":
            read_pipeline(text, path, display, checkout)
        elif kind == "dockerfile":
            checkout.dockerfiles.append(read_dockerfile(text, path, display))
        elif kind == "requirements":
            checkout.requirements.append(read_requirements(text, path, display))
        elif kind == "profile":
            read_profile(text, path, display, checkout)
        elif kind == "lock":
            read_lock_file(path, text, display, checkout)
        elif kind == "manifest":
            read_manifest_file(data, display, checkout)
    return checkout


def read_store(store: str, checkout: Checkout) -> None:
    """Every manifest in a local store folder (PROFILE/DIGEST/manifest.json)."""
    if "://" in store and not store.startswith("file://"):
        raise BadInputError(
            f"--store {store!r}: check reads a local store folder (a path or file://PATH); "
            "for a cloud store, copy its PROFILE/DIGEST/manifest.json files into a folder "
            "with the same layout"
        )
    root = Path(store.removeprefix("file://"))
    if not root.is_dir():
        raise BadInputError(f"--store {store}: no such folder")
    known = {Path(m.display).resolve() for m in checkout.manifests}
    for path in sorted(root.glob("*/*/manifest.json")):
        if path.resolve() in known or _real_file(path) is None:
            continue
        size = path.stat().st_size
        if size > _MAX_BYTES:
            # --store names these manifests: one too big to read is an error, as for a file
            # named on the command line.
            big = _too_big(path, str(path), size, named=True)
            assert big is not None  # always a finding for a named file
            checkout.findings.append(big)
            continue
        checkout.files.append((str(path), "manifest"))
        read_manifest_file(path.read_bytes(), str(path), checkout, from_store=True)
