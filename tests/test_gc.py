"""`gpubuild gc`: what it keeps (pure rules), what it leaves in a folder, Azurite and a registry,
and that it never deletes a blob under a publish running at the same time (many real races)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from builder.errors import BadInputError, IntegrityError
from builder.gc import GcPolicy, GcResult, choose_blobs, choose_manifests, plan_gc, run_gc
from builder.manifest import Manifest, blob_key, manifest_key
from builder.pack import PackResult
from builder.publish import PublishResult, publish
from builder.stores import FileStore, Store, StoredBlob, StoredManifest, open_store
from tests.helpers import pack_wheels, run_cli
from tests.support.services import AzuriteEndpoint
from tests.support.wheels import build_wheel

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


# --- the pure rules ---------------------------------------------------------------------------


def _listed(profile: str, name: str, hours_ago: float) -> StoredManifest:
    return StoredManifest(
        profile, hashlib.sha256(name.encode()).hexdigest(), NOW - hours_ago * HOUR
    )


def test_the_newest_of_each_profile_stay_and_named_digests_too() -> None:
    a = [_listed("a", f"a{i}", i) for i in range(5)]  # a0 newest
    b = [_listed("b", f"b{i}", 10 + i) for i in range(3)]
    kept, doomed, unmatched = choose_manifests(
        [*a, *b], GcPolicy(keep=2, keep_digests=(a[4].digest[:12], "f" * 20)), NOW
    )
    assert set(kept) == {a[0], a[1], a[4], b[0], b[1]}
    assert set(doomed) == {a[2], a[3], b[2]}
    assert unmatched == ["f" * 20]


def test_older_than_spares_what_is_recent_even_beyond_keep() -> None:
    a = [_listed("a", f"a{i}", 24 * i) for i in range(6)]  # one a day
    kept, doomed, _ = choose_manifests(a, GcPolicy(keep=1, older_than=timedelta(days=3)), NOW)
    assert kept == a[:3] and doomed == a[3:]


def test_equal_times_are_ordered_by_digest_so_a_run_is_reproducible() -> None:
    same = [_listed("a", f"x{i}", 1) for i in range(4)]
    kept, _, _ = choose_manifests(list(reversed(same)), GcPolicy(keep=2), NOW)
    assert kept == sorted(same, key=lambda m: m.digest)[:2]


def test_blobs_go_only_when_unneeded_and_older_than_the_cutoff() -> None:
    def blob(name: str, hours_ago: float | None) -> StoredBlob:
        when = None if hours_ago is None else NOW - hours_ago * HOUR
        return StoredBlob(hashlib.sha256(name.encode()).hexdigest(), 10, when)

    needed, old, young, undated = blob("n", 5), blob("o", 5), blob("y", 0.5), blob("u", None)
    doomed, kept_young = choose_blobs(
        [needed, old, young, undated], frozenset({needed.sha256}), NOW - HOUR
    )
    assert set(doomed) == {old, undated} and kept_young == [young]


@pytest.mark.parametrize(
    "policy", [{"keep": 0}, {"keep_digests": ("abc",)}, {"keep_digests": ("X" * 12,)}]
)
def test_a_policy_that_makes_no_sense_is_bad_input(policy: dict[str, object]) -> None:
    with pytest.raises(BadInputError):
        GcPolicy(**policy)  # type: ignore[arg-type]


# --- building and publishing real artifacts ---------------------------------------------------


@dataclass(frozen=True)
class Packs:
    folder: Path  # a local store that holds every pack below
    by_name: dict[str, PackResult]


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> Packs:
    """Five versions of two profiles; every digest shares one big shard, each profile's
    digests share one more, and each digest has a shard of its own."""
    work = tmp_path_factory.mktemp("gc-packs")
    noise = random.Random(10)
    wheels = work / "wheels"

    def wheel(name: str, version: str, size: int) -> Path:
        files = {f"{name.replace('-', '_')}/data.bin": noise.randbytes(size)}
        return build_wheel(wheels, name, version, files=files)

    shared = wheel("shared-cuda", "1.0", 200_000)
    found = {}
    for profile in ("prof-a", "prof-b"):
        base = wheel(f"base-{profile}", "1.0", 120_000)
        for version in range(1, 6):
            app = wheel(f"app-{profile}", f"{version}.0", 80_000 + version)
            name = f"{profile}-v{version}"
            found[name] = pack_wheels(work, work / "packs", [shared, base, app], profile, name)
    return Packs(work / "packs", found)


def _publish_in_order(store: Store, packs: Packs, *, pause: float = 0.0) -> list[str]:
    """v1 of both profiles, then v2 ..., one at a time (an Azure time has whole seconds)."""
    order = [f"{p}-v{v}" for v in range(1, 6) for p in ("prof-a", "prof-b")]
    for name in order:
        publish(packs.by_name[name], store)
        time.sleep(pause)
    return order


def _broken_manifests(store: Store) -> list[str]:
    """Published manifests that name a blob the store does not hold at its size."""
    broken = []
    for entry in store.list_manifests():
        manifest = store.manifest(entry.profile, entry.digest)
        if store.missing_shards(manifest.shards):
            broken.append(f"{entry.profile}/{entry.digest[:12]}")
    return broken


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class StoreUnderTest:
    url: str
    env: dict[str, str]
    pause: float  # between publishes, so each has a time of its own


@pytest.fixture(
    params=[
        "file",
        pytest.param("azure", marks=pytest.mark.azurite),
        pytest.param("registry", marks=pytest.mark.docker),  # as registry_address is marked
    ]
)
def store_under_test(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> StoreUnderTest:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
    if request.param == "file":
        return StoreUnderTest((tmp_path / "store").as_uri(), env, 0.0)
    if request.param == "azure":
        endpoint: AzuriteEndpoint = request.getfixturevalue("azurite_endpoint")
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", endpoint.connection_string)
        env["AZURE_STORAGE_CONNECTION_STRING"] = endpoint.connection_string
        url = f"az://{endpoint.account}/gc-{uuid.uuid4().hex[:12]}/cache"
        return StoreUnderTest(url, env, 1.05)
    address: str = request.getfixturevalue("registry_address")
    return StoreUnderTest(f"oci+http://{address}/gc/{uuid.uuid4().hex[:12]}", env, 0.0)


def test_gc_keeps_exactly_what_the_kept_manifests_need(
    packs: Packs, store_under_test: StoreUnderTest
) -> None:
    """10 digests of two profiles, --keep 2: the 4 newest manifests stay, and of the blobs only
    those they reference (a registry: their layers and configs too)."""
    store = open_store(store_under_test.url)
    order = _publish_in_order(store, packs, pause=store_under_test.pause)
    before = {blob.sha256 for blob in store.list_blobs()}
    time.sleep(1.1)  # every blob older than --grace 1s
    dry = run_cli(
        "gc", store_under_test.url, "--keep", "2", "--grace", "1s", "--dry-run", "--json",
        env=store_under_test.env,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert {b.sha256 for b in store.list_blobs()} == before  # a dry run deletes nothing
    assert len(store.list_manifests()) == 10

    done = run_cli(
        "gc", store_under_test.url, "--keep", "2", "--grace", "1s", "--json",
        env=store_under_test.env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    kept_names = ["prof-a-v5", "prof-b-v5", "prof-a-v4", "prof-b-v4"]
    kept = [packs.by_name[name].manifest for name in kept_names]
    left = {(m.profile, m.digest) for m in store.list_manifests()}
    assert left == {(m.profile, m.digest) for m in kept}
    needed = frozenset().union(*(store.blobs_of(m) for m in kept))
    doomed = [packs.by_name[n].manifest for n in order if n not in kept_names]
    doomed_only = {s.sha256 for m in doomed for s in m.shards} - needed
    assert doomed_only  # each old version had a shard of its own
    if store.keeps_blob_times:
        assert {blob.sha256 for blob in store.list_blobs()} == needed
    for sha256 in needed:
        assert store.has_blob(sha256) is not None
    for sha256 in doomed_only:
        assert store.has_blob(sha256) is None

    document, planned = done.json(), dry.json()
    assert {b["sha256"] for b in planned["blobs"]} == {b["sha256"] for b in document["blobs"]}
    assert planned["bytes"] == document["bytes"] > 0
    assert len(document["manifests"]) == 6 and len(document["kept"]) == 4
    assert f"deleted {blob_key(sorted(doomed_only)[0])}" in done.stderr
    assert "would delete 6 manifests" in dry.stderr and "would delete" in dry.stderr
    assert _broken_manifests(store) == []
    # A second run finds nothing more to do.
    again = run_cli("gc", store_under_test.url, "--keep", "2", "--grace", "1s", "--json",
                    env=store_under_test.env)  # fmt: skip
    assert again.returncode == 0 and again.json()["blobs"] == [] == again.json()["manifests"]


def test_blobs_younger_than_the_grace_period_stay(packs: Packs, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    for name in ("prof-a-v1", "prof-a-v2"):
        publish(packs.by_name[name], store)
    result = run_cli("gc", store.display_url, "--keep", "1", "--json")  # default grace: 1h
    assert result.returncode == 0, result.stderr
    document = result.json()
    assert len(document["manifests"]) == 1 and document["blobs"] == []
    assert document["young"] and "younger than the grace period" in result.stderr


def test_a_kept_manifest_that_does_not_read_stops_gc_before_anything_is_deleted(
    packs: Packs, tmp_path: Path
) -> None:
    store = FileStore(tmp_path / "store")
    for name in ("prof-a-v1", "prof-a-v2"):
        publish(packs.by_name[name], store)
    newest = packs.by_name["prof-a-v2"].manifest
    (store.root / manifest_key(newest.profile, newest.digest)).write_text('{"format": 1}')
    old = datetime.now(timezone.utc) - timedelta(days=1)
    for blob in store.list_blobs():
        os.utime(store.root / blob_key(blob.sha256), (old.timestamp(), old.timestamp()))
    policy = GcPolicy(keep=1)
    with pytest.raises(IntegrityError, match="cannot tell which blobs"):
        plan_gc(store, policy)
    assert len(store.list_manifests()) == 2
    cli = run_cli("gc", store.display_url, "--keep", "1")
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert "publish-cache --repair" in cli.stderr


def test_bad_options_are_bad_input(tmp_path: Path) -> None:
    for args in (["--keep", "0"], ["--keep-digest", "xyz"], ["--older-than", "soon"]):
        result = run_cli("gc", tmp_path.as_uri(), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


# --- gc and publish at the same time --------------------------------------------------------------


@dataclass(frozen=True)
class RaceSetup:
    old: PackResult  # profile "race": published long ago, not kept
    new: PackResult  # profile "race": the newest, kept; shares nothing with `old`
    reuser: PackResult  # profile "other": reuses every shared shard of `old`
    shared: frozenset[str]  # blobs of `old` that `reuser` names


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory) -> RaceSetup:
    work = tmp_path_factory.mktemp("race")
    noise = random.Random(50)
    wheels = work / "wheels"

    def wheel(name: str, size: int) -> Path:
        files = {f"{name.replace('-', '_')}/data.bin": noise.randbytes(size)}
        return build_wheel(wheels, name, "1.0", files=files)

    # Many shared shards: gc deletes them one by one while the publisher refreshes them one by
    # one, so the two meet somewhere in the middle.
    shared = [wheel(f"shared-{i}", 60_000 + i) for i in range(12)]
    packs = work / "packs"
    old = pack_wheels(work, packs, [*shared, wheel("old-app", 70_000)], "race", "race-old")
    new = pack_wheels(work, packs, [wheel("new-app", 70_001)], "race", "race-new")
    reuser = pack_wheels(work, packs, [*shared, wheel("other-app", 70_002)], "other", "other-1")
    common = {s.sha256 for s in old.manifest.shards} & {s.sha256 for s in reuser.manifest.shards}
    assert len(common) >= 12
    return RaceSetup(old, new, reuser, frozenset(common))


def _age(store: Store, manifest: Manifest, when: datetime) -> None:
    """Make a folder store's manifest and blobs look as old as `when`."""
    assert isinstance(store, FileStore)
    paths = [store.root / manifest_key(manifest.profile, manifest.digest)]
    paths += [store.root / blob_key(s.sha256) for s in manifest.shards]
    for path in paths:
        os.utime(path, (when.timestamp(), when.timestamp()))


