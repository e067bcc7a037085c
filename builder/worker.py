"""The worker image's side of the pipeline: the heavy lock, the light lock resolved on top of
it (checked and measured), the Dockerfile with its disk budget, and `split`.

It builds on builder/resolve.py (ensure_lock) and is what `gpubuild dockerfile`, `build-image`
and `split` call.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.backends import Job
from builder.budget import (
    Budget,
    ContextSize,
    human_size,
    measure_context,
    over_budget_error,
    render_budget,
)
from builder.budget import plan_budget as budget_for
from builder.dockerfile import WorkerPlan, context_path, dockerignore_text, plan_dockerfile
from builder.files import write_atomically
from builder.image import engine_or_none, local_image_bytes
from builder.indexes import IndexSettings
from builder.light import (
    DEFAULT_MAX_LIGHT_BYTES,
    LightSet,
    SplitProposal,
    check_light_set,
    check_requirement_names,
    classify,
    light_lock_path,
    measure,
    measured_packages,
    read_requirements,
)
from builder.pack import default_store_dir, reusable_manifest
from builder.profile import Profile
from builder.progress import Progress, silent
from builder.resolve import ensure_lock, resolve

_NO_SETTINGS = IndexSettings()


def plan_worker(
    profile: Profile,
    *,
    profile_arg: str,
    context: Path,
    code: tuple[Path, ...] = (),
    lock_path: Path | None = None,
    settings: IndexSettings = _NO_SETTINGS,
    max_light_bytes: int | None = None,
    on_progress: Progress = silent,
) -> WorkerPlan:
    """The heavy lock, the light lock resolved on top of it (checked and measured), and the
    packed manifest when this machine's store has it: everything the Dockerfile needs."""
    heavy = ensure_lock(profile, settings=settings, lock_path=lock_path)
    light: LightSet | None = None
    if profile.light:
        light_path = light_lock_path(heavy.lock_path)
        # Refused before resolving: a GPU package by its name, and a light lock the Dockerfile
        # could not COPY (outside the build context).
        check_requirement_names(profile, profile.light)
        context_path(light_path, context, "the light lock")
        on_progress(f"resolving the light set of {profile.name} on top of the heavy lock")
        provided = {p.name: p.version for p in heavy.lock.packages}
        job = Job(requirements=profile.light, set_name="light", provided=provided)
        light_result = ensure_lock(profile, settings=settings, lock_path=light_path, job=job)
        light = check_light_set(
            profile,
            light_result,
            provided,
            settings=settings,
            max_bytes=max_light_bytes,
            on_progress=on_progress,
        )
    manifest = reusable_manifest(default_store_dir(), profile.name, heavy.lock.digest())
    return plan_dockerfile(
        profile,
        heavy,
        light,
        manifest,
        profile_arg=profile_arg,
        context=context,
        code=code,
        settings=settings,
    )


@dataclass(frozen=True)
class DockerfileResult:
    plan: WorkerPlan
    budget_text: str
    budget: Budget
    output: Path | None
    context: ContextSize
    dockerignore: str  # the .dockerignore that sends only what the Dockerfile copies
    dockerignore_written: Path | None


def generate_dockerfile(
    profile: Profile,
    *,
    profile_arg: str,
    context: Path,
    code: tuple[Path, ...] = (),
    lock_path: Path | None = None,
    settings: IndexSettings = _NO_SETTINGS,
    max_light_bytes: int | None = None,
    budget_bytes: int,
    output: Path | None = None,
    write_dockerignore: bool = False,
    on_progress: Progress = silent,
) -> DockerfileResult:
    """Plan, check the disk budget (as CI builds and pushes it), then write the Dockerfile.

    `write_dockerignore`: write the proposed .dockerignore into the context when it has none
    (the budget then counts the context it sends)."""
    plan = plan_worker(
        profile,
        profile_arg=profile_arg,
        context=context,
        code=code,
        lock_path=lock_path,
        settings=settings,
        max_light_bytes=max_light_bytes,
        on_progress=on_progress,
    )
    proposal = dockerignore_text(plan)
    ignore_path = context / ".dockerignore"
    written = None
    if write_dockerignore and not ignore_path.exists():
        write_atomically(ignore_path, proposal)
        written = ignore_path
    measured = measure_context(context)
    if measured.dockerignore:
        source = f"measured: {context} as docker build sends it (.dockerignore applied)"
    else:
        source = (
            f"measured: {context} as docker build sends it, with no .dockerignore"
            + (f" ({measured.describe()})" if measured.describe() else "")
            + "; one that sends only what the Dockerfile copies would send"
            f" {human_size(plan.copied_bytes)} (--dockerignore writes it)"
        )
    base_image = profile.target.base_image
    budget = budget_for(
        plan.budget_inputs,
        base_image=base_image,
        local_base_bytes=local_image_bytes(engine_or_none(), base_image),
        context_bytes=measured.bytes,
        context_source=source,
        push=True,
        budget_bytes=budget_bytes,
    )
    rendered = render_budget(budget)
    if budget.over:
        raise over_budget_error(budget, rendered)
    if output is not None:
        write_atomically(output, plan.text)
    return DockerfileResult(plan, rendered, budget, output, measured, proposal, written)


def propose_split(
    profile: Profile,
    source: Path,
    *,
    settings: IndexSettings = _NO_SETTINGS,
    max_bytes: int = DEFAULT_MAX_LIGHT_BYTES,
    on_progress: Progress = silent,
) -> SplitProposal:
    """Resolve a whole requirements file for the profile's target, measure it, split it."""
    requirements = read_requirements(source)
    lock = resolve(profile, Job(requirements=requirements, set_name=source.name), settings)
    with tempfile.TemporaryDirectory(prefix="gpubuild-split-") as work:
        lock_path = Path(work) / "split.lock"
        sizes = measure(lock_path, lock, profile, settings, on_progress)
    packages = measured_packages(lock, sizes)
    heavy, light = classify(requirements, packages, max_bytes)
    return SplitProposal(source, heavy, light, packages, lock.provided_by_base, max_bytes)
