"""How many shards the init script hashes and unpacks at once: no more than the cores the
container may use, which is nproc capped by the CPU limit of its cgroup (v1 or v2). Tested by
running the script: a bsdtar wrapper records when each unpack runs, and a real cgroup with a
one-core quota stands for a pod's `limits.cpu`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder.initscript import render_init_script
from builder.manifest import Manifest
from tests.support.users import is_root
from tests.test_initscript import (
    Artifacts,
    assert_installed,
    build_artifacts,
    run_init,
    write_script,
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    return build_artifacts(tmp_path_factory.mktemp("artifacts"))


# --- the cgroup reader, on cgroup trees made in a folder ----------------------------------


def _cgroup_function() -> str:
    """The script's cgroup_cpu_limit function, exactly as rendered."""
    text = render_init_script_for_tests()
    found = re.search(r"^cgroup_cpu_limit\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert found is not None, "the init script has no cgroup_cpu_limit function"
    return found.group(0)


def render_init_script_for_tests() -> str:
    manifest = Manifest(
        digest="0" * 64,
        profile="cores",
        python="3.10",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shards=(),
        env={},
        packages=(),
    )
    return render_init_script(manifest, "file:///store")


def cpu_limit(root: Path, proc_cgroup: str) -> str:
    (root / "proc-cgroup").write_text(proc_cgroup)
    done = subprocess.run(
        [
            "bash",
            "-c",
            _cgroup_function() + 'cgroup_cpu_limit "$1" "$2"',
            "cgroup",
            str(root / "proc-cgroup"),
            str(root / "fs"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_a_v2_container_sees_its_own_limit_rounded_up(tmp_path: Path) -> None:
    write(tmp_path / "fs" / "cpu.max", "150000 100000")
    assert cpu_limit(tmp_path, "0::/\n") == "2"


def test_v2_takes_the_tightest_limit_on_the_way_up(tmp_path: Path) -> None:
    """A pod's limit sits on the pod's cgroup, a container's on its own: the lower one binds."""
    fs = tmp_path / "fs"
    write(fs / "cpu.max", "max 100000")
    write(fs / "kubepods" / "cpu.max", "max 100000")
    write(fs / "kubepods" / "pod1" / "cpu.max", "400000 100000")
    write(fs / "kubepods" / "pod1" / "init" / "cpu.max", "max 100000")
    assert cpu_limit(tmp_path, "0::/kubepods/pod1/init\n") == "4"
    write(fs / "kubepods" / "pod1" / "init" / "cpu.max", "50000 100000")
    assert cpu_limit(tmp_path, "0::/kubepods/pod1/init\n") == "1"


def test_v1_reads_the_cfs_quota_of_joined_controllers(tmp_path: Path) -> None:
    fs = tmp_path / "fs" / "cpu,cpuacct"
    write(fs / "cpu.cfs_quota_us", "-1")
    write(fs / "cpu.cfs_period_us", "100000")
    write(fs / "kubepods" / "x" / "cpu.cfs_quota_us", "250000")
    write(fs / "kubepods" / "x" / "cpu.cfs_period_us", "100000")
    lines = "12:memory:/kubepods/x\n4:cpu,cpuacct:/kubepods/x\n"
    assert cpu_limit(tmp_path, lines) == "3"


def test_v1_inside_a_container_finds_the_limit_at_the_top_of_its_mount(tmp_path: Path) -> None:
    """Without a cgroup namespace the path names the host's folders, which the container's
    mount does not have: its own cgroup is the mount's top folder."""
    fs = tmp_path / "fs" / "cpu"
    write(fs / "cpu.cfs_quota_us", "200000")
    write(fs / "cpu.cfs_period_us", "100000")
    assert cpu_limit(tmp_path, "3:cpu:/docker/0123abcd\n") == "2"


@pytest.mark.parametrize(
    ("files", "proc"),
    [
        ({"cpu.max": "max 100000"}, "0::/\n"),
        ({"cpu.max": "garbage here"}, "0::/\n"),
        ({"cpu.max": "0 100000"}, "0::/\n"),
        ({"cpu.max": "100000 0"}, "0::/\n"),
        ({"cpu.max": "99999999999999999999 100000"}, "0::/\n"),
        ({}, "0::/\n"),
        ({"cpu.max": "100000 100000"}, "not a cgroup line\n"),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "2:cpu:/\n"),
    ],
)
def test_no_limit_or_an_unreadable_one_means_none(
    tmp_path: Path, files: dict[str, str], proc: str
) -> None:
    (tmp_path / "fs").mkdir()
    for name, text in files.items():
        write(tmp_path / "fs" / name, text)
    assert cpu_limit(tmp_path, proc) == ""


def test_no_proc_file_means_no_limit(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", _cgroup_function() + 'cgroup_cpu_limit "$1" /sys/fs/cgroup', "x", "/nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


# --- unpack slots, by running the script -----------------------------------------------------


def bsdtar_recorder(folder: Path, log: Path) -> str:
    """A PATH whose bsdtar notes when each extraction starts and ends (and lingers a little,
    so that extractions that may overlap do)."""
    real = shutil.which("bsdtar")
    assert real is not None, "bsdtar (Debian's libarchive-tools) is needed"
    folder.mkdir()
    wrapper = folder / "bsdtar"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'if [[ " $* " == *" -x "* ]]; then\n'
        f'  echo "start $(date +%s%N)" >>{log}\n'
        "  sleep 0.4\n"
        f'  {real} "$@"; rc=$?\n'
        f'  echo "end $(date +%s%N)" >>{log}\n'
        "  exit $rc\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def most_at_once(log: Path) -> int:
    events = []
    for line in log.read_text().splitlines():
        kind, stamp = line.split()
        events.append((int(stamp), 1 if kind == "start" else -1))
    # At one instant an end comes before a start: touching intervals do not overlap.
    events.sort(key=lambda event: (event[0], event[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize(("unpackers", "expected"), [("1", 1), ("3", 3)])
def test_no_more_shards_unpack_at_once_than_unpackers(
    artifacts: Artifacts, tmp_path: Path, unpackers: str, expected: int
) -> None:
    shards = len(artifacts.a.manifest.shards)
    assert shards >= 3, "the fixture needs several shards to show overlap"
    log = tmp_path / "unpacks.log"
    path = bsdtar_recorder(tmp_path / "bin", log)
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(
        script,
        target,
        {"PATH": path, "GPUBUILD_PARALLEL": "4", "GPUBUILD_UNPACKERS": unpackers},
    )
    assert result.returncode == 0, result.stderr
    assert_installed(target, artifacts.a)
    assert f"4 downloads at once (2 attempts each), {unpackers} unpacking at once" in result.stderr
    assert len(log.read_text().splitlines()) == 2 * shards
    # 3 slots with 4 workers and 0.4 s per unpack: they do overlap (the bound is what binds).
    assert most_at_once(log) == expected


def test_unpackers_never_exceed_downloads_and_must_be_a_number(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    capped = run_init(script, target, {"GPUBUILD_PARALLEL": "2", "GPUBUILD_UNPACKERS": "9"})
    assert capped.returncode == 0, capped.stderr
    assert "2 downloads at once (2 attempts each), 2 unpacking at once" in capped.stderr
    for bad in ("0", "two", "-1", "1.5"):
        other = tmp_path / f"vol-{bad}"
        other.mkdir()
        refused = run_init(script, other, {"GPUBUILD_UNPACKERS": bad})
        assert refused.returncode != 0
        assert f"GPUBUILD_UNPACKERS must be a whole number from 1 (got '{bad}')" in refused.stderr
        assert list(other.iterdir()) == [] or not (other / ".gpubuild" / "installed").exists()


# --- a real cgroup with a one-core quota -----------------------------------------------------


@contextmanager
def one_core_cgroup() -> Iterator[Path]:
    """A new cgroup (v2 where the cpu controller is there, else v1's cpu hierarchy) whose
    quota is one core; removed after. Yields the cgroup.procs file to join it."""
    name = f"gpubuild-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup")
    v1 = Path("/sys/fs/cgroup/cpu")
    if "cpu" in _read(v2 / "cgroup.subtree_control").split():
        group = v2 / name
        group.mkdir()
        (group / "cpu.max").write_text("100000 100000\n")
    elif (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000\n")
        (group / "cpu.cfs_quota_us").write_text("100000\n")
    else:
        pytest.fail("no writable cgroup cpu controller (v2 cpu in subtree_control, or v1 cpu)")
    try:
        yield group / "cgroup.procs"
    finally:
        group.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_a_cpu_limit_caps_the_unpackers_nproc_does_not_see(
    artifacts: Artifacts, tmp_path: Path
) -> None:
    if not is_root():
        pytest.skip("making a cgroup needs root (CI runs as root)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: a one-core limit changes nothing (CI has two)")
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    with one_core_cgroup() as procs:
        limited = subprocess.run(
            ["bash", "-c", 'echo $$ >"$1" && exec bash "$2"', "join", str(procs), str(script)],
            env={
                "PATH": os.environ["PATH"],
                "GPUBUILD_TARGET": str(target),
                "GPUBUILD_RETRIES": "2",
                "LANG": "C.UTF-8",
            },
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert limited.returncode == 0, limited.stderr
    assert_installed(target, artifacts.a)
    assert "4 downloads at once (2 attempts each), 1 unpacking at once" in limited.stderr
    assert "(1 core usable, by the container's CPU limit)" in limited.stderr
    free = tmp_path / "free"
    free.mkdir()
    unlimited = run_init(script, free)
    assert unlimited.returncode == 0, unlimited.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"({cores} cores usable, by nproc)" in unlimited.stderr
