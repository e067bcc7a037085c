"""Property tests: every file gpubuild reads, mutated at random, gives a clean result or a
clear error (a GpubuildError, exit 2 through the CLI), never a traceback, and nothing is
written outside the target.

The seeds are real files (the shipped profile and snapshot, a real lock and manifest from the
fixture deployment repo); hypothesis mutates their bytes, their lines and, for JSON, the value
at any path.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.base import parse_snapshot
from builder.cli import main
from builder.errors import GpubuildError
from builder.lock import parse_lock
from builder.manifest import manifest_from_bytes
from builder.profile import load_profile
from tests.helpers import REPO

FIXTURES = REPO / "tests" / "fixtures" / "deploy-repo"
LOCK_TEXT = (FIXTURES / "your-gpu-service" / "gpubuild" / "torch-cu121.lock").read_text()
MANIFEST_PATH = next((FIXTURES / "store").rglob("manifest.json"))
MANIFEST_BYTES = MANIFEST_PATH.read_bytes()
PROFILE_TEXT = (REPO / "profiles" / "onnx-gpu.toml").read_text()
SNAPSHOT_TEXT = (REPO / "profiles" / "bases" / "ray-2.52.0-py310-cu121.txt").read_text()

QUICK = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["../..", "/", "/etc", "a/../../b", ".gpubuild/x", "\x00", "x\ny", "0" * 64]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with a few random edits: bytes flipped, slices cut, junk inserted."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 200))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=30))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def mutated_lines(draw: st.DrawFn, seed: str) -> str:
    lines = seed.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(lines) - 1, 0)))
        kind = draw(st.sampled_from(["drop", "duplicate", "replace", "swap"]))
        if not lines:
            break
        if kind == "drop":
            del lines[at]
        elif kind == "duplicate":
            lines.insert(at, lines[at])
        elif kind == "replace":
            lines[at] = draw(st.text(max_size=60))
        else:
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
    return "\n".join(lines) + "\n"


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for number, item in enumerate(value[:5]):
            found += _paths(item, (*prefix, number))
    return found


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any) -> Any:
    document = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(document)))
        replacement = draw(json_values)
        if not path:
            document = replacement
            continue
        parent = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = replacement
        except (KeyError, IndexError, TypeError):
            pass
    return document


def _manifest_seed() -> Any:
    return json.loads(MANIFEST_BYTES)


def _lock_header_seed() -> Any:
    line = next(line for line in LOCK_TEXT.splitlines() if line.startswith("# gpubuild: "))
    return json.loads(line[len("# gpubuild: ") :])


def _with_header(header: Any) -> str:
    return "\n".join(
        "# gpubuild: " + json.dumps(header) if line.startswith("# gpubuild: ") else line
        for line in LOCK_TEXT.splitlines()
    )


# --- the readers, in process ------------------------------------------------------------


@QUICK
@given(
    st.one_of(
        mutated_bytes(MANIFEST_BYTES),
        mutated_json(_manifest_seed()).map(lambda d: json.dumps(d).encode()),
    )
)
def test_manifest_reader_gives_a_manifest_or_a_clear_error(data: bytes) -> None:
    try:
        manifest = manifest_from_bytes(data, where="store/manifest.json")
    except GpubuildError as exc:
        assert "store/manifest.json" in str(exc)
        return
    # What it accepts is safe to use: no path leads out of the install folder.
    for directory in manifest.directories:
        assert not directory.startswith("/") and ".." not in directory.split("/")
    assert manifest.install_dir.startswith("/") and manifest.install_dir != "/"
    assert all(isinstance(s.bytes, int) and s.bytes >= 0 for s in manifest.shards)


@QUICK
@given(
    st.one_of(
        mutated_lines(LOCK_TEXT),
        mutated_bytes(LOCK_TEXT.encode()).map(lambda b: b.decode("utf-8", "replace")),
        mutated_json(_lock_header_seed()).map(_with_header),
    )
)
def test_lock_reader_gives_a_lock_or_a_clear_error(text: str) -> None:
    try:
        lock = parse_lock(text, "x.lock")
    except GpubuildError as exc:
        assert "x.lock" in str(exc)
        return
    lock.digest()  # usable
    assert lock.install_dir.startswith("/")


@QUICK
@given(st.one_of(mutated_lines(SNAPSHOT_TEXT), st.text(max_size=200)))
def test_snapshot_reader_gives_pins_or_a_clear_error(text: str) -> None:
    try:
        packages = parse_snapshot(text, "base.txt")
    except GpubuildError as exc:
        assert "base.txt" in str(exc)
        return
    assert all(isinstance(v, str) and v for v in packages.values())


@QUICK
@given(
    st.one_of(
        mutated_lines(PROFILE_TEXT),
        mutated_bytes(PROFILE_TEXT.encode()).map(lambda b: b.decode("utf-8", "replace")),
    )
)
def test_profile_reader_gives_a_profile_or_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    folder = tmp_path_factory.mktemp("profile")
    shutil.copytree(REPO / "profiles" / "bases", folder / "bases")
    path = folder / "p.toml"
    path.write_text(text)
    try:
        profile = load_profile(path)
    except GpubuildError as exc:
        assert str(path) in str(exc)
        return
    assert profile.target.install_dir.startswith("/")


# --- through the CLI: exit 2 or a clean result, and no write outside the target ----------


def _tree(root: Path) -> dict[str, int]:
    """Every path below root, with the modification time of files (folders change their own
    when a staging folder comes and goes inside them)."""
    return {
        str(p.relative_to(root)): 0 if p.is_dir() else p.lstat().st_mtime_ns
        for p in sorted(root.rglob("*"))
    }


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutated_json(_manifest_seed()))
def test_fetch_of_a_mutated_manifest_never_writes_outside_its_folder(
    tmp_path_factory: pytest.TempPathFactory, document: Any
) -> None:
    root = tmp_path_factory.mktemp("fetch")
    store = root / "store"
    digest = _manifest_seed()["digest"]
    manifest = store / "torch-cu121" / digest / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps(document))
    work = root / "work"
    work.mkdir()
    before = _tree(root)
    result = CliRunner().invoke(
        main, ["fetch", f"{store.as_uri()}/torch-cu121/{digest}", "--into", str(work / "into")]
    )
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    assert _tree(root) == before  # no blob exists, so nothing may have been made anywhere


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.one_of(mutated_lines(LOCK_TEXT), mutated_json(_lock_header_seed()).map(_with_header)))
def test_check_and_init_script_on_a_mutated_lock(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    root = tmp_path_factory.mktemp("lock")
    repo = root / "repo"
    shutil.copytree(FIXTURES / "your-gpu-service" / "gpubuild", repo)
    (repo / "torch-cu121.lock").write_text(text)
    before = _tree(root)
    checked = CliRunner().invoke(main, ["check", str(repo)])
    assert checked.exit_code in (0, 1), checked.output
    assert checked.exception is None or isinstance(checked.exception, SystemExit), repr(
        checked.exception
    )
    out = root / "out" / "init.sh"
    scripted = CliRunner().invoke(
        main,
        [
            "init-script",
            str(repo / "torch-cu121.toml"),
            "--store",
            (root / "store").as_uri(),
            "-o",
            str(out),
        ],
    )
    assert scripted.exit_code in (1, 2), scripted.output
    assert scripted.exception is None or isinstance(scripted.exception, SystemExit), repr(
        scripted.exception
    )
    assert not out.exists()
    assert _tree(root) == before
