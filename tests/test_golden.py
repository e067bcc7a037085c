"""What gpubuild generates for the shipped torch-cu121 profile stays byte for byte the same:
the lock (written and read back), the init script with and without the pip fallback, and the
Kubernetes snippet. The inputs are the fixture deployment repo's lock and published manifest,
so these run offline. (The worker Dockerfile's golden file is in test_dockerfile.py.)

Regenerate with GPUBUILD_UPDATE_GOLDEN=1 when a change to the output is intended.
"""

from __future__ import annotations

import os

import pytest

from builder.initscript import render_init_script
from builder.k8s import pod_snippet, render_snippet
from builder.lock import read_lock, render_lock
from builder.manifest import manifest_from_bytes
from tests.helpers import REPO

GOLDEN = REPO / "tests" / "golden"
FIXTURES = REPO / "tests" / "fixtures" / "deploy-repo"
LOCK = FIXTURES / "your-gpu-service" / "gpubuild" / "torch-cu121.lock"
MANIFEST = next((FIXTURES / "store" / "torch-cu121").rglob("manifest.json"))
STORE_URL = "https://gpucache.blob.core.windows.net/gpubuild/prod"


def _matches_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if os.environ.get("GPUBUILD_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{name} changed; GPUBUILD_UPDATE_GOLDEN=1 if intended"


def test_the_lock_is_written_back_byte_for_byte() -> None:
    lock = read_lock(LOCK)
    assert render_lock(lock, lock.install_dir) == LOCK.read_text()


@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "pip-fallback"])
def test_the_init_script_matches_its_golden_file(fallback: bool) -> None:
    manifest = manifest_from_bytes(MANIFEST.read_bytes(), where=str(MANIFEST))
    text = render_init_script(
        manifest, STORE_URL, fallback_lock=LOCK.read_text() if fallback else None
    )
    _matches_golden(f"torch-cu121{'.fallback' if fallback else ''}.init.sh", text)


def test_the_kubernetes_snippet_matches_its_golden_file() -> None:
    manifest = manifest_from_bytes(MANIFEST.read_bytes(), where=str(MANIFEST))
    snippet = pod_snippet(
        manifest, image="myacr.azurecr.io/data-ai/gpubuild-init:torch-cu121", secret="gpubuild-sas"
    )
    _matches_golden("torch-cu121.init-container.yaml", render_snippet(snippet))
