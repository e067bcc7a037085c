"""`gpubuild build-image`: build the generated worker Dockerfile through the Docker engine.

The build context is staged in a temporary folder holding only what the Dockerfile COPYs, at
the same relative paths, so the image is built from exactly the text `gpubuild dockerfile`
prints. The build goes through the docker SDK's low-level API with its output streamed line by
line, on host networking (the engines here run with --bridge=none). Afterwards the real image
size is compared with the estimate, and the image can be pushed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.budget import (
    DEFAULT_BUDGET_BYTES,
    Budget,
    base_sizes,
    budget_document,
    files_bytes,
    human_size,
    image_estimate,
    over_budget_error,
    plan_budget,
)
from builder.dockerfile import WorkerPlan
from builder.errors import BadInputError, DockerError
from builder.secrets import has_credentials, malformed_userinfo

Line = Callable[[str], None]


def engine_or_none() -> Any | None:
    """A client for a Docker engine that answers now, or None (sizes then stay unknown)."""
    import os

    import docker
    import docker.errors

    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


def local_image_bytes(client: Any | None, image: str) -> int | None:
    """Extracted size of `image` when the engine has it (it is never pulled for this)."""
    if client is None:
        return None
    import docker.errors

    try:
        return int(client.images.get(image).attrs["Size"])
    except (docker.errors.ImageNotFound, docker.errors.APIError, KeyError, ValueError):
        return None


# --- staging and building ----------------------------------------------------------------------


def stage_context(plan: WorkerPlan, dest: Path) -> int:
    """Write the Dockerfile and copy what it COPYs into `dest`; returns the bytes staged."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "Dockerfile").write_text(plan.text, encoding="utf-8")
    for source in plan.files_to_send():
        relative = source.resolve().relative_to(plan.context.resolve())
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
    return files_bytes([dest])


# The classic builder colours a step's stderr with ANSI escapes; a log file wants plain text.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _stream_lines(chunks: Iterator[dict[str, Any]], on_line: Line) -> Iterator[dict[str, Any]]:
    """Pass each build chunk on, after printing its text as whole lines."""
    pending = ""
    for chunk in chunks:
        text = chunk.get("stream")
        if text:
            pending += _ANSI.sub("", text)
            *done, pending = pending.split("\n")
            for line in done:
                if line.strip():
                    on_line(line.rstrip())
        yield chunk
    if pending.strip():
        on_line(pending.rstrip())


def build(
    client: Any,
    context: Path,
    *,
    tag: str,
    buildargs: Mapping[str, str],
    on_line: Line,
) -> str:
    """Build `context` (its Dockerfile) as `tag`; returns the image id."""
    import docker.errors

    image_id: str | None = None
    tail: list[str] = []

    def keep(line: str) -> None:
        tail.append(line)
        del tail[:-20]
        on_line(line)

    try:
        chunks = client.api.build(
            path=str(context),
            tag=tag,
            buildargs=dict(buildargs),
            decode=True,
            # The engines here have no bridge network (SERVICES.md); CI agents work either way.
            network_mode="host",
            rm=True,
            forcerm=True,
        )
        for chunk in _stream_lines(chunks, keep):
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise DockerError(
                    f"docker build of {tag} failed: {detail.strip()}\n"
                    + "\n".join(f"  {line}" for line in tail[-10:])
                )
            aux = chunk.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                image_id = aux["ID"]
            elif "status" in chunk:
                keep(f"{chunk.get('id', '')} {chunk['status']}".strip())
    except docker.errors.APIError as exc:
        raise DockerError(f"docker build of {tag} failed: {exc}") from None
    if image_id is None:
        try:
            image_id = client.images.get(tag).id
        except docker.errors.DockerException as exc:
            raise DockerError(f"docker build of {tag} reported no image: {exc}") from None
    return image_id


def new_layers_bytes(client: Any, image: str, base_image: str) -> int:
    """Bytes of the layers the build added on top of the base (from the image history)."""
    history = client.api.history(image)
    base_history = client.api.history(base_image)
    added = history[: max(0, len(history) - len(base_history))]
    return sum(int(entry.get("Size") or 0) for entry in added)


def push(client: Any, tag: str, on_line: Line) -> str | None:
    """Push `tag`; returns the pushed manifest digest. Progress bars are left out of the log."""
    import docker.errors
    from docker.utils import parse_repository_tag

    repository, image_tag = parse_repository_tag(tag)
    digest: str | None = None
    last: dict[str, str] = {}
    try:
        for chunk in client.api.push(repository, tag=image_tag, stream=True, decode=True):
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise DockerError(f"docker push of {tag} failed: {detail}")
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = aux["Digest"]
            status = chunk.get("status")
            layer = chunk.get("id", "")
            if not status or last.get(layer) == status:
                continue  # "Pushing" repeats with every progress update
            last[layer] = status
            on_line(f"{layer}: {status}" if layer else status)
    except docker.errors.APIError as exc:
        raise DockerError(f"docker push of {tag} failed: {exc}") from None
    return digest


