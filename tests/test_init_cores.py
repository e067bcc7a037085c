"""How many shards the init script hashes and unpacks at once: no more than the cores the
container may use, which is nproc capped by the CPU limit of its cgroup (v1 or v2). Tested by
running the script: bsdtar and openssl wrappers record when each unpack and hash runs, and a
real cgroup with a one-core quota stands for a pod's `limits.cpu`."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder.initscript import render_init_script
from builder.manifest import Manifest
from tests.support.faults import ScriptedStore, Serve, blob_path
from tests.support.services import require_program
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
            # The script's own mode: an unset variable or a failing command would end it.
            "set -euo pipefail\n" + _cgroup_function() + 'cgroup_cpu_limit "$1" "$2"',
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


def test_v2_without_a_namespace_finds_the_limit_at_the_top_of_its_mount(tmp_path: Path) -> None:
    """The path names the host's folders; the container's mount is its own cgroup."""
    write(tmp_path / "fs" / "cpu.max", "300000 100000")
    assert cpu_limit(tmp_path, "0::/kubepods.slice/pod-1.slice/cri-0123.scope\n") == "3"


def test_a_hybrid_host_reads_v1_cpu_and_the_unified_mount(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    write(fs / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1")
    write(fs / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    write(fs / "unified" / "job" / "cpu.max", "200000 100000")
    lines = "5:cpu,cpuacct:/job\n0::/job\n"
    assert cpu_limit(tmp_path, lines) == "2"
    write(fs / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "100000")
    write(fs / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000")
    assert cpu_limit(tmp_path, lines) == "1"


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
        [
            "bash",
            "-c",
            "set -euo pipefail\n" + _cgroup_function() + 'cgroup_cpu_limit "$1" /sys/fs/cgroup',
            "x",
            "/nope",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


# --- unpack slots, by running the script -----------------------------------------------------


def slot_recorder(folder: Path, log: Path) -> str:
    """A PATH whose bsdtar (extracting), b3sum and openssl (hashing), the work an unpack slot covers,
    note when each run starts and ends, and linger a little so that runs that may overlap do."""
    folder.mkdir()
    for program, marker in (("bsdtar", "-x"), ("b3sum", "--no-names"), ("openssl", "dgst")):
        real = require_program(program, f"the Debian package that has {program}")
        wrapper = folder / program
        wrapper.write_text(
            "#!/bin/bash\n"
            f'if [[ " $* " == *" {marker} "* ]]; then\n'
            f'  echo "start $(date +%s%N) {program}" >>{log}\n'
            "  sleep 0.3\n"
            # The end is noted before the output goes on: the script reads the digest
            # through a pipe and goes on as soon as it has it.
            f'  out=$({real} "$@"); rc=$?\n'
            f'  echo "end $(date +%s%N) {program}" >>{log}\n'
            '  [[ -z $out ]] || printf "%s\\n" "$out"\n'
            "  exit $rc\n"
            "fi\n"
            f'exec {real} "$@"\n'
        )
        wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def most_at_once(log: Path) -> int:
    events = []
    for line in log.read_text().splitlines():
        kind, stamp, _program = line.split()
        events.append((int(stamp), 1 if kind == "start" else -1))
    # At one instant an end comes before a start: touching intervals do not overlap.
    events.sort(key=lambda event: (event[0], event[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("unpackers", [1, 3])
def test_no_more_shards_hash_or_unpack_at_once_than_unpackers(
    artifacts: Artifacts, tmp_path: Path, unpackers: int
) -> None:
    shards = len(artifacts.a.manifest.shards)
    assert shards >= 3, "the fixture needs several shards to show overlap"
    log = tmp_path / "unpacks.log"
    path = slot_recorder(tmp_path / "bin", log)
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(
        script,
        target,
        {"PATH": path, "GPUBUILD_PARALLEL": "4", "GPUBUILD_UNPACKERS": str(unpackers)},
    )
    assert result.returncode == 0, result.stderr
    assert_installed(target, artifacts.a)
    assert f"4 downloads at once (2 attempts each), {unpackers} unpacking at once" in result.stderr
    lines = log.read_text().splitlines()
    assert sum(line.endswith(" bsdtar") for line in lines) == 2 * shards
    # The shards are checked by b3sum (the manifest pins BLAKE3); one more run of b3sum and
    # the only one of openssl: the script's probes of whether they hash at all.
    assert "checking BLAKE3 (b3sum)" in result.stderr
    assert sum(line.endswith(" b3sum") for line in lines) == 2 * (shards + 1)
    assert sum(line.endswith(" openssl") for line in lines) == 2
    peak = most_at_once(log)
    assert peak <= unpackers
    if unpackers > 1:
        # 4 workers, several shards, 0.3 s per step: without overlap the count proves nothing.
        assert peak >= 2


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


def test_a_shard_rejected_once_gives_its_slot_back(artifacts: Artifacts, tmp_path: Path) -> None:
    """One slot: a worker whose shard fails its check must give the slot back before it
    downloads again, or every other worker (and the retry) waits for ever."""
    require_program("b3sum", "Debian package b3sum")  # the check the message names
    manifest = artifacts.a.manifest
    victim = max(manifest.shards, key=lambda shard: shard.bytes)
    target = tmp_path / "vol"
    target.mkdir()
    with ScriptedStore(artifacts.store) as server:
        server.script(blob_path(victim.sha256), Serve(body=b"not the pinned bytes" * 100))
        result = run_init(
            write_script(tmp_path, manifest, server.url),
            target,
            {"GPUBUILD_PARALLEL": "4", "GPUBUILD_UNPACKERS": "1"},
            timeout=90,
        )
        served = server.served(blob_path(victim.sha256))
    assert result.returncode == 0, result.stderr
    assert "BLAKE3 mismatch" in result.stderr and len(served) == 2
    assert_installed(target, artifacts.a)


def test_omp_num_threads_does_not_shrink_the_cores(artifacts: Artifacts, tmp_path: Path) -> None:
    """nproc obeys OMP_NUM_THREADS, which the worker image sets to 1; the script must not."""
    target = tmp_path / "vol"
    target.mkdir()
    script = write_script(tmp_path, artifacts.a.manifest, artifacts.store.as_uri())
    result = run_init(script, target, {"OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"})
    assert result.returncode == 0, result.stderr
    cores = len(os.sched_getaffinity(0))
    usable = f"{cores} core usable" if cores == 1 else f"{cores} cores usable"
    assert f"({usable}, by nproc)" in result.stderr


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
