"""The build agent's disk budget: the peak a worker image build needs, item by item.

A CI agent (about 10 GB of disk on Azure DevOps) pulls the base image (compressed layers land
on disk, then are extracted), receives the build context, writes the new layers (light
packages, code), and, when pushing, the compressed export of the new layers. The estimate adds
those up. A figure nobody knows (the base image's download size when neither the profile nor
an engine can say) stays unknown: the verdict is then "incomplete", never a guess.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from builder.errors import OverBudgetError
from builder.profile import Target
from builder.units import GB, MB, human_size

DEFAULT_BUDGET_BYTES = 10 * GB
__all__ = ["GB", "MB", "human_size"]


@dataclass(frozen=True)
class BudgetItem:
    label: str
    bytes: int | None  # None: unknown
    source: str  # where the figure comes from


@dataclass(frozen=True)
class Budget:
    items: tuple[BudgetItem, ...]
    budget_bytes: int

    @property
    def known_bytes(self) -> int:
        return sum(item.bytes for item in self.items if item.bytes is not None)

    @property
    def unknown(self) -> tuple[str, ...]:
        return tuple(item.label for item in self.items if item.bytes is None)

    @property
    def over(self) -> bool:
        """Over budget already with the known figures alone."""
        return self.known_bytes > self.budget_bytes

    @property
    def verdict(self) -> str:
        if self.over:
            return "over"
        return "incomplete" if self.unknown else "fits"


@dataclass(frozen=True)
class BaseSizes:
    download_bytes: int | None
    download_source: str
    extracted_bytes: int | None
    extracted_source: str


def base_sizes(
    image: str,
    profile_download: int | None,
    profile_extracted: int | None,
    engine_extracted: int | None,
) -> BaseSizes:
    """The profile's recorded figures first, then what a Docker engine that has the image says."""
    if profile_download is not None:
        download, download_source = profile_download, "profile [target] base_image_download_bytes"
    else:
        download, download_source = (
            None,
            "unknown: record [target] base_image_download_bytes in the profile",
        )
    if profile_extracted is not None:
        extracted, extracted_source = profile_extracted, "profile [target] base_image_bytes"
    elif engine_extracted is not None:
        extracted, extracted_source = engine_extracted, f"Docker engine (image {image})"
    else:
        extracted, extracted_source = (
            None,
            "unknown: record [target] base_image_bytes in the profile, or pull the image",
        )
    return BaseSizes(download, download_source, extracted, extracted_source)


