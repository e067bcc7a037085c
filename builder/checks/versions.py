"""GB101-GB104: Ray and Python versions across the places the deployment guide lists.

Every place that fixes a version is a Pin; the pins of one cluster (and the files tied to it)
are compared, and each place off the majority is reported, naming where the majority is.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from builder.checks.links import Links
from builder.checks.model import (
    Checkout,
    Cluster,
    Dockerfile,
    Finding,
    ProfileFile,
    Requirements,
    Where,
    finding,
    python_image_version,
    ray_image_versions,
)


@dataclass(frozen=True)
class Pin:
    """One place that fixes a Ray or Python version."""

    kind: str  # "ray" or "python"
    version: str
    what: str
    where: Where
    rank: int  # which place wins a tie: the head image, then rayVersion, then the rest


def _image_pins(image: str, what: str, where: Where, rank: int) -> list[Pin]:
    is_ray, ray, python = ray_image_versions(image)
    pins = []
    if is_ray and ray:
        pins.append(Pin("ray", ray, f"{what} {image}", where, rank))
    if python:
        pins.append(Pin("python", python, f"{what} {image}", where, rank))
    return pins


def _cluster_pins(cluster: Cluster) -> list[Pin]:
    pins = []
    if cluster.ray_version:
        version, where = cluster.ray_version
        pins.append(Pin("ray", version, f"{cluster.kind} rayVersion", where, 1))
    for group in cluster.groups:
        for container in group.containers:
            if container.image and container.image_where:
                what = "head image" if group.head else f"worker group {group.name!r} image"
                pins += _image_pins(
                    container.image, what, container.image_where, 0 if group.head else 2
                )
        for container in group.init_containers:
            if container.image and container.image_where:
                what = f"{group.name!r} initContainer {container.name!r} image"
                pins += _image_pins(container.image, what, container.image_where, 3)
    return pins


def _dockerfile_pins(dockerfile: Dockerfile, python_too: bool) -> list[Pin]:
    pins = []
    for image, where in dockerfile.froms:
        pins += _image_pins(image, "base image (FROM)", where, 3)
        python = python_image_version(image)
        if python and python_too:
            pins.append(Pin("python", python, f"base image (FROM) {image}", where, 4))
    return pins


def _requirements_pins(requirements: Requirements) -> list[Pin]:
    return [
        Pin("ray", version, f"requirement {text}", where, 4)
        for text, version, where in requirements.ray
        if version
    ]


def _profile_pins(profile: ProfileFile) -> list[Pin]:
    target = profile.profile.target
    pins = _image_pins(
        target.base_image, "gpubuild profile base_image", profile.base_image_where, 4
    )
    pins.append(Pin("python", target.python, "gpubuild profile python", profile.python_where, 4))
    return pins


def version_groups(checkout: Checkout, links: Links) -> tuple[list[list[Pin]], list[str]]:
    """The pins of each cluster (with the files tied to it) and what could not be placed."""
    ray_folders = {r.path.parent.resolve() for r in checkout.requirements if r.ray}
    groups: list[list[Pin]] = []
    placed_docker: set[int] = set()
    placed_requirements: set[int] = set()
    placed_profiles: set[int] = set()
    for cluster in checkout.clusters:
        pins = _cluster_pins(cluster)
        for dockerfile in links.dockerfiles_of(cluster):
            placed_docker.add(id(dockerfile))
            pins += _dockerfile_pins(dockerfile, python_too=False)
        for release in links.releases_of(cluster):
            for dockerfile in links.dockerfiles_for(release.repository):
                placed_docker.add(id(dockerfile))
                pins += _dockerfile_pins(dockerfile, python_too=True)
            for requirements in links.requirements_of_release(release):
                placed_requirements.add(id(requirements))
                pins += _requirements_pins(requirements)
        for profile in links.profiles_of(cluster):
            placed_profiles.add(id(profile))
            pins += _profile_pins(profile)
        groups.append(pins)
    loose: list[tuple[str, list[Pin]]] = []
    for dockerfile in checkout.dockerfiles:
        if id(dockerfile) not in placed_docker:
            python_too = dockerfile.path.parent.resolve() in ray_folders
            loose.append((dockerfile.display, _dockerfile_pins(dockerfile, python_too)))
    for requirements in checkout.requirements:
        if id(requirements) not in placed_requirements:
            loose.append((requirements.display, _requirements_pins(requirements)))
    for profile in checkout.profiles:
        if id(profile) not in placed_profiles:
            loose.append((profile.display, _profile_pins(profile)))
    loose = [(display, pins) for display, pins in loose if pins]
    not_compared: list[str] = []
    if len(groups) == 1:
        for _, pins in loose:
            groups[0] += pins
    elif not groups:
        groups.append([pin for _, pins in loose for pin in pins])
    else:
        not_compared = [
            f"{display} (Ray/Python versions; {len(groups)} clusters, none of them names it)"
            for display, _ in loose
        ]
    return groups, not_compared


def _majority(pins: list[Pin]) -> str:
    counts = Counter(pin.version for pin in pins)
    best = max(counts.values())
    tied = [v for v, n in counts.items() if n == best]
    return min(tied, key=lambda v: min(p.rank for p in pins if p.version == v))


def version_findings(groups: list[list[Pin]]) -> list[Finding]:
    findings = []
    for pins in groups:
        for kind, code, label in (("ray", "GB101", "Ray"), ("python", "GB104", "Python")):
            these = [p for p in pins if p.kind == kind]
            if len({p.version for p in these}) < 2:
                continue
            major = _majority(these)
            agreeing = [p for p in these if p.version == major]
            places = "; ".join(f"{p.what} at {p.where}" for p in agreeing[:3])
            more = f" and {len(agreeing) - 3} more" if len(agreeing) > 3 else ""
            for pin in these:
                if pin.version == major:
                    continue
                fix = (
                    f"use {label} {major} here (change one, change all: the deployment guide's "
                    "version table); a mismatch fails the Ray handshake"
                    if kind == "ray"
                    else f"use Python {major} here: Ray nodes and Ray Client need the same "
                    "Python minor version"
                )
                findings.append(
                    finding(
                        pin.where,
                        code,
                        f"{pin.what} is {label} {pin.version}, but the deployment uses "
                        f"{label} {major} ({places}{more})",
                        fix,
                    )
                )
    return findings


def unpinned_findings(checkout: Checkout) -> list[Finding]:
    findings = []
    images: list[tuple[str, Where]] = []
    for cluster in checkout.clusters:
        for group in cluster.groups:
            for container in [*group.containers, *group.init_containers]:
                if container.image and container.image_where:
                    images.append((container.image, container.image_where))
    for dockerfile in checkout.dockerfiles:
        images += dockerfile.froms
    for image, where in images:
        is_ray, version, _ = ray_image_versions(image)
        if is_ray and version is None and "@" not in image:
            findings.append(
                finding(
                    where,
                    "GB102",
                    f"Ray image {image} names no Ray version: it moves under you and cannot "
                    "be compared with the rest of the cluster",
                    "pin the version in the tag, e.g. rayproject/ray:2.52.0-py310",
                )
            )
    for requirements in checkout.requirements:
        for text, version, where in requirements.ray:
            if version is None:
                findings.append(
                    finding(
                        where,
                        "GB103",
                        f"{text!r} does not pin Ray exactly: Ray Client must match the "
                        "cluster's version",
                        "pin it: ray[client]==<the cluster's Ray version>",
                    )
                )
    return findings
