"""`gpubuild check`: read a deployment checkout and report the deployment guide's known mistakes.

The deployment guide's troubleshooting table lists failures that cost a day each: Ray at two
versions, onnxruntime silently on CPU because LD_LIBRARY_PATH misses cuDNN, Flux no longer
updating a tag whose `$imagepolicy` marker was lost, a GPU pod that never schedules. Most of
them can be read off the files: the RayService, the HelmReleases, the Dockerfiles, the
requirements, the pipelines, gpubuild's own profiles, locks and manifests. This module walks the
given paths, parses what it recognises (ruamel.yaml's round-trip loader keeps line numbers and
end-of-line comments), builds a small model of the deployment, and runs one function per rule.

A file that fails to parse is a finding (GB001), never a crash: so is YAML past the bounds of
builder.yamlload (deep nesting, alias bombs), and a file named on the command line that is too
big to read; one found in a folder is a warning (GB002). A YAML file is only ours when it
names `kind: RayService`, `RayCluster` or `HelmRelease` at the top level (or is a pipeline), so
Helm templates and other YAML in a checkout are left alone.

Which RayService do a Dockerfile, a requirements file or a profile belong to? One RayService in
the checked paths: all of them. Several: a Dockerfile belongs to the cluster whose worker image
its pipeline (or, failing that, its folder name) builds; an API service's requirements belong
to the cluster its HelmRelease's `ray://<name>-head-svc...` address names; a profile belongs to
the cluster whose gpubuild init image carries its name, or whose worker image it was made for.
What cannot be placed is not compared (and is listed on stderr), rather than compared with a
cluster it may have nothing to do with.

The parts, in builder/checks/: model (findings, rules, the parsed files), read (files to model),
shell (commands inside containers), links (what belongs to which cluster), versions (GB1xx),
environment (GB2xx), rules (GB3xx-GB6xx), pipelines (GB7xx). This module runs them and renders
the result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.checks.environment import environment_findings
from builder.checks.links import Links
from builder.checks.model import ERROR, RULES, WARNING, Checkout, Finding
from builder.checks.pipelines import pipeline_findings
from builder.checks.read import read_checkout, read_store
from builder.checks.rules import (
    flux_findings,
    gpu_findings,
    init_findings,
    redirect_findings,
    sas_findings,
    shipped_findings,
)
from builder.checks.versions import unpinned_findings, version_findings, version_groups
from builder.errors import BadInputError


@dataclass(frozen=True)
class CheckResult:
    findings: tuple[Finding, ...]
    files: tuple[tuple[str, str], ...]  # (display path, kind)
    not_compared: tuple[str, ...] = ()  # versions that could not be tied to one cluster

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == ERROR)

    @property
    def warnings(self) -> int:
        return sum(1 for f in self.findings if f.severity == WARNING)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


def result_document(result: CheckResult) -> dict[str, object]:
    return {
        "findings": [f.document() for f in result.findings],
        "summary": {
            "errors": result.errors,
            "warnings": result.warnings,
            "files": len(result.files),
        },
        "files": [{"path": path, "kind": kind} for path, kind in result.files],
        "not_compared": list(result.not_compared),
        "rules": {
            code: {"severity": rule.severity, "summary": rule.summary}
            for code, rule in sorted(RULES.items())
        },
    }


def result_text(result: CheckResult) -> str:
    return "".join(f.text() + "\n" for f in result.findings)


def summary_text(result: CheckResult) -> str:
    kinds = Counter(kind for _, kind in result.files)
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "nothing recognised"
    lines = [
        f"checked {len(result.files)} file(s) ({parts}): "
        f"{result.errors} error(s), {result.warnings} warning(s)"
    ]
    lines += [f"not compared: {item}" for item in result.not_compared]
    return "\n".join(lines)


def run_rules(checkout: Checkout) -> tuple[list[Finding], list[str]]:
    links = Links.of(checkout)
    groups, not_compared = version_groups(checkout, links)
    findings = [
        *checkout.findings,
        *version_findings(groups),
        *unpinned_findings(checkout),
        *environment_findings(checkout, links),
        *flux_findings(checkout),
        *init_findings(checkout, links),
        *redirect_findings(checkout),
        *shipped_findings(checkout, links),
        *gpu_findings(checkout),
        *sas_findings(checkout),
        *pipeline_findings(checkout),
    ]
    unique = sorted(set(findings), key=lambda f: (f.path, f.line, f.code, f.message))
    return unique, not_compared


def check(
    paths: Sequence[Path], *, profiles: Sequence[Path] = (), store: str | None = None
) -> CheckResult:
    """Read the deployment files under `paths` and report every finding, sorted by place."""
    if not paths:
        raise BadInputError("give at least one path to check (a deployment checkout)")
    checkout = read_checkout(paths, profiles)
    if store:
        read_store(store, checkout)
    findings, not_compared = run_rules(checkout)
    return CheckResult(tuple(findings), tuple(checkout.files), tuple(not_compared))
