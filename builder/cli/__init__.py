"""The `gpubuild` command line: it parses options and calls the pipeline (builder.pipeline)
and the stage modules, nothing more. `base.py` holds the group, the shared options and the
reporter; one module per group of commands, imported when one of its commands runs. `main` is
the entry point (console script `gpubuild`, `python -m builder.cli`)."""

from __future__ import annotations

from builder.cli.base import main

__all__ = ["main"]
