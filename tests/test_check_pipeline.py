"""`gpubuild check` on pipelines and on the init container's SAS: GB701 (publish-cache without
resolve --check before it), GB702 (a DockerFiles entry that does not exist), GB405 (a SAS
Secret with no note on its renewal), GB406 (a SAS written into the manifest).

Each case copies the clean fixture checkout (tests/fixtures/deploy-repo), makes one edit and
expects exactly the listed findings, lines found by searching the edited file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.check import check
from tests.helpers import REPO as GPUBUILD_REPO
from tests.helpers import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "deploy-repo"
RAY_SERVICE = "draft-deployment/dev/ray-service.yaml"
GPU_PIPELINE = "your-gpu-service/azure-pipelines.yaml"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "repo")
    return tmp_path / "repo"


def _line(path: Path, needle: str, after: int = 0) -> int:
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if number > after and needle in text:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def _found(repo: Path) -> list[tuple[str, int, str]]:
    result = check([repo])
    return [(Path(f.path).relative_to(repo).as_posix(), f.line, f.code) for f in result.findings]


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


# The gpubuild init container with the SAS as `k8s patch --secret gpubuild-sas` mounts it.
SAS_FILE_ENV = """\
                  - name: GPUBUILD_TARGET
                    value: /shared-packages
                  - name: GPUBUILD_SAS_FILE
                    value: /var/run/gpubuild/sas
                volumeMounts:
                  - mountPath: /shared-packages
                    name: python-packages
                  - mountPath: /var/run/gpubuild
                    name: gpubuild-sas
                    readOnly: true
"""
PLAIN_ENV = """\
                  - name: GPUBUILD_TARGET
                    value: /shared-packages
                volumeMounts:
                  - mountPath: /shared-packages
                    name: python-packages
"""
PACKAGES_VOLUME = """\
              - name: python-packages
                emptyDir:
"""


def _mount_sas(repo: Path, volume: str) -> Path:
    path = repo / RAY_SERVICE
    _edit(path, PLAIN_ENV, SAS_FILE_ENV)
    _edit(path, PACKAGES_VOLUME, volume + PACKAGES_VOLUME)
    return path


SECRET_VOLUME = """\
              - name: gpubuild-sas
                secret:
                  secretName: gpubuild-sas
                  defaultMode: 0400
"""


def test_a_sas_secret_without_a_rotation_note_is_a_warning(repo: Path) -> None:
    path = _mount_sas(repo, SECRET_VOLUME)
    line = _line(path, "value: /var/run/gpubuild/sas")
    assert _found(repo) == [(RAY_SERVICE, line, "GB405")]
    result = check([repo])
    assert result.exit_code == 0  # a warning
    assert "Secret 'gpubuild-sas'" in result.findings[0].message


@pytest.mark.parametrize(
    ("where", "comment"),
    [
        ("volume", "                # rotated every Monday by the sas-rotation pipeline\n"),
        ("container", "                # SAS renewed weekly, see the runbook\n"),
        ("top", "# The gpubuild-sas Secret expires monthly; ops renews it.\n"),
    ],
)
def test_a_rotation_note_near_it_or_naming_it_is_enough(
    repo: Path, where: str, comment: str
) -> None:
    volume = SECRET_VOLUME
    if where == "volume":
        volume = volume.replace("                secret:\n", comment + "                secret:\n")
    path = _mount_sas(repo, volume)
    if where == "container":
        _edit(path, "                volumeMounts:\n                  - mountPath: /shared-packages\n"
              "                    name: python-packages\n                  - mountPath: /var/run",
              comment + "                volumeMounts:\n                  - mountPath:"
              " /shared-packages\n                    name: python-packages\n"
              "                  - mountPath: /var/run")  # fmt: skip
    if where == "top":
        path.write_text(comment + path.read_text())
    assert _found(repo) == []


def test_a_comment_without_the_words_is_no_note(repo: Path) -> None:
    volume = SECRET_VOLUME.replace(
        "                secret:\n",
        "                # the SAS for the store\n                secret:\n",
    )
    path = _mount_sas(repo, volume)
    assert _found(repo) == [(RAY_SERVICE, _line(path, "value: /var/run/gpubuild/sas"), "GB405")]


def test_a_csi_volume_is_not_flagged(repo: Path) -> None:
    """A CSI Secrets Store volume can rotate by itself: not a Secret gpubuild can judge."""
    volume = """\
              - name: gpubuild-sas
                csi:
                  driver: secrets-store.csi.k8s.io
                  readOnly: true
"""
    _mount_sas(repo, volume)
    assert _found(repo) == []


def test_a_sas_from_a_secret_key_ref_is_judged_too(repo: Path) -> None:
    path = repo / RAY_SERVICE
    _edit(path, PLAIN_ENV, PLAIN_ENV.replace(
        "                volumeMounts:\n",
        "                  - name: GPUBUILD_SAS\n                    valueFrom:\n"
        "                      secretKeyRef: {name: store-sas, key: sas}\n"
        "                volumeMounts:\n"))  # fmt: skip
    assert _found(repo) == [(RAY_SERVICE, _line(path, "- name: GPUBUILD_SAS"), "GB405")]


def test_a_sas_written_into_the_manifest_is_an_error_and_never_printed(repo: Path) -> None:
    path = repo / RAY_SERVICE
    secret = "sv=2024-08-04&sr=c&sp=r&se=2030-01-01&sig=c2VjcmV0c2lnbmF0dXJlMTIz"
    _edit(path, PLAIN_ENV, PLAIN_ENV.replace(
        "                volumeMounts:\n",
        f'                  - name: GPUBUILD_SAS\n                    value: "{secret}"\n'
        "                volumeMounts:\n"))  # fmt: skip
    line = _line(path, secret)
    assert _found(repo) == [(RAY_SERVICE, line, "GB406")]
    done = run_cli("check", str(repo))
    assert done.returncode == 1
    assert f"ray-service.yaml:{line}: GB406" in done.stdout
    assert "c2VjcmV0c2lnbmF0dXJlMTIz" not in done.stdout + done.stderr


PUBLISH_STEPS = """\
steps:
  - script: |
      set -euo pipefail
{check}      gpubuild publish-cache gpubuild/torch-cu121.toml --store "$STORE"
    displayName: publish
