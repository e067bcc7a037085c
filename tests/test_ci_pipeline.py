"""`gpubuild ci azure-pipelines`: the generated file validates against the Azure Pipelines schema
(for the shipped profiles), and its steps pass when run in order as an agent runs them, against
a file store, and against Azurite plus a local registry.

How the agent is reproduced (`Agent` below), and where it cannot be:
- Template expressions (`${{ parameters.x }}`) are replaced at "compile time" by the parameter
  values (their defaults, or the values a test queues the run with), as Azure Pipelines does
  before a run starts; the file may use no other expression.
- Pipeline variables and the predefined ones the file names (Build.SourcesDirectory,
  Pipeline.Workspace, Agent.TempDirectory, ...) become environment variables (upper case, `.`
  as `_`), and `$(Name)` macros in variable values, task inputs and script text are expanded
  when the variable exists and left as written otherwise, as the agent does.
- `script:` steps and the AzureCLI@2 inline script run with `bash --noprofile --norc FILE` in
  the sources folder, one after another; a failed step skips the rest, except `always()`
  steps. `##vso[task.prependpath]` and `##vso[task.setvariable]` are honoured.
- Tasks that exist only on an agent are checked by their inputs and reproduced where their
  effect matters: UsePythonVersion@0 puts a Python on PATH (a venv whose site-packages
  already hold gpubuild's dependencies, so the step's pip installs gpubuild itself, from a
  wheel of this checkout, with no index); Cache@2 restores and saves its `path` under the key
  it computes (quoted segments literal, file segments hashed); AzureCLI@2's sign-in is
  replaced by the environment a test gives (Azurite's connection string): the script itself
  runs unchanged. PublishPipelineArtifact@1 copies its targetPath, which must exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from ruamel.yaml import YAML

from builder.lock import read_lock
from builder.profile import load_profile
from builder.resolve import ensure_lock
from builder.secrets import scrub
from tests.helpers import REPO, run_cli, write_profile
from tests.support.index import serve_index
from tests.support.services import AzuriteEndpoint, require_program
from tests.support.wheels import build_wheel

SCHEMA = REPO / "builder" / "data" / "azure-pipelines" / "service-schema.json"
PROFILE = "ci-demo"


# --- the schema and the file's shape -----------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    return jsonschema.Draft7Validator(schema)


def _schema_errors(validator: jsonschema.Draft7Validator, text: str) -> list[str]:
    """The schema's errors for the file read as YAML 1.2, as the VS Code extension reads it
    (booleans typed, a number where the schema wants a string is an error)."""
    document = YAML(typ="safe", pure=True).load(text)
    return [f"{list(e.absolute_path)}: {e.message[:300]}" for e in validator.iter_errors(document)]


def _generate(*args: str) -> str:
    """The file for this repository's profiles, written outside the checkout (so it names no
    path of its own among the triggers)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "azure-pipelines.gpubuild.yaml"
        done = run_cli("ci", "azure-pipelines", *args, "-o", str(output), cwd=REPO)
        assert done.returncode == 0, done.stderr
        return output.read_text()


SHIPPED = (
    "profiles/onnx-gpu.toml",
    "profiles/torch-cu121.toml",
    "--index",
    "pytorch-cu121=default",
)


@pytest.mark.parametrize(
    "where",
    [
        ("--store", "az://gpucache/gpubuild/prod"),
        ("--store", "az://gpucache/gpubuild/prod", "--registry", "oci://myacr.azurecr.io/gpubuild"),
        ("--registry", "oci://myacr.azurecr.io/gpubuild", "--delivery", "init-copy"),
        ("--store", "https://gpucache.blob.core.windows.net/gpubuild/prod"),
        ("--store", "file:///srv/gpubuild-store", "--code", "README.md"),
    ],
    ids=["azure-store", "store-and-acr", "acr-only", "blob-url", "file-store"],
)
def test_the_shipped_profiles_validate_against_the_schema(
    validator: jsonschema.Draft7Validator, where: tuple[str, ...]
) -> None:
    text = _generate(*SHIPPED, *where)
    assert _schema_errors(validator, text) == []
    assert text == _generate(*SHIPPED, *where)  # deterministic: the same bytes every time


