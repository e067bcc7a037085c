"""The `gpubuild` command line: parses options and calls the stage modules, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from builder import __version__
from builder.errors import BadInputError, GpubuildError


class GpubuildGroup(click.Group):
    """Turns GpubuildError into its message and exit status instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except GpubuildError as exc:
            click.echo(f"gpubuild: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=GpubuildGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpubuild")
def main() -> None:
    """GPU Python dependencies for Ray on Kubernetes, resolved once and unpacked in seconds.

    \b
    The pipeline:
      gpubuild resolve PROFILE        conflict-free heavy set and hashed lock
      gpubuild base-snapshot IMAGE    what a base image already has
    Exit status: 0 success, 1 a failure of the job, 2 bad input or usage.
    """


def _emit_json(document: object) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def _parse_index_overrides(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    overrides = []
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise BadInputError(f"--index {value!r}: expected NAME=URL or NAME=default")
        overrides.append((name, url))
    return tuple(overrides)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the lock (default: <profile>.lock beside the profile).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--backend",
    type=click.Choice(["uv", "pip-tools"]),
    default="uv",
    show_default=True,
    help="Resolver. pip-tools works only when the target python and platform are the host's.",
)
@click.option(
    "--index-url",
    metavar="URL",
    help="Default package index (instead of uv's default or your pip/uv configuration).",
)
@click.option(
    "--index",
    "index_overrides",
    multiple=True,
    metavar="NAME=URL",
    help="Replace the URL of the profile's [[index]] NAME; NAME=default takes its packages "
    "from the default index instead. Repeatable.",
)
def resolve(
    profile: Path,
    lock_path: Path | None,
    as_json: bool,
    backend: str,
    index_url: str | None,
    index_overrides: tuple[str, ...],
) -> None:
    """Resolve PROFILE's heavy set for its target against its base image and write the lock.

    \b
    Rules (DESIGN.md): base packages are pinned to their base versions; [policy]
    constraints apply on top; [policy] exclude names are never shipped; wheels only;
    a package listed under an [[index]] comes from that index only. Packages the base
    already has at the same version are not shipped. Nothing changed since the last
    run: the lock is left untouched.

    \b
    Example:
      gpubuild resolve profiles/onnx-gpu.toml
      gpubuild resolve profiles/torch-cu121.toml --index pytorch-cu121=default --json
    """
    from builder.profile import load_profile
    from builder.resolve import IndexSettings, report_document, report_text
    from builder.resolve import resolve as run_resolve

    loaded = load_profile(profile)
    settings = IndexSettings(
        default_url=index_url, overrides=_parse_index_overrides(index_overrides)
    )
    click.echo(
        f"resolving {loaded.name} for python {loaded.target.python} on "
        f"{loaded.target.platform} ...",
        err=True,
    )
    result = run_resolve(loaded, lock_path=lock_path, settings=settings, backend=backend)
    click.echo(report_text(result), err=True)
    if as_json:
        _emit_json(report_document(result))


@main.command("base-snapshot")
@click.argument("image")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Snapshot file to write (name==version lines).",
)
def base_snapshot(image: str, output: Path) -> None:
    """List the Python distributions of IMAGE by running its own python through Docker.

    \b
    Example:
      gpubuild base-snapshot rayproject/ray:2.52.0-py310-cu121 \\
          -o profiles/bases/ray-2.52.0-py310-cu121.txt
    """
    from builder.base import docker_client, render_snapshot, snapshot_image
    from builder.resolve import write_atomically

    interpreter, packages = snapshot_image(docker_client(), image)
    write_atomically(output, render_snapshot(image, interpreter, packages))
    click.echo(f"{len(packages)} distributions from {image} ({interpreter}) -> {output}", err=True)


def _index_settings(index_url: str | None, index_overrides: tuple[str, ...]) -> object:
    from builder.resolve import IndexSettings

    return IndexSettings(default_url=index_url, overrides=_parse_index_overrides(index_overrides))


@main.command("publish-cache")
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="file://PATH, az://ACCOUNT/CONTAINER/PREFIX or an https blob URL "
    "(default: the local store, $XDG_CACHE_HOME/gpubuild/store).",
)
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The lock (default: <profile>.lock beside the profile); resolved when missing or stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--index-url", metavar="URL", help="Default package index, as for resolve.")
@click.option(
    "--index",
    "index_overrides",
    multiple=True,
    metavar="NAME=URL",
    help="Replace the URL of the profile's [[index]] NAME (NAME=default: the default index).",
)
def publish_cache_command(
    profile: Path,
    store_url: str | None,
    lock_path: Path | None,
    as_json: bool,
    index_url: str | None,
    index_overrides: tuple[str, ...],
) -> None:
    """Resolve, pack and publish PROFILE's heavy set to a store; the main job of gpubuild.

    \b
    Uploads only the shards the store lacks, then the manifest last, so readers never
    see a half-published digest. Already published and intact: uploads nothing.
    Azure credentials, in this order: AZURE_STORAGE_CONNECTION_STRING, a SAS
    (AZURE_STORAGE_SAS_TOKEN or the URL's query), DefaultAzureCredential.

    \b
    Examples:
      gpubuild publish-cache profiles/onnx-gpu.toml
      gpubuild publish-cache profiles/onnx-gpu.toml --store az://myaccount/gpubuild/prod --json
    """
    from builder.profile import load_profile
    from builder.publish import publish_cache, publish_document
    from builder.store import default_store_url

    loaded = load_profile(profile)
    result = publish_cache(
        loaded,
        store_url=store_url or default_store_url(),
        lock_path=lock_path,
        settings=_index_settings(index_url, index_overrides),  # type: ignore[arg-type]
        on_progress=lambda message: click.echo(message, err=True),
    )
    if result.already_published:
        summary = "already published, nothing uploaded"
    else:
        summary = (
            f"{result.shards_uploaded} shard(s) uploaded ({result.bytes_uploaded / 1e6:,.1f} MB),"
            f" {result.shards_present} already there"
        )
    click.echo(
        f"{result.profile} {result.digest}: {summary}\n"
        f"  store:    {result.store}\n  manifest: {result.manifest_url}\n"
        f"  size:     {result.bytes_total / 1e6:,.1f} MB in {len(result.manifest.shards)} shard(s)",
        err=True,
    )
    if as_json:
        _emit_json(publish_document(result))


