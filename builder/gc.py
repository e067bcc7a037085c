"""Garbage collection of a store (`gpubuild gc`): old manifests go, then the blobs that no kept
manifest needs (docs/design.md#garbage-collection).

Which manifests stay is pure (`choose_manifests`): the newest `keep` of each profile, any digest
named with --keep-digest, and, with --older-than, any published more recently than that. Which
blobs go is pure too (`choose_blobs`): those that no kept manifest needs and whose time is before
the cutoff, the moment the manifests were listed minus the grace period.

Safety against a publisher running at the same time: a publisher refreshes the time of every
blob its manifest names right before writing the manifest (builder/publish.py), and gc deletes a
blob only when the store, at the moment of deleting, still holds it with a time at or before
the cutoff (`Store.delete_blob`). A blob reused by a publish that gc's listing could not see is
therefore either refreshed first (and kept) or deleted first (and the publisher, finding it
gone, uploads it again). A registry dates no blob: there gc lists the tags again right before
each delete, and the publisher checks its blobs again after pushing the tag.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from builder.errors import BadInputError, FormatError, IntegrityError, NotPublishedError
from builder.manifest import blob_key, manifest_key
from builder.progress import Progress, silent
from builder.stores import Store, StoredBlob, StoredManifest
from builder.stores.base import SAFE_GC_GRACE
from builder.units import megabytes, plural

DEFAULT_KEEP = 5
DEFAULT_GRACE = timedelta(hours=1)
MIN_DIGEST_PREFIX = 12


@dataclass(frozen=True)
class GcPolicy:
    """What to keep: the newest `keep` digests of each profile, the digests named in
    `keep_digests` (full, or a prefix of at least 12 hex digits), and, when `older_than` is set,
    every digest published more recently than that. Blobs younger than `grace` always stay."""

    keep: int = DEFAULT_KEEP
    keep_digests: tuple[str, ...] = ()
    older_than: timedelta | None = None
    grace: timedelta = DEFAULT_GRACE

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise BadInputError(
                f"--keep {self.keep}: gc keeps at least the newest digest of each profile"
            )
        for digest in self.keep_digests:
            if not (
                MIN_DIGEST_PREFIX <= len(digest) <= 64
                and all(c in "0123456789abcdef" for c in digest)
            ):
                raise BadInputError(
                    f"--keep-digest {digest!r}: expected a digest (lowercase hex, at least"
                    f" {MIN_DIGEST_PREFIX} digits)"
                )

    @property
    def unsafe_grace(self) -> bool:
        """A grace period shorter than the publisher's promise covers (SAFE_GC_GRACE)."""
        return self.grace < SAFE_GC_GRACE


@dataclass(frozen=True)
class GcPlan:
    store: str  # display URL, no secret
    listed_at: datetime
    cutoff: datetime  # blobs with a time after this stay
    kept: tuple[StoredManifest, ...]
    doomed: tuple[StoredManifest, ...]  # manifests to delete
    blobs: tuple[StoredBlob, ...]  # blobs no kept manifest needs, older than the cutoff
    young: tuple[StoredBlob, ...]  # blobs no kept manifest needs, but too recent to delete
    unmatched: tuple[str, ...]  # --keep-digest values that name no published digest

    @property
    def blob_bytes(self) -> int:
        return sum(blob.bytes for blob in self.blobs)


@dataclass(frozen=True)
class GcResult:
    plan: GcPlan
    dry_run: bool
    manifests: tuple[StoredManifest, ...]  # deleted (or, in a dry run, that would be)
    blobs: tuple[StoredBlob, ...]  # deleted (or would be)
    skipped: tuple[StoredBlob, ...]  # refreshed or gone since the listing: not deleted

    @property
    def bytes(self) -> int:
        return sum(blob.bytes for blob in self.blobs)


# --- the pure rules -----------------------------------------------------------------------------


def choose_manifests(
    manifests: Iterable[StoredManifest], policy: GcPolicy, now: datetime
) -> tuple[list[StoredManifest], list[StoredManifest], list[str]]:
    """(kept, doomed, --keep-digest values that match nothing), each sorted newest first."""
    by_profile: dict[str, list[StoredManifest]] = {}
    for manifest in manifests:
        by_profile.setdefault(manifest.profile, []).append(manifest)
    named = set(policy.keep_digests)
    matched: set[str] = set()
    kept: list[StoredManifest] = []
    doomed: list[StoredManifest] = []
    for profile in sorted(by_profile):
        # Newest first; equal times in digest order, so a run is reproducible.
        ordered = sorted(by_profile[profile], key=lambda m: (-m.published.timestamp(), m.digest))
        for rank, manifest in enumerate(ordered):
            names = {prefix for prefix in named if manifest.digest.startswith(prefix)}
            matched |= names
            recent = policy.older_than is not None and now - manifest.published < policy.older_than
            (kept if rank < policy.keep or names or recent else doomed).append(manifest)
    return kept, doomed, sorted(named - matched)


def choose_blobs(
    blobs: Iterable[StoredBlob], needed: frozenset[str], cutoff: datetime
) -> tuple[list[StoredBlob], list[StoredBlob]]:
    """(to delete, too young to delete) among the blobs that no kept manifest needs. A blob the
    store does not date (a registry's) is old enough: it goes when nothing needs it."""
    doomed: list[StoredBlob] = []
    young: list[StoredBlob] = []
    for blob in sorted(blobs, key=lambda b: b.sha256):
        if blob.sha256 in needed:
            continue
        (young if blob.modified is not None and blob.modified > cutoff else doomed).append(blob)
    return doomed, young


# --- the store's side -----------------------------------------------------------------------


