"""Base snapshots: the distributions a base image already has (docs/design.md#base-snapshot)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from builder.errors import BadInputError, DockerError, FormatError
from builder.fields import PACKAGE_NAME

# Run inside the image with its own interpreter: the standard library only, so it works on any
# image that has Python >= 3.8, and `python` or `python3` (whichever exists) first on PATH.
_LIST_DISTRIBUTIONS = (
    "import json, sys, importlib.metadata as m;"
    "print(json.dumps({'python': sys.executable, 'version': '%d.%d' % sys.version_info[:2],"
    "'dists': sorted({(d.metadata['Name'], d.version) for d in m.distributions()"
    " if d.metadata['Name']})}))"
)


@dataclass(frozen=True)
class BaseSnapshot:
    path: Path | None
    packages: dict[str, str]  # canonical name -> version
    data: bytes = b""  # the file's bytes, as read (they decide the lock's `sources`)

    def version_of(self, name: str) -> str | None:
        return self.packages.get(canonicalize_name(name))

    @property
    def text(self) -> str:
        """The file as text, newlines as Python's text mode reads them."""
        return universal_newlines(self.data.decode("utf-8"))


def universal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_snapshot(text: str, where: object) -> dict[str, str]:
    """The one reader of snapshots: `name==version` lines, `#` comments; FormatError naming
    `where` and the line otherwise."""
    packages: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        name, version = name.strip(), version.strip()
        if not sep or not PACKAGE_NAME.match(name) or not version:
            raise FormatError(
                f"{where}:{number}", None, f"expected name==version, got {line[:80]!r}"
            )
        try:
            Version(version)
        except InvalidVersion:
            raise FormatError(
                f"{where}:{number}", None, f"{version[:40]!r} is not a version"
            ) from None
        packages[canonicalize_name(name)] = version
    return packages


def decode_snapshot(data: bytes, where: object) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(where, None, f"not UTF-8 text (byte {exc.start})") from None


def read_snapshot(path: Path) -> BaseSnapshot:
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise BadInputError(f"{path}: cannot read base snapshot: {exc}") from None
    return snapshot_from_bytes(data, path)


def snapshot_from_bytes(data: bytes, path: Path) -> BaseSnapshot:
    return BaseSnapshot(path, parse_snapshot(decode_snapshot(data, path), path), data)


def render_snapshot(image: str, python: str, packages: dict[str, str]) -> str:
    lines = [
        f"# Python distributions in {image}",
        f"# read by `gpubuild base-snapshot` from {python} inside the image",
    ]
    lines += [f"{name}=={packages[name]}" for name in sorted(packages)]
    return "\n".join(lines) + "\n"


def snapshot_image(client: Any, image: str) -> tuple[str, dict[str, str]]:
    """Run the image's own python and list its distributions; returns (interpreter, packages)."""
    import docker.errors

    command = [
        "sh",
        "-c",
        'for py in python python3; do command -v "$py" >/dev/null && exec "$py" -c "$0"; done;'
        ' echo "no python on PATH" >&2; exit 127',
        _LIST_DISTRIBUTIONS,
    ]
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError as exc:
            raise DockerError(f"image {image} is not present and cannot be pulled: {exc}") from None
    try:
        output = client.containers.run(
            image,
            command,
            entrypoint=[],
            network_mode="host",
            remove=True,
            stdout=True,
            stderr=False,
        )
    except docker.errors.ContainerError as exc:
        raise DockerError(f"listing distributions in {image} failed: {exc.stderr!r}") from None
    except docker.errors.APIError as exc:
        raise DockerError(f"cannot run {image}: {exc}") from None
    try:
        listing = json.loads(output.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DockerError(f"unexpected output from python in {image}: {output[:200]!r}") from None
    return _read_listing(listing, image)


def _read_listing(listing: object, image: str) -> tuple[str, dict[str, str]]:
    """What the image's python printed, checked before it becomes a snapshot file."""
    bad = DockerError(f"unexpected output from python in {image}: not a list of distributions")
    if not isinstance(listing, dict) or not isinstance(listing.get("python"), str):
        raise bad
    dists = listing.get("dists")
    if not isinstance(dists, list):
        raise bad
    packages: dict[str, str] = {}
    for item in dists:
        if not (
            isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            raise bad
        name, version = item
        try:
            Version(version)
        except InvalidVersion:
            continue  # a distribution with a non-PEP 440 version cannot be pinned: left out
        if PACKAGE_NAME.match(name):
            packages[canonicalize_name(name)] = version
    return listing["python"], packages


def docker_client() -> Any:  # a docker.DockerClient (the SDK has no type hints)
    import docker
    import docker.errors

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerError(
            f"no Docker engine answers ({exc}); start dockerd or set DOCKER_HOST"
        ) from None
    return client
