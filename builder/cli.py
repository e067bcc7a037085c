"""The `gpubuild` command line: parses options and calls the stage modules, nothing more."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from builder import __version__
from builder.errors import BadInputError, GpubuildError
from builder.progress import Reporter, Step
from builder.secrets import (
    malformed_userinfo,
    redact_url,
    register_environment,
    register_url,
    scrub,
)

if TYPE_CHECKING:
    from builder.initscript import Published
    from builder.resolve import IndexSettings


class GpubuildGroup(click.Group):
    """Turns GpubuildError into its message and exit status instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        register_environment()
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().invoke(ctx)
        except GpubuildError as exc:
            click.echo(f"gpubuild: error: {scrub(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            # A file or folder the user named that cannot be read or written: a message, not
            # a traceback.
            click.echo(f"gpubuild: error: {scrub(str(exc))}", err=True)
            ctx.exit(1)
        except (Terminated, KeyboardInterrupt) as exc:
            # Every stage cleans up in `finally` (work folders, partial files, child
            # processes): by the time this runs, nothing half-written is left.
            how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            click.echo(f"\ngpubuild: stopped by {how}; nothing half-written was kept", err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return None


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that its cleanup runs (a container stop, a CI
    job cancelled): the default action would end the process with no `finally` run."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


_reporter: Reporter | None = None


def report(message: str | Step) -> None:
    """Progress and results for a person: stderr, scrubbed, a bar for steps on a terminal."""
    global _reporter
    if _reporter is None or _reporter.stream is not sys.stderr:
        _reporter = Reporter(sys.stderr)
    _reporter(message)


@click.group(cls=GpubuildGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpubuild")
def main() -> None:
    """GPU Python dependencies for Ray on Kubernetes, resolved once and unpacked in seconds.

    \b
    The pipeline (each command has --help with an example):
      resolve PROFILE          conflict-free heavy set and hashed lock
      pack PROFILE             the lock as verified, content-addressed shards
      publish-cache PROFILE    resolve + pack + upload to a store (the main job)
      init-script PROFILE      the initContainer script that unpacks it in seconds
      k8s patch YAML           wire that initContainer into a RayService worker group
      fetch URL --into DIR     download, verify and unpack a published digest
      sas STORE_URL            a read-only SAS for the init container
      dockerfile PROFILE       the slim worker Dockerfile, under the disk budget
      build-image PROFILE      build (and push) that image through Docker
      split REQUIREMENTS       propose the light/heavy split of a requirements file
      check PATH...            find deployment mistakes in a repo
      doctor                   inspect a running worker container
      base-snapshot IMAGE      what a base image already has
    Exit status: 0 success, 1 a failure of the job, 2 bad input or usage.
    """


def _emit_json(document: object) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def _checked_index_url(option: str, url: str) -> str:
    """An index URL from the command line: its credentials are registered as secrets, and one
    that tools would split wrongly (and then print its password) is refused."""
    register_url(url)
    if malformed_userinfo(url):
        raise BadInputError(
            f"{option} {redact_url(url)}: the part before '@' holds a '/', which URL parsers"
            " take for the start of the path (and then print the password); percent-encode it"
            " in the user name or password ('/' is %2F)"
        )
    if not url.startswith(("http://", "https://", "file://")):
        raise BadInputError(f"{option} {redact_url(url)}: expected an http(s):// or file:// URL")
    return url


def _parse_index_overrides(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    overrides = []
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise BadInputError(f"--index {redact_url(value)!r}: expected NAME=URL or NAME=default")
        if url != "default":
            _checked_index_url(f"--index {name}=", url)
        overrides.append((name, url))
    return tuple(overrides)


def _index_settings(index_url: str | None, index_overrides: tuple[str, ...]) -> IndexSettings:
    from builder.resolve import IndexSettings

    if index_url is not None:
        _checked_index_url("--index-url", index_url)
    return IndexSettings(default_url=index_url, overrides=_parse_index_overrides(index_overrides))


def index_options(command: object) -> object:
    """--index-url and --index NAME=URL, the same on every command that resolves."""
    command = click.option(
        "--index",
        "index_overrides",
        multiple=True,
        metavar="NAME=URL",
        help="Replace the URL of the profile's [[index]] NAME; NAME=default takes its packages "
        "from the default index instead. Repeatable.",
    )(command)  # type: ignore[arg-type]
    return click.option(
        "--index-url",
        metavar="URL",
        help="Default package index (instead of uv's default or your pip/uv configuration).",
    )(command)


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
@index_options
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
    from builder.resolve import report_document, report_text
    from builder.resolve import resolve as run_resolve

    loaded = load_profile(profile)
    settings = _index_settings(index_url, index_overrides)
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def base_snapshot(image: str, output: Path, as_json: bool) -> None:
    """List the Python distributions of IMAGE by running its own python through Docker.

    \b
    Example:
      gpubuild base-snapshot rayproject/ray:2.52.0-py310-cu121 \\
          -o profiles/bases/ray-2.52.0-py310-cu121.txt
    """
    from builder.base import docker_client, render_snapshot, snapshot_image
    from builder.files import write_atomically

    interpreter, packages = snapshot_image(docker_client(), image)
    write_atomically(output, render_snapshot(image, interpreter, packages))
    report(f"{len(packages)} distributions from {image} ({interpreter}) -> {output}")
    if as_json:
        _emit_json(
            {
                "image": image,
                "interpreter": interpreter,
                "output": str(output),
                "packages": packages,
            }
        )


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
    index_url: str | None,
    index_overrides: tuple[str, ...],
) -> None:
    """Resolve, pack and publish PROFILE's heavy set to a store; the main job of gpubuild.

    \b
    Uploads only the shards the store lacks, then the manifest last, so readers never
    see a half-published digest. Already published and intact: uploads nothing.
    "Intact" compares sizes; --repair re-hashes the blobs and replaces damaged ones (what
    a pod's "sha256 mismatch" asks for).
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
        settings=_index_settings(index_url, index_overrides),
        on_progress=report,
        repair=repair,
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
            f"{result.shards_uploaded} shard(s) {verb} ({result.bytes_uploaded / 1e6:,.1f} MB),"
            f" {result.shards_present} already there"
        )
    report(
        f"{result.profile} {result.digest}: {summary}\n"
        f"  store:    {result.store}\n  manifest: {result.manifest_url}\n"
        f"  fetch:    gpubuild fetch {result.fetch_url} --into DIR\n"
        f"  size:     {result.bytes_total / 1e6:,.1f} MB in {len(result.manifest.shards)} shard(s)"
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
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
    from builder.fetch import fetch, fetch_document

    result = fetch(artifact_url, into, on_progress=report)
    if as_json:
        _emit_json(fetch_document(result))


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
        sas_expiry_for,
        sas_lifetime,
        write_secret_file,
    )

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
        _emit_json(
            {
                "store": store.display_url,
                "out": str(out),
                "expires": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "permissions": "read",
            }
        )


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
@index_options
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

    loaded = load_profile(profile)
    settings = _index_settings(index_url, index_overrides)
    out = out_dir or default_store_dir()
    click.echo(f"packing {loaded.name} into {out} ...", err=True)
    result = pack(
        loaded,
        lock_path=lock_path,
        out_dir=out,
        settings=settings,
        on_progress=report,
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


# --- builder.initscript / builder.k8s: init-script, k8s patch (owner: initscript.py, k8s.py) --


def _published(
    command: str, profile: Path, store_url: str | None, lock_path: Path | None
) -> Published:
    from builder.initscript import find_published
    from builder.profile import load_profile
    from builder.store import default_store_url

    if store_url is None:
        # The default store is a folder in this machine's cache: a pod cannot read it, so
        # output for a pod names its store explicitly (a file:// one too, when it is meant).
        raise BadInputError(
            f"{command} writes what runs in a pod, so it needs --store: the store the profile"
            " was published to (az://ACCOUNT/CONTAINER/PREFIX or its https URL). Without it,"
            f" the default would be this machine's local store ({default_store_url()}), which"
            " no pod can read; pass --store file://... explicitly for a folder the pod mounts"
        )
    return find_published(load_profile(profile), store_url, lock_path)


_STORE_HELP = (
    "Required: the store the profile was published to: az://ACCOUNT/CONTAINER/PREFIX, an "
    "https blob URL, or file://PATH for a folder the pod mounts. The script reads it at the "
    "same place unless GPUBUILD_STORE_URL says otherwise."
)


@main.command("init-script")
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store_url", metavar="URL", help=_STORE_HELP)
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The lock (default: <profile>.lock beside the profile).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("init.sh"),
    show_default=True,
    help="Where to write the script.",
)
@click.option(
    "--k8s-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the Kubernetes snippet (initContainer, volume, mounts, env) here.",
)
@click.option(
    "--fallback",
    type=click.Choice(["pip"]),
    help="Build in a pip install of the lock, used only when the store cannot be reached.",
)
@click.option("--image", metavar="IMAGE", help="The init image, for the snippet.")
@click.option("--secret", metavar="NAME", help="A Secret whose key 'sas' holds the SAS.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def init_script_command(
    profile: Path,
    store_url: str | None,
    lock_path: Path | None,
    output: Path,
    k8s_out: Path | None,
    fallback: str | None,
    image: str | None,
    secret: str | None,
    as_json: bool,
) -> None:
    """Write the initContainer script for PROFILE's published digest (and its k8s snippet).

    \b
    The script pins the digest and every shard's sha256; it downloads shards in
    parallel, verifies them, and switches the volume to the new set only when all
    of it is there. Settings at run time: GPUBUILD_TARGET, GPUBUILD_STORE_URL,
    GPUBUILD_SAS / GPUBUILD_SAS_FILE, GPUBUILD_PARALLEL, GPUBUILD_RETRIES.
    Build the init image around it: docker build -f Dockerfile.init .

    \b
    Example:
      gpubuild init-script profiles/onnx-gpu.toml --store az://acct/gpubuild/prod \\
          -o init.sh --k8s-out init-container.yaml --secret gpubuild-sas
    """
    from builder.initscript import render_init_script, write_script
    from builder.k8s import pod_snippet, render_snippet

    found = _published("init-script", profile, store_url, lock_path)
    manifest = found.manifest
    text = render_init_script(
        manifest, found.store_base_url, fallback_lock=found.lock_text if fallback else None
    )
    snippet = render_snippet(pod_snippet(manifest, image=image, secret=secret)) if k8s_out else ""
    write_script(output, text)
    shards = len(manifest.shards)
    report(
        f"{manifest.profile} {manifest.digest[:12]}: {shards} shard{'s' * (shards != 1)}, "
        f"{manifest.total_bytes / 1e6:,.1f} MB from {found.store_display_url} -> {output}"
    )
    if k8s_out:
        write_script(k8s_out, snippet, mode=0o644)
        report(f"Kubernetes snippet -> {k8s_out}")
    if as_json:
        _emit_json(
            {
                "profile": manifest.profile,
                "digest": manifest.digest,
                "store": found.store_display_url,
                "script": str(output),
                "snippet": str(k8s_out) if k8s_out else None,
                "shards": shards,
                "bytes": manifest.total_bytes,
                "fallback": fallback,
                "env": manifest.env,
            }
        )


@main.group("k8s", cls=GpubuildGroup)
def k8s_group() -> None:
    """Kubernetes manifests: put the gpubuild initContainer into a RayService."""


@k8s_group.command("patch")
@click.argument("ray_service", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--group", "group", required=True, help="The worker group (its groupName).")
@click.option(
    "--profile",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The profile whose published digest the initContainer installs.",
)
@click.option("--store", "store_url", metavar="URL", help=_STORE_HELP)
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The lock (default: <profile>.lock beside the profile).",
)
@click.option("--image", metavar="IMAGE", help="The init image (default gpubuild-init:<tag>).")
@click.option("--secret", metavar="NAME", help="A Secret whose key 'sas' holds the SAS.")
@click.option("--dry-run", is_flag=True, help="Print the diff; leave the file as it is.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def k8s_patch_command(
    ray_service: Path,
    group: str,
    profile: Path,
    store_url: str | None,
    lock_path: Path | None,
    image: str | None,
    secret: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Insert or update the initContainer, volume, mounts and env of one worker group.

    \b
    Edits RAY_SERVICE_YAML in place and only where needed: comments, key order,
    quotes, indentation and Flux markers stay as they are. An initContainer named
    install-heavy-deps (the pip one of the deployment guide) is replaced. The
    result is checked against the KubeRay CRD before it is written. Prints the diff.

    \b
    Example:
      gpubuild k8s patch dev/ray-service.yaml --group your-gpu-worker-group \\
          --profile profiles/onnx-gpu.toml --store az://acct/gpubuild/prod \\
          --image myacr.azurecr.io/data-ai/gpubuild-init:onnx-gpu --secret gpubuild-sas
    """
    from builder.k8s import patch_ray_service, pod_snippet

    found = _published("k8s patch", profile, store_url, lock_path)
    snippet = pod_snippet(found.manifest, image=image, secret=secret)
    result = patch_ray_service(ray_service, group, snippet, write=not dry_run)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.diff:
        click.echo(result.diff.rstrip("\n"), err=True)
    verb = "would change" if dry_run else "patched"
    click.echo(
        f"{ray_service}: {verb if result.changed else 'already up to date'} (group {group})",
        err=True,
    )
    if as_json:
        _emit_json(
            {
                "path": str(ray_service),
                "group": group,
                "changed": result.changed,
                "written": result.changed and not dry_run,
                "diff": result.diff,
                "warnings": list(result.warnings),
            }
        )


# --- builder.dockerfile / builder.light / builder.budget / builder.image: dockerfile, split,
# build-image (owner: dockerfile.py, light.py, budget.py, image.py) ---------------------------


def _mb_option() -> object:
    return click.option(
        "--max-light-mb",
        type=click.FloatRange(min=0, min_open=True),
        default=100.0,
        show_default=True,
        help="Largest installed size (MB) one [light] distribution may have.",
    )


def _budget_option() -> object:
    return click.option(
        "--budget-gb",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        help="Disk of the CI build agent (GB); the estimated peak must fit.",
    )


def _worker_options(command: object) -> object:
    for option in reversed(
        [
            click.argument("profile", type=click.Path(dir_okay=False, path_type=Path)),
            click.option(
                "--code",
                "code",
                multiple=True,
                type=click.Path(exists=True, path_type=Path),
                metavar="PATH",
                help="A file or folder copied to /app/<its name>. Repeatable.",
            ),
            click.option(
                "--context",
                type=click.Path(file_okay=False, exists=True, path_type=Path),
                default=Path("."),
                show_default=True,
                help="The build context: holds the --code paths, certs/ and the light lock.",
            ),
            click.option(
                "--lock",
                "lock_path",
                type=click.Path(dir_okay=False, path_type=Path),
                help="The heavy lock (default: <profile>.lock); the light lock goes beside it as"
                " <name>.light.lock.",
            ),
            _mb_option(),
            _budget_option(),
            index_options,
            click.option(
                "--json", "as_json", is_flag=True, help="Print a JSON document on stdout."
            ),
        ]
    ):
        command = option(command)  # type: ignore[operator]
    return command


@main.command("dockerfile")
@_worker_options  # type: ignore[arg-type]
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the Dockerfile (default: print it on stdout).",
)
@click.option(
    "--dockerignore",
    "write_dockerignore",
    is_flag=True,
    help="Write CONTEXT/.dockerignore sending only what the Dockerfile copies, when the "
    "context has none (without it, the one that would do so is printed).",
)
def dockerfile_command(
    profile: Path,
    code: tuple[Path, ...],
    context: Path,
    lock_path: Path | None,
    max_light_mb: float,
    budget_gb: float,
    index_url: str | None,
    index_overrides: tuple[str, ...],
    as_json: bool,
    output: Path | None,
    write_dockerignore: bool,
) -> None:
    """Write the slim worker Dockerfile for PROFILE and check the build's disk budget.

    \b
    The image gets the base (ARG BASE_IMAGE), the proxy CA from certs/*.crt when there
    is one, the [light] requirements from their own hashed lock (resolved on top of the
    heavy lock, written beside it as <name>.light.lock), the --code files in /app, and
    PYTHONPATH, LD_LIBRARY_PATH (from the packed heavy manifest) and OMP_NUM_THREADS.
    A GPU package or a distribution above --max-light-mb under [light] is an error, and
    so is an estimated peak disk above --budget-gb (exit 1; nothing is written).

    \b
    Example:
      gpubuild dockerfile profiles/onnx-gpu.toml --code your_tasks.py -o Dockerfile
    """
    from builder.budget import GB, budget_document, render_budget
    from builder.dockerfile import generate_dockerfile, worker_document, worker_text
    from builder.light import MB
    from builder.profile import load_profile

    result = generate_dockerfile(
        load_profile(profile),
        profile_arg=profile.as_posix(),
        context=context,
        code=code,
        lock_path=lock_path,
        settings=_index_settings(index_url, index_overrides),  # type: ignore[arg-type]
        max_light_bytes=int(max_light_mb * MB),
        budget_bytes=int(budget_gb * GB),
        output=output,
        on_progress=report,
        write_dockerignore=write_dockerignore,
    )
    report(worker_text(result.plan))
    report(render_budget(result.budget))
    if result.dockerignore_written is not None:
        report(f".dockerignore written: {result.dockerignore_written}")
    elif not result.context.dockerignore:
        report(
            f"{context} has no .dockerignore, so docker sends all of it to the daemon"
            + (f" ({result.context.describe()})" if result.context.describe() else "")
            + ". This one sends only what the Dockerfile copies (write it with --dockerignore):\n"
            + "".join(f"    {line}\n" for line in result.dockerignore.splitlines()).rstrip("\n")
        )
    if output is not None:
        report(f"Dockerfile written: {output}")
    if as_json:
        _emit_json(
            {
                **worker_document(result.plan),
                "dockerfile": str(output) if output else None,
                "dockerignore": str(result.dockerignore_written)
                if result.dockerignore_written
                else None,
                "context_bytes": result.context.bytes,
                "budget": budget_document(result.budget),
            }
        )
    elif output is None:
        click.echo(result.plan.text, nl=False)


@main.command("split")
@click.argument("requirements", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--profile",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The profile whose target, base image and policy decide versions and sizes.",
)
@_mb_option()  # type: ignore[misc]
@click.option("--index-url", metavar="URL", help="Default package index.")
@click.option("--json", "as_json", is_flag=True, help="Print the proposal as JSON on stdout.")
def split_command(
    requirements: Path, profile: Path, max_light_mb: float, index_url: str | None, as_json: bool
) -> None:
    """Propose [heavy] and [light] lists for an existing REQUIREMENTS file.

    \b
    The whole file is resolved for the profile's target and installed into a temporary
    folder to measure it. A requirement goes to [heavy] when it, or anything it pulls
    in, is a CUDA/GPU package or above --max-light-mb installed; the rest is [light].

    \b
    Example:
      gpubuild split requirements.txt --profile profiles/onnx-gpu.toml
    """
    from builder.light import MB, propose_split, render_toml_lists, split_document, split_text
    from builder.profile import load_profile

    proposal = propose_split(
        load_profile(profile),
        requirements,
        settings=_index_settings(index_url, ()),  # type: ignore[arg-type]
        max_bytes=int(max_light_mb * MB),
        on_progress=report,
    )
    click.echo(split_text(proposal), err=True)
    if as_json:
        _emit_json(split_document(proposal))
    else:
        click.echo(
            render_toml_lists(
                [line.requirement for line in proposal.heavy],
                [line.requirement for line in proposal.light],
            ),
            nl=False,
        )


@main.command("build-image")
@_worker_options  # type: ignore[arg-type]
@click.option("--tag", required=True, help="Image name and tag, e.g. REGISTRY/data-ai/NAME:TAG.")
@click.option("--push", "push_image", is_flag=True, help="Push the image after building it.")
@click.option(
    "--build-arg",
    "build_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="A Docker build argument (BASE_IMAGE, APP_USER, PIP_INDEX_URL ...). Repeatable.",
)
def build_image_command(
    profile: Path,
    code: tuple[Path, ...],
    context: Path,
    lock_path: Path | None,
    max_light_mb: float,
    budget_gb: float,
    index_url: str | None,
    index_overrides: tuple[str, ...],
    as_json: bool,
    tag: str,
    push_image: bool,
    build_args: tuple[str, ...],
) -> None:
    """Build (and with --push, push) PROFILE's worker image through the Docker engine.

    \b
    Builds exactly the Dockerfile `gpubuild dockerfile` writes, from a staged context
    holding only what it copies, with the build output streamed here; then compares
    the real image size with the estimate. --index-url also becomes the PIP_INDEX_URL
    build argument unless --build-arg names one.

    \b
    Example:
      gpubuild build-image profiles/onnx-gpu.toml --code your_tasks.py \\
          --tag myacr.azurecr.io/data-ai/your-gpu-service:dev --push
    """
    from builder.base import docker_client
    from builder.budget import GB, render_budget
    from builder.dockerfile import plan_worker, worker_text
    from builder.image import build_image, check_build_args, result_document, result_text
    from builder.light import MB
    from builder.profile import load_profile

    args: dict[str, str] = {}
    for item in build_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--build-arg {item!r}: expected KEY=VALUE")
        args[key] = value
    if index_url and "PIP_INDEX_URL" not in args:
        args["PIP_INDEX_URL"] = index_url
    check_build_args(args)
    progress = report
    plan = plan_worker(
        load_profile(profile),
        profile_arg=profile.as_posix(),
        context=context,
        code=code,
        lock_path=lock_path,
        settings=_index_settings(index_url, index_overrides),  # type: ignore[arg-type]
        max_light_bytes=int(max_light_mb * MB),
        on_progress=progress,
    )
    click.echo(worker_text(plan), err=True)
    result = build_image(
        plan,
        client=docker_client(),
        tag=tag,
        buildargs=args,
        push_image=push_image,
        budget_bytes=int(budget_gb * GB),
        on_line=progress,
        render_budget=render_budget,
    )
    click.echo(result_text(result), err=True)
    if as_json:
        _emit_json(result_document(result))


# --- builder.check and builder.doctor: gpubuild check, gpubuild doctor (owner: check.py, doctor.py)


@main.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON on stdout.")
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A gpubuild profile to take into account besides those under PATHS. Repeatable.",
)
@click.option(
    "--store",
    metavar="DIR",
    help="A local store folder (or file://DIR) whose published manifests count as caches.",
)
def check_command(
    paths: tuple[Path, ...], as_json: bool, profiles: tuple[Path, ...], store: str | None
) -> None:
    """Read a deployment checkout and report the deployment guide's known mistakes.

    \b
    Reads RayService/RayCluster and HelmRelease YAML, Dockerfiles, requirements*.txt,
    azure-pipelines*.yaml, gpubuild profiles, locks and manifests under PATHS
    (skipping .git, .venv, node_modules). Each finding is `file:line: CODE message`
    with a fix; exit 1 when any finding is an error, 0 otherwise.

    \b
    Codes:
      GB001 file does not parse        GB101 Ray version mismatch
      GB102 Ray image without version  GB103 ray[client] not pinned ==
      GB104 Python version mismatch    GB201 LD_LIBRARY_PATH lacks library folders
      GB202 PYTHONPATH lacks /shared-packages   GB203 /app before /shared-packages
      GB301 Flux $imagepolicy marker missing    GB302 marker names the wrong field
      GB401 pip at pod start, cache published   GB402 rm -rf protobuf/click hack
      GB403 numpy<2 re-install hack    GB404 unquoted < or > in pip install
      GB501 ships protobuf>=5          GB502 ships click
      GB503 ships numpy>=2             GB504 shadows a base package
      GB601 GPU group, no nvidia.com/gpu limit  GB602 no nvidia.com/gpu toleration

    \b
    Example:
      gpubuild check draft-deployment/ your-gpu-service/ your-api-service/
      gpubuild check draft-deployment/ --profile profiles/onnx-gpu.toml --store ./store --json
    """
    from builder.check import check, result_document, result_text, summary_text

    result = check(list(paths), profiles=list(profiles), store=store)
    if as_json:
        _emit_json(result_document(result))
    else:
        click.echo(result_text(result), nl=False)
    click.echo(summary_text(result), err=True)
    sys.exit(result.exit_code)


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
@click.option(
    "--shared",
    metavar="DIR",
    default=None,
    help="The shared packages folder (default: $GPUBUILD_TARGET or /shared-packages).",
)
def doctor_command(as_json: bool, shared: str | None) -> None:
    """Check a running worker container: sys.path, shadowed packages, libraries, GPU.

    \b
    Run it inside the Ray container with the image's python; it needs only the
    standard library, so where gpubuild is not installed use the file itself:
      kubectl exec -i POD -c ray-worker -- python3 - --json < builder/doctor.py
    Exit 1 when a check fails.
    """
    from builder import doctor

    sys.exit(doctor.run(shared or doctor.default_shared(), as_json))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