def _one_race(
    store: Store,
    race: RaceSetup,
    policy: GcPolicy,
    freshness: timedelta,
    prepare: Callable[[], None],
    rng: random.Random,
) -> str:
    """Set the stage (an old digest whose blobs nothing kept needs, and a publisher about to
    reuse them), run gc and the publisher at once, and check that no manifest in the store
    names a missing blob. Returns how the two met."""
    store.delete_manifest("other", race.reuser.manifest.digest)
    for pack in (race.old, race.new):
        publish(pack, store, blob_freshness=freshness)
    prepare()
    results: dict[str, object] = {}
    delays = {"gc": rng.uniform(0, 0.02), "publish": rng.uniform(0, 0.02)}

    def run_gc_now() -> None:
        time.sleep(delays["gc"])
        results["gc"] = run_gc(store, plan_gc(store, policy))

    said: list[str] = []

    def publish_now() -> None:
        time.sleep(delays["publish"])
        results["publish"] = publish(
            race.reuser, store, blob_freshness=freshness, on_progress=lambda m: said.append(str(m))
        )

    threads = [threading.Thread(target=run_gc_now), threading.Thread(target=publish_now)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(results) == {"gc", "publish"}, "gc or publish failed (see the thread's error)"
    assert _broken_manifests(store) == []
    assert store.complete_manifest("other", race.reuser.manifest.digest) is not None
    gc_result = results["gc"]
    assert isinstance(gc_result, GcResult) and isinstance(results["publish"], PublishResult)
    deleted = {b.sha256 for b in gc_result.blobs} & race.shared
    skipped = {b.sha256 for b in gc_result.skipped} & race.shared
    again = any("vanished" in line for line in said)
    if skipped and again:
        return "both: gc kept refreshed blobs, the publisher uploaded deleted ones again"
    if skipped:
        return "the publisher refreshed first: gc kept those blobs"
    if again:
        return "gc deleted first: the publisher uploaded those blobs again"
    if deleted:
        return "gc finished before the publisher looked"
    return "the publisher finished first: gc saw its manifest"


def _race_many(
    store: Store,
    race: RaceSetup,
    rounds: int,
    policy: GcPolicy,
    freshness: timedelta,
    prepare: Callable[[], None],
) -> Counter[str]:
    rng = random.Random(5)
    outcomes = Counter(
        _one_race(store, race, policy, freshness, prepare, rng) for _ in range(rounds)
    )
    print(f"\n{store.display_url}: {dict(outcomes)}")
    return outcomes


def test_gc_and_publish_racing_in_a_folder_never_lose_a_blob(
    race: RaceSetup, tmp_path: Path
) -> None:
    """Production settings (grace 1h, blobs refreshed when older than 10 min): the old digest
    and its blobs are made two hours old before each of 60 races."""
    store = FileStore(tmp_path / "store")
    two_hours_ago = datetime.now(timezone.utc) - 2 * HOUR

    def prepare() -> None:
        _age(store, race.old.manifest, two_hours_ago)

    outcomes = _race_many(store, race, 60, GcPolicy(keep=1), timedelta(minutes=10), prepare)
    assert sum(outcomes.values()) == 60
    # The races really met: in some rounds gc and the publisher worked on the same blobs at
    # once (without the publisher's refresh, such rounds leave a manifest naming a lost blob).
    assert sum(n for outcome, n in outcomes.items() if "refreshed" in outcome or "again" in outcome)


@pytest.mark.azurite
def test_gc_and_publish_racing_in_azurite_never_lose_a_blob(
    race: RaceSetup, azurite_endpoint: AzuriteEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure's times cannot be set back: a grace of 2 s and blobs refreshed when older than
    1 s, and a wait before each race so that the old blobs are old."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)
    store = open_store(f"az://{azurite_endpoint.account}/race-{uuid.uuid4().hex[:12]}")

    def prepare() -> None:
        time.sleep(2.2)
        # The newest digest must stay the newest: publish it again after the wait.
        store.put_manifest("race", race.new.manifest.digest, race.new.manifest_path.read_bytes())

    policy = GcPolicy(keep=1, grace=timedelta(seconds=2))
    outcomes = _race_many(store, race, 15, policy, timedelta(seconds=1), prepare)
    assert sum(outcomes.values()) == 15
