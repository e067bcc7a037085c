"""`gpubuild resolve`: apart from the other pipeline commands so that a no-op resolve (the lock
is current) imports only what reading a profile and a lock needs."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.base import (
    emit_json,
    index_options,
    json_option,
    profile_argument,
    report,
)
from builder.indexes import IndexSettings
from builder.profile import load_profile
from builder.resolve import ensure_lock, report_document, report_text


@click.command("resolve")
@profile_argument
@click.option(
    "-o",
    "--output",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the lock (default: <profile>.lock beside the profile).",
)
@json_option
@click.option(
    "--backend",
    type=click.Choice(["uv", "pip-tools"]),
    default="uv",
    show_default=True,
    help="Resolver. pip-tools works only when the target python and platform are the host's.",
)
@index_options
def resolve(
    profile: Path,
    lock_path: Path | None,
    as_json: bool,
    backend: str,
    settings: IndexSettings,
) -> None:
    """Resolve PROFILE's heavy set for its target against its base image and write the lock.

    \b
    Rules (docs/design.md#resolution-rules): base packages are pinned to their base
    versions; [policy] constraints apply on top; [policy] exclude names are never
    shipped; wheels only; a package listed under an [[index]] comes from that index
    only. Packages the base already has at the same version are not shipped. Nothing
    changed since the last run: the lock is left untouched.

    \b
    Example:
      gpubuild resolve profiles/onnx-gpu.toml
      gpubuild resolve profiles/torch-cu121.toml --index pytorch-cu121=default --json
    """
    loaded = load_profile(profile)
    report(
        f"resolving {loaded.name} for python {loaded.target.python} on {loaded.target.platform} ..."
    )
    result = ensure_lock(loaded, settings=settings, lock_path=lock_path, backend=backend)
    report(report_text(result))
    if as_json:
        emit_json(report_document(result))