def test_the_schema_check_catches_a_broken_file(validator: jsonschema.Draft7Validator) -> None:
    """The validation has teeth: a wrong task input, a misspelt step key, an unknown task
    version are each refused."""
    text = _generate(*SHIPPED, "--store", "az://gpucache/gpubuild/prod")
    for before, after in [
        ("scriptType: bash", "scriptType: bassh"),
        ("    condition: always()", "    conditon: always()"),
        ("task: Cache@2", "task: Cache@9"),
        ("targetPath:", "targetPth:"),
    ]:
        assert before in text
        assert _schema_errors(validator, text.replace(before, after)), after


def _document(text: str) -> dict[str, Any]:
    loaded = YAML(typ="safe", pure=True).load(text)
    assert isinstance(loaded, dict)
    return loaded


def _steps(document: dict[str, Any]) -> list[dict[str, Any]]:
    return list(document["steps"])


def _scripts(document: dict[str, Any]) -> list[str]:
    out = []
    for step in _steps(document):
        if "script" in step:
            out.append(step["script"])
        elif step.get("task") == "AzureCLI@2":
            out.append(step["inputs"]["inlineScript"])
    return out


def test_the_file_for_the_shipped_profiles() -> None:
    text = _generate(*SHIPPED, "--store", "az://gpucache/gpubuild/prod",
                     "--registry", "oci://myacr.azurecr.io/gpubuild")  # fmt: skip
    document = _document(text)
    assert document["trigger"]["branches"]["include"] == ["main", "dev"]
    assert document["trigger"]["paths"]["include"] == [
        "profiles/onnx-gpu.toml",
        "profiles/onnx-gpu.lock",
        "profiles/bases/ray-2.52.0-py310-cu121.txt",
        "profiles/torch-cu121.toml",
        "profiles/torch-cu121.lock",
    ]
    params = {p["name"]: p for p in document["parameters"]}
    assert params["gpubuildPackage"]["default"] == "gpubuild==0.1.0"
    assert params["store"]["default"] == "az://gpucache/gpubuild/prod"
    assert params["registry"]["default"] == "oci://myacr.azurecr.io/gpubuild"
    assert all("default" in p and p["displayName"] for p in params.values())
    tasks = {s["task"]: s for s in _steps(document) if "task" in s}
    cache = tasks["Cache@2"]["inputs"]
    assert cache["key"] == (
        'gpubuild | "$(Agent.OS)" | "${{ parameters.gpubuildPackage }}" | profiles/onnx-gpu.lock'
        " | profiles/torch-cu121.lock"
    )
    assert cache["path"] == "$(GPUBUILD_CACHE)"
    variables = document["variables"]
    for cached in ("UV_CACHE_DIR", "PIP_CACHE_DIR"):
        assert variables[cached].startswith(variables["GPUBUILD_CACHE"] + "/")
    azure = tasks["AzureCLI@2"]["inputs"]
    assert azure["azureSubscription"] == "${{ parameters.azureServiceConnection }}"
    assert (azure["scriptType"], azure["scriptLocation"]) == ("bash", "inlineScript")
    assert azure["addSpnToEnvironment"] is False and azure["failOnStandardError"] is False
    assert tasks["PublishPipelineArtifact@1"]["inputs"]["targetPath"] == "$(GPUBUILD_ARTIFACT_DIR)"
    assert tasks["UsePythonVersion@0"]["inputs"]["versionSpec"] == "3.11"
    scripts = _scripts(document)
    joined = "\n".join(scripts)
    # Values reach scripts through env:, never pasted into the text, and no secret is written.
    assert "${{" not in joined
    assert scrub(text) == text  # nothing builder.secrets would take for a secret
    for script in scripts:
        assert script.startswith("set -euo pipefail\n")
    check = joined.index(
        "gpubuild resolve profiles/torch-cu121.toml --check --index pytorch-cu121=default"
    )
    assert check < joined.index("gpubuild publish-cache profiles/onnx-gpu.toml")
    assert 'az acr login --name "$acr" --expose-token' in joined


