"""The YAML text of `gpubuild ci azure-pipelines`, rendered from a `PipelineSpec` that
builder/cipipeline.py planned: deterministic, no I/O. Values a user chooses become `parameters`
passed to scripts through `env:`; scalars are quoted whenever YAML would read them as something
other than the same string."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from builder.cipipeline import (
    AGENT_PYTHON,
    ARTIFACT,
    BRANCHES,
    PipelineSpec,
    number_text,
)

_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./@:+=-]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _scalar(value: str) -> str:
    """A YAML scalar for `value`: plain when that reads back as the same string, else quoted."""
    if _PLAIN.match(value) and value.lower() not in _YAML_WORDS and not _looks_numeric(value):
        return value
    return _quoted(value)


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _looks_numeric(value: str) -> bool:
    return bool(re.match(r"^[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?$", value)) or value.startswith(
        ("0x", "0o")
    )


def _block(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return [pad + line if line else "" for line in text.rstrip("\n").split("\n")]


def _sh(words: Sequence[str]) -> str:
    """A command line; words starting with $ are environment variables, quoted as "$NAME"."""
    out = []
    for word in words:
        out.append(f'"{word}"' if word.startswith("$") else shlex.quote(word))
    return " ".join(out)


def _parameters(spec: PipelineSpec) -> list[tuple[str, str, str, str]]:
    """(name, type, default, display name) of what a user sets, in the order they read them."""
    params = []
    if spec.store is not None:
        params.append(("store", "string", spec.store,
                       "Store the heavy sets are published to (az://ACCOUNT/CONTAINER/PREFIX)"))  # fmt: skip
    if spec.registry is not None:
        params.append(("registry", "string", spec.registry,
                       "Registry the heavy sets are published to as images (oci://REGISTRY/REPOSITORY)"))  # fmt: skip
    if spec.azure:
        may = [
            "write the store (Storage Blob Data Contributor)" if spec.store is not None else "",
            "push to the registry (AcrPush)" if spec.registry is not None else "",
        ]
        params.append(("azureServiceConnection", "string", spec.service_connection,
                       "Azure service connection allowed to "
                       + " and ".join(m for m in may if m)))  # fmt: skip
    if spec.store is not None:
        params.append(("sasSecretName", "string", spec.secret,
                       "Kubernetes Secret (key 'sas') with the pods' read-only SAS, named in the snippet"))  # fmt: skip
    params.append(("gpubuildPackage", "string", spec.gpubuild_package,
                   f"pip requirement that installs gpubuild {spec.version} (a feed's"
                   f" gpubuild=={spec.version}, a wheel URL, or a git URL at a tag)"))  # fmt: skip
    params.append(("diskBudgetGb", "number", number_text(spec.budget_gb),
                   "Disk of the agent that builds the worker image (GB): the Dockerfile gate"))  # fmt: skip
    params.append(("vmImage", "string", spec.vm_image, "Microsoft-hosted agent image"))
    return params


def _install_script(spec: PipelineSpec) -> str:
    want = f"gpubuild, version {spec.version}"
    return f"""\
set -euo pipefail
df -h . | sed 's/^/disk at start: /'
python -m pip install --disable-pip-version-check --progress-bar off "$GPUBUILD_PACKAGE"
# The locks' inputs digest names gpubuild's version: another version would find them stale.
installed="$(gpubuild --version)"
if [ "$installed" != {shlex.quote(want)} ]; then
  echo "##vso[task.logissue type=error]$GPUBUILD_PACKAGE installed '$installed', not gpubuild {spec.version}, the version the generated pipeline and the locks are for"
  exit 1
fi
echo "$installed"
"""


def _check_script(spec: PipelineSpec) -> str:
    lines = ["set -euo pipefail"]
    for profile in spec.profiles:
        lines.append(_sh(["gpubuild", "resolve", profile.profile, "--check", *profile.index_args]))
    return "\n".join(lines) + "\n"


def _registry_login() -> str:
    # An Azure Container Registry takes an ACR token from the service connection's sign-in; the
    # token goes into gpubuild's environment only, never into the log or onto a command line.
    return """\
case "$GPUBUILD_REGISTRY" in
  oci://*.azurecr.io/*)
    acr="${GPUBUILD_REGISTRY#oci://}"
    acr="${acr%%.azurecr.io/*}"
    GPUBUILD_REGISTRY_USERNAME=00000000-0000-0000-0000-000000000000
    GPUBUILD_REGISTRY_PASSWORD="$(az acr login --name "$acr" --expose-token --output tsv --query accessToken)"
    export GPUBUILD_REGISTRY_USERNAME GPUBUILD_REGISTRY_PASSWORD
    ;;
