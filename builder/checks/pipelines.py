"""GB701-GB702: the Azure pipelines of a checkout (docs/design.md#in-azure-pipelines).

GB701: a pipeline that runs `gpubuild publish-cache PROFILE` with no `gpubuild resolve PROFILE
--check` before it publishes whatever the lock (or a resolution on the agent) says, even when
the profile was edited after the lock was written; `resolve --check` fails the run instead.
GB702: the template pipeline builds the images its `DockerFiles` list names; an entry whose
Dockerfile is not in the checkout fails that build (or builds another image than meant).
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from builder.checks.model import Checkout, Command, Finding, finding


def _gpubuild(command: Command) -> tuple[str, list[str]] | None:
    """(subcommand, its positional arguments) of a `gpubuild ...` command, else None."""
    words = list(command.words)
    if not words or PurePosixPath(words[0]).name != "gpubuild" or len(words) < 2:
        return None
    return words[1], [w for w in words[2:] if not w.startswith("-")]


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def pipeline_findings(checkout: Checkout) -> list[Finding]:
    findings = []
    for pipeline in checkout.pipelines:
        checked: list[str] = []
        for command in pipeline.commands:
            parsed = _gpubuild(command)
            if parsed is None:
                continue
            subcommand, arguments = parsed
            if subcommand == "resolve" and "--check" in command.words and arguments:
                checked.append(arguments[0])
            elif subcommand == "publish-cache" and arguments:
                profile = arguments[0]
                if any(_same(profile, earlier) for earlier in checked):
                    continue
                findings.append(
                    finding(
                        command.where,
                        "GB701",
                        f"publishes {profile} without `gpubuild resolve {profile} --check`"
                        " before it: a profile edited after its lock was written is published"
                        " from a lock nobody reviewed (or resolved again on the agent)",
                        f"run `gpubuild resolve {profile} --check` (same index options) in an"
                        " earlier step; `gpubuild ci azure-pipelines` writes such a pipeline",
                    )
                )
        for entry in pipeline.dockerfile_entries:
            if any(path.is_file() for path in entry.candidates):
                continue
            findings.append(
                finding(
                    entry.where,
                    "GB702",
                    f"DockerFiles names {entry.written}, which is not in the checkout"
                    f" (looked for {', '.join(str(p) for p in entry.candidates)}): the"
                    " template's image build fails",
                    "correct the path (relative to the repository root), or write the"
                    " Dockerfile (`gpubuild dockerfile PROFILE -o Dockerfile`)",
                )
            )
    return findings
