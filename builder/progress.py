"""What long work tells a person while it runs.

Stages take an `on_progress` callable (`Progress`) and call it with a line of text, or with a
`Step` for countable work (shard 3 of 9). They never print. The CLI's `Reporter` writes to
stderr, scrubbed of secrets: a `Step` is a bar redrawn in place on a terminal and a line
otherwise (CI logs, `kubectl logs`), so that progress appears as work completes either way.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from builder.secrets import scrub


@dataclass(frozen=True)
class Step:
    """One finished piece of countable work: `done` of `total`, and what it was."""

    done: int
    total: int
    text: str

    def line(self) -> str:
        return f"[{self.done}/{self.total}] {self.text}"

    def __str__(self) -> str:
        return self.line()


Progress = Callable[[str | Step], None]


def silent(_message: str | Step) -> None:
    """The Progress of a caller that wants none."""


class Reporter:
    """Progress to a stream (stderr): lines, and a bar for Steps when the stream is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar_shown = False

    def __call__(self, message: str | Step) -> None:
        if isinstance(message, Step) and self.tty:
            self._draw(message)
            return
        text = message.line() if isinstance(message, Step) else message
        self._clear()
        self.stream.write(scrub(text) + "\n")
        self.stream.flush()

    def _draw(self, step: Step) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        slots = 24
        filled = slots * step.done // max(step.total, 1)
        head = f"[{'#' * filled}{'.' * (slots - filled)}] {step.done}/{step.total} "
        text = scrub(step.text)
        room = max(width - len(head) - 1, 10)
        if len(text) > room:
            text = text[: room - 3] + "..."
        self.stream.write("\r\x1b[2K" + head + text)
        self._bar_shown = True
        if step.done >= step.total:
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.flush()

    def _clear(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[2K")
            self._bar_shown = False
