"""GB201-GB203: the Ray container's PYTHONPATH and LD_LIBRARY_PATH against what its
initContainers put into the shared folder (a gpubuild manifest's env, or the guide's rule)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from packaging.utils import canonicalize_name

from builder.checks.links import Links, is_gpubuild_init, matching_profile
from builder.checks.model import (
    APP_DIR,
    DEFAULT_SHARED,
    GPU_PACKAGES,
    Checkout,
    Container,
    Finding,
    Group,
    ManifestFile,
    Where,
    finding,
    path_entries,
)
from builder.checks.shell import pip_installs


@dataclass(frozen=True)
class SharedInstall:
    """What one group's initContainers put into a shared folder."""

    target: str
    names: frozenset[str]  # canonical names known to be installed (pip args or manifest)
    manifest: ManifestFile | None
    source: str  # for messages


def shared_installs(group: Group, links: Links) -> list[SharedInstall]:
    found = []
    for container in group.init_containers:
        if is_gpubuild_init(container):
            manifest = links.manifest_for_init(container)
            env = container.env.get("GPUBUILD_TARGET")
            target = (env.value if env and env.value else None) or (
                manifest.manifest.install_dir if manifest else DEFAULT_SHARED
            )
            names = (
                frozenset(canonicalize_name(p.name) for p in manifest.manifest.packages)
                if manifest
                else frozenset()
            )
            source = (
                f"manifest {manifest.display} (profile {manifest.manifest.profile})"
                if manifest
                else f"gpubuild initContainer {container.name!r}"
            )
            found.append(SharedInstall(target.rstrip("/"), names, manifest, source))
            continue
        installs = [p for p in pip_installs(container) if p.target]
        if not installs:
            continue
        names = frozenset(canonicalize_name(n) for p in installs for n in p.names)
        target = (installs[0].target or DEFAULT_SHARED).rstrip("/")
        matching = matching_profile(names, links)
        manifest = links.published(matching) if matching else None
        source = (
            f"manifest {manifest.display} (profile {manifest.manifest.profile}, the set this "
            "initContainer installs)"
            if manifest
            else "the deployment guide: onnxruntime-gpu needs cuDNN's folder or it silently "
            "runs on CPU"
        )
        found.append(SharedInstall(target, names, manifest, source))
    return found


def _effective_env(
    container: Container, links: Links
) -> dict[str, tuple[str | None, Where | None, str]]:
    """name -> (value, where in the pod spec or None, described source): pod env over image ENV."""
    env: dict[str, tuple[str | None, Where | None, str]] = {}
    for dockerfile in links.dockerfiles_for(container.image):
        for name, (value, where) in dockerfile.env.items():
            env[name] = (value, None, f" (the image's ENV, {where})")
    for name, var in container.env.items():
        env[name] = (var.value, var.where, "")
    return env


def environment_findings(checkout: Checkout, links: Links) -> list[Finding]:
    findings = []
    for cluster in checkout.clusters:
        for group in cluster.groups:
            installs = shared_installs(group, links)
            if not installs or not group.containers:
                continue
            container = group.containers[0]  # KubeRay runs Ray in the first container
            fallback = container.env_where or container.where
            env = _effective_env(container, links)
            findings += _python_path_findings(group, container, installs, env, fallback)
            findings += _library_path_findings(group, container, installs, env, fallback)
    return findings


def _python_path_findings(
    group: Group,
    container: Container,
    installs: list[SharedInstall],
    env: Mapping[str, tuple[str | None, Where | None, str]],
    fallback: Where,
) -> list[Finding]:
    findings = []
    value, where, source = env.get("PYTHONPATH", (None, None, ""))
    entries = path_entries(value)
    at = where or fallback
    for target in sorted({i.target for i in installs}):
        wanted = ":".join(dict.fromkeys([target, *entries] if entries else [target, APP_DIR]))
        if target not in entries:
            state = f"is {value!r}{source}" if value is not None else "is not set"
            findings.append(
                finding(
                    at,
                    "GB202",
                    f"worker group {group.name!r}: container {container.name!r} gets packages "
                    f"in {target} from its initContainer, but PYTHONPATH {state}",
                    f'set PYTHONPATH to "{wanted}" in the pod env (an env entry replaces '
                    "the image's ENV, so name /app again)",
                )
            )
        elif APP_DIR in entries and entries.index(APP_DIR) < entries.index(target):
            fixed = [target, *[e for e in entries if e != target]]
            findings.append(
                finding(
                    at,
                    "GB203",
                    f"worker group {group.name!r}: PYTHONPATH {value!r} puts {APP_DIR} before "
                    f"{target}, so anything in {APP_DIR} with a package's name wins over the "
                    "shared packages",
                    f'use "{":".join(fixed)}" ({target} first, as the deployment guide says)',
                )
            )
    return findings


def _library_path_findings(
    group: Group,
    container: Container,
    installs: list[SharedInstall],
    env: Mapping[str, tuple[str | None, Where | None, str]],
    fallback: Where,
) -> list[Finding]:
    findings = []
    value, where, source = env.get("LD_LIBRARY_PATH", (None, None, ""))
    entries = path_entries(value)
    for install in installs:
        if not install.names & GPU_PACKAGES:
            continue
        if install.manifest is not None:
            wanted = path_entries(install.manifest.manifest.env.get("LD_LIBRARY_PATH"))
        elif "onnxruntime-gpu" in install.names:
            wanted = [f"{install.target}/nvidia/cudnn/lib"]
        else:
            continue
        gpu = install.names & GPU_PACKAGES
        missing = [d for d in wanted if d not in entries]
        if not missing:
            continue
        full = ":".join(dict.fromkeys([*wanted, *entries]))
        state = (
            f"LD_LIBRARY_PATH{source} lacks"
            if value is not None
            else "LD_LIBRARY_PATH (not set) lacks"
        )
        findings.append(
            finding(
                where or fallback,
                "GB201",
                f"worker group {group.name!r} runs {', '.join(sorted(gpu))} "
                f"from {install.target}, but {state} {', '.join(missing)} "
                f"(needed per {install.source})",
                f'set LD_LIBRARY_PATH to "{full}" (gpubuild k8s patch writes it from the '
                "manifest); `gpubuild doctor` in the pod shows what does not load",
            )
        )
    return findings
