"""GB301-GB302 (Flux markers), GB401-GB404 (initContainer and pip habits), GB405-GB406 (the
init script's SAS), GB501-GB504 (what a lock or manifest ships), GB601-GB602 (GPU
scheduling)."""

from __future__ import annotations

import re
from collections.abc import Set
from pathlib import PurePosixPath
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from builder.checks.links import Links, matching_profile
from builder.checks.model import (
    GPU_RESOURCE,
    Checkout,
    Command,
    Container,
    Finding,
    Group,
    ImageField,
    Where,
    finding,
)
from builder.checks.shell import pip_install, pip_installs, unquoted_comparisons
from builder.errors import GpubuildError


def flux_findings(checkout: Checkout) -> list[Finding]:
    findings = []
    suffix = {"repository": "name", "tag": "tag"}
    for release in checkout.helm_releases:
        name = release.name or "?"
        policies: list[tuple[str, ImageField]] = []
        for item in release.image_fields:
            if item.marker is None:
                policy = f"flux-system:{name}-image-policy"
                hint = f":{suffix[item.key]}" if item.key in suffix else ""
                findings.append(
                    finding(
                        item.where,
                        "GB301",
                        f"HelmRelease {name!r}: image {item.key} {item.value!r} has no Flux "
                        "marker, so Flux never updates it and new images are not deployed",
                        f'end the line with # {{"$imagepolicy": "{policy}{hint}"}} '
                        "(the ImagePolicy's namespace:name)",
                    )
                )
                continue
            parts = item.marker.split(":")
            want = suffix.get(item.key)
            got = parts[2] if len(parts) == 3 else None
            if want and got != want:
                findings.append(
                    finding(
                        item.where,
                        "GB302",
                        f"HelmRelease {name!r}: the marker on image {item.key} is "
                        f"{item.marker!r}; Flux would write the image's "
                        f"{_setter_field(got)} into {item.key}",
                        f'use "{":".join(parts[:2])}:{want}" on the {item.key} line',
                    )
                )
            policies.append((":".join(parts[:2]), item))
        if len({p for p, _ in policies}) > 1:
            first = policies[0]
            for policy, item in policies[1:]:
                if policy != first[0]:
                    findings.append(
                        finding(
                            item.where,
                            "GB302",
                            f"HelmRelease {name!r}: image {item.key} follows ImagePolicy "
                            f"{policy!r} but {first[1].key} follows {first[0]!r}",
                            f"make both markers name {first[0]!r}",
                        )
                    )
    return findings


def _setter_field(suffix: str | None) -> str:
    return {"name": "repository", "tag": "tag", "digest": "digest", None: "full reference"}.get(
        suffix, repr(suffix)
    )


def init_findings(checkout: Checkout, links: Links) -> list[Finding]:
    findings = []
    for cluster in checkout.clusters:
        for group in cluster.groups:
            for container in group.init_containers:
                findings += _init_container_findings(group, container, links)
    return findings


def _init_container_findings(group: Group, container: Container, links: Links) -> list[Finding]:
    findings = []
    label = f"worker group {group.name!r} initContainer {container.name!r}"
    installs = pip_installs(container)
    names = frozenset(n for p in installs for n in p.names)
    profile = matching_profile(names, links) if installs else None
    if profile is not None:
        manifest = links.published(profile)
        assert manifest is not None
        heavy = sorted(canonicalize_name(Requirement(r).name) for r in profile.profile.heavy)
        findings.append(
            finding(
                installs[0].where,
                "GB401",
                f"{label} pip-installs {', '.join(heavy)} at every pod start, but gpubuild "
                f"profile {profile.profile.name!r} has that set published ({manifest.display}, "
                f"digest {manifest.manifest.digest[:12]})",
                f"replace this initContainer with the generated one: `gpubuild init-script "
                f"{profile.display}` (and `gpubuild k8s patch` for the pod spec)",
            )
        )
    for index, install in enumerate(installs):
        if set(install.names) == {"numpy"} and (install.upgrade or index > 0):
            findings.append(
                finding(
                    install.where,
                    "GB403",
                    f"{label} re-installs numpy by hand after the other packages",
                    'put "numpy<2" in the profile\'s [policy] constraints: the resolver '
                    "never ships numpy 2 then, and nothing needs patching",
                )
            )
    for command in container.commands:
        words = command.words
        if not words or PurePosixPath(words[0]).name != "rm":
            continue
        flags = "".join(w for w in words[1:] if w.startswith("-") and not w.startswith("--"))
        if "r" not in flags.lower() and "--recursive" not in words:
            continue
        hit = sorted(
            {
                name
                for w in words[1:]
                if not w.startswith("-")
                for name in ("protobuf", "click")
                if PurePosixPath(w).name.lower().startswith(name)
            }
        )
        if hit:
            findings.append(
                finding(
                    command.where,
                    "GB402",
                    f"{label} deletes {' and '.join(hit)} from the shared folder by hand",
                    'let the resolver do it: [policy] exclude = ["click"] and constraints '
                    '= ["protobuf<5"] in the profile keep them out of the shipped set '
                    "(`gpubuild resolve` reports what was excluded)",
                )
            )
    return findings