# --- the whole command --------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    tag: str
    image_id: str
    base_image: str
    image_bytes: int  # measured: the whole image, as `docker images` shows it
    new_bytes: int  # measured: the layers the build added
    estimated_image_bytes: int | None
    estimated_new_bytes: int
    budget: Budget
    pushed_digest: str | None

    @property
    def image_error(self) -> float | None:
        """(measured - estimate) / measured, for the whole image."""
        if self.estimated_image_bytes is None or not self.image_bytes:
            return None
        return (self.image_bytes - self.estimated_image_bytes) / self.image_bytes

    @property
    def new_layers_error(self) -> float | None:
        if not self.new_bytes:
            return None
        return (self.new_bytes - self.estimated_new_bytes) / self.new_bytes


def check_build_args(buildargs: Mapping[str, str]) -> None:
    """A build argument is written into the image history: no index credentials in one."""
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        value = buildargs.get(key)
        if value and any(has_credentials(url) or malformed_userinfo(url) for url in value.split()):
            raise BadInputError(
                f"--build-arg {key} carries credentials (a user name, password or token), and a"
                " build argument is written into the image history; give pip its index through"
                " the base image's pip.conf or a build secret instead"
            )


def build_image(
    plan: WorkerPlan,
    *,
    client: Any,
    tag: str,
    buildargs: Mapping[str, str],
    push_image: bool,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    on_line: Line,
    render_budget: Callable[[Budget], str],
) -> BuildResult:
    """Stage, check the budget, build, measure and (optionally) push the worker image."""
    check_build_args(buildargs)
    base_image = buildargs.get("BASE_IMAGE", plan.profile.target.base_image)
    with tempfile.TemporaryDirectory(prefix="gpubuild-image-") as work:
        context = Path(work) / "context"
        staged = stage_context(plan, context)
        budget = plan_budget(
            plan.budget_inputs,
            base_image=base_image,
            local_base_bytes=local_image_bytes(client, base_image),
            context_bytes=staged,
            context_source="measured: the staged context (only what the Dockerfile copies)",
            push=push_image,
            budget_bytes=budget_bytes,
        )
        on_line(render_budget(budget))
        if budget.over:
            raise over_budget_error(budget, render_budget(budget))
        image_id = build(client, context, tag=tag, buildargs=buildargs, on_line=on_line)
    image_bytes = local_image_bytes(client, tag) or 0
    new_bytes = new_layers_bytes(client, tag, base_image)
    code_bytes = plan.copied_bytes
    base = base_sizes(
        base_image,
        plan.profile.target.base_image_download_bytes,
        plan.profile.target.base_image_bytes,
        local_image_bytes(client, base_image),
    )
    digest = push(client, tag, on_line) if push_image else None
    return BuildResult(
        tag=tag,
        image_id=image_id,
        base_image=base_image,
        image_bytes=image_bytes,
        new_bytes=new_bytes,
        estimated_image_bytes=image_estimate(base, plan.light_bytes, code_bytes),
        estimated_new_bytes=plan.light_bytes + code_bytes,
        budget=budget,
        pushed_digest=digest,
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def result_text(result: BuildResult) -> str:
    lines = [
        f"built {result.tag} ({result.image_id[:19]}) on {result.base_image}",
        f"  image size:  {human_size(result.image_bytes)} measured, {human_size(result.estimated_image_bytes)}"
        f" estimated (error {_percent(result.image_error)})",
        f"  new layers:  {human_size(result.new_bytes)} measured, {human_size(result.estimated_new_bytes)}"
        f" estimated (error {_percent(result.new_layers_error)})",
    ]
    if result.pushed_digest:
        lines.append(f"  pushed:      {result.tag}@{result.pushed_digest}")
    return "\n".join(lines)


def result_document(result: BuildResult) -> dict[str, object]:
    return {
        "tag": result.tag,
        "image_id": result.image_id,
        "base_image": result.base_image,
        "image_bytes": result.image_bytes,
        "estimated_image_bytes": result.estimated_image_bytes,
        "image_error": result.image_error,
        "new_layers_bytes": result.new_bytes,
        "estimated_new_layers_bytes": result.estimated_new_bytes,
        "new_layers_error": result.new_layers_error,
        "budget": budget_document(result.budget),
        "pushed_digest": result.pushed_digest,
    }