@main.command("fetch")
@click.argument("artifact_url", metavar="STORE_URL/PROFILE/DIGEST")
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to unpack into (must be new or empty).",
)
def fetch_command(artifact_url: str, into: Path) -> None:
    """Download, verify and unpack one published digest, as the init script does.

    \b
    Every shard's sha256, its tar's sha256 and its file count are checked before
    anything appears in the folder. A SAS may come from AZURE_STORAGE_SAS_TOKEN.

    \b
    Example:
      gpubuild fetch file://$HOME/.cache/gpubuild/store/onnx-gpu/<digest> --into /tmp/sp
    """
    from builder.fetch import fetch

    result = fetch(artifact_url, into, on_progress=lambda message: click.echo(message, err=True))
    click.echo(f"{result.files} files in {result.into}", err=True)


# --- builder.store: gpubuild sas (owner: store.py) -----------------------------------------


@main.command("sas")
@click.argument("store_url")
@click.option(
    "--expires-in",
    default="24h",
    show_default=True,
    help="How long the token stays valid: 90s, 30m, 24h, 7d.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to this file (mode 0600) instead of stdout.",
)
def sas(store_url: str, expires_in: str, out: Path | None) -> None:
    """Make a read-only SAS token for STORE_URL's container, for the init script.

    \b
    The token allows reading blobs only (no list, write or delete), for the whole
    container: shards under blobs/ are shared by every profile, and Azure has no
    prefix-scoped SAS without a hierarchical namespace. It is signed with the account
    key from AZURE_STORAGE_CONNECTION_STRING, or with a user delegation key from your
    Azure AD sign-in (at most 7 days). The token goes to --out or stdout, never to logs.

    \b
    Example:
      gpubuild sas az://myaccount/gpu-cache --expires-in 24h --out sas.txt
      kubectl create secret generic gpubuild-sas --from-file=sas=sas.txt
    """
    from builder.store import (
        describe_read_sas,
        make_read_sas,
        open_store,
        parse_duration,
        sas_expiry_for,
        write_secret_file,
    )

    expiry = sas_expiry_for(parse_duration(expires_in))
    store = open_store(store_url)
    token = make_read_sas(store, expiry=expiry)
    if out is not None:
        write_secret_file(out, token)
    else:
        click.echo(token)
    click.echo(f"{describe_read_sas(store, expiry)} -> {out or 'stdout'}", err=True)


# --- builder.pack: gpubuild pack (owner: pack.py) -------------------------------------------


@main.command("pack")
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Store folder for blobs/ and PROFILE/DIGEST/manifest.json "
    "(default: the local store, $XDG_CACHE_HOME/gpubuild/store).",
)
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The lock to pack (default: <profile>.lock beside the profile); resolved first when "
    "missing or stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--index-url", metavar="URL", help="Default package index, as for resolve.")
@click.option(
    "--index",
    "index_overrides",
    multiple=True,
    metavar="NAME=URL",
    help="Replace the URL of the profile's [[index]] NAME (NAME=default: the default index). "
    "Repeatable.",
)
def pack_command(
    profile: Path,
    out_dir: Path | None,
    lock_path: Path | None,
    as_json: bool,
    index_url: str | None,
    index_overrides: tuple[str, ...],
) -> None:
    """Install PROFILE's lock for its target and write it as content-addressed shards.

    \b
    Writes OUT/blobs/<sha256>.tar.zst (one shard per large distribution, small ones
    grouped) and, last, OUT/<profile>/<digest>/manifest.json with the environment
    (PYTHONPATH, LD_LIBRARY_PATH) the pod needs. A digest already packed is reused.

    \b
    Example:
      gpubuild pack profiles/onnx-gpu.toml --out ./store --json
    """
    from builder.pack import default_store_dir, manifest_document, pack
    from builder.profile import load_profile
    from builder.resolve import IndexSettings

    loaded = load_profile(profile)
    settings = IndexSettings(
        default_url=index_url, overrides=_parse_index_overrides(index_overrides)
    )
    out = out_dir or default_store_dir()
    click.echo(f"packing {loaded.name} into {out} ...", err=True)
    result = pack(
        loaded,
        lock_path=lock_path,
        out_dir=out,
        settings=settings,
        on_progress=lambda message: click.echo(message, err=True),
    )
    manifest = result.manifest
    state = "reused" if result.reused else "written"
    click.echo(
        f"manifest {state}: {result.manifest_path} ({len(manifest.shards)} shards,"
        f" {manifest.total_bytes / 1e6:.1f} MB, {manifest.total_files} files)",
        err=True,
    )
    if as_json:
        _emit_json(manifest_document(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
