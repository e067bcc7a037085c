"""Profile validation: every bad input is a clear error naming file and key, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.errors import ProfileError
from builder.profile import load_profile
from tests.helpers import REPO, run_cli, write_profile


@pytest.mark.parametrize("profile", ["onnx-gpu.toml", "torch-cu121.toml"])
def test_shipped_profiles_load(profile: str) -> None:
    loaded = load_profile(REPO / "profiles" / profile)
    assert loaded.target.python == "3.10"
    assert loaded.target.base_packages.is_file()
    assert "click" in loaded.policy.exclude
    assert "protobuf<5" in loaded.policy.constraints


def test_torch_profile_routes_torch_to_its_index() -> None:
    loaded = load_profile(REPO / "profiles" / "torch-cu121.toml")
    index = loaded.index_for("Torch")
    assert index is not None and index.name == "pytorch-cu121"
    assert loaded.index_for("numpy") is None


def _valid() -> dict:
    return {
        "name": "ok",
        "target": {
            "base_image": "rayproject/ray:2.52.0-py310-cu121",
            "base_packages": "bases/base.txt",
            "python": "3.10",
            "platform": "x86_64-manylinux_2_28",
            "interpreter": "/usr/bin/python3",
        },
        "heavy": {"requirements": ["onnxruntime-gpu==1.18.1"]},
        "policy": {"constraints": ["numpy<2"], "exclude": ["click"]},
    }


def _toml(document: dict) -> str:
    """Enough TOML for profiles: strings, numbers, lists, tables, arrays of tables."""
    scalars = [
        f"{k} = {json.dumps(v)}"
        for k, v in document.items()
        if not isinstance(v, dict | list)
        or (isinstance(v, list) and not any(isinstance(i, dict) for i in v))
    ]
    lines = list(scalars)
    for key, value in document.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        elif isinstance(value, list) and any(isinstance(i, dict) for i in value):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _index(name: str, url: str, packages: list[str]) -> dict:
    return {"name": name, "url": url, "packages": packages}


# (change to a valid profile, the key the error must name, a word the message must contain)
BAD_PROFILES = [
    (lambda d: d.update(surprise=1), "surprise", "unknown key"),
    (lambda d: d.update(name="Not_OK"), "name", "[a-z0-9-]"),
    (lambda d: d["target"].pop("base_packages"), "target.base_packages", "required"),
    (lambda d: d["target"].update(python="3"), "target.python", "3.10"),
    (lambda d: d["target"].update(platform="win_amd64"), "target.platform", "Linux platform"),
    (lambda d: d["target"].update(interpreter="python"), "target.interpreter", "absolute"),
    (lambda d: d["target"].update(base_image_bytes=-5), "target.base_image_bytes", "positive"),
    (lambda d: d["target"].update(install_dir="/."), "target.install_dir", "'.'"),
    (lambda d: d["target"].update(install_dir="/shared/../.."), "target.install_dir", "'..'"),
    (lambda d: d["target"].update(install_dir="/"), "target.install_dir", "other than /"),
    (lambda d: d["target"].update(install_dir="/usr"), "target.install_dir", "system folder"),
    (lambda d: d["target"].update(install_dir="shared"), "target.install_dir", "absolute"),
    (
        lambda d: d["target"].update(base_packages="bases/loop.txt"),
        "target.base_packages",
        "cannot read",
    ),
    (
        lambda d: d["target"].update(base_packages="bases/bad-utf8.txt"),
        "target.base_packages",
        "UTF-8",
    ),
    (
        lambda d: d["target"].update(base_packages="bases/bad-line.txt"),
        "target.base_packages",
        "bad-line.txt:2",
    ),
    (lambda d: d["target"].update(base_packages="a\u0000b"), "target.base_packages", "null"),
    (lambda d: d["heavy"].update(requirements=["numpy>>2"]), "heavy.requirements", "not a valid"),
    (lambda d: d["heavy"].update(requirements=[]), "heavy.requirements", "no requirement"),
    (lambda d: d.pop("heavy"), "heavy", "required"),
    (lambda d: d["policy"].update(colour=1), "policy.colour", "unknown key"),
    (lambda d: d["policy"].update(constraints="numpy<2"), "policy.constraints", "array of strings"),
    (lambda d: d["policy"].update(exclude=["not a name"]), "policy.exclude", "not a package name"),
    (lambda d: d.update(index=[_index("a", "ftp://x", ["torch"])]), "index[0].url", "http"),
    (
        lambda d: d.update(
            index=[_index("a", "https://a", ["torch"]), _index("b", "https://b", ["Torch"])]
        ),
        "index[1].packages",
        "already taken",
    ),
    (
        lambda d: d["heavy"].update(requirements=["x @ https://example.invalid/x.whl"]),
        "heavy.requirements",
        "direct URL",
    ),
    (
        lambda d: d.update(light={"requirements": ["onnxruntime-gpu"]}),
        "light.requirements",
        "also under [heavy]",
    ),
]


def _profile_text(change, tmp_path: Path) -> Path:
    write_profile(tmp_path, heavy=["x==1"])  # for its base snapshot
    (tmp_path / "bases" / "loop.txt").symlink_to(tmp_path / "bases" / "loop.txt")
    (tmp_path / "bases" / "bad-utf8.txt").write_bytes(b"numpy==1.26.4\n\xff\xfe==1\n")
    (tmp_path / "bases" / "bad-line.txt").write_text("numpy==1.26.4\nnot a pin\n")
    document = _valid()
    change(document)
    path = tmp_path / "bad.toml"
    path.write_text(_toml(document))
    return path


def test_valid_document_loads(tmp_path: Path) -> None:
    loaded = _profile_text(lambda d: None, tmp_path)
    assert load_profile(loaded).name == "ok"


@pytest.mark.parametrize(("change", "key", "word"), BAD_PROFILES)
def test_bad_profile_is_a_clear_error(tmp_path: Path, change: str, key: str, word: str) -> None:
    path = _profile_text(change, tmp_path)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"[{key}]" in message
    assert word in message


def test_missing_base_snapshot_is_named(tmp_path: Path) -> None:
    path = write_profile(tmp_path, heavy=["x==1"])
    (tmp_path / "bases" / "base.txt").unlink()
    with pytest.raises(ProfileError, match=r"\[target.base_packages\].*does not exist"):
        load_profile(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x\n')
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(broken)
    with pytest.raises(ProfileError, match="no such profile"):
        load_profile(tmp_path / "absent.toml")


def test_cli_bad_profile_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    path = _profile_text(lambda d: d.update(surprise=1), tmp_path)
    result = run_cli("resolve", str(path))
    assert result.returncode == 2
    assert "surprise" in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not path.with_suffix(".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "bases", "test-profile.toml"]


def test_cli_bad_index_override_exits_2(tmp_path: Path) -> None:
    path = write_profile(tmp_path, heavy=["x==1"])
    result = run_cli("resolve", str(path), "--index", "nosuch=https://a")
    assert result.returncode == 2
    assert "no [[index]] named 'nosuch'" in result.stderr
    result = run_cli("resolve", str(path), "--index", "just-a-name")
    assert result.returncode == 2
    assert "NAME=URL" in result.stderr