def estimate(
    base: BaseSizes,
    *,
    context_bytes: int,
    context_source: str,
    light_bytes: int,
    light_source: str = "measured: the light lock installed for the target by uv",
    code_bytes: int,
    code_source: str = "measured: the files the Dockerfile copies",
    push: bool,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Budget:
    """The peak disk of one build on a fresh agent, as a breakdown."""
    items = [
        BudgetItem("base image download (compressed)", base.download_bytes, base.download_source),
        BudgetItem("base image extracted", base.extracted_bytes, base.extracted_source),
        BudgetItem("build context", context_bytes, context_source),
        BudgetItem("light layer", light_bytes, light_source),
        BudgetItem("copied files", code_bytes, code_source),
    ]
    if push:
        items.append(
            BudgetItem(
                "image export for push",
                light_bytes + code_bytes,
                "estimated: new layers, compressed (at most their raw size)",
            )
        )
    return Budget(tuple(items), budget_bytes)


def image_estimate(base: BaseSizes, light_bytes: int, code_bytes: int) -> int | None:
    """What `docker images` should show for the built image: base plus the new layers."""
    if base.extracted_bytes is None:
        return None
    return base.extracted_bytes + light_bytes + code_bytes


@dataclass(frozen=True)
class BudgetInputs:
    """What a worker image build adds, as the plan knows it (builder.dockerfile)."""

    target: Target
    light_bytes: int
    has_light: bool
    copied_bytes: int
    has_certs: bool


def plan_budget(
    inputs: BudgetInputs,
    *,
    base_image: str,
    local_base_bytes: int | None,
    context_bytes: int,
    context_source: str,
    push: bool,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Budget:
    """The budget of one build: `local_base_bytes` is what an engine says of the base image
    (None when it cannot)."""
    target = inputs.target
    base = base_sizes(
        base_image, target.base_image_download_bytes, target.base_image_bytes, local_base_bytes
    )
    return estimate(
        base,
        context_bytes=context_bytes,
        context_source=context_source,
        light_bytes=inputs.light_bytes,
        light_source=(
            "measured: the light lock installed for the target by uv"
            if inputs.has_light
            else "no [light] set"
        ),
        code_bytes=inputs.copied_bytes,
        code_source="measured: the files the Dockerfile copies"
        + (
            " (not counted: the CA bundle update-ca-certificates rewrites)"
            if inputs.has_certs
            else ""
        ),
        push=push,
        budget_bytes=budget_bytes,
    )


def over_budget_error(budget: Budget, rendered: str) -> OverBudgetError:
    return OverBudgetError(
        f"the build needs more disk than the agent has:\n{rendered}\nnothing was written or built"
    )


def render_budget(budget: Budget) -> str:
    width = max(len(item.label) for item in budget.items)
    lines = ["disk budget of the build agent (peak):"]
    for item in budget.items:
        lines.append(f"  {item.label:<{width}}  {human_size(item.bytes):>10}  {item.source}")
    total = human_size(budget.known_bytes)
    if budget.unknown:
        total += " + unknown"
    lines.append(f"  {'total':<{width}}  {total:>10}")
    lines.append(f"  {'budget':<{width}}  {human_size(budget.budget_bytes):>10}")
    if budget.verdict == "over":
        lines.append(
            f"verdict: OVER BUDGET by {human_size(budget.known_bytes - budget.budget_bytes)}: move"
            " large [light] requirements to [heavy], shrink the build context (.dockerignore),"
            " or raise --budget-gb if the agent really has more disk"
        )
    elif budget.verdict == "incomplete":
        lines.append(
            f"verdict: incomplete: {', '.join(budget.unknown)} unknown; the known items fit"
            f" with {human_size(budget.budget_bytes - budget.known_bytes)} to spare"
        )
    else:
        lines.append(
            f"verdict: fits, {human_size(budget.budget_bytes - budget.known_bytes)} to spare"
        )
    return "\n".join(lines)


def budget_document(budget: Budget) -> dict[str, object]:
    return {
        "items": [
            {"label": item.label, "bytes": item.bytes, "source": item.source}
            for item in budget.items
        ],
        "known_bytes": budget.known_bytes,
        "unknown": list(budget.unknown),
        "budget_bytes": budget.budget_bytes,
        "verdict": budget.verdict,
    }


# --- measuring files ----------------------------------------------------------------------------


def files_bytes(paths: Iterable[Path]) -> int:
    """Bytes of the regular files at or below each path (symlinks are not followed)."""
    total = 0
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_file():
            total += path.stat().st_size
            continue
        for folder, _dirs, files in os.walk(path):
            for name in files:
                item = Path(folder) / name
                if not item.is_symlink():
                    total += item.stat().st_size
    return total


@dataclass(frozen=True)
class ContextSize:
    """What `docker build CONTEXT` sends, and which top-level entries weigh most."""

    bytes: int
    largest: tuple[tuple[str, int], ...]  # (top-level entry, bytes), heaviest first
    dockerignore: bool  # whether the context has a .dockerignore

    def describe(self) -> str:
        if not self.largest or self.bytes == 0:
            return ""
        heavy = [f"{name} {human_size(size)}" for name, size in self.largest[:3]]
        return "mostly " + ", ".join(heavy)


def measure_context(context: Path) -> ContextSize:
    """The build context as docker sends it: the folder minus what .dockerignore excludes."""
    from docker.utils.build import exclude_paths

    ignore = context / ".dockerignore"
    patterns: list[str] = []
    if ignore.is_file():
        patterns = [
            line.strip()
            for line in ignore.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    by_entry: dict[str, int] = {}
    for relative in exclude_paths(str(context), patterns):
        item = context / relative
        if item.is_file() and not item.is_symlink():
            top = Path(relative).parts[0]
            by_entry[top] = by_entry.get(top, 0) + item.stat().st_size
    largest = tuple(sorted(by_entry.items(), key=lambda pair: (-pair[1], pair[0])))
    return ContextSize(sum(by_entry.values()), largest, ignore.is_file())


def context_bytes(context: Path) -> int:
    """What `docker build CONTEXT` sends: the folder minus what .dockerignore excludes."""
    return measure_context(context).bytes
