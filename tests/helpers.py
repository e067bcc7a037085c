"""Small helpers shared by the test modules: running the CLI and writing profiles."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from builder.indexes import IndexSettings
from builder.manifest import manifest_key
from builder.pack import PackResult, write_artifact
from builder.pipeline import publish_profile
from builder.profile import load_profile
from builder.publish import PublishResult
from builder.tools import run_uv

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """Run `gpubuild` as a user would: a separate process, real exit status."""
    proc = subprocess.run(
        [sys.executable, "-m", "builder.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


BASE_SNAPSHOT = """\
# test base image
protobuf==4.25.8
numpy==1.26.4
click==8.1.7
packaging==23.0
grpcio==1.74.0
"""


def write_profile(
    folder: Path,
    *,
    heavy: list[str],
    name: str = "test-profile",
    python: str = "3.10",
    platform: str = "x86_64-manylinux_2_28",
    constraints: list[str] | None = None,
    exclude: list[str] | None = None,
    allow_shadow: list[str] | None = None,
    indexes: list[dict] | None = None,
    prune: list[str] | None = None,
    base: str = BASE_SNAPSHOT,
    extra: str = "",
) -> Path:
    """A profile and its base snapshot in `folder`; returns the profile path."""
    (folder / "bases").mkdir(parents=True, exist_ok=True)
    (folder / "bases" / "base.txt").write_text(base)
    lines = [
        f'name = "{name}"',
        "[target]",
        'base_image = "gpubuild-test/base:bookworm"',
        'base_packages = "bases/base.txt"',
        f'python = "{python}"',
        f'platform = "{platform}"',
        'interpreter = "/usr/bin/python3"',
        'install_dir = "/shared-packages"',
        "[heavy]",
        f"requirements = {json.dumps(heavy)}",
        "[policy]",
        f"constraints = {json.dumps(constraints if constraints is not None else ['protobuf<5', 'numpy<2'])}",
        f"exclude = {json.dumps(exclude if exclude is not None else ['click'])}",
        f"allow_shadow = {json.dumps(allow_shadow or [])}",
        *([f"prune = {json.dumps(prune)}"] if prune is not None else []),
    ]
    for index in indexes or []:
        lines += [
            "[[index]]",
            f"name = {json.dumps(index['name'])}",
            f"url = {json.dumps(index['url'])}",
            f"packages = {json.dumps(index['packages'])}",
        ]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def docker_context(files: dict[str, bytes]) -> io.BytesIO:
    """An in-memory build context (a tar) for `images.build(fileobj=..., custom_context=True)`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def publish_to(profile: Path, store: str, index: str, tmp_path: Path) -> PublishResult:
    """Publish a test profile, resolved against the fixture index, to `store`."""
    return publish_profile(
        load_profile(profile),
        store_url=store,
        settings=IndexSettings(default_url=index),
        pack_dir=tmp_path / "packs",
    )


def new_repository(prefix: str) -> str:
    """A registry repository no other test uses."""
    return f"gpubuild/{prefix}{uuid.uuid4().hex[:10]}"


def pack_wheels(work: Path, packs: Path, wheels: list[Path], profile: str, name: str) -> PackResult:
    """Install `wheels` with uv and pack them as `profile` under a digest made from `name`
    (python 3.11, small shard threshold so that each wheel is a shard of its own)."""
    tree = work / f"tree-{name}"
    done = run_uv(["pip", "install", "--target", str(tree), "--no-deps", *map(str, wheels)])
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(name.encode()).hexdigest()
    manifest = write_artifact(
        tree,
        packs,
        profile=profile,
        digest=digest,
        python="3.11",
        platform="x86_64-manylinux_2_28",
        install_dir="/shared-packages",
        shard_threshold=50_000,
    )
    return PackResult(manifest, packs / manifest_key(profile, digest), packs, reused=False)
