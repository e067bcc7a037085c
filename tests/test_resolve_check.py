"""`gpubuild resolve --check`: exit 0 for a current lock, 1 with what changed in words for an
edited profile, a changed snapshot, another lock format or other index options; no resolver,
no network, nothing written, and fast. The locks are real resolutions (uv, wheels built here)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.backends import Job
from builder.indexes import IndexSettings
from builder.lock import read_lock, source_changes
from builder.profile import load_profile
from builder.resolve import ensure_lock
from tests.helpers import run_cli, write_profile
from tests.support.index import serve_index
from tests.support.wheels import build_wheel

BASE = """\
# test base image
protobuf==4.25.8
numpy==1.26.4
click==8.1.7
"""


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dists = tmp_path_factory.mktemp("check-dists")
    wheels = [
        build_wheel(dists, "model-a", "1.0", requires=["helper>=1", "numpy", "click"]),
        build_wheel(dists, "model-a", "2.0", requires=["helper>=1"]),
        build_wheel(dists, "helper", "1.5"),
        build_wheel(dists, "numpy", "1.26.4"),
        build_wheel(dists, "click", "8.1.7"),
        build_wheel(dists, "light-tool", "0.1"),
    ]
    with serve_index(wheels, tmp_path_factory.mktemp("check-index")) as url:
        yield url


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory, index: str) -> Path:
    """A folder with a profile, its snapshot and its lock, resolved once for the module."""
    folder = tmp_path_factory.mktemp("resolved")
    profile = write_profile(folder, name="checked", heavy=["model-a==1.0"], base=BASE)
    ensure_lock(load_profile(profile), settings=IndexSettings(default_url=index))
    return folder


@pytest.fixture
def repo(tmp_path: Path, resolved: Path) -> Path:
    """A fresh copy of the resolved folder; returns the profile path."""
    shutil.copytree(resolved, tmp_path / "repo")
    return tmp_path / "repo" / "checked.toml"


def _check(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", "resolve", str(profile), "--check", *args],
        capture_output=True,
        text=True,
    )


def test_a_current_lock_exits_0_and_is_left_alone(repo: Path, index: str) -> None:
    lock = repo.with_suffix(".lock")
    before = (lock.read_bytes(), lock.stat().st_mtime_ns)
    done = _check(repo, "--index-url", index)
    assert done.returncode == 0, done.stderr
    assert f"{lock} is current (digest " in done.stderr
    assert done.stdout == ""
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before
    assert sorted(p.name for p in repo.parent.iterdir()) == [
        "bases",
        "checked.lock",
        "checked.toml",
    ]


def test_it_runs_no_resolver_and_needs_no_network(repo: Path, tmp_path: Path) -> None:
    """The index the lock was resolved with is gone (its server stopped): --check still
    answers, never looks for uv, and never imports pack, the stores or the Azure SDK."""
    dists = tmp_path / "dists"
    with serve_index([build_wheel(dists, "helper", "1.5")], tmp_path / "gone") as gone:
        profile = write_profile(repo.parent, name="checked", heavy=["helper==1.5"], base=BASE)
        ensure_lock(load_profile(profile), settings=IndexSettings(default_url=gone))
    probe = (
        "import sys\n"
        "from builder.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], prog_name='gpubuild')\n"
        "except SystemExit as done:\n"
        "    loaded = sorted(m for m in sys.modules if m.startswith(('builder.pack',"
        " 'builder.stores', 'azure')))\n"
        "    from builder.tools import uv_bin\n"
        "    print(done.code, loaded, uv_bin.cache_info().misses)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "resolve", str(profile), "--check", "--index-url", gone],
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent", "UV_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert done.stdout.strip() == "0 [] 0", done.stderr  # uv was never even looked for


def test_check_takes_under_half_a_second(repo: Path, index: str) -> None:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        done = _check(repo, "--index-url", index)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0, done.stderr
    assert statistics.median(times) < 0.5, times


def test_an_edited_requirement_exits_1_naming_it(repo: Path, index: str) -> None:
    lock = repo.with_suffix(".lock")
    before = lock.read_bytes()
    repo.write_text(repo.read_text().replace('"model-a==1.0"', '"model-a==2.0", "helper<1.2"'))
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert f"{lock} is stale for {repo}:" in done.stderr
    assert "profile edited (checked.toml): it asks for model-a==2.0, the lock has model-a 1.0" in (
        done.stderr
    )
    assert "it asks for helper<1.2, the lock has helper 1.5" in done.stderr
    assert f"run `gpubuild resolve {repo}`" in done.stderr
    assert lock.read_bytes() == before


def test_a_new_exclude_and_a_dropped_requirement_are_named(repo: Path, index: str) -> None:
    repo.write_text(
        repo.read_text()
        .replace('"model-a==1.0"', '"helper==1.5"')
        .replace('exclude = ["click"]', 'exclude = ["click", "helper"]')
    )
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert "it no longer asks for model-a, which the lock has at 1.0" in done.stderr
    assert "it excludes helper, which the lock ships (1.5)" in done.stderr


def test_a_changed_base_snapshot_exits_1_naming_the_package(repo: Path, index: str) -> None:
    snapshot = repo.parent / "bases" / "base.txt"
    snapshot.write_text(snapshot.read_text().replace("numpy==1.26.4", "numpy==1.26.3"))
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert (
        "base snapshot changed (base.txt): it lists numpy 1.26.3, the lock leaves numpy 1.26.4"
        " to the base" in done.stderr
    )
    assert "profile edited" not in done.stderr


def test_a_new_prune_pattern_is_named(repo: Path, index: str) -> None:
    repo.write_text(repo.read_text().replace("[policy]\n", '[policy]\nprune = ["helper/docs/*"]\n'))
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert (
        "profile edited (checked.toml): [policy] prune is now ['helper/docs/*'], the lock prunes"
        " nothing" in done.stderr
    )


def test_an_edit_the_lock_cannot_show_still_counts(repo: Path, index: str) -> None:
    repo.write_text("# a comment\n" + repo.read_text())
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert "changed in a way the lock does not show (a comment" in done.stderr


def test_another_lock_format_exits_1(repo: Path, index: str) -> None:
    lock = repo.with_suffix(".lock")
    lock.write_text(lock.read_text().replace('"format": 3', '"format": 2'))
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert "lock format:" in done.stderr and "2 is not lock format 3" in done.stderr


def test_a_missing_lock_exits_1(repo: Path) -> None:
    repo.with_suffix(".lock").unlink()
    done = _check(repo)
    assert done.returncode == 1
    assert "no lock:" in done.stderr


def test_other_index_options_are_told_apart(repo: Path, index: str) -> None:
    done = _check(repo)  # resolved with --index-url, checked without
    assert done.returncode == 1
    assert (
        "index options or gpubuild version changed: the lock was resolved with other"
        " --index-url/--index options than this run's (none)" in done.stderr
    )
    done = _check(repo, "--index-url", index, "--backend", "pip-tools")
    assert done.returncode == 1
    assert "resolver changed: the lock was resolved with uv " in done.stderr


def test_json_document(repo: Path, index: str) -> None:
    done = run_cli("resolve", str(repo), "--check", "--json", "--index-url", index)
    assert done.returncode == 0
    document = json.loads(done.stdout)
    assert document["current"] is True
    [entry] = document["locks"]
    assert entry["set"] == "heavy" and entry["reasons"] == [] and len(entry["digest"]) == 64
    repo.write_text(repo.read_text().replace('"model-a==1.0"', '"model-a==2.0"'))
    done = run_cli("resolve", str(repo), "--check", "--json", "--index-url", index)
    assert done.returncode == 1
    assert json.loads(done.stdout)["locks"][0]["reasons"] == [
        "profile edited (checked.toml): it asks for model-a==2.0, the lock has model-a 1.0"
    ]


def test_a_bad_profile_is_bad_input(repo: Path) -> None:
    repo.write_text(repo.read_text().replace('python = "3.10"', 'python = "3"'))
    done = _check(repo)
    assert done.returncode == 2
    assert "[target.python]" in done.stderr and "Traceback" not in done.stderr


def test_the_light_lock_is_checked_too(repo: Path, index: str) -> None:
    repo.write_text(repo.read_text() + '[light]\nrequirements = ["light-tool==0.1"]\n')
    settings = IndexSettings(default_url=index)
    heavy = ensure_lock(load_profile(repo), settings=settings)
    light_lock = repo.with_name("checked.light.lock")
    done = _check(repo, "--index-url", index)
    assert done.returncode == 1
    assert f"{light_lock} is stale" in done.stderr and "no lock:" in done.stderr
    provided = {p.name: p.version for p in heavy.lock.packages}
    job = Job(requirements=("light-tool==0.1",), set_name="light", provided=provided)
    ensure_lock(load_profile(repo), settings=settings, lock_path=light_lock, job=job)
    done = _check(repo, "--index-url", index)
    assert done.returncode == 0, done.stderr
    assert f"{light_lock} is current" in done.stderr


def test_source_changes_reads_shadowing_off_the_lock(repo: Path) -> None:
    """The pure explanation on its own: a base package the lock ships is now in the base."""
    lock = read_lock(repo.with_suffix(".lock"))
    snapshot = repo.parent / "bases" / "base.txt"
    snapshot.write_text(snapshot.read_text() + "helper==1.4\n")
    reasons = source_changes(lock, load_profile(repo), ("model-a==1.0",))
    assert reasons == (
        "base snapshot changed (base.txt): it lists helper 1.4, and the lock ships helper 1.5"
        " as if the base lacked it",
    )
