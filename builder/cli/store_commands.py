"""Commands of the main pipeline after resolution: pack, publish-cache, fetch and sas
(`resolve` is resolve_command.py, which imports neither pack nor the stores)."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.base import (
    emit_json,
    index_options,
    json_option,
    lock_option,
    profile_argument,
    report,
)
from builder.errors import BadInputError
from builder.fetch import fetch, fetch_document
from builder.files import write_secret_file
from builder.indexes import IndexSettings
from builder.pack import default_store_dir, manifest_document
from builder.pipeline import pack_profile, publish_profile
from builder.profile import load_profile
from builder.publish import publish_document
from builder.stores import default_store_url, open_store
from builder.stores.sas import describe_read_sas, make_read_sas, sas_expiry_for, sas_lifetime
from builder.units import megabytes, plural


@click.command("pack")
@profile_argument
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Store folder for blobs/ and PROFILE/DIGEST/manifest.json "
    "(default: the local store, $XDG_CACHE_HOME/gpubuild/store).",
)
@lock_option
@json_option
@index_options
def pack_command(
    profile: Path,
    out_dir: Path | None,
    lock_path: Path | None,
    as_json: bool,
    settings: IndexSettings,
) -> None:
    """Install PROFILE's lock for its target and write it as content-addressed shards.

    \b
    Resolves first when the lock is missing or stale. Writes OUT/blobs/<sha256>.tar.zst
    (one shard per large distribution, small ones grouped) and, last,
    OUT/<profile>/<digest>/manifest.json with the environment (PYTHONPATH,
    LD_LIBRARY_PATH) the pod needs. A digest already packed is reused.

    \b
    Example:
      gpubuild pack profiles/onnx-gpu.toml --out ./store --json
    """
    loaded = load_profile(profile)
    out = out_dir or default_store_dir()
    report(f"packing {loaded.name} into {out} ...")
    result = pack_profile(
        loaded, out_dir=out, settings=settings, lock_path=lock_path, on_progress=report
    )
    manifest = result.manifest
    state = "reused" if result.reused else "written"
    report(
        f"manifest {state}: {result.manifest_path} ({plural(len(manifest.shards), 'shard')},"
        f" {megabytes(manifest.total_bytes)}, {plural(manifest.total_files, 'file')})"
    )
    if as_json:
        emit_json(manifest_document(result))


@click.command("publish-cache")
@profile_argument
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="file://PATH, az://ACCOUNT/CONTAINER/PREFIX or an https blob URL "
    "(default: the local store, $XDG_CACHE_HOME/gpubuild/store).",
)
@lock_option
@json_option
@click.option(
    "--repair",
    is_flag=True,
    help="Re-hash every blob of this digest in the store (and the local pack) instead of "
    "trusting sizes, and upload good copies of damaged ones.",
)
@index_options
def publish_cache_command(
    profile: Path,
    store_url: str | None,
    lock_path: Path | None,
    as_json: bool,
    repair: bool,
    settings: IndexSettings,
) -> None:
    """Resolve, pack and publish PROFILE's heavy set to a store; the main job of gpubuild.

    \b
    Uploads only the shards the store lacks, then the manifest last, so readers never
    see a half-published digest. Already published and intact: uploads nothing.
    "Intact" compares sizes; --repair re-hashes the blobs and replaces damaged ones (what
    a pod's "sha256 mismatch" asks for). Azure credentials, in this order:
    AZURE_STORAGE_CONNECTION_STRING, a SAS (AZURE_STORAGE_SAS_TOKEN or the URL's query),
    an Azure AD sign-in (az login, workload or managed identity).

    \b
    Examples:
      gpubuild publish-cache profiles/onnx-gpu.toml
      gpubuild publish-cache profiles/onnx-gpu.toml --store az://myaccount/gpubuild/prod --json
    """
    result = publish_profile(
        load_profile(profile),
        store_url=store_url or default_store_url(),
        settings=settings,
        lock_path=lock_path,
        repair=repair,
        on_progress=report,
    )
    if result.repaired:
        report(
            f"repaired {len(result.repaired)} damaged blob(s): "
            + ", ".join(shard.sha256[:16] for shard in result.repaired)
        )
    elif repair:
        report("repair: every blob of this digest matches its sha256")
    if result.already_published:
        summary = "already published, nothing uploaded"
    else:
        verb = "written" if result.store.startswith("file://") else "uploaded"
        summary = (
            f"{plural(result.shards_uploaded, 'shard')} {verb}"
            f" ({megabytes(result.bytes_uploaded)}), {result.shards_present} already there"
        )
    report(
        f"{result.profile} {result.digest}: {summary}\n"
        f"  store:    {result.store}\n  manifest: {result.manifest_url}\n"
        + "".join(f"  {label + ':':<9} {ref}\n" for label, ref in result.references.items())
        + f"  fetch:    gpubuild fetch {result.fetch_url} --into DIR\n"
        f"  size:     {megabytes(result.bytes_total)} in"
        f" {plural(len(result.manifest.shards), 'shard')}"
    )
    if as_json:
        emit_json(publish_document(result))


@click.command("fetch")
@click.argument("artifact_url", metavar="STORE_URL/PROFILE/DIGEST")
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to unpack into (must be new or empty).",
)
@json_option
def fetch_command(artifact_url: str, into: Path, as_json: bool) -> None:
    """Download, verify and unpack one published digest, as the init script does.

    \b
    STORE_URL/PROFILE/DIGEST is what `gpubuild publish-cache` prints as "fetch:" (its
    manifest URL, ending in /manifest.json, works too). Every shard's sha256, its tar's
    sha256 and its file count are checked, and no link may lead out of the tree, before
    anything appears in the folder. A SAS may come from AZURE_STORAGE_SAS_TOKEN.

    \b
    Example:
      gpubuild fetch file://$HOME/.cache/gpubuild/store/onnx-gpu/<digest> --into /tmp/sp
    """
    result = fetch(artifact_url, into, on_progress=report)
    if as_json:
        emit_json(fetch_document(result))


@click.command("sas")
@click.argument("store_url")
@click.option(
    "--expires-in",
    default="24h",
    show_default=True,
    help="How long the token stays valid: 90s, 30m, 24h, 7d (at most 365d).",
)
@click.option(
    "--allow-long-expiry",
    is_flag=True,
    help="Allow --expires-in above 365 days (up to ten years).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to this file (mode 0600) instead of stdout.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print where the token went and its expiry as JSON on stdout (needs --out).",
)
def sas(
    store_url: str, expires_in: str, allow_long_expiry: bool, out: Path | None, as_json: bool
) -> None:
    """Make a read-only SAS token for STORE_URL's container, for the init script.

    \b
    The token allows reading blobs only (no list, write or delete), for the whole
    container: shards under blobs/ are shared by every profile, and Azure has no
    prefix-scoped SAS without a hierarchical namespace. It is signed with the account
    key from AZURE_STORAGE_CONNECTION_STRING, or with a user delegation key from your
    Azure AD sign-in (at most 7 days). The token goes to --out or stdout, never to logs;
    its expiry goes to stderr.

    \b
    Example:
      gpubuild sas az://myaccount/gpu-cache --expires-in 24h --out sas.txt
      kubectl create secret generic gpubuild-sas --from-file=sas=sas.txt
    """
    if as_json and out is None:
        raise BadInputError("--json needs --out: stdout would hold both the token and the JSON")
    expiry = sas_expiry_for(sas_lifetime(expires_in, allow_long=allow_long_expiry))
    store = open_store(store_url)
    token = make_read_sas(store, expiry=expiry)
    if out is not None:
        write_secret_file(out, token)
    else:
        click.echo(token)
    report(f"{describe_read_sas(store, expiry)} -> {out or 'stdout'}")
    if as_json:
        emit_json(
            {
                "store": store.display_url,
                "out": str(out),
                "expires": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "permissions": "read",
            }
        )