esac
"""


def _publish_script(spec: PipelineSpec) -> str:
    lines = ["set -euo pipefail"]
    if spec.store is not None:
        lines.append(': "${GPUBUILD_STORE:?set the pipeline parameter store}"')
    if spec.registry is not None:
        lines.append(': "${GPUBUILD_REGISTRY:?set the pipeline parameter registry}"')
        lines += _registry_login().rstrip("\n").split("\n")
    for profile in spec.profiles:
        out = f"$GPUBUILD_ARTIFACT_DIR/{profile.name}"
        lines.append(f'mkdir -p "{out}"')
        commands: list[list[str]] = []
        if spec.store is not None:
            store = ["--store", "$GPUBUILD_STORE"]
            snippet = ["-o", f"{out}/init.sh", "--k8s-out", f"{out}/init-container.yaml"]
            commands.append(["publish-cache", profile.profile, *store, *profile.index_args])
            commands.append(["init-script", profile.profile, *store, *snippet,
                             "--secret", "$GPUBUILD_SAS_SECRET"])  # fmt: skip
        if spec.registry is not None:
            registry = ["--store", "$GPUBUILD_REGISTRY"]
            delivery = spec.registry_delivery
            snippet = ["--delivery", delivery, "--k8s-out", f"{out}/{delivery}.yaml"]
            commands.append(["publish-cache", profile.profile, *registry, *profile.index_args])
            commands.append(["init-script", profile.profile, *registry, *snippet])
        lines += [_sh(["gpubuild", *words]) for words in commands]
    return "\n".join(lines) + "\n"


def _dockerfile_script(spec: PipelineSpec) -> str:
    code: list[str] = []
    for path in spec.code:
        code += ["--code", path]
    lines = [
        "set -euo pipefail",
        "# Exit 1 when the worker image would not fit the agent's disk; a verdict that lacks a",
        "# size (the base image's, unless the profile records it) is a warning.",
        "gate() {",
        '  verdict="$(python -c \'import json, sys; print(json.load(open(sys.argv[1]))["budget"]["verdict"])\' "$2")"',
        '  echo "disk budget of the worker image for $1: $verdict"',
        '  if [ "$verdict" = incomplete ]; then',
        '    echo "##vso[task.logissue type=warning]$1: the disk budget is incomplete (see the'
        ' dockerfile step); record base_image_bytes and base_image_download_bytes in the profile"',
        "  fi",
        "}",
    ]
    for profile in spec.profiles:
        out = f"$GPUBUILD_ARTIFACT_DIR/{profile.name}"
        budget = ["--budget-gb", "$GPUBUILD_DISK_BUDGET_GB"]
        written = ["-o", f"{out}/Dockerfile", "--json", *profile.index_args]
        dockerfile = ["gpubuild", "dockerfile", profile.profile, *code, *budget, *written]
        lines.append(f'mkdir -p "{out}"')
        lines.append(_sh(dockerfile) + f' > "{out}/dockerfile.json"')
        lines.append(_sh(["gate", profile.name, f"{out}/dockerfile.json"]))
    return "\n".join(lines) + "\n"


_DISK_SCRIPT = """\
set -euo pipefail
# What this run left on the agent's disk; the peak, while a set was packed, was about this
# plus the unpacked set (the manifests' raw sizes) that pack removes when it is done.
for folder in "$UV_CACHE_DIR" "$PIP_CACHE_DIR" "$XDG_CACHE_HOME" "$GPUBUILD_ARTIFACT_DIR"; do
  if [ -d "$folder" ]; then du -sh "$folder"; else printf '0\\t%s (not made)\\n' "$folder"; fi
