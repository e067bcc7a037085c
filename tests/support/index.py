"""A PEP 503 "simple" package index on a local folder, served on 127.0.0.1.

Tests resolve and install against wheels they build themselves, through the
same HTTP code paths uv and pip use for a real index.
"""

from __future__ import annotations

import email.parser
import hashlib
import html
import os
import re
import shutil
import tarfile
import threading
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

from packaging.utils import canonicalize_name

_SDIST_SUFFIXES = (".tar.gz", ".zip")


def _project_name(filename: str) -> str:
    if filename.endswith(".whl"):
        return canonicalize_name(filename.split("-", 1)[0])
    for suffix in _SDIST_SUFFIXES:
        if filename.endswith(suffix):
            return canonicalize_name(filename[: -len(suffix)].rsplit("-", 1)[0])
    raise ValueError(f"not a wheel or sdist file name: {filename}")


def core_metadata(dist: Path) -> bytes:
    """The METADATA (wheel) or PKG-INFO (sdist) bytes of a distribution."""
    if dist.name.endswith(".whl"):
        with zipfile.ZipFile(dist) as zf:
            for member in zf.namelist():
                parts = member.split("/")
                if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                    return zf.read(member)
        raise ValueError(f"{dist} has no .dist-info/METADATA")
    if dist.name.endswith(".tar.gz"):
        with tarfile.open(dist) as tf:
            for entry in tf.getmembers():
                if entry.name.count("/") == 1 and entry.name.endswith("/PKG-INFO"):
                    extracted = tf.extractfile(entry)
                    assert extracted is not None
                    return extracted.read()
        raise ValueError(f"{dist} has no PKG-INFO")
    raise ValueError(f"unsupported distribution: {dist}")


def _requires_python(dist: Path) -> str | None:
    parsed = email.parser.BytesParser().parsebytes(core_metadata(dist), headersonly=True)
    value = parsed.get("Requires-Python")
    return str(value) if value is not None else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _page(title: str, links: list[str]) -> str:
    body = "\n".join(links)
    return (
        "<!DOCTYPE html>\n<html>\n<head>"
        '<meta name="pypi:repository-version" content="1.0">'
        f"<title>{html.escape(title)}</title></head>\n"
        f"<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def write_simple_index(
    dists: Iterable[Path], root: Path, *, core_metadata_files: bool = False
) -> None:
    """Copy ``dists`` into ``root/files`` and (re)write ``root/simple``.

    Pages are generated from everything in ``root/files``, so calling this
    again on the same root adds distributions instead of replacing them.
    ``core_metadata_files`` also writes ``<wheel>.metadata`` beside each
    wheel and announces it (PEP 658/714), as the public index does; without
    it uv reads METADATA out of the wheel with range requests.
    """
    files_dir = root / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        dist = Path(dist)
        _project_name(dist.name)  # reject stray files early
        target = files_dir / dist.name
        if dist.resolve() != target.resolve():
            shutil.copyfile(dist, target)

    projects: dict[str, list[Path]] = {}
    for path in sorted(files_dir.iterdir()):
        if path.name.endswith(".metadata"):
            continue
        projects.setdefault(_project_name(path.name), []).append(path)

    simple = root / "simple"
    if simple.exists():
        shutil.rmtree(simple)
    simple.mkdir()
    for project, paths in sorted(projects.items()):
        links = []
        for path in paths:
            attrs = f'href="../../files/{html.escape(path.name)}#sha256={_sha256(path)}"'
            requires_python = _requires_python(path)
            if requires_python is not None:
                attrs += f' data-requires-python="{html.escape(requires_python)}"'
            if core_metadata_files and path.name.endswith(".whl"):
                sidecar = path.with_name(path.name + ".metadata")
                sidecar.write_bytes(core_metadata(path))
                digest = f"sha256={_sha256(sidecar)}"
                # Both spellings: PEP 714 renamed the attribute, older
                # clients still read the first one.
                attrs += f' data-dist-info-metadata="{digest}" data-core-metadata="{digest}"'
            links.append(f"<a {attrs}>{html.escape(path.name)}</a><br>")
        (simple / project).mkdir()
        (simple / project / "index.html").write_text(_page(f"Links for {project}", links))
    root_links = [f'<a href="{p}/">{p}</a><br>' for p in sorted(projects)]
    (simple / "index.html").write_text(_page("Simple index", root_links))


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _QuietRangeHandler(SimpleHTTPRequestHandler):
    """Static files with single-range ``Range`` support and no request log.

    Without a separate metadata file, uv first sends HEAD for a wheel and,
    when the answer carries ``Accept-Ranges: bytes``, reads only the zip's
    central directory and METADATA with range requests (as against a real
    index); otherwise it downloads whole wheels. The stdlib handler has no
    ``Range`` support, so files are answered here to exercise uv's real path.
    """

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self) -> BinaryIO | None:
        # One handler serves every request of a keep-alive connection.
        self._remaining: int | None = None
        path = self.translate_path(self.path)
        if self.path.endswith("/") or not os.path.isfile(path):
            # Directories (index.html, redirects) and 404s as the stdlib does.
            return super().send_head()
        f = open(path, "rb")  # noqa: SIM115 - the base class closes it
        try:
            size = os.fstat(f.fileno()).st_size
            byte_range = self._parse_range(size)
            if byte_range is None:
                self.send_response(HTTPStatus.OK)
                start, end = 0, size - 1
            else:
                start, end = byte_range
                if start >= size or start > end:
                    f.close()
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", self.date_time_string(int(os.path.getmtime(path))))
            self.end_headers()
            f.seek(start)
            self._remaining = end - start + 1
            return f
        except BaseException:
            f.close()
            raise

    def _parse_range(self, size: int) -> tuple[int, int] | None:
        header = self.headers.get("Range")
        match = _RANGE.match(header.strip()) if header else None
        # Multi-range or malformed headers may be ignored (RFC 9110 14.2).
        if match is None or match.group(1) == match.group(2) == "":
            return None
        first, last = match.groups()
        if first == "":
            return max(size - int(last), 0), size - 1
        return int(first), min(int(last), size - 1) if last else size - 1

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
        remaining = self._remaining
        if remaining is None:
            super().copyfile(source, outputfile)
            return
        while remaining > 0:
            chunk = source.read(min(256 * 1024, remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 and yield the base URL."""
    handler = partial(_QuietRangeHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, name=f"index-{server.server_port}", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def serve_index(dists: Iterable[Path], root: Path) -> Iterator[str]:
    """A simple index of ``dists`` written under ``root`` and served on 127.0.0.1; yields its
    ``/simple`` URL. The URL's path is unique: uv caches index pages by URL, and a later server
    may be given this one's port."""
    prefix = uuid.uuid4().hex[:8]
    write_simple_index(dists, root / prefix)
    with serve_directory(root) as url:
        yield f"{url}/{prefix}/simple"
