"""Commands for the slim worker image: dockerfile, split and build-image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from builder.base import docker_client
from builder.budget import budget_document, render_budget
from builder.cli.base import Command, emit_json, index_options, report
from builder.dockerfile import worker_document, worker_text
from builder.errors import BadInputError
from builder.image import build_image, check_build_args, result_document, result_text
from builder.indexes import IndexSettings
from builder.light import render_toml_lists, split_document, split_text
from builder.profile import load_profile
from builder.units import GB, MB
from builder.worker import generate_dockerfile, plan_worker, propose_split


def _max_light_option(command: Command) -> Command:
    return click.option(
        "--max-light-mb",
        type=click.FloatRange(min=0, min_open=True),
        default=100.0,
        show_default=True,
        help="Largest installed size (MB) one [light] distribution may have.",
    )(command)


def worker_options(command: Command) -> Command:
    """What `dockerfile` and `build-image` both take: the profile, the code, the context, the
    locks, the limits and the indexes."""
    decorators: list[Any] = [
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
        _max_light_option,
        click.option(
            "--budget-gb",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_default=True,
            help="Disk of the CI build agent (GB); the estimated peak must fit.",
        ),
        index_options,
        click.option("--json", "as_json", is_flag=True, help="Print a JSON document on stdout."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


@click.command("dockerfile")
@worker_options
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
    settings: IndexSettings,
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
    result = generate_dockerfile(
        load_profile(profile),
        profile_arg=profile.as_posix(),
        context=context,
        code=code,
        lock_path=lock_path,
        settings=settings,
        max_light_bytes=int(max_light_mb * MB),
        budget_bytes=int(budget_gb * GB),
        output=output,
        write_dockerignore=write_dockerignore,
        on_progress=report,
    )
    report(worker_text(result.plan))
    report(result.budget_text)
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
        written = result.dockerignore_written
        emit_json(
            {
                **worker_document(result.plan),
                "dockerfile": str(output) if output else None,
                "dockerignore": str(written) if written else None,
                "context_bytes": result.context.bytes,
                "budget": budget_document(result.budget),
            }
        )
    elif output is None:
        click.echo(result.plan.text, nl=False)


@click.command("split")
@click.argument("requirements", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--profile",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The profile whose target, base image and policy decide versions and sizes.",
)
@_max_light_option
@index_options
@click.option("--json", "as_json", is_flag=True, help="Print the proposal as JSON on stdout.")
def split_command(
    requirements: Path,
    profile: Path,
    max_light_mb: float,
    settings: IndexSettings,
    as_json: bool,
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
    proposal = propose_split(
        load_profile(profile),
        requirements,
        settings=settings,
        max_bytes=int(max_light_mb * MB),
        on_progress=report,
    )
    report(split_text(proposal))
    if as_json:
        emit_json(split_document(proposal))
    else:
        click.echo(
            render_toml_lists(
                [line.requirement for line in proposal.heavy],
                [line.requirement for line in proposal.light],
            ),
            nl=False,
        )


@click.command("build-image")
@worker_options
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
    settings: IndexSettings,
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
    args: dict[str, str] = {}
    for item in build_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--build-arg {item!r}: expected KEY=VALUE")
        args[key] = value
    if settings.default_url and "PIP_INDEX_URL" not in args:
        args["PIP_INDEX_URL"] = settings.default_url
    check_build_args(args)
    plan = plan_worker(
        load_profile(profile),
        profile_arg=profile.as_posix(),
        context=context,
        code=code,
        lock_path=lock_path,
        settings=settings,
        max_light_bytes=int(max_light_mb * MB),
        on_progress=report,
    )
    report(worker_text(plan))
    result = build_image(
        plan,
        client=docker_client(),
        tag=tag,
        buildargs=args,
        push_image=push_image,
        budget_bytes=int(budget_gb * GB),
        on_line=report,
        render_budget=render_budget,
    )
    report(result_text(result))
    if as_json:
        emit_json(result_document(result))
