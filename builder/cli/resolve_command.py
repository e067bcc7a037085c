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
from builder.resolve import (
    check_document,
    check_locks,
    check_text,
    ensure_lock,
    report_document,
    report_text,
)


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
@click.option(
    "--check",
    is_flag=True,
    help="Resolve nothing and write nothing: exit 0 when the lock is current for the profile,"
    " its base snapshot and these options, 1 (saying what changed) when `resolve` would"
    " rewrite it. No network.",
)
@index_options
def resolve(
    profile: Path,
    lock_path: Path | None,
    as_json: bool,
    backend: str,
    check: bool,
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
    \b
    --check (for CI, like `uv lock --check`): is the lock (and the light lock, when the
    profile has a [light] set) what `resolve` with the same options would leave? Exit 1
    with the reasons when the profile was edited, the snapshot changed, the lock is in
    another format or was resolved with other options.

    \b
    Example:
      gpubuild resolve profiles/onnx-gpu.toml
      gpubuild resolve profiles/torch-cu121.toml --index pytorch-cu121=default --json
      gpubuild resolve profiles/onnx-gpu.toml --check
    """
    loaded = load_profile(profile)
    if check:
        checks = check_locks(loaded, settings=settings, lock_path=lock_path, backend=backend)
        report(check_text(loaded, checks))
        if as_json:
            emit_json(check_document(checks))
        if not all(c.current for c in checks):
            raise click.exceptions.Exit(1)
        return
    report(
        f"resolving {loaded.name} for python {loaded.target.python} on {loaded.target.platform} ..."
    )
    result = ensure_lock(loaded, settings=settings, lock_path=lock_path, backend=backend)
    report(report_text(result))
    if as_json:
        emit_json(report_document(result))
