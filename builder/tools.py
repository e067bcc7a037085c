"""Running uv (and pip-compile) with the settings every gpubuild call needs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
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
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Completed:
    """Run a program to its end; `on_line` sees each line of its stderr as it comes.

    The program runs in a session of its own, and whatever stops this call (Ctrl-C, SIGTERM
    turned into an exception by the CLI, an error) stops the program and its children too:
    an orphaned uv would go on writing into a folder that is being cleaned up.
    """
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        raise ToolFailedError(f"cannot run {argv[0]}: {exc}") from None
    try:
        if on_line is None:
            stdout, stderr = proc.communicate()
        else:
            stdout, stderr = _stream(proc, on_line)
    except BaseException:
        stop_process_group(proc)
        raise
    return Completed(proc.returncode, stdout, stderr)


def _stream(proc: subprocess.Popen[str], on_line: Callable[[str], None]) -> tuple[str, str]:
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None  # both are pipes (run_tool)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
    reader.start()
    err: list[str] = []
    for line in stderr:
        err.append(line)
        on_line(line.rstrip("\n"))
    proc.wait()
    reader.join()
    return "".join(out), "".join(err)


def stop_process_group(proc: subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM the program's whole session, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_uv(
    args: list[str],
    *,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    default_index: str | None = None,
) -> Completed:
    """Run uv. `default_index` goes through the environment (UV_DEFAULT_INDEX), never argv:
    any user of the machine can read a process's command line, credentials and all."""
    extra = {"UV_DEFAULT_INDEX": default_index} if default_index else None
    return run_tool([uv_bin(), *args], cwd=cwd, env=uv_env(extra), on_line=on_line)


def pip_compile_argv() -> list[str]:
    return [sys.executable, "-m", "piptools", "compile"]
