"""Build real wheel and sdist files in pure Python, without setuptools.

Tests need many small distributions with chosen names, versions, tags and
dependencies (to provoke conflicts on purpose). Building them through a build
backend would be slow and would hide what ends up in the archive, so the
archives are written here byte by byte, following the binary distribution
format spec. Output is deterministic: the same arguments give the same bytes,
so hashes in lock files stay stable between runs.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from packaging.tags import parse_tag
from packaging.utils import canonicalize_name
from packaging.version import Version

# The zip format cannot store dates before 1980; any fixed value gives
# reproducible bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_GENERATOR = "gpubuild-tests (tests/support/wheels.py)"
_DATA_SCHEMES = frozenset({"purelib", "platlib", "headers", "scripts", "data"})


def escape_name(name: str) -> str:
    """Project name as it appears in wheel/sdist file names and .dist-info."""
    return canonicalize_name(name).replace("-", "_")


def import_name(name: str) -> str:
    """The module name the default wheel contents use for ``name``."""
    return escape_name(name)


def normalize_version(version: str) -> str:
    # A '-' would split the file name wrongly; the spec says to escape it,
    # and PEP 440 normalisation never produces one.
    return str(Version(version)).replace("-", "_")


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _metadata(
    name: str,
    version: str,
    requires: Iterable[str],
    requires_python: str | None,
    metadata_version: str,
) -> bytes:
    lines = [
        f"Metadata-Version: {metadata_version}",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: test distribution {name}",
    ]
    if requires_python is not None:
        lines.append(f"Requires-Python: {requires_python}")
    lines.extend(f"Requires-Dist: {req}" for req in requires)
    return ("\n".join(lines) + "\n").encode("utf-8")


def _wheel_file(tag: str) -> bytes:
    purelib = all(t.platform == "any" for t in parse_tag(tag))
    # Compressed tag sets (cp310.cp311-abi3-...) expand to one line each, as
    # the spec asks; sort for deterministic output.
    lines = [
        "Wheel-Version: 1.0",
        f"Generator: {_GENERATOR}",
        f"Root-Is-Purelib: {'true' if purelib else 'false'}",
        *(f"Tag: {t}" for t in sorted(str(t) for t in parse_tag(tag))),
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _entry_points(console_scripts: Mapping[str, str]) -> bytes:
    lines = ["[console_scripts]"]
    lines.extend(f"{k} = {v}" for k, v in sorted(console_scripts.items()))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _zip_info(arcname: str, executable: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that external_attr holds a file mode.
    mode = 0o755 if executable else 0o644
    info.external_attr = (0o100000 | mode) << 16
    return info


def wheel_filename(name: str, version: str, tag: str = "py3-none-any") -> str:
    return f"{escape_name(name)}-{normalize_version(version)}-{tag}.whl"


def build_wheel(
    dest: Path,
    name: str,
    version: str,
    *,
    requires: Sequence[str] = (),
    tag: str = "py3-none-any",
    files: Mapping[str, bytes] | None = None,
    entry_points: Mapping[str, str] | None = None,
    data_files: Mapping[str, bytes] | None = None,
    requires_python: str | None = None,
) -> Path:
    """Write a wheel into ``dest`` and return its path.

    ``files`` maps archive paths (``pkg/mod.py``) to contents; by default the
    wheel holds ``<import_name>/__init__.py`` with ``__version__``.
    ``entry_points`` maps console script names to ``"module:function"``.
    ``data_files`` maps paths relative to the ``.data`` directory, whose first
    part is the install scheme (``scripts/tool``, ``purelib/extra.py``).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if files is None:
        files = {f"{import_name(name)}/__init__.py": f'__version__ = "{version}"\n'.encode()}

    stem = f"{escape_name(name)}-{normalize_version(version)}"
    dist_info = f"{stem}.dist-info"
    data_dir = f"{stem}.data"

    entries: list[tuple[str, bytes, bool]] = []
    for path, content in sorted(files.items()):
        entries.append((path, content, False))
    for rel, content in sorted((data_files or {}).items()):
        scheme = rel.split("/", 1)[0]
        if scheme not in _DATA_SCHEMES or "/" not in rel:
            raise ValueError(
                f"data_files key {rel!r} must start with one of {sorted(_DATA_SCHEMES)}/"
            )
        entries.append((f"{data_dir}/{rel}", content, scheme == "scripts"))

    metadata = _metadata(name, version, requires, requires_python, "2.1")
    entries.append((f"{dist_info}/METADATA", metadata, False))
    entries.append((f"{dist_info}/WHEEL", _wheel_file(tag), False))
    if entry_points:
        entries.append((f"{dist_info}/entry_points.txt", _entry_points(entry_points), False))
    entries.append((f"{dist_info}/top_level.txt", b"", False))

    record_lines = [f"{path},{_record_hash(data)},{len(data)}" for path, data, _ in entries]
    record_path = f"{dist_info}/RECORD"
    # RECORD cannot hash itself; the spec leaves its hash and size empty.
    record_lines.append(f"{record_path},,")
    record = ("\n".join(record_lines) + "\n").encode("utf-8")

    out = dest / wheel_filename(name, version, tag)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path, data, executable in entries:
            zf.writestr(_zip_info(path, executable), data)
        # RECORD goes last, as installers expect to find it after the files.
        zf.writestr(_zip_info(record_path, False), record)
    out.write_bytes(buffer.getvalue())
    return out


def _setup_py(name: str, version: str, requires: Sequence[str]) -> bytes:
    return (
        "from setuptools import setup\n\n"
        f"setup(name={name!r}, version={version!r}, "
        f"py_modules=[{import_name(name)!r}], install_requires={list(requires)!r})\n"
    ).encode()


def _tar_info(path: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_sdist(dest: Path, name: str, version: str, requires: Sequence[str] = ()) -> Path:
    """Write a minimal ``NAME-VER.tar.gz`` sdist (PKG-INFO, setup.py, module)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"{escape_name(name)}-{normalize_version(version)}"
    members = {
        # Metadata 2.2 lets tools trust PKG-INFO's Requires-Dist without
        # running setup.py (PEP 643); nothing is marked Dynamic.
        f"{stem}/PKG-INFO": _metadata(name, version, requires, None, "2.2"),
        f"{stem}/setup.py": _setup_py(name, version, requires),
        f"{stem}/{import_name(name)}.py": f'__version__ = "{version}"\n'.encode(),
    }
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, data in members.items():
            tf.addfile(_tar_info(path, len(data)), io.BytesIO(data))
    out = dest / f"{stem}.tar.gz"
    gz_buffer = io.BytesIO()
    # mtime=0 and an empty filename keep the gzip header free of run data.
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buffer, mtime=0) as gz:
        gz.write(tar_buffer.getvalue())
    out.write_bytes(gz_buffer.getvalue())
    return out
