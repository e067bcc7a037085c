"""Commands whose output runs in a pod: init-script and k8s patch."""

from __future__ import annotations

from pathlib import Path

import click

from builder.cli.base import GpubuildGroup, emit_json, json_option, lock_option, report
from builder.errors import BadInputError
from builder.initscript import render_init_script, write_script
from builder.k8s import DELIVERIES, PodSnippet, pod_snippet, render_snippet
from builder.k8s_patch import patch_ray_service
from builder.pipeline import Published, find_published
from builder.profile import load_profile
from builder.stores import default_store_url
from builder.units import megabytes, plural

_STORE_HELP = (
    "Required: the store the profile was published to: az://ACCOUNT/CONTAINER/PREFIX, an "
    "https blob URL, or file://PATH for a folder the pod mounts. The script reads it at the "
    "same place unless GPUBUILD_STORE_URL says otherwise."
)


def _published(
    command: str, profile: Path, store_url: str | None, lock_path: Path | None
) -> Published:
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


_DELIVERY_HELP = (
    "How pods get the set: blob (the init script downloads the shards; any store), init-copy "
    "(an initContainer from the registry's init-copy image copies them; oci:// stores), or "
    "image-volume (the registry's image mounted read-only; Kubernetes with image volumes)."
)

delivery_option = click.option(
    "--delivery",
    type=click.Choice(DELIVERIES),
    default="blob",
    show_default=True,
    help=_DELIVERY_HELP,
)


def _snippet(found: Published, delivery: str, image: str | None, secret: str | None) -> PodSnippet:
    """The pod snippet for one delivery: a registry's images come from the store, by digest."""
    is_registry = found.store_display_url.startswith("oci")
    if delivery == "blob":
        if is_registry:
            raise BadInputError(
                f"{found.store_display_url} is a registry: pods get it with --delivery"
                " image-volume or init-copy (the init script reads blob stores)"
            )
        return pod_snippet(found.manifest, image=image, secret=secret)
    if not is_registry:
        raise BadInputError(
            f"--delivery {delivery} needs the set published to a registry store"
            f" (oci://REGISTRY/REPOSITORY), not {found.store_display_url}"
        )
    wanted = "image" if delivery == "image-volume" else "init-copy image"
    reference = image or found.references.get(wanted)
    if reference is None:
        raise BadInputError(
            f"{found.store_display_url} has no {wanted} for {found.manifest.profile}"
            f" {found.manifest.digest[:12]}: publish again where a static busybox is installed"
            " (Debian's busybox-static, or GPUBUILD_BUSYBOX)"
        )
    return pod_snippet(found.manifest, image=reference, secret=secret, delivery=delivery)


@click.command("init-script")
@click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store_url", metavar="URL", help=_STORE_HELP)
@lock_option
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
@delivery_option
@json_option
def init_script_command(
    profile: Path,
    store_url: str | None,
    lock_path: Path | None,
    output: Path,
    k8s_out: Path | None,
    fallback: str | None,
    image: str | None,
    secret: str | None,
    delivery: str,
    as_json: bool,
) -> None:
    """Write the initContainer script for PROFILE's published digest (and its k8s snippet).

    \b
    The script pins the digest and every shard's sha256; it downloads shards in
    parallel, verifies each before unpacking it, and switches the volume to the new set
    only when all of it is there. Settings at run time: GPUBUILD_TARGET,
    GPUBUILD_STORE_URL, GPUBUILD_SAS / GPUBUILD_SAS_FILE, GPUBUILD_PARALLEL,
    GPUBUILD_RETRIES. Build the init image around it: docker build -f Dockerfile.init .

    \b
    Example:
      gpubuild init-script profiles/onnx-gpu.toml --store az://acct/gpubuild/prod \\
          -o init.sh --k8s-out init-container.yaml --secret gpubuild-sas
    """
    found = _published("init-script", profile, store_url, lock_path)
    manifest = found.manifest
    pod = _snippet(found, delivery, image, secret)
    snippet = render_snippet(pod) if k8s_out else ""
    if delivery != "blob" and k8s_out is None:
        raise BadInputError(
            f"--delivery {delivery} needs no script, only the pod snippet: give --k8s-out FILE"
            " (or use `gpubuild k8s patch --delivery ...`)"
        )
    shards = len(manifest.shards)
    if delivery == "blob":
        text = render_init_script(
            manifest, found.store_base_url, fallback_lock=found.lock_text if fallback else None
        )
        write_script(output, text)
        report(
            f"{manifest.profile} {manifest.digest[:12]}: {plural(shards, 'shard')}, "
            f"{megabytes(manifest.total_bytes)} from {found.store_display_url} -> {output}"
        )
    if k8s_out:
        write_script(k8s_out, snippet, mode=0o644)
        report(f"Kubernetes snippet -> {k8s_out}")
    if as_json:
        emit_json(
            {
                "profile": manifest.profile,
                "digest": manifest.digest,
                "store": found.store_display_url,
                "script": str(output) if delivery == "blob" else None,
                "delivery": delivery,
                "image": pod.image,
                "snippet": str(k8s_out) if k8s_out else None,
                "shards": shards,
                "bytes": manifest.total_bytes,
                "fallback": fallback,
                "env": manifest.env,
            }
        )


@click.group("k8s", cls=GpubuildGroup)
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
@lock_option
@click.option("--image", metavar="IMAGE", help="The init image (default gpubuild-init:<tag>).")
@click.option("--secret", metavar="NAME", help="A Secret whose key 'sas' holds the SAS.")
@delivery_option
@click.option("--dry-run", is_flag=True, help="Print the diff; leave the file as it is.")
@json_option
def k8s_patch_command(
    ray_service: Path,
    group: str,
    profile: Path,
    store_url: str | None,
    lock_path: Path | None,
    image: str | None,
    secret: str | None,
    delivery: str,
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
    found = _published("k8s patch", profile, store_url, lock_path)
    snippet = _snippet(found, delivery, image, secret)
    result = patch_ray_service(ray_service, group, snippet, write=not dry_run)
    for warning in result.warnings:
        report(f"warning: {warning}")
    if result.diff:
        report(result.diff.rstrip("\n"))
    verb = "would change" if dry_run else "patched"
    report(f"{ray_service}: {verb if result.changed else 'already up to date'} (group {group})")
    if as_json:
        emit_json(
            {
                "path": str(ray_service),
                "group": group,
                "changed": result.changed,
                "written": result.changed and not dry_run,
                "diff": result.diff,
                "warnings": list(result.warnings),
            }
        )
