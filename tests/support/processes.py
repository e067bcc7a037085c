"""Process trees in tests: find a process's descendants, kill a whole tree at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the script and everything it started, as a container's end would: freeze them
    first (SIGSTOP) so that none can start another process in between."""
    pids = {proc.pid}
    while True:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        grown = pids | descendants(proc.pid) | {d for p in pids for d in descendants(p)}
        if grown == pids:
            break
        pids = grown
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids - {proc.pid}):
        assert time.monotonic() < deadline, "killed processes did not go away"
        time.sleep(0.05)
