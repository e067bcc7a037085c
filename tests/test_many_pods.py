"""A worker group starting at once: N init scripts against one store behind a proxy that
throttles (503 Server Busy with Retry-After, a cap on connections), resets connections mid-body
and paces bodies. Every pod must end with the complete, verified set; retries must honour
Retry-After, spread out (full jitter: no synchronized waves) and stay within GPUBUILD_RETRIES;
a cut download must resume, not start again. Against nginx serving a folder store (N = 32) and
Azurite with a read-only SAS (a smaller N). bench/bench_many_pods.py runs the same at larger N.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from builder.initscript import render_init_script
from builder.manifest import Manifest, blob_key, manifest_to_bytes
from builder.pack import write_artifact
from builder.stores import open_store
from builder.stores.sas import make_read_sas
from builder.tools import run_uv
from tests.support.faults import Chaos, FaultProxy, PodRun, Relayed, retry_gaps, run_pods
from tests.support.services import AzuriteEndpoint, nginx_serving
from tests.support.users import nonroot_folder
from tests.support.wheels import build_wheel

PROFILE = "crowd"
INSTALL_DIR = "/shared-packages"
PODS = 32
AZURITE_PODS = 8
RETRIES = 10
RETRY_AFTER = 1
# Sized for about a minute on two cores: small shards, a cap well below the crowd's demand.
CHAOS = Chaos(
    busy=0.15,
    retry_after=RETRY_AFTER,
    reset=0.1,
    max_connections=8,
    bytes_per_second=2_000_000,
    seed=12,
)


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    store: Path  # the folder store nginx serves
    files: dict[str, str]  # relative path -> sha256 of what the tree must hold


def _tree_files(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(".gpubuild") or path.is_dir() or path.is_symlink():
            continue
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """A set of four shards (three of a few hundred kB, incompressible, one of small files),
    packed into a folder that nginx's workers may read."""
    work = tmp_path_factory.mktemp("crowd")
    noise = random.Random(32)
    wheels = [
        build_wheel(
            work / "wheels",
            f"part-{name}",
            "1.0",
            files={f"part_{name}/blob.bin": noise.randbytes(size), f"part_{name}/__init__.py": b""},
        )
        for name, size in (("a", 600_000), ("b", 400_000), ("c", 250_000))
    ]
    wheels.append(
        build_wheel(
            work / "wheels",
            "many-files",
            "1.0",
            files={f"many_files/m{i}.py": f"X = {i}\n".encode() for i in range(200)},
        )
    )
    tree = work / "tree"
    done = run_uv(["pip", "install", "--target", str(tree), "--no-deps", *map(str, wheels)])
    assert done.returncode == 0, done.stderr
    with nonroot_folder("gpubuild-crowd-") as home:
        store = home / "store"
        manifest = write_artifact(
            tree,
            store,
            profile=PROFILE,
            digest=hashlib.sha256(b"crowd").hexdigest(),
            python="3.11",
            platform="x86_64-manylinux_2_28",
            install_dir=INSTALL_DIR,
            shard_threshold=100_000,
        )
        for path in [store, *store.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        assert len(manifest.shards) >= 4
        yield Published(manifest, store, _tree_files(tree))


def _script(folder: Path, manifest: Manifest, url: str) -> Path:
    path = folder / f"init-{uuid.uuid4().hex[:6]}.sh"
    path.write_text(render_init_script(manifest, url))
    path.chmod(0o755)
    return path


def _env(**extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "GPUBUILD_RETRIES": str(RETRIES),
        "GPUBUILD_PARALLEL": "2",
        **extra,
    }


@dataclass(frozen=True)
class CrowdFigures:
    pods: int
    seconds: float
    bytes_served: int
    bytes_needed: int
    requests: int
    failed_requests: int
    retries_by_pods: int
    faults: dict[str, int]


def _check_crowd(
    runs: list[PodRun], entries: list[Relayed], published: Published, seconds: float
) -> CrowdFigures:
    """Every promise of the crowd test; returns the figures it reports."""
    manifest = published.manifest
    for run in runs:
        assert run.returncode == 0, f"{run.name}:\n{run.stderr[-3000:]}"
        assert (run.target / ".gpubuild" / "installed").read_text().split()[0] == manifest.digest
        assert _tree_files(run.target) == published.files, run.name
    blobs = {f"/{blob_key(s.sha256)}" for s in manifest.shards}
    gets = [e for e in entries if e.method == "GET" and e.path.endswith(tuple(blobs))]
    # Within GPUBUILD_RETRIES: no pod asked for one shard more often than it may try.
    per_pod_and_blob = Counter((e.client, e.path) for e in gets)
    assert max(per_pod_and_blob.values()) <= RETRIES
    assert len(per_pod_and_blob) == len(runs) * len(manifest.shards)
    failed = [e for e in gets if e.status >= 500 or e.fault]
    faults = Counter(e.fault or str(e.status) for e in failed)
    assert faults["busy"] and faults["capped"] and faults["reset"], faults
    # Each failed request cost its pod exactly one retry, which the pod reports.
    reported = sum(run.retries for run in runs)
    assert reported == len(failed), (reported, faults)
    # Retry-After is honoured: no retry after a 503 came back sooner than it asked. (Measured
    # from when the 503 was asked for: a busy machine may log its end late, never its start.)
    pairs = retry_gaps(gets)
    waits = [after.started - before.started for before, after in pairs if before.status == 503]
    assert waits and min(waits) >= RETRY_AFTER, min(waits)
    # Full jitter: the waits after a 503 spread over the backoff window instead of landing
    # together (no 100 ms slot holds more than a fifth of them; a fixed backoff puts them
    # all in one).
    slots = Counter(int((wait - RETRY_AFTER) * 10) for wait in waits)
    assert max(slots.values()) <= max(3, len(waits) // 5), sorted(slots.items())
    assert statistics.pstdev(waits) > 0.2, statistics.pstdev(waits)
    # A reset download resumes from what it kept: its retry asks for a later byte (what a
    # reset loses in flight is gone, though: test_a_download_cut_at_90_percent... is exact).
    resets = [(b, a) for b, a in pairs if b.fault == "reset"]
    assert any(a.range_start > 0 for _, a in resets)
    needed = len(runs) * manifest.total_bytes
    served = sum(e.bytes_sent for e in gets if e.status in (200, 206))
    # Resumed, not restarted: only what a reset cut off can have been sent twice.
    assert needed <= served <= needed + sum(b.bytes_sent for b, _ in resets), (served, needed)
    return CrowdFigures(
        pods=len(runs),
        seconds=seconds,
        bytes_served=served,
        bytes_needed=needed,
        requests=len(gets),
        failed_requests=len(failed),
        retries_by_pods=reported,
        faults=dict(faults),
    )


def _report(label: str, figures: CrowdFigures) -> None:
    print(
        f"\n{label}: {figures.pods} pods in {figures.seconds:.1f} s;"
        f" {figures.bytes_served / 1e6:.1f} MB served for {figures.bytes_needed / 1e6:.1f} MB"
        f" needed; {figures.requests} requests, {figures.failed_requests} failed"
        f" ({figures.faults}); {figures.retries_by_pods} retries reported by the pods"
    )


def test_a_worker_group_starting_at_once_behind_a_throttling_proxy(
    published: Published, tmp_path: Path
) -> None:
    with (
        nginx_serving(published.store, tmp_path / "nginx") as upstream,
        FaultProxy(upstream, CHAOS) as proxy,
    ):
        script = _script(tmp_path, published.manifest, proxy.url)
        started = time.monotonic()
        runs = run_pods(script, PODS, tmp_path / "pods", proxy.client_url, _env(), timeout=240)
        seconds = time.monotonic() - started
        entries = proxy.entries()
    figures = _check_crowd(runs, entries, published, seconds)
    _report("nginx", figures)


@pytest.mark.azurite
def test_a_worker_group_against_azurite_with_a_read_only_sas(
    published: Published, azurite_endpoint: AzuriteEndpoint, tmp_path: Path
) -> None:
    container = f"crowd-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)
        store = open_store(f"{azurite_endpoint.blob_url}/{container}")
        manifest = published.manifest
        for shard in manifest.shards:
            store.put_blob(shard.sha256, published.store / blob_key(shard.sha256))
        store.put_manifest(PROFILE, manifest.digest, manifest_to_bytes(manifest))
        sas = make_read_sas(
            store, expiry=datetime.now(timezone.utc) + timedelta(days=3, minutes=30)
        )
    path = f"/{container}"  # blob_url ends in the account: the proxy keeps that path
    with FaultProxy(azurite_endpoint.blob_url, CHAOS) as proxy:
        script = _script(tmp_path, manifest, f"{proxy.url}{path}")
        started = time.monotonic()
        runs = run_pods(
            script,
            AZURITE_PODS,
            tmp_path / "pods",
            lambda name: f"{proxy.client_url(name)}{path}",
            _env(GPUBUILD_SAS=sas),
            timeout=240,
        )
        seconds = time.monotonic() - started
        entries = proxy.entries()
    # The promises hold whatever the draw gave this smaller crowd, except that it may not
    # have met every kind of fault: those are checked on the bigger one.
    for run in runs:
        assert run.returncode == 0, f"{run.name}:\n{run.stderr[-3000:]}"
        assert _tree_files(run.target) == published.files
        assert sas.split("sig=", 1)[1].split("&", 1)[0] not in run.stderr
        # Three days left on the SAS: every pod warns, without printing the token.
        assert "WARNING: the SAS from GPUBUILD_SAS expires in 3 days 0 hours" in run.stderr
    gets = [e for e in entries if e.method == "GET" and "/blobs/" in e.path]
    assert max(Counter((e.client, e.path) for e in gets).values()) <= RETRIES
    failed = [e for e in gets if e.status >= 500 or e.fault]
    assert sum(run.retries for run in runs) == len(failed)
    waits = [a.started - b.started for b, a in retry_gaps(gets) if b.status == 503]
    assert all(wait >= RETRY_AFTER for wait in waits)
    served = sum(e.bytes_sent for e in gets if e.status in (200, 206))
    print(
        f"\nazurite: {len(runs)} pods in {seconds:.1f} s; {served / 1e6:.1f} MB served for"
        f" {len(runs) * manifest.total_bytes / 1e6:.1f} MB needed; {len(gets)} requests,"
        f" {len(failed)} failed; {sum(run.retries for run in runs)} retries"
    )


@pytest.mark.parametrize(
    "upstream_kind", ["nginx", pytest.param("azurite", marks=pytest.mark.azurite)]
)
def test_a_download_cut_at_90_percent_resumes_from_there(
    published: Published,
    tmp_path: Path,
    upstream_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    """The biggest shard's first response breaks off after 90% of its body: the retry asks for
    the rest with a Range request, so the blob crosses the wire once (the sha256 is still
    checked over the whole blob: the pod ends with the verified set)."""
    manifest = published.manifest
    big = max(manifest.shards, key=lambda s: s.bytes)
    chaos = Chaos(reset=1.0, cut_between=(0.9, 0.9), max_resets=1, cut_with="close")
    extra: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if upstream_kind == "nginx":
            upstream = stack.enter_context(nginx_serving(published.store, tmp_path / "nginx"))
            path = ""
        else:
            endpoint: AzuriteEndpoint = request.getfixturevalue("azurite_endpoint")
            container = f"resume-{uuid.uuid4().hex[:12]}"
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("AZURE_STORAGE_CONNECTION_STRING", endpoint.connection_string)
                store = open_store(f"{endpoint.blob_url}/{container}")
                for shard in manifest.shards:
                    store.put_blob(shard.sha256, published.store / blob_key(shard.sha256))
                extra["GPUBUILD_SAS"] = make_read_sas(
                    store, expiry=datetime.now(timezone.utc) + timedelta(days=30)
                )
            upstream, path = endpoint.blob_url, f"/{container}"
        proxy = stack.enter_context(FaultProxy(upstream, chaos))
        script = _script(tmp_path, manifest, f"{proxy.url}{path}")
        runs = run_pods(
            script,
            1,
            tmp_path / "pods",
            lambda name: f"{proxy.client_url(name)}{path}",
            _env(GPUBUILD_PARALLEL="1", **extra),
        )
        entries = proxy.entries()
    assert runs[0].returncode == 0, runs[0].stderr
    assert _tree_files(runs[0].target) == published.files
    served = [e for e in entries if e.path.endswith(blob_key(big.sha256))]
    # Shards go biggest first, one at a time: the first response was the cut one.
    assert [e.fault for e in served] == ["reset", ""]
    first, second = served
    assert first.bytes_sent == int(big.bytes * 0.9)
    assert second.status == 206 and second.range_start == first.bytes_sent
    # The second request asked for the last tenth only: the blob crossed the wire once.
    assert sum(e.bytes_sent for e in served) == big.bytes
