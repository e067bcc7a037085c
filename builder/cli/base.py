"""What every `gpubuild` command shares: the group that turns errors into messages and exit
statuses, the progress reporter, and the options that mean the same on every command."""

from __future__ import annotations

import functools
import importlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from builder import __version__
from builder.errors import BadInputError, GpubuildError
from builder.indexes import USE_DEFAULT_INDEX, IndexSettings
from builder.progress import Reporter, Step
from builder.secrets import (
    malformed_userinfo,
    redact_url,
    register_environment,
    register_url,
    scrub,
)

Command = TypeVar("Command", bound=Callable[..., Any])


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that its cleanup runs (a container stop, a CI
    job cancelled): the default action would end the process with no `finally` run."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


class GpubuildGroup(click.Group):
    """Turns GpubuildError into its message and exit status instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        register_environment()
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().invoke(ctx)
        except GpubuildError as exc:
            click.echo(f"gpubuild: error: {scrub(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            # A file or folder the user named that cannot be read or written: a message, not
            # a traceback.
            click.echo(f"gpubuild: error: {scrub(str(exc))}", err=True)
            ctx.exit(1)
        except (Terminated, KeyboardInterrupt) as exc:
            # Every stage cleans up in `finally` (work folders, partial files, child
            # processes): by the time this runs, nothing half-written is left.
            how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            click.echo(f"\ngpubuild: stopped by {how}; nothing half-written was kept", err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)
        finally:
            signal.signal(signal.SIGTERM, previous)


_reporter: Reporter | None = None


def report(message: str | Step) -> None:
    """Progress and results for a person: stderr, scrubbed, a bar for steps on a terminal."""
    global _reporter
    if _reporter is None or _reporter.stream is not sys.stderr:
        _reporter = Reporter(sys.stderr)
    _reporter(message)


def emit_json(document: object) -> None:
    """The one machine-readable document of a command, on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=True))


# Each command's module is imported when the command runs (or --help lists them), so that a
# quick command such as a no-op `resolve` does not pay for importing every stage.
_COMMANDS = {
    "resolve": "resolve_command:resolve",
    "pack": "store_commands:pack_command",
    "publish-cache": "store_commands:publish_cache_command",
    "fetch": "store_commands:fetch_command",
    "sas": "store_commands:sas",
    "gc": "maintenance_commands:gc_command",
    "verify": "maintenance_commands:verify_command",
    "init-script": "pod_commands:init_script_command",
    "k8s": "pod_commands:k8s_group",
    "dockerfile": "image_commands:dockerfile_command",
    "split": "image_commands:split_command",
    "build-image": "image_commands:build_image_command",
    "check": "repo_commands:check_command",
    "doctor": "repo_commands:doctor_command",
    "base-snapshot": "repo_commands:base_snapshot",
    "ci": "ci_commands:ci_group",
}


class CommandsGroup(GpubuildGroup):
    """The top-level group: commands come from builder.cli's command modules on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(f"builder.cli.{module}"), name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=CommandsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpubuild")
def main() -> None:
    """GPU Python dependencies for Ray on Kubernetes, resolved once and unpacked in seconds.

    \b
    The pipeline (each command has --help with an example):
      resolve PROFILE          conflict-free heavy set and hashed lock
      pack PROFILE             the lock as verified, content-addressed shards
      publish-cache PROFILE    resolve + pack + upload to a store (the main job)
      init-script PROFILE      the initContainer script that unpacks it in seconds
      k8s patch YAML           wire that initContainer into a RayService worker group
      fetch URL --into DIR     download, verify and unpack a published digest
      sas STORE_URL            a read-only SAS for the init container
      gc STORE                 delete old digests and the blobs nothing kept needs
      verify STORE             re-hash the store's blobs; --repair-from a local pack
      dockerfile PROFILE       the slim worker Dockerfile, under the disk budget
      build-image PROFILE      build (and push) that image through Docker
      split REQUIREMENTS       propose the light/heavy split of a requirements file
      check PATH...            find deployment mistakes in a repo
      doctor                   inspect a running worker container
      base-snapshot IMAGE      what a base image already has
      ci azure-pipelines PROFILE...  a CI pipeline: check the locks, publish, hand over
    Exit status: 0 success, 1 a failure of the job, 2 bad input or usage.
    The design and the file formats: docs/design.md in the gpubuild repository.
    """


# --- options shared by several commands --------------------------------------------------------


def profile_argument(command: Command) -> Command:
    return click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))(command)


def json_option(command: Command) -> Command:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."
    )(command)


def lock_option(command: Command) -> Command:
    return click.option(
        "--lock",
        "lock_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The lock (default: <profile>.lock beside the profile).",
    )(command)


def checked_index_url(option: str, url: str) -> str:
    """An index URL from the command line: its credentials are registered as secrets, and one
    that tools would split wrongly (and then print its password) is refused."""
    register_url(url)
    if malformed_userinfo(url):
        raise BadInputError(
            f"{option} {redact_url(url)}: the part before '@' holds a '/', which URL parsers"
            " take for the start of the path (and then print the password); percent-encode it"
            " in the user name or password ('/' is %2F)"
        )
    if not url.startswith(("http://", "https://", "file://")):
        raise BadInputError(f"{option} {redact_url(url)}: expected an http(s):// or file:// URL")
    return url


def index_settings(index_url: str | None, overrides: tuple[str, ...]) -> IndexSettings:
    parsed = []
    for value in overrides:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise BadInputError(f"--index {redact_url(value)!r}: expected NAME=URL or NAME=default")
        if url != USE_DEFAULT_INDEX:
            checked_index_url(f"--index {name}=", url)
        parsed.append((name, url))
    if index_url is not None:
        checked_index_url("--index-url", index_url)
    return IndexSettings(default_url=index_url, overrides=tuple(parsed))


def index_options(command: Command) -> Command:
    """--index-url and --index NAME=URL, the same on every command that resolves; the command
    receives them as one `settings: IndexSettings`."""

    @click.option(
        "--index-url",
        metavar="URL",
        help="Default package index (instead of uv's default or your pip/uv configuration).",
    )
    @click.option(
        "--index",
        "index_overrides",
        multiple=True,
        metavar="NAME=URL",
        help="Replace the URL of the profile's [[index]] NAME; NAME=default takes its packages "
        "from the default index instead. Repeatable.",
    )
    @functools.wraps(command)
    def wrapper(
        *args: Any, index_url: str | None, index_overrides: tuple[str, ...], **kw: Any
    ) -> Any:
        return command(*args, settings=index_settings(index_url, index_overrides), **kw)

    return wrapper  # type: ignore[return-value]  # click's decorators return a plain callable
