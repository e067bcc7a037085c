"""Running uv (and pip-compile) with the settings every gpubuild call needs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from builder.errors import ToolFailedError


@cache
def uv_bin() -> str:
    import uv

    return uv.find_uv_bin()


@cache
def uv_version() -> str:
    return (
        subprocess.run([uv_bin(), "--version"], capture_output=True, text=True, check=True)
        .stdout.split("(")[0]
        .strip()
    )


def uv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Large GPU wheels time out under uv's default 30 s read timeout.
    env.setdefault("UV_HTTP_TIMEOUT", "300")
    # A target Python the host lacks would otherwise make uv fetch a managed interpreter.
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env.setdefault("UV_NO_PROGRESS", "1")
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_tool(
    argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Completed:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    except OSError as exc:
        raise ToolFailedError(f"cannot run {argv[0]}: {exc}") from None
    return Completed(proc.returncode, proc.stdout, proc.stderr)


def run_uv(args: list[str], *, cwd: Path | None = None) -> Completed:
    return run_tool([uv_bin(), *args], cwd=cwd, env=uv_env())


def pip_compile_argv() -> list[str]:
    return [sys.executable, "-m", "piptools", "compile"]
