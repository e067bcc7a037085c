"""Install: a lock materialised for its target by uv, and the finished tree checked against
the lock and the profile's policy. Nothing is built; every wheel is checked against its hash.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from builder.errors import (
    DiskFullError,
    GpubuildError,
    IntegrityError,
    PolicyViolationError,
    ToolFailedError,
)
from builder.lock import Lock
from builder.profile import Profile
from builder.progress import Progress, silent
from builder.secrets import redact_url, scrub
from builder.tools import run_uv
from builder.tree import list_tree, read_distributions
from builder.units import megabytes

# uv's lines worth passing on while it installs (it prints them without a terminal too).
_UV_PROGRESS = ("Downloading ", "Downloaded ", "Prepared ", "Installed ")


# --- materialise --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallPass:
    index_url: str | None  # None: uv's default index (or the user's uv configuration)
    requirements: str  # name==version --hash=... lines


def install_passes(
    lock: Lock, real_urls: Mapping[str, str] | None = None, default_url: str | None = None
) -> list[InstallPass]:
    """One uv pass per index (docs/design.md#resolution-rules, rule 4): each package is fetched from its own index only.

    The lock records redacted URLs; `real_urls` maps them back to the URL with credentials.
    A package the lock names no index for (pip-tools locks) comes from `default_url`, or from
    uv's default when that is None.
    """
    groups: dict[str | None, list[str]] = {}
    for package in sorted(lock.packages, key=lambda p: p.name):
        hashes = " ".join(f"--hash={h}" for h in sorted(package.hashes))
        groups.setdefault(package.index_url, []).append(
            f"{package.name}=={package.version} {hashes}"
        )
    real_urls = real_urls or {}
    return [
        InstallPass(
            real_urls.get(url.rstrip("/"), url) if url else default_url, "\n".join(lines) + "\n"
        )
        for url, lines in sorted(groups.items(), key=lambda item: item[0] or "")
    ]


def materialise(
    lock_path: Path,
    lock: Lock,
    dest: Path,
    *,
    python: str,
    platform: str,
    real_urls: Mapping[str, str] | None = None,
    default_url: str | None = None,
    on_progress: Progress = silent,
) -> None:
    """Install the lock into the empty folder `dest` for the target, without building anything.

    `real_urls` and `default_url` as for `install_passes`.
    """
    report = on_progress
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise GpubuildError(f"{dest} is not empty; uv --target is only safe into an empty folder")
    passes = install_passes(lock, real_urls, default_url)
    with tempfile.TemporaryDirectory(prefix="gpubuild-pack-") as work:
        for number, step in enumerate(passes, start=1):
            requirements = Path(work) / f"pass-{number}.txt"
            requirements.write_text(step.requirements, encoding="utf-8")
            shown = redact_url(step.index_url) if step.index_url else "the default index"
            report(
                f"installing {step.requirements.count(chr(10))} package(s) from {shown}"
                f" (pass {number}/{len(passes)})"
            )
            args = [
                "pip", "install", "--target", str(dest), "--python-version", python,
                "--python-platform", platform, "--no-deps", "--require-hashes", "--no-build",
                "--no-installer-metadata", "--no-compile", "--link-mode", "copy",
                "--no-python-downloads", "-r", str(requirements),
            ]  # fmt: skip
            completed = run_uv(
                args,
                on_line=lambda line: _uv_line(line, report),
                default_index=step.index_url,
            )
            if completed.returncode != 0:
                raise _install_error(completed.stderr, lock_path, dest, shown)


def _uv_line(line: str, report: Progress) -> None:
    text = line.strip()
    if text.startswith(_UV_PROGRESS):
        report(f"  uv: {text}")


def _install_error(stderr: str, lock_path: Path, dest: Path, index: str) -> GpubuildError:
    text = scrub(stderr.strip())  # never echo credentials
    if "No space left on device" in text or "os error 28" in text:
        used = sum(e.size for e in list_tree(dest).entries) if dest.is_dir() else 0
        free = shutil.disk_usage(dest.parent).free
        cause = [line.strip() for line in text.splitlines() if "os error 28" in line]
        return DiskFullError(
            f"out of disk space while installing {lock_path} into {dest}: a file did not fit"
            f" with {megabytes(used)} of the tree installed and {megabytes(free)} free. The tree and then"
            " its shards (up to the tree's size again) must fit on that disk: free some space"
            " or pack into a folder on a bigger disk (--out DIR).\nuv: "
            + (cause[0] if cause else text.splitlines()[-1])
        )
    if "hash mismatch" in text.lower():
        return IntegrityError(
            f"a wheel from {index} does not match the hash in {lock_path}; resolve again if the"
            f" index really changed it:\n{text}"
        )
    return ToolFailedError(f"uv could not install {lock_path} from {index}:\n{text}")


def check_tree(tree: Path, lock: Lock, profile: Profile) -> None:
    """Defensive scan of the finished tree: exactly the lock, nothing the policy forbids."""
    listing = list_tree(tree)
    installed = {d.name: d.version for d in read_distributions(tree, listing)}
    snapshot = profile.snapshot
    locked = {p.name: p.version for p in lock.packages}
    problems = []

    def same(a: str | None, b: str | None) -> bool:
        return a is not None and b is not None and Version(a) == Version(b)

    for name, version in sorted(installed.items()):
        base_version = snapshot.version_of(name)
        if name in profile.policy.exclude:
            problems.append(f"{name}=={version} is excluded by [policy] exclude")
        elif (
            base_version is not None
            and not same(base_version, version)
            and name not in profile.policy.allow_shadow
        ):
            problems.append(
                f"{name}=={version} would shadow the base image's {name}=={base_version}"
                " (not in [policy] allow_shadow)"
            )
        elif not same(locked.get(name), version):
            problems.append(f"{name}=={version} is not in the lock")
    for name, version in sorted(locked.items()):
        if name not in installed:
            problems.append(f"{name}=={version} is in the lock but was not installed")
    if problems:
        raise PolicyViolationError(
            f"the materialised tree for {profile.name} breaks {profile.path}'s policy or the"
            " lock; nothing was packed:\n  " + "\n  ".join(problems)
        )


def disk_error(exc: OSError, where: Path, doing: str, needed: int) -> GpubuildError:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return GpubuildError(f"{doing} in {where} failed: {exc}")
    free = shutil.disk_usage(where).free if where.exists() else 0
    need = (
        f" the tree is {megabytes(needed)} installed and its shards need up to that much;"
        if needed
        else ""
    )
    return DiskFullError(
        f"out of disk space in {where} while {doing}:{need} {megabytes(free)} free now."
        " Free some space or pack into a folder on a bigger disk (--out DIR)."
        " Nothing half-written was kept: without a manifest the digest counts as not packed."
    )
