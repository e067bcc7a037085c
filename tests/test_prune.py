"""[policy] prune: build-only files removed before packing, on small real wheels installed by
uv. What is pruned and what stays (triton's headers, libraries, metadata), RECORD kept true,
the lock and the manifest recording it, the digest covering it, doctor reporting it, and the
pruned tree still importing with the host python."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.doctor import check_pruned
from builder.errors import FormatError
from builder.fetch import fetch
from builder.indexes import IndexSettings
from builder.lock import parse_lock, read_lock
from builder.pipeline import pack_profile
from builder.profile import PRUNE_PRESETS, load_profile
from builder.prune import PRUNED_FILE
from tests.helpers import run_cli, write_profile
from tests.support.wheels import build_wheel

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # the fetched tree is imported


@pytest.fixture
def index(tmp_path: Path, local_index: Callable[[list[Path]], str]) -> str:
    dists = tmp_path / "dists"
    return local_index([
        build_wheel(dists, "torch", "9.9", files={
            "torch/__init__.py": b"VALUE = 'torch'\n",
            "torch/include/ATen/core.h": b"// header\n" * 100,
            "torch/include/c10/util.h": b"// header\n",
            "torch/lib/libtorch_cpu.so": b"\x7fELF" + b"\0" * 5000,
            "torch/lib/libtorch_static.a": b"!<arch>\n" + b"\0" * 3000,
            "torch/share/cmake/Torch/TorchConfig.cmake": b"# cmake\n",
        }),
        build_wheel(dists, "nvidia-alpha", "1.0", files={
            "nvidia/alpha/include/alpha.h": b"// alpha\n",
            "nvidia/alpha/lib/libalpha.so.1": b"\x7fELF" + b"\0" * 2000,
            "nvidia/alpha/lib/libalpha_static.a": b"!<arch>\n",
        }),
        # A JIT compiler's own headers and libraries: never in a preset.
        build_wheel(dists, "triton", "3.0", files={
            "triton/__init__.py": b"VALUE = 'triton'\n",
            "triton/backends/nvidia/include/cuda.h": b"// cuda\n",
            "triton/_C/libtriton.so": b"\x7fELF" + b"\0" * 1000,
        }),
        build_wheel(dists, "plain", "1.0", files={
            "plain/__init__.py": b"VALUE = 'plain'\n",
            "plain/docs/guide.txt": b"read me\n",
        }),
    ])  # fmt: skip


HEAVY = ["torch==9.9", "nvidia-alpha==1.0", "triton==3.0", "plain==1.0"]


def _pack(tmp_path: Path, index: str, name: str, prune: list[str] | None):
    path = write_profile(tmp_path / name, name=name, heavy=HEAVY, python=PYTHON, prune=prune)
    profile = load_profile(path)
    packed = pack_profile(
        profile, out_dir=tmp_path / "store", settings=IndexSettings(default_url=index)
    )
    return profile, packed


def test_prune_removes_build_only_files_and_keeps_what_runs(tmp_path: Path, index: str) -> None:
    profile, packed = _pack(tmp_path, index, "pruned", ["@dev-files", "plain/docs/*"])
    manifest = packed.manifest
    assert manifest.prune == (*PRUNE_PRESETS["@dev-files"], "plain/docs/*")
    assert {p.name: p.files for p in manifest.pruned} == {"nvidia-alpha": 2, "plain": 1, "torch": 4}
    tree = tmp_path / "tree"
    fetch((tmp_path / "store").as_uri() + f"/{profile.name}/{manifest.digest}", tree)

    gone = [
        "torch/include", "torch/share", "torch/lib/libtorch_static.a",
        "nvidia/alpha/include", "nvidia/alpha/lib/libalpha_static.a", "plain/docs",
    ]  # fmt: skip
    assert [path for path in gone if (tree / path).exists()] == []  # emptied folders go too
    kept = [
        "torch/lib/libtorch_cpu.so", "nvidia/alpha/lib/libalpha.so.1",
        "triton/backends/nvidia/include/cuda.h", "triton/_C/libtriton.so", "plain/__init__.py",
    ]  # fmt: skip
    assert [path for path in kept if not (tree / path).is_file()] == []
    assert manifest.total_files == sum(1 for p in tree.rglob("*") if p.is_file())

    # RECORD stays true: no line for a pruned file, one for the note that says what went.
    record = (tree / "torch-9.9.dist-info" / "RECORD").read_text()
    assert "torch/include" not in record and "libtorch_static.a" not in record
    assert f"torch-9.9.dist-info/{PRUNED_FILE}" in record
    note = (tree / "torch-9.9.dist-info" / PRUNED_FILE).read_text()
    assert "files: 4" in note and "pattern: torch/include/*" in note
    # RECORD claims the note: it travels with its distribution, not among unclaimed files.
    assert not [note for note in manifest.notes if "no RECORD claims" in note]

    probe = subprocess.run(
        [sys.executable, "-s", "-B", "-c", "import torch, triton, plain; print(torch.VALUE)"],
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.strip() == "torch", probe.stderr

    check = check_pruned(str(tree))
    assert check.status == "pass" and len(check.details) == 3
    assert any(d.startswith("torch-9.9: 4 files") for d in check.details)
    assert check_pruned(str(tmp_path / "store")).status == "skip"


def test_the_lock_records_the_patterns_and_the_digest_covers_them(
    tmp_path: Path, index: str
) -> None:
    _, pruned = _pack(tmp_path, index, "pruned", ["@dev-files"])
    _, whole = _pack(tmp_path, index, "whole", None)
    assert pruned.manifest.digest != whole.manifest.digest
    pruned_lock = read_lock(tmp_path / "pruned" / "pruned.lock")
    assert pruned_lock.prune == PRUNE_PRESETS["@dev-files"]
    header = next(
        line for line in (tmp_path / "whole" / "whole.lock").read_text().splitlines()
        if line.startswith("# gpubuild: ")
    )  # fmt: skip
    # A profile without prune writes the lock it always wrote (no new key, same digest rule).
    assert "prune" not in json.loads(header.removeprefix("# gpubuild: "))
    assert not whole.manifest.prune and b'"prune"' not in whole.manifest_path.read_bytes()

    text = (tmp_path / "pruned" / "pruned.lock").read_text()
    hostile = text.replace('"torch/include/*"', '"../../etc/*"')
    with pytest.raises(FormatError, match=r"prune\[2\]"):
        parse_lock(hostile, "pruned.lock")


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("/usr/lib/*", "relative to the install folder"),
        ("torch/../../x", "without '..'"),
        ("*", "would remove everything"),
        ("*/*", "would remove everything"),
        ("@everything", "unknown preset"),
        ("", "non-empty"),
    ],
)
def test_a_bad_prune_pattern_is_bad_input(tmp_path: Path, pattern: str, words: str) -> None:
    path = write_profile(tmp_path, heavy=["plain==1.0"], prune=["@dev-files", pattern])
    result = run_cli("resolve", str(path))
    assert result.returncode == 2, result.stderr
    assert "policy.prune[1]" in result.stderr and words in result.stderr
    assert not path.with_suffix(".lock").exists()