def sas_findings(checkout: Checkout) -> list[Finding]:
    """GB405: the SAS comes from a Secret, and nothing in the file says how that Secret is
    renewed. Every SAS expires (`gpubuild sas` makes 24-hour ones unless told otherwise, a
    year at most), and then every new pod's init container fails with HTTP 403 while the
    running ones carry on: the failure comes days later, on a scale-up. What can be read off
    a manifest is only whether someone wrote the renewal down; the Secret, its expiry and the
    job that renews it are not in the checkout. GB406: a SAS written into the manifest."""
    findings = []
    for cluster in checkout.clusters:
        for group in cluster.groups:
            for container in [*group.init_containers, *group.containers]:
                label = f"worker group {group.name!r} container {container.name!r}"
                for use in container.sas:
                    if use.source == "literal":
                        findings.append(
                            finding(
                                use.where,
                                "GB406",
                                f"{label} has its SAS written into the manifest"
                                f" ({use.variable}): everyone who reads the repository can"
                                " read the store, and it cannot be rotated without a commit",
                                "delete it, revoke it (rotate the account key), and mount a"
                                " Secret instead: `gpubuild k8s patch ... --secret NAME`",
                            )
                        )
                    elif use.source == "secret" and not use.rotation_note:
                        findings.append(
                            finding(
                                use.where,
                                "GB405",
                                f"{label} reads its SAS from Secret {use.secret!r}"
                                f" ({use.variable}), and no comment here says how that"
                                " Secret is renewed: when the SAS expires, new pods fail"
                                " (HTTP 403) while old ones keep running",
                                "renew it before it expires (`gpubuild sas STORE --expires-in"
                                " ... --out FILE` in a scheduled job, or an External Secret),"
                                f" and say so in a comment here that names {use.secret!r} or"
                                " sits on these lines, with 'rotated', 'renewed' or 'expires'",
                            )
                        )
    return findings


def redirect_findings(checkout: Checkout) -> list[Finding]:
    """GB404: `pip install numpy>=1.24.0` unquoted installs any numpy, output to file `=1.24.0`."""
    commands: list[tuple[str, Command]] = []
    for cluster in checkout.clusters:
        for group in cluster.groups:
            for container in [*group.init_containers, *group.containers]:
                label = f"container {container.name!r}"
                commands += [(label, c) for c in container.commands]
    for dockerfile in checkout.dockerfiles:
        commands += [("RUN", c) for c in dockerfile.runs]
    findings = []
    for label, command in commands:
        install = pip_install(command)
        if install is None:
            continue
        for piece, line in command.pieces:
            for word in unquoted_comparisons(piece):
                name = re.match(r"[A-Za-z0-9_.\-]+", word)
                if not name or canonicalize_name(name.group(0)) not in install.names:
                    continue
                findings.append(
                    finding(
                        Where(command.where.path, line),
                        "GB404",
                        f"{label}: {word} is not quoted, so the shell runs `pip install "
                        f"{name.group(0)}` with no version limit and redirects pip's output "
                        "to a file",
                        f'quote it: "{word}"',
                    )
                )
    return findings