def test_every_script_passes_shellcheck(tmp_path: Path) -> None:
    shellcheck = require_program("shellcheck", "the Debian package shellcheck")
    text = _generate(*SHIPPED, "--store", "az://gpucache/gpubuild/prod",
                     "--registry", "oci://myacr.azurecr.io/gpubuild", "--code", "README.md")  # fmt: skip
    for number, script in enumerate(_scripts(_document(text))):
        path = tmp_path / f"step{number}.sh"
        path.write_text(script)
        done = subprocess.run([shellcheck, "-s", "bash", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}\n{done.stdout}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--store", "https://acct.blob.core.windows.net/c/p?sv=2024&sig=SECRETSIG"),
         "the URL holds credentials"),
        (("--store", "az://acct/gpubuild/prod", "--index-url", "https://u:hunter22@feed.example/simple"),
         "would show its credentials"),
        (("--registry", "az://acct/gpubuild/prod"), "expected oci://REGISTRY/REPOSITORY"),
        (("--store", "az://acct/gpubuild/prod", "--gpubuild-package", "gpubuild @ git+https://u:hunter22@x/g"),
         "without credentials"),
        ((), "give --store"),
        (("--store", "oci://myacr.azurecr.io/gpubuild"), "a registry goes in --registry"),
    ],
    ids=["sas-in-store", "index-password", "registry-not-oci", "package-token", "nowhere", "oci-store"],
)  # fmt: skip
def test_what_the_file_cannot_carry_is_refused(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    output = tmp_path / "pipeline.yaml"
    done = run_cli("ci", "azure-pipelines", "profiles/onnx-gpu.toml", *args, "-o", str(output),
                   cwd=REPO)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "SECRETSIG" not in done.stderr and "hunter22" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not output.exists()


def test_a_profile_outside_the_root_is_refused(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "elsewhere", name="outside", heavy=["x==1"])
    done = run_cli("ci", "azure-pipelines", str(profile), "--store", "file:///srv/store",
                   "-o", str(tmp_path / "p.yaml"), cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert "outside the repository root" in done.stderr


# --- the agent ---------------------------------------------------------------------------------

_EXPRESSION = re.compile(r"\$\{\{\s*parameters\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_MACRO = re.compile(r"\$\(([A-Za-z0-9_.]+)\)")
_PREPEND = re.compile(r"^##vso\[task\.prependpath\](.*)$", re.M)
_SETVARIABLE = re.compile(r"^##vso\[task\.setvariable variable=([^;\]]+)[^\]]*\](.*)$", re.M)


@dataclass
class StepRun:
    name: str
    kind: str
    returncode: int | None  # None: skipped
    output: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Agent:
    """An Azure Pipelines agent on Linux, for one repository checkout."""

    repo: Path
    workspace: Path
    python_bin: Path
    base_env: dict[str, str]
    cache: dict[str, Path]  # the Cache@2 service: key -> saved folder
    sign_in_env: dict[str, str] = field(default_factory=dict)  # what AzureCLI@2's login gives

    def run(self, text: str, parameters: dict[str, str] | None = None) -> list[StepRun]:
        document = _document(text)
        values = {p["name"]: str(p["default"]) for p in document.get("parameters", [])}
        for name, value in (parameters or {}).items():
            assert name in values, f"no parameter {name}"
            values[name] = value
        document = _compile(document, values)
        if self.workspace.exists():
            shutil.rmtree(self.workspace)
        temp = self.workspace / "_temp"
        temp.mkdir(parents=True)
        (self.workspace / "a").mkdir()
        variables = {
            "Build.SourcesDirectory": str(self.repo),
            "System.DefaultWorkingDirectory": str(self.repo),
            "Pipeline.Workspace": str(self.workspace),
            "Agent.BuildDirectory": str(self.workspace),
            "Build.ArtifactStagingDirectory": str(self.workspace / "a"),
            "Agent.TempDirectory": str(temp),
            "Agent.OS": "Linux",
            "Build.SourceBranchName": "main",
        }
        for name, value in (document.get("variables") or {}).items():
            variables[name] = str(value)
        for name in list(variables):
            variables[name] = self.expand(variables[name], variables)
        env = {**self.base_env}
        env.update({name.upper().replace(".", "_"): value for name, value in variables.items()})
        runs: list[StepRun] = []
        saves: list[tuple[str, Path]] = []
        failed = False
        for step in document["steps"]:
            condition = str(step.get("condition", "succeeded()")).replace(" ", "")
            name = step.get("displayName") or step.get("task") or "checkout"
            kind = step.get("task") or ("script" if "script" in step else "checkout")
            if failed and condition != "always()":
                runs.append(StepRun(name, kind, None))
                continue
            step_env = {**env, **{k: self.expand(str(v), variables)
                                  for k, v in (step.get("env") or {}).items()}}  # fmt: skip
            run = self._step(step, kind, name, step_env, variables, saves)
            runs.append(run)
            if run.returncode != 0:
                failed = True
                continue
            for path in _PREPEND.findall(run.output):
                env["PATH"] = f"{path.strip()}:{env['PATH']}"
            for variable, value in _SETVARIABLE.findall(run.output):
                variables[variable] = value
                env[variable.upper().replace(".", "_")] = value
        if not failed:  # Cache@2 saves in the post-job phase of a successful job only
            for key, path in saves:
                if key not in self.cache and path.is_dir():
                    saved = self.workspace.parent / f"cache-{uuid.uuid4().hex[:8]}"
                    shutil.copytree(path, saved, symlinks=True)
                    self.cache[key] = saved
        return runs

    @staticmethod
    def expand(text: str, variables: dict[str, str]) -> str:
        known = {name.lower(): value for name, value in variables.items()}
        return _MACRO.sub(lambda m: known.get(m.group(1).lower(), m.group(0)), text)

    def _step(
        self,
        step: dict[str, Any],
        kind: str,
        name: str,
        env: dict[str, str],
        variables: dict[str, str],
        saves: list[tuple[str, Path]],
    ) -> StepRun:
        inputs = {k: self.expand(str(v), variables) for k, v in (step.get("inputs") or {}).items()}
        if kind == "checkout":
            assert step["checkout"] == "self"
            return StepRun(name, kind, 0)
        if kind == "script":
            return self._bash(name, kind, self.expand(step["script"], variables), env)
        if kind == "UsePythonVersion@0":
            assert inputs["versionSpec"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
            # The task puts its Python first on PATH for the later steps, as this does.
            return StepRun(name, kind, 0, f"##vso[task.prependpath]{self.python_bin}\n", inputs)
        if kind == "Cache@2":
            key = self._cache_key(inputs["key"])
            path = Path(inputs["path"])
            hit = self.cache.get(key)
            if hit is None:
                for prefix in inputs.get("restoreKeys", "").splitlines():
                    prefix_key = self._cache_key(prefix)
                    hit = next((v for k, v in self.cache.items() if k.startswith(prefix_key)), None)
                    if hit is not None:
                        break
            if hit is not None:
                shutil.copytree(hit, path, symlinks=True, dirs_exist_ok=True)
            saves.append((key, path))
            return StepRun(name, kind, 0, f"cache {'restored' if hit else 'miss'}: {key}", inputs)
        if kind == "AzureCLI@2":
            assert (inputs["scriptType"], inputs["scriptLocation"]) == ("bash", "inlineScript")
            return self._bash(name, kind, inputs["inlineScript"], {**env, **self.sign_in_env})
        if kind == "PublishPipelineArtifact@1":
            source = Path(inputs["targetPath"])
            if not source.is_dir():
                return StepRun(name, kind, 1, f"{source} does not exist", inputs)
            shutil.copytree(source, self.workspace / "published" / inputs["artifact"])
            return StepRun(name, kind, 0, "", inputs)
        raise AssertionError(f"a step the agent here does not know: {step}")

    def _bash(self, name: str, kind: str, script: str, env: dict[str, str]) -> StepRun:
        path = Path(env["AGENT_TEMPDIRECTORY"]) / f"{uuid.uuid4().hex}.sh"
        path.write_text(script)
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", str(path)],
            cwd=self.repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
        return StepRun(name, kind, done.returncode, done.stdout)

    def _cache_key(self, key: str) -> str:
        parts = []
        for segment in (s.strip() for s in key.split("|")):
            if segment.startswith('"') and segment.endswith('"'):
                parts.append(segment[1:-1])
            elif "/" in segment or "." in segment:
                # A segment that looks like a path is a file, hashed: it must exist.
                parts.append(hashlib.sha256((self.repo / segment).read_bytes()).hexdigest())
            else:
                parts.append(segment)
        return "|".join(parts)


def _compile(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _compile(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_compile(value, values) for value in node]
    if isinstance(node, str):
        result = _EXPRESSION.sub(lambda m: values[m.group(1)], node)
        assert "${{" not in result, f"an expression the file may not use: {node}"
        return result
    return node


def _step(runs: list[StepRun], kind: str) -> StepRun:
    return next(run for run in runs if run.kind == kind)


def _passed(runs: list[StepRun]) -> None:
    for run in runs:
        assert run.returncode == 0, f"step {run.name!r} ({run.kind}): {run.output}"


# --- running it --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpubuild_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout: what the parameter gpubuildPackage may name (a wheel URL)."""
    source = tmp_path_factory.mktemp("gpubuild-source")
    for name in ("builder", "pyproject.toml", "README.md"):
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(item, source / name)
    wheels = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(wheels), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    [wheel] = wheels.glob("gpubuild-*.whl")
    return wheel


@pytest.fixture
def agent_python(tmp_path: Path) -> Path:
    """The agent's Python (UsePythonVersion@0): a fresh venv, without gpubuild, whose
    site-packages already hold gpubuild's dependencies (those of this test run, linked in),
    as a warm cache would; returns its bin folder."""
    venv = tmp_path / "agent-python"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)  # type: ignore[attr-defined]
    ours = Path(sysconfig.get_paths()["purelib"])
    linked = tmp_path / "agent-deps"
    linked.mkdir()
    for item in ours.iterdir():
        if item.name.startswith(("gpubuild", "__editable__", "pip", "_distutils_hack")) or (
            item.suffix == ".pth"
        ):
            continue
        (linked / item.name).symlink_to(item)
    [site] = (venv / "lib").glob("python3*/site-packages")
    (site / "agent-deps.pth").write_text(f"{linked}\n")
    (venv / "bin" / "uv").symlink_to(Path(sys.executable).parent / "uv")
    return venv / "bin"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A package index of small wheels; yields its URL and its folder."""
    dists = tmp_path_factory.mktemp("ci-dists")
    wheels = [
        build_wheel(dists, "model-a", "1.0", requires=["helper==1.5", "click"],
                    files={"model_a/__init__.py": b"", "model_a/lib/libmodel.so.1": os.urandom(200_000)}),
        build_wheel(dists, "model-a", "2.0", requires=["helper==1.5"]),
        build_wheel(dists, "helper", "1.5"),
        build_wheel(dists, "click", "8.1.7"),
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("ci-index")
    with serve_index(wheels, root) as url:
        yield url, root


@pytest.fixture
def repo(tmp_path: Path, index: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A code repository with a profile and its lock, resolved with the index from uv's
    environment (as an organisation's feed is configured), so no index option is needed."""
    root = tmp_path / "repo"
    write_profile(root / "profiles", name=PROFILE, heavy=["model-a==1.0"])
    monkeypatch.setenv("UV_DEFAULT_INDEX", index[0])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "resolve-cache"))
    ensure_lock(load_profile(root / "profiles" / f"{PROFILE}.toml"))
    (root / "your_tasks.py").write_text("print('tasks')\n")
    return root


@pytest.fixture
def make_agent(
    tmp_path: Path, agent_python: Path, gpubuild_wheel: Path, index: tuple[str, Path]
) -> Callable[..., Agent]:
    cache: dict[str, Path] = {}

    def make(repo: Path, **sign_in: str) -> Agent:
        home = tmp_path / "agent-home"
        home.mkdir(exist_ok=True)
        env = {
            "PATH": os.environ["PATH"].replace(str(Path(sys.executable).parent) + ":", ""),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            # The organisation's settings on the agent: its package feed for uv, and pip
            # never reaching for an index (gpubuild comes as a wheel, its dependencies are in).
            "UV_DEFAULT_INDEX": index[0],
            "PIP_NO_INDEX": "1",
            "DOCKER_CONFIG": str(tmp_path / "docker-config"),
        }
        return Agent(repo, tmp_path / "work" / "1", agent_python, env, cache, dict(sign_in))

    return make


def _pipeline(repo: Path, *args: str) -> str:
    done = run_cli("ci", "azure-pipelines", f"profiles/{PROFILE}.toml", *args, "--code",
                   "your_tasks.py", cwd=repo)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return (repo / "azure-pipelines.gpubuild.yaml").read_text()


def _digest(repo: Path) -> str:
    return read_lock(repo / "profiles" / f"{PROFILE}.lock").digest()


KINDS = ["checkout", "UsePythonVersion@0", "Cache@2", "script", "script", "script",
         "script", "PublishPipelineArtifact@1", "script"]  # fmt: skip


def test_the_steps_pass_in_order_against_a_file_store(
    tmp_path: Path, repo: Path, make_agent: Callable[..., Agent], gpubuild_wheel: Path,
    index: tuple[str, Path], validator: jsonschema.Draft7Validator,
) -> None:  # fmt: skip
    store = tmp_path / "store"
    text = _pipeline(repo, "--store", store.as_uri())
    assert _schema_errors(validator, text) == []
    agent = make_agent(repo)
    runs = agent.run(text, {"gpubuildPackage": str(gpubuild_wheel)})
    _passed(runs)
    assert [run.kind for run in runs] == KINDS
    digest = _digest(repo)
    assert (store / PROFILE / digest / "manifest.json").is_file()
    install, check, publish, dockerfile = (r.output for r in runs[3:7])
    assert "gpubuild, version 0.1.0" in install
    assert f"profiles/{PROFILE}.lock is current" in check
    assert re.search(rf"{PROFILE} {digest[:12]}\S*: \d+ shards? written", publish), publish
    out = agent.workspace / "published" / "gpubuild" / PROFILE
    assert sorted(p.name for p in out.iterdir()) == [
        "Dockerfile", "dockerfile.json", "init-container.yaml", "init.sh"]  # fmt: skip
    script = (out / "init.sh").read_text()
    assert digest in script
    subprocess.run(["bash", "-n", str(out / "init.sh")], check=True)
    snippet = YAML(typ="safe", pure=True).load((out / "init-container.yaml").read_text())
    assert "gpubuild-sas" in json.dumps(snippet)
    assert "COPY your_tasks.py /app/your_tasks.py" in (out / "Dockerfile").read_text()
    assert "disk budget of the worker image for ci-demo: incomplete" in dockerfile
    assert "##vso[task.logissue type=warning]ci-demo: the disk budget is incomplete" in dockerfile
    disk = runs[-1].output
    for folder in ("gpubuild-cache/uv", "_temp/gpubuild-home", "a/gpubuild"):
        assert re.search(rf"^\d\S*\s+{re.escape(str(agent.workspace / folder))}$", disk, re.M), disk
    # pip installed a wheel file with no index: nothing to cache, and the report says so.
    assert f"0\t{agent.workspace / 'gpubuild-cache/pip'} (not made)" in disk
    assert "Filesystem" in disk
    # The job succeeded, so Cache@2 saved its folder under a key that hashes the lock.
    [key] = agent.cache
    lock_hash = hashlib.sha256((repo / "profiles" / f"{PROFILE}.lock").read_bytes()).hexdigest()
    assert key.endswith(lock_hash) and key.startswith(f"gpubuild|Linux|{gpubuild_wheel}")

    # A re-run to the same store uploads nothing.
    blobs = {p.name: p.stat().st_mtime_ns for p in (store / "blobs").iterdir()}
    runs = agent.run(text, {"gpubuildPackage": str(gpubuild_wheel)})
    _passed(runs)
    assert "cache restored" in _step(runs, "Cache@2").output
    assert "already published, nothing uploaded" in runs[5].output
    assert {p.name: p.stat().st_mtime_ns for p in (store / "blobs").iterdir()} == blobs

    # A re-run that must pack again (a new store) downloads no wheel: the index has none left,
    # and the restored uv cache is enough.
    for wheel in index[1].rglob("*.whl"):
        wheel.rename(wheel.with_suffix(".whl.gone"))
    try:
        other = tmp_path / "other-store"
        runs = agent.run(text, {"gpubuildPackage": str(gpubuild_wheel), "store": other.as_uri()})
    finally:
        for wheel in index[1].rglob("*.whl.gone"):
            wheel.rename(wheel.with_suffix(""))
    _passed(runs)
    assert (other / PROFILE / digest / "manifest.json").is_file()


def test_a_stale_lock_fails_the_run_before_anything_is_published(
    tmp_path: Path, repo: Path, make_agent: Callable[..., Agent], gpubuild_wheel: Path
) -> None:
    store = tmp_path / "store"
    text = _pipeline(repo, "--store", store.as_uri())
    profile = repo / "profiles" / f"{PROFILE}.toml"
    profile.write_text(profile.read_text().replace('"model-a==1.0"', '"model-a==2.0"'))
    runs = make_agent(repo).run(text, {"gpubuildPackage": str(gpubuild_wheel)})
    check = runs[4]
    assert check.returncode == 1
    assert "profile edited (ci-demo.toml): it asks for model-a==2.0, the lock has model-a 1.0" in (
        check.output
    )
    assert [run.returncode for run in runs[5:8]] == [None, None, None]  # skipped
    assert runs[-1].returncode == 0  # the disk report runs always
    assert not store.exists()


def test_the_disk_budget_gate_fails_the_run(
    tmp_path: Path, repo: Path, make_agent: Callable[..., Agent], gpubuild_wheel: Path
) -> None:
    text = _pipeline(repo, "--store", (tmp_path / "store").as_uri())
    runs = make_agent(repo).run(
        text, {"gpubuildPackage": str(gpubuild_wheel), "diskBudgetGb": "0.000000001"}
    )
    dockerfile = runs[6]
    assert dockerfile.returncode == 1
    assert "OVER BUDGET" in dockerfile.output
    assert runs[7].returncode is None  # no artifact from a failed run


def test_a_gpubuild_of_another_version_is_refused(
    tmp_path: Path, repo: Path, make_agent: Callable[..., Agent], gpubuild_wheel: Path
) -> None:
    """The install step insists on the version the file was generated by (and the locks were
    resolved with): a wheel that claims another version fails it, with the reason."""
    text = _pipeline(repo, "--store", (tmp_path / "store").as_uri())
    text = text.replace("gpubuild, version 0.1.0", "gpubuild, version 9.9.9")
    runs = make_agent(repo).run(text, {"gpubuildPackage": str(gpubuild_wheel)})
    assert runs[3].returncode == 1
    assert "##vso[task.logissue type=error]" in runs[3].output
    assert "installed 'gpubuild, version 0.1.0', not gpubuild" in runs[3].output


@pytest.mark.azurite
def test_the_steps_pass_against_azurite_and_a_registry(
    tmp_path: Path, repo: Path, make_agent: Callable[..., Agent], gpubuild_wheel: Path,
    azurite_endpoint: AzuriteEndpoint, registry_address: str,
    validator: jsonschema.Draft7Validator,
) -> None:  # fmt: skip
    container = f"ci-{uuid.uuid4().hex[:10]}"
    repository = f"gpubuild/ci{uuid.uuid4().hex[:8]}"
    registry = f"oci+http://{registry_address}/{repository}"
    text = _pipeline(repo, "--store", f"az://{azurite_endpoint.account}/{container}/prod",
                     "--registry", registry)  # fmt: skip
    assert _schema_errors(validator, text) == []
    assert "task: AzureCLI@2" in text
    # The service connection's sign-in, here: Azurite's account, which gpubuild reads from
    # the environment as it would read the az CLI's sign-in on the agent.
    agent = make_agent(repo, AZURE_STORAGE_CONNECTION_STRING=azurite_endpoint.connection_string)
    runs = agent.run(text, {"gpubuildPackage": str(gpubuild_wheel)})
    _passed(runs)
    assert [run.kind for run in runs] == [*KINDS[:5], "AzureCLI@2", *KINDS[6:]]
    digest = _digest(repo)
    client = azurite_endpoint.blob_service_client().get_container_client(container)
    names = {blob.name for blob in client.list_blobs()}
    assert f"prod/{PROFILE}/{digest}/manifest.json" in names
    tags = requests.get(f"http://{registry_address}/v2/{repository}/tags/list", timeout=10).json()
    assert f"{PROFILE}-{digest[:16]}" in tags["tags"]
    out = agent.workspace / "published" / "gpubuild" / PROFILE
    volume = (out / "image-volume.yaml").read_text()
    assert f"{registry_address}/{repository}@sha256:" in volume
    assert f"/{container}/prod" in (out / "init.sh").read_text()
    # Nothing secret in any step's output or any file handed over.
    key = azurite_endpoint.key
    assert all(key not in run.output for run in runs)
    assert all(key not in p.read_text() for p in out.iterdir())
    assert key not in text