"""


def _gpubuild_pipeline(repo: Path, check_line: str) -> Path:
    path = repo / "your-gpu-service" / "azure-pipelines.publish.yaml"
    path.write_text("trigger:\n  - main\n\n" + PUBLISH_STEPS.format(check=check_line))
    return path


def test_publish_cache_without_resolve_check_is_an_error(repo: Path) -> None:
    path = _gpubuild_pipeline(repo, "")
    line = _line(path, "gpubuild publish-cache")
    assert _found(repo) == [("your-gpu-service/azure-pipelines.publish.yaml", line, "GB701")]
    assert check([repo]).exit_code == 1


def test_resolve_check_of_another_profile_does_not_count(repo: Path) -> None:
    path = _gpubuild_pipeline(repo, "      gpubuild resolve gpubuild/onnx-gpu.toml --check\n")
    line = _line(path, "gpubuild publish-cache")
    assert _found(repo) == [("your-gpu-service/azure-pipelines.publish.yaml", line, "GB701")]


def test_resolve_check_first_is_clean(repo: Path) -> None:
    _gpubuild_pipeline(
        repo, "      gpubuild resolve ./gpubuild/torch-cu121.toml --check --index x=default\n"
    )
    assert _found(repo) == []


def test_resolve_check_after_publishing_is_too_late(repo: Path) -> None:
    path = _gpubuild_pipeline(repo, "")
    path.write_text(
        path.read_text() + "  - bash: gpubuild resolve gpubuild/torch-cu121.toml --check\n"
    )
    line = _line(path, "gpubuild publish-cache")
    assert _found(repo) == [("your-gpu-service/azure-pipelines.publish.yaml", line, "GB701")]


def test_the_generated_pipeline_is_clean(repo: Path) -> None:
    """What `gpubuild ci azure-pipelines` writes passes `gpubuild check` (its AzureCLI@2
    inline script included), beside the template pipeline of the same repository."""
    service = repo / "your-gpu-service"
    done = run_cli("ci", "azure-pipelines", "gpubuild/torch-cu121.toml", "--store",
                   "az://gpucache/gpubuild/prod", "--code", "your_tasks.py", cwd=service)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (service / "azure-pipelines.gpubuild.yaml").is_file()
    assert _found(repo) == []
    result = check([repo])
    assert ("your-gpu-service/azure-pipelines.gpubuild.yaml", "pipeline") in {
        (Path(p).relative_to(repo).as_posix(), kind) for p, kind in result.files
    }
    # Take the check step out: GB701 on each publish-cache line of the inline script.
    path = service / "azure-pipelines.gpubuild.yaml"
    _edit(path, "      gpubuild resolve gpubuild/torch-cu121.toml --check\n", "      true\n")
    line = _line(path, "gpubuild publish-cache gpubuild/torch-cu121.toml")
    assert _found(repo) == [("your-gpu-service/azure-pipelines.gpubuild.yaml", line, "GB701")]


def test_a_missing_dockerfile_in_the_template_list_is_an_error(repo: Path) -> None:
    path = repo / GPU_PIPELINE
    _edit(path, "file: '$(Build.SourcesDirectory)/Dockerfile'",
          "file: '$(Build.SourcesDirectory)/docker/Dockerfile.gpu'")  # fmt: skip
    line = _line(path, "docker/Dockerfile.gpu")
    assert _found(repo) == [(GPU_PIPELINE, line, "GB702")]
    message = check([repo]).findings[0].message
    assert "DockerFiles names $(Build.SourcesDirectory)/docker/Dockerfile.gpu" in message
    (repo / "your-gpu-service" / "docker").mkdir()
    shutil.copy(repo / "your-gpu-service" / "Dockerfile",
                repo / "your-gpu-service" / "docker" / "Dockerfile.gpu")  # fmt: skip
    assert _found(repo) == []


def test_a_pipeline_below_the_root_finds_dockerfiles_at_the_git_root(repo: Path) -> None:
    """$(Build.SourcesDirectory) is the repository root: a pipeline in a subfolder names
    Dockerfiles from there, which `check` finds through the checkout's .git."""
    service = repo / "your-gpu-service"
    (service / ".git").mkdir()
    (service / "ci").mkdir()
    (service / GPU_PIPELINE.split("/")[1]).rename(service / "ci" / "azure-pipelines.yaml")
    assert _found(repo) == []
    shutil.rmtree(service / ".git")
    line = _line(service / "ci" / "azure-pipelines.yaml", "/Dockerfile'")
    assert _found(repo) == [("your-gpu-service/ci/azure-pipelines.yaml", line, "GB702")]


def test_the_rules_are_listed(repo: Path) -> None:
    done = run_cli("check", str(repo), "--json", cwd=GPUBUILD_REPO)
    rules = done.json()["rules"]
    assert {"GB405", "GB406", "GB701", "GB702"} <= set(rules)
    assert rules["GB405"]["severity"] == "warning" and rules["GB701"]["severity"] == "error"
