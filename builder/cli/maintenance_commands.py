"""Commands that look after a store: gc (delete what no kept digest needs) and verify (re-hash
what published manifests reference, and repair it from a local pack)."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.base import emit_json, json_option, report
from builder.errors import IntegrityError
from builder.gc import DEFAULT_GRACE, DEFAULT_KEEP, GcPolicy, describe, gc_document, plan_gc, run_gc
from builder.stores import open_store
from builder.stores.base import SAFE_GC_GRACE
from builder.units import parse_duration
from builder.verify import describe as describe_verify
from builder.verify import verify_document, verify_store


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds / 60:g}m"


@click.command("gc")
@click.argument("store_url", metavar="STORE")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=DEFAULT_KEEP,
    show_default=True,
    help="Published digests to keep per profile, the newest first.",
)
@click.option(
    "--keep-digest",
    "keep_digests",
    multiple=True,
    metavar="DIGEST",
    help="Also keep this digest (or a prefix of at least 12 hex digits): one that running "
    "clusters still install. Repeatable.",
)
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Delete only manifests published longer ago than this (30d, 12h).",
)
@click.option(
    "--grace",
    metavar="DURATION",
    default=_hours(DEFAULT_GRACE.total_seconds()),
    show_default=True,
    help="Never delete a blob written or refreshed more recently than this: a publish may be "
    f"reusing it. Below {_hours(SAFE_GC_GRACE.total_seconds())} it is safe only while nobody "
    "publishes.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@json_option
def gc_command(
    store_url: str,
    keep: int,
    keep_digests: tuple[str, ...],
    older_than: str | None,
    grace: str,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Delete old manifests from STORE, then the blobs no kept manifest needs.

    \b
    Keeps the newest --keep digests of every profile (by the time each was first
    published), every --keep-digest, and with --older-than everything more recent. Then
    deletes each blob that no kept manifest names and that is older than --grace. Safe
    while a publish runs: a publisher refreshes every blob it reuses before it writes its
    manifest, and gc deletes a blob only when the store still holds it at an old time.
    Works on folders, Azure containers and registries (a registry needs deletes enabled).
    Digests that old init scripts in running clusters pin must be kept with --keep-digest.

    \b
    Examples:
      gpubuild gc az://myaccount/gpu-cache --keep 3 --dry-run
      gpubuild gc az://myaccount/gpu-cache --keep 3 --keep-digest 3f2a9c1e7b4d --json
    """
    policy = GcPolicy(
        keep=keep,
        keep_digests=tuple(d.strip().lower() for d in keep_digests),
        older_than=parse_duration(older_than) if older_than is not None else None,
        grace=parse_duration(grace),
    )
    if policy.unsafe_grace:
        report(
            f"warning: --grace {grace} is shorter than"
            f" {_hours(SAFE_GC_GRACE.total_seconds())}: a publish running now could lose a"
            " blob it reuses; run it only while nobody publishes to this store"
        )
    store = open_store(store_url)
    plan = plan_gc(store, policy)
    result = run_gc(store, plan, dry_run=dry_run, on_progress=report)
    for line in describe(result):
        report(line)
    if as_json:
        emit_json(gc_document(result))


@click.command("verify")
@click.argument("store_url", metavar="STORE")
@click.argument("selector", metavar="[PROFILE[/DIGEST]]", required=False)
@click.option(
    "--repair-from",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    metavar="DIR",
    help="A local pack (gpubuild pack --out DIR): upload good copies of missing or damaged "
    "blobs and manifests from it.",
)
@json_option
def verify_command(
    store_url: str, selector: str | None, repair_from: Path | None, as_json: bool
) -> None:
    """Re-hash every blob that STORE's published manifests reference.

    \b
    Reads each blob once, in a stream, several at a time: the sha256 and size of the
    .tar.zst and of the tar inside are compared with the manifest. Reports missing and
    damaged blobs (and manifests that do not read); with --repair-from, replaces them
    with good copies from a local pack and reads them back. Exit status 1 while anything
    stays missing or damaged.

    \b
    Examples:
      gpubuild verify az://myaccount/gpu-cache
      gpubuild verify az://myaccount/gpu-cache onnx-gpu --repair-from ~/.cache/gpubuild/store
    """
    store = open_store(store_url)
    result = verify_store(store, selector, repair_from=repair_from, on_progress=report)
    for line in describe_verify(result):
        report(line)
    if as_json:
        emit_json(verify_document(result))
    if not result.ok:
        broken = sum(1 for b in result.blobs if b.state in ("missing", "damaged")) + sum(
            1 for m in result.manifests if m.state == "damaged"
        )
        raise IntegrityError(f"{store.display_url}: {broken} missing or damaged (listed above)")