def plan_gc(store: Store, policy: GcPolicy, *, now: datetime | None = None) -> GcPlan:
    """List the store, read every kept manifest, and decide what goes. Deletes nothing.

    A kept manifest that cannot be read stops gc (IntegrityError): which blobs it needs is
    unknown, so no blob could be deleted safely."""
    listed_at = now or datetime.now(timezone.utc)
    manifests = store.list_manifests()
    kept, doomed, unmatched = choose_manifests(manifests, policy, listed_at)
    needed = needed_blobs(store, kept)
    blobs, young = choose_blobs(store.list_blobs(), needed, listed_at - policy.grace)
    return GcPlan(
        store=store.display_url,
        listed_at=listed_at,
        cutoff=listed_at - policy.grace,
        kept=tuple(kept),
        doomed=tuple(doomed),
        blobs=tuple(blobs),
        young=tuple(young),
        unmatched=tuple(unmatched),
    )


def needed_blobs(store: Store, kept: Sequence[StoredManifest]) -> frozenset[str]:
    """Every blob the kept manifests need, each manifest read by the one manifest reader."""
    needed: set[str] = set()
    for entry in kept:
        try:
            manifest = store.manifest(entry.profile, entry.digest)
        except NotPublishedError:
            continue  # deleted since the listing (another gc): it needs nothing any more
        except (FormatError, IntegrityError) as exc:
            raise IntegrityError(
                f"gc cannot tell which blobs {store.manifest_url(entry.profile, entry.digest)}"
                f" needs, so it deletes nothing: {exc}. Publish that digest again (gpubuild"
                " publish-cache --repair), or delete its manifest by hand"
            ) from None
        needed |= store.blobs_of(manifest)
    return frozenset(needed)


def run_gc(
    store: Store, plan: GcPlan, *, dry_run: bool = False, on_progress: Progress = silent
) -> GcResult:
    """Apply `plan`: the doomed manifests first (a digest is unpublished before any of its
    blobs goes), then each blob, by a conditional delete (see the module's docstring)."""
    report = on_progress
    if dry_run:
        return GcResult(plan, True, plan.doomed, plan.blobs, ())
    for manifest in plan.doomed:
        store.delete_manifest(manifest.profile, manifest.digest)
        report(f"deleted {manifest_key(manifest.profile, manifest.digest)}")
    deleted: list[StoredBlob] = []
    skipped: list[StoredBlob] = []
    watch = _RegistryWatch(store, plan) if not store.keeps_blob_times else None
    for blob in plan.blobs:
        if watch is not None and blob.sha256 in watch.needed_now():
            skipped.append(blob)
            continue
        if store.delete_blob(blob.sha256, unmodified_since=plan.cutoff):
            deleted.append(blob)
            report(f"deleted {blob_key(blob.sha256)} ({megabytes(blob.bytes)})")
        else:
            skipped.append(blob)
            report(f"kept {blob_key(blob.sha256)}: a publisher refreshed it since the listing")
    return GcResult(plan, False, plan.doomed, tuple(deleted), tuple(skipped))


class _RegistryWatch:
    """For a store that dates no blob: the blobs that manifests published since the plan need,
    found by listing the published digests again right before each delete."""

    def __init__(self, store: Store, plan: GcPlan) -> None:
        self.store = store
        # Only the kept: a doomed digest published again after gc deleted it counts as new.
        self.known = {(m.profile, m.digest) for m in plan.kept}
        self.needed: set[str] = set()

    def needed_now(self) -> frozenset[str]:
        fresh = [m for m in self.store.list_manifests() if (m.profile, m.digest) not in self.known]
        self.needed |= needed_blobs(self.store, fresh)
        self.known |= {(m.profile, m.digest) for m in fresh}
        return frozenset(self.needed)


def describe(result: GcResult) -> list[str]:
    """Lines for a person: what went (or would go) and how many bytes."""
    plan = result.plan
    verb = "would delete" if result.dry_run else "deleted"
    lines = [
        f"{plan.store}: {plural(len(plan.kept), 'digest')} kept, {verb}"
        f" {plural(len(result.manifests), 'manifest')} and {plural(len(result.blobs), 'blob')}"
        f" ({megabytes(result.bytes)})"
    ]
    lines += [
        f"  {verb} {manifest_key(m.profile, m.digest)} (published {_when(m.published)})"
        for m in result.manifests
    ]
    lines += [f"  {verb} {blob_key(b.sha256)} ({megabytes(b.bytes)})" for b in result.blobs]
    if plan.young:
        lines.append(
            f"  left {plural(len(plan.young), 'unneeded blob')}"
            f" ({megabytes(sum(b.bytes for b in plan.young))}) younger than the grace period:"
            " a publish may be using them; a later gc deletes them"
        )
    if result.skipped:
        lines.append(
            f"  kept {plural(len(result.skipped), 'blob')} that a publisher refreshed since"
            " the listing"
        )
    lines += [f"  note: --keep-digest {d} names no published digest" for d in plan.unmatched]
    return lines


def gc_document(result: GcResult) -> dict[str, object]:
    """The `--json` document of `gpubuild gc`."""
    plan = result.plan

    def manifest_entry(m: StoredManifest) -> dict[str, str]:
        return {"profile": m.profile, "digest": m.digest, "published": _when(m.published)}

    return {
        "store": plan.store,
        "dry_run": result.dry_run,
        "cutoff": _when(plan.cutoff),
        "kept": [manifest_entry(m) for m in plan.kept],
        "manifests": [manifest_entry(m) for m in result.manifests],
        "blobs": [{"sha256": b.sha256, "bytes": b.bytes} for b in result.blobs],
        "bytes": result.bytes,
        "skipped": [b.sha256 for b in result.skipped],
        "young": [b.sha256 for b in plan.young],
        "unmatched_keep_digests": list(plan.unmatched),
    }


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