def shipped_findings(checkout: Checkout, links: Links) -> list[Finding]:
    from builder.base import read_snapshot

    findings = []
    sources: list[tuple[str, str, list[tuple[str, str]], dict[str, int], set[str]]] = []
    for lock in checkout.locks:
        packages = [(p.name, p.version) for p in lock.lock.packages]
        allowed: set[str] = {canonicalize_name(s.name) for s in lock.lock.shadowed}
        sources.append((lock.display, lock.lock.profile, packages, lock.lines, allowed))
    for item in (m for m in checkout.manifests if not m.from_store):
        packages = [(p.name, p.version) for p in item.manifest.packages]
        sources.append((item.display, item.manifest.profile, packages, item.lines, set()))
    for display, profile_name, packages, lines, allowed in sources:
        profile = links.profile_named(profile_name)
        base = None
        if profile is not None:
            allowed |= {canonicalize_name(n) for n in profile.profile.policy.allow_shadow}
            try:
                base = read_snapshot(profile.profile.target.base_packages)
            except GpubuildError:
                base = None
        for name, version in packages:
            name = canonicalize_name(name)
            where = Where(display, lines.get(name, 1))
            found = _shipped_finding(name, version, where, base, allowed, profile_name)
            if found:
                findings.append(found)
    return findings


def _shipped_finding(
    name: str, version: str, where: Where, base: Any, allowed: Set[str], profile: str
) -> Finding | None:
    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    resolve_fix = f"add {{}} to profile {profile!r}'s [policy] and run `gpubuild resolve` again"
    if name == "protobuf" and parsed is not None and parsed.major >= 5:
        return finding(
            where, "GB501",
            f"ships protobuf {version}: Ray 2.x breaks with protobuf 5 and later",
            resolve_fix.format('constraints = ["protobuf<5"]'),
        )  # fmt: skip
    if name == "click":
        return finding(
            where, "GB502",
            f"ships click {version}: it shadows the click Ray's CLI was built with",
            resolve_fix.format('exclude = ["click"]'),
        )  # fmt: skip
    if name == "numpy" and parsed is not None and parsed.major >= 2:
        return finding(
            where, "GB503",
            f"ships numpy {version}: onnxruntime-gpu 1.x and Ray's image need numpy<2",
            resolve_fix.format('constraints = ["numpy<2"]'),
        )  # fmt: skip
    base_version = base.version_of(name) if base is not None else None
    if base_version is not None and base_version != version and name not in allowed:
        return finding(
            where, "GB504",
            f"ships {name} {version} over the base image's {name} {base_version} "
            "(it comes first on PYTHONPATH and replaces it for Ray too)",
            f"let `gpubuild resolve` pin {name} to the base's version, or name it in "
            f"[policy] allow_shadow of profile {profile!r} if replacing it is intended",
        )  # fmt: skip
    return None


def _positive(value: str | None) -> bool:
    try:
        return value is not None and float(str(value).strip().strip("\"'")) > 0
    except ValueError:
        return False


def gpu_findings(checkout: Checkout) -> list[Finding]:
    findings = []
    for cluster in checkout.clusters:
        for group in cluster.groups:
            if group.head:
                continue
            limit = any(_positive(c.limits.get(GPU_RESOURCE)) for c in group.containers)
            toleration = any(
                key == GPU_RESOURCE or (key is None and op == "Exists")
                for key, op in group.tolerations
            )
            asks = (
                limit
                or any(_positive(c.requests.get(GPU_RESOURCE)) for c in group.containers)
                or _positive(group.ray_start_params.get("num-gpus"))
                or any(key == GPU_RESOURCE for key, _ in group.tolerations)
            )
            if not asks:
                continue
            if not limit:
                container = group.containers[0] if group.containers else None
                where = (
                    (container.limits_where or container.resources_where or container.where)
                    if container
                    else group.where
                )
                findings.append(
                    finding(
                        where,
                        "GB601",
                        f"worker group {group.name!r} is a GPU group (num-gpus, a GPU request "
                        f"or a GPU toleration) but its container has no {GPU_RESOURCE} limit: "
                        "Kubernetes gives it no GPU and Ray's GPU actors wait forever",
                        f"add {GPU_RESOURCE}: 1 under resources.limits (and requests) of the "
                        "Ray container",
                    )
                )
            if not toleration:
                findings.append(
                    finding(
                        group.tolerations_where or group.name_where,
                        "GB602",
                        f"worker group {group.name!r} asks for GPUs but does not tolerate the "
                        f"{GPU_RESOURCE} taint: on clusters whose GPU nodes carry it (this "
                        "team's do) the pod stays Pending, unless the cluster's "
                        "ExtendedResourceToleration admission plugin adds it",
                        f'add to tolerations: {{key: "{GPU_RESOURCE}", operator: "Exists", '
                        'effect: "NoSchedule"}',
                    )
                )
    return findings