done
df -h "$PIPELINE_WORKSPACE"
"""


def render_azure_pipeline(spec: PipelineSpec) -> str:
    """The pipeline file's text: the same spec always gives the same bytes."""
    profiles = spec.profiles
    names = ", ".join(p.profile for p in profiles)
    out: list[str] = [
        f"# Publishes the gpubuild heavy sets of {names}, each lock checked first.",
        f"# Generated by gpubuild {spec.version}; do not edit. Regenerate with:",
        f"#   {spec.command}",
        "# A pipeline of its own: the repository's template pipeline stays as it is.",
        f"# Steps: install gpubuild {spec.version} (the version the locks were resolved with);",
        "# `resolve --check` (a lock not resolved again after an edit fails the run);",
        "# `publish-cache`; the init script and Kubernetes snippet of each profile; `dockerfile`",
        f"# (fails when the worker image would not fit the agent's disk); artifact '{ARTIFACT}'.",
        "# No key, SAS or token is written here: "
        + (
            "the store is written through the Azure service connection."
            if spec.azure
            else "the store needs none."
        ),
        "",
        "trigger:",
        "  branches:",
        "    include:",
        *[f"      - {branch}" for branch in BRANCHES],
        "  paths:",
        "    include:",
    ]
    paths: list[str] = []
    for profile in profiles:
        for path in (profile.profile, profile.lock, profile.light_lock, profile.snapshot):
            if path is not None and path not in paths:
                paths.append(path)
    if spec.pipeline_file is not None:
        paths.append(spec.pipeline_file)
    out += [f"      - {_scalar(path)}" for path in paths]
    out += ["", "pr: none", "", "parameters:"]
    for name, kind, default, display in _parameters(spec):
        out += [
            f"  - name: {name}",
            f"    displayName: {_scalar(display)}",
            f"    type: {kind}",
            # Quoted, number or not: Azure Pipelines reads every scalar as a string (so does its
            # schema), and a quoted number reads the same to it.
            f"    default: {_quoted(default) if kind == 'number' else _scalar(default)}",
        ]
    out += [
        "",
        "variables:",
        "  # Restored and saved by the Cache@2 step: a re-run downloads no wheel again.",
        "  GPUBUILD_CACHE: $(Pipeline.Workspace)/gpubuild-cache",
        "  UV_CACHE_DIR: $(Pipeline.Workspace)/gpubuild-cache/uv",
        "  PIP_CACHE_DIR: $(Pipeline.Workspace)/gpubuild-cache/pip",
        "  # gpubuild's local packs (scratch): the agent empties this folder after the job.",
        "  XDG_CACHE_HOME: $(Agent.TempDirectory)/gpubuild-home",
        f"  GPUBUILD_ARTIFACT_DIR: $(Build.ArtifactStagingDirectory)/{ARTIFACT}",
        "",
        "pool:",
        "  vmImage: ${{ parameters.vmImage }}",
        "",
        "steps:",
        "  - checkout: self",
        "    fetchDepth: '1'",
        "",
        "  - task: UsePythonVersion@0",
        f"    displayName: Python {AGENT_PYTHON} for gpubuild",
        "    inputs:",
        f"      versionSpec: '{AGENT_PYTHON}'",
        "",
        "  - task: Cache@2",
        "    displayName: Restore the uv and pip caches, keyed by the locks",
        "    inputs:",
        "      key: '" + " | ".join(_cache_key(spec)).replace("'", "''") + "'",
        "      restoreKeys: |",
        "        " + " | ".join(_cache_key(spec)[:3]),
        "        " + " | ".join(_cache_key(spec)[:2]),
        "      path: $(GPUBUILD_CACHE)",
        "",
        "  - script: |",
        *_block(_install_script(spec), 6),
        f"    displayName: Install gpubuild {spec.version}",
        "    env:",
        "      GPUBUILD_PACKAGE: ${{ parameters.gpubuildPackage }}",
        "",
        "  - script: |",
        *_block(_check_script(spec), 6),
        "    displayName: The locks are current (resolve --check)",
        "",
    ]
    publish_env = []
    if spec.store is not None:
        publish_env += [
            "      GPUBUILD_STORE: ${{ parameters.store }}",
            "      GPUBUILD_SAS_SECRET: ${{ parameters.sasSecretName }}",
        ]
    if spec.registry is not None:
        publish_env.append("      GPUBUILD_REGISTRY: ${{ parameters.registry }}")
    title = "Publish the heavy sets (publish-cache) and write the init snippets"
    if spec.azure:
        out += [
            "  - task: AzureCLI@2",
            f"    displayName: {title}",
            "    inputs:",
            "      azureSubscription: ${{ parameters.azureServiceConnection }}",
            "      scriptType: bash",
            "      scriptLocation: inlineScript",
            "      addSpnToEnvironment: false",
            "      failOnStandardError: false",
            "      inlineScript: |",
            *_block(_publish_script(spec), 8),
        ]
    else:
        out += ["  - script: |", *_block(_publish_script(spec), 6), f"    displayName: {title}"]
    out += ["    env:", *publish_env, ""]
    out += [
        "  - script: |",
        *_block(_dockerfile_script(spec), 6),
        "    displayName: Worker Dockerfile within the disk budget (dockerfile)",
        "    env:",
        "      GPUBUILD_DISK_BUDGET_GB: ${{ parameters.diskBudgetGb }}",
        "",
        "  - task: PublishPipelineArtifact@1",
        "    displayName: Init scripts and Kubernetes snippets for the manifests repository",
        "    inputs:",
        "      targetPath: $(GPUBUILD_ARTIFACT_DIR)",
        f"      artifact: {ARTIFACT}",
        "      publishLocation: pipeline",
        "",
        "  - script: |",
        *_block(_DISK_SCRIPT, 6),
        "    displayName: Disk used on the agent",
        "    condition: always()",
    ]
    return "\n".join(out) + "\n"


def _cache_key(spec: PipelineSpec) -> list[str]:
    """Cache@2 key segments: quoted strings are literal, paths are hashed (the locks)."""
    locks: list[str] = []
    for profile in spec.profiles:
        locks.append(profile.lock)
        if profile.light_lock:
            locks.append(profile.light_lock)
    return ["gpubuild", '"$(Agent.OS)"', '"${{ parameters.gpubuildPackage }}"', *locks]


__all__ = ["render_azure_pipeline"]
