"""Which cluster a Dockerfile, an API service or a profile belongs to, and which manifest an
init image was built for (see builder/check.py's docstring for the rules)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from builder.checks.model import (
    Checkout,
    Cluster,
    Container,
    Dockerfile,
    HelmRelease,
    ManifestFile,
    ProfileFile,
    Requirements,
    split_image,
)


@dataclass
class Links:
    """Which Dockerfile builds which image, and which cluster each outside file belongs to."""

    checkout: Checkout
    builds: dict[str, list[Dockerfile]] = field(default_factory=dict)

    @classmethod
    def of(cls, checkout: Checkout) -> Links:
        links = cls(checkout)
        by_path = {d.path.resolve(): d for d in checkout.dockerfiles}
        for pipeline in checkout.pipelines:
            for repository, file in pipeline.builds:
                dockerfile = by_path.get(file.resolve())
                if dockerfile is not None:
                    links.builds.setdefault(repository, []).append(dockerfile)
        return links

    def dockerfiles_for(self, image: str | None) -> list[Dockerfile]:
        if not image:
            return []
        repository = split_image(image)[0].lower()
        if repository in self.builds:
            return self.builds[repository]
        # No pipeline says so: a Dockerfile in a folder named like the image (your-gpu-service/).
        last = repository.rsplit("/", 1)[-1]
        return [d for d in self.checkout.dockerfiles if d.path.parent.name.lower() == last]

    def cluster_images(self, cluster: Cluster) -> list[str]:
        return [
            c.image for g in cluster.groups for c in [*g.containers, *g.init_containers] if c.image
        ]

    def dockerfiles_of(self, cluster: Cluster) -> list[Dockerfile]:
        found: list[Dockerfile] = []
        for image in self.cluster_images(cluster):
            for dockerfile in self.dockerfiles_for(image):
                if dockerfile not in found:
                    found.append(dockerfile)
        return found

    def releases_of(self, cluster: Cluster) -> list[HelmRelease]:
        found = []
        for release in self.checkout.helm_releases:
            if release.ray_service is None or release.ray_service[0] != cluster.name:
                continue
            namespace = release.ray_service[1]
            if namespace and cluster.namespace and namespace != cluster.namespace:
                continue
            found.append(release)
        return found

    def requirements_of_release(self, release: HelmRelease) -> list[Requirements]:
        folders = {d.path.parent.resolve() for d in self.dockerfiles_for(release.repository)}
        return [r for r in self.checkout.requirements if r.path.parent.resolve() in folders]

    def profiles_of(self, cluster: Cluster) -> list[ProfileFile]:
        names = {
            m.manifest.profile
            for c in init_containers(cluster)
            if (m := self.manifest_for_init(c)) is not None
        }
        images = set(self.cluster_images(cluster))
        images |= {image for d in self.dockerfiles_of(cluster) for image, _ in d.froms}
        return [
            p
            for p in self.checkout.profiles
            if p.profile.name in names or p.profile.target.base_image in images
        ]

    def manifest_for_init(self, container: Container) -> ManifestFile | None:
        """The manifest a gpubuild init image was built for: its tag is PROFILE-DIGEST12."""
        if not container.image:
            return None
        tag = split_image(container.image)[1] or ""
        for item in self.checkout.manifests:
            manifest = item.manifest
            if tag == f"{manifest.profile}-{manifest.digest[:12]}":
                return item
        return None

    def published(self, profile: ProfileFile) -> ManifestFile | None:
        """A manifest for `profile`, preferring the digest of the lock beside it."""
        candidates = [
            m for m in self.checkout.manifests if m.manifest.profile == profile.profile.name
        ]
        if not candidates:
            return None
        lock_digest = None
        for lock in self.checkout.locks:
            if lock.lock.profile == profile.profile.name:
                lock_digest = lock.lock.digest()
        for candidate in candidates:
            if candidate.manifest.digest == lock_digest:
                return candidate
        return candidates[-1]

    def profile_named(self, name: str) -> ProfileFile | None:
        for profile in self.checkout.profiles:
            if profile.profile.name == name:
                return profile
        return None


def init_containers(cluster: Cluster) -> Iterator[Container]:
    for group in cluster.groups:
        yield from group.init_containers


def is_gpubuild_init(container: Container) -> bool:
    if "GPUBUILD_TARGET" in container.env:
        return True
    repository = split_image(container.image or "")[0]
    return repository.rsplit("/", 1)[-1].startswith("gpubuild-init")


def matching_profile(names: frozenset[str], links: Links) -> ProfileFile | None:
    """A profile with a published manifest whose heavy requirements are all in `names`."""
    for profile in links.checkout.profiles:
        heavy = {canonicalize_name(Requirement(r).name) for r in profile.profile.heavy}
        if heavy and heavy <= names and links.published(profile) is not None:
            return profile
    return None
