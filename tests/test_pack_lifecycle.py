"""pack while it runs: progress appears as work completes, SIGTERM stops it cleanly (its uv
too), and what a killed run leaves is swept by the next run, never a live run's folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.pack import WORK_PREFIX, write_artifact
from builder.progress import Step
from builder.tools import run_tool
from tests.helpers import REPO, write_profile
from tests.support.faults import ScriptedStore, Stall
from tests.support.index import write_simple_index
from tests.support.processes import descendants, kill_tree
from tests.support.wheels import build_wheel


def _distribution(tree: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution as uv leaves it: its files and a dist-info with a RECORD."""
    info = tree / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [f"{name}-1.0.dist-info/METADATA,,", f"{name}-1.0.dist-info/RECORD,,"]
    for path, data in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
        record.append(f"{path},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_shards_are_reported_as_they_finish(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _distribution(tree, "big", {"big/blob.bin": os.urandom(96 * 2**20)})  # slow to pack
    for name in ("a", "b", "c"):
        _distribution(tree, name, {f"{name}/x.py": f"NAME = {name!r}\n".encode() * 50})
    out = tmp_path / "store"
    blobs_at_first_report: list[int] = []

    def on_progress(message: str | Step) -> None:
        if isinstance(message, Step) and not blobs_at_first_report:
            blobs_at_first_report.append(len(list((out / "blobs").glob("*.tar.zst"))))

    manifest = write_artifact(
        tree,
        out,
        profile="progress",
        digest="d" * 64,
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shard_threshold=1024,
        on_progress=on_progress,
    )
    assert len(manifest.shards) > 1
    # The first shard was reported while others were still being written.
    assert blobs_at_first_report and blobs_at_first_report[0] < len(manifest.shards)


def test_a_tools_lines_arrive_while_it_runs() -> None:
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    result = run_tool(
        ["bash", "-c", "echo first >&2; sleep 1; echo second >&2"],
        on_line=lambda line: seen.append((time.monotonic() - started, line)),
    )
    assert result.returncode == 0
    assert [line for _, line in seen] == ["first", "second"]
    assert seen[0][0] < 0.8 < seen[1][0]


@pytest.fixture
def stalling_index(tmp_path: Path) -> Iterator[tuple[ScriptedStore, str, Path]]:
    """A package index whose one wheel can be made to stall mid-download."""
    wheel = build_wheel(
        tmp_path / "wheels", "slow-pkg", "1.0", files={"slow_pkg/data.bin": os.urandom(3 * 2**20)}
    )
    root = tmp_path / "index"
    write_simple_index([wheel], root)
    with ScriptedStore(root) as server:
        yield server, f"/files/{wheel.name}", root


def _start_pack(profile: Path, out: Path, index: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "builder.cli", "pack", str(profile), "--out", str(out),
         "--index-url", index],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "UV_NO_CACHE": "1"},
        cwd=REPO,
    )  # fmt: skip


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert proc.poll() is None, f"pack ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within 60 s"
        time.sleep(0.05)


def _work_folders(out: Path) -> list[Path]:
    return sorted(out.glob(f"{WORK_PREFIX}*")) if out.exists() else []


def _profile(tmp_path: Path, server: ScriptedStore, index: str) -> Path:
    profile = write_profile(tmp_path / "profiles", heavy=["slow-pkg==1.0"], python="3.11")
    resolved = subprocess.run(
        [sys.executable, "-m", "builder.cli", "resolve", str(profile), "--index-url", index],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert resolved.returncode == 0, resolved.stderr
    return profile


def test_sigterm_while_installing_stops_uv_and_leaves_nothing(
    tmp_path: Path, stalling_index: tuple[ScriptedStore, str, Path]
) -> None:
    server, wheel_path, _ = stalling_index
    index = f"{server.url}/simple"
    profile = _profile(tmp_path, server, index)
    server.script(wheel_path, Stall(0.5))
    out = tmp_path / "store"
    before = len(server.served(wheel_path))
    proc = _start_pack(profile, out, index)
    _wait_for(lambda: len(server.served(wheel_path)) > before, proc, "the stalled download")
    children = descendants(proc.pid)
    assert children, "uv should be running"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert _work_folders(out) == []
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tar.zst"))
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "uv outlived gpubuild"
        time.sleep(0.05)


def test_a_killed_runs_leftovers_are_swept_but_never_a_live_runs(
    tmp_path: Path, stalling_index: tuple[ScriptedStore, str, Path]
) -> None:
    server, wheel_path, _ = stalling_index
    index = f"{server.url}/simple"
    profile = _profile(tmp_path, server, index)
    server.script(wheel_path, Stall(0.5), Stall(0.5), Stall(0.5))
    out = tmp_path / "store"

    killed = _start_pack(profile, out, index)
    _wait_for(lambda: len(_work_folders(out)) == 1, killed, "a work folder")
    kill_tree(killed)  # SIGKILL: no cleanup can run
    (leftover,) = _work_folders(out)

    live = _start_pack(profile, out, index)
    try:
        _wait_for(lambda: not leftover.exists(), live, "the dead run's folder to go")
        _wait_for(lambda: len(_work_folders(out)) == 1, live, "its own work folder")
        (mine,) = _work_folders(out)
        other = _start_pack(profile, out, index)
        try:
            _wait_for(lambda: len(_work_folders(out)) == 2, other, "a second work folder")
            assert mine.exists()  # the second run did not sweep the first, live one
        finally:
            other.send_signal(signal.SIGTERM)
            other.communicate(timeout=30)
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=30)
    assert _work_folders(out) == []


def test_a_work_folder_is_never_swept_while_its_run_lives(tmp_path: Path) -> None:
    from builder.files import NEW_PREFIX, sweep_stale, work_folder

    # A folder being made (not locked yet) carries another name, which a sweep of the
    # prefix never takes while it is young.
    (tmp_path / f"{NEW_PREFIX}{WORK_PREFIX}half").mkdir()
    with work_folder(tmp_path, WORK_PREFIX) as mine:
        assert mine.name.startswith(WORK_PREFIX) and (mine / ".lock").exists()
        swept = sweep_stale(tmp_path, WORK_PREFIX, patterns=(f"{NEW_PREFIX}{WORK_PREFIX}*",))
        assert swept == [] and mine.exists()
        assert (tmp_path / f"{NEW_PREFIX}{WORK_PREFIX}half").exists()
    assert not mine.exists()
    # Once its run is gone (its lock free), the next sweep takes it.
    dead = tmp_path / f"{WORK_PREFIX}dead"
    dead.mkdir()
    (dead / ".lock").touch()
    assert sweep_stale(tmp_path, WORK_PREFIX) == [dead] and not dead.exists()
