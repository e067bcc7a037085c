"""`gpubuild doctor`: its ELF reader and library search, and a real run inside a container.

The container test is the one that matters: the local Debian base image (python3.11, pip) with
a distribution installed into its own site-packages, a shared folder built here with uv (one
wheel there shadows that distribution at another version) and two shared libraries built with
gcc (libneed.so NEEDS libprovided.so.1, which lives in a folder not on LD_LIBRARY_PATH), mounted
read-only at /shared-packages; doctor.py mounted beside it and run with the image's python3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from builder import doctor
from builder.tools import uv_bin
from tests.helpers import docker_context, run_cli
from tests.support.wheels import build_wheel

LIBS = Path(__file__).parent / "fixtures" / "doctor-libs"
DOCTOR = Path(doctor.__file__)
LIB_FOLDER = "nvidia/fake/lib"  # where libprovided.so.1 sits in the shared folder
EXT_FOLDER = "fakeext"  # where libneed.so sits


def _gcc(*args: str) -> None:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the fixture libraries (Debian package gcc)"
    subprocess.run([gcc, "-shared", "-fPIC", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def built_libs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libprovided.so.1 (soname libprovided.so.1), libneed.so (NEEDS it), and two variants of
    libneed that find it by $ORIGIN: one with DT_RUNPATH, one with DT_RPATH."""
    out = tmp_path_factory.mktemp("libs")
    _gcc(
        "-Wl,-soname,libprovided.so.1",
        "-o",
        str(out / "libprovided.so.1"),
        str(LIBS / "provided.c"),
    )
    (out / "libprovided.so").symlink_to("libprovided.so.1")
    link = [str(LIBS / "need.c"), f"-L{out}", "-lprovided"]
    _gcc("-Wl,-soname,libneed.so", "-o", str(out / "libneed.so"), *link)
    _gcc("-o", str(out / "librunpath.so"), *link, "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib")
    _gcc("-o", str(out / "librpath.so"), *link, "-Wl,--disable-new-dtags,-rpath,${ORIGIN}/../lib")
    return out


def _shared_tree(root: Path, libs: Path) -> None:
    (root / LIB_FOLDER).mkdir(parents=True, exist_ok=True)
    (root / EXT_FOLDER).mkdir(parents=True, exist_ok=True)
    shutil.copy(libs / "libprovided.so.1", root / LIB_FOLDER / "libprovided.so.1")
    shutil.copy(libs / "libneed.so", root / EXT_FOLDER / "libneed.so")


def test_read_elf_reads_what_gcc_wrote(built_libs: Path) -> None:
    need = doctor.read_elf(str(built_libs / "libneed.so"))
    assert need is not None
    assert need.needed == ("libprovided.so.1", "libc.so.6")
    assert need.soname == "libneed.so"
    assert (need.rpath, need.runpath) == ((), ())
    assert need.machine == doctor.elf_header(str(built_libs / "libprovided.so.1"))
    provided = doctor.read_elf(str(built_libs / "libprovided.so.1"))
    assert provided is not None and provided.soname == "libprovided.so.1"
    runpath = doctor.read_elf(str(built_libs / "librunpath.so"))
    rpath = doctor.read_elf(str(built_libs / "librpath.so"))
    assert runpath is not None and runpath.runpath == ("$ORIGIN/../lib",) and runpath.rpath == ()
    assert rpath is not None and rpath.rpath == ("${ORIGIN}/../lib",) and rpath.runpath == ()
    assert doctor.read_elf(str(LIBS / "need.c")) is None  # not ELF: skipped, not an error


def test_library_search_follows_ld_so(built_libs: Path, tmp_path: Path) -> None:
    _shared_tree(tmp_path, built_libs)
    need = str(tmp_path / EXT_FOLDER / "libneed.so")
    info = doctor.read_elf(need)
    assert info is not None
    nowhere = doctor.LibrarySearch([], {}, [])
    assert nowhere.find("libprovided.so.1", need, info) is None
    lib_dir = str(tmp_path / LIB_FOLDER)
    on_path = doctor.LibrarySearch([lib_dir], {}, [])
    assert on_path.find("libprovided.so.1", need, info) == os.path.join(lib_dir, "libprovided.so.1")
    cached = doctor.LibrarySearch([], {"libprovided.so.1": [f"{lib_dir}/libprovided.so.1"]}, [])
    assert cached.find("libprovided.so.1", need, info) is not None
    # $ORIGIN: a library whose RUNPATH (or RPATH) names ../lib finds it without LD_LIBRARY_PATH.
    for variant in ("librunpath.so", "librpath.so"):
        placed = tmp_path / "nvidia" / "fake" / "bin" / variant
        placed.parent.mkdir(exist_ok=True)
        shutil.copy(built_libs / variant, placed)
        placed_info = doctor.read_elf(str(placed))
        assert placed_info is not None
        assert nowhere.find("libprovided.so.1", str(placed), placed_info) is not None, variant
    # A file of the right name but not a usable ELF is skipped, as ld.so skips it.
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "libprovided.so.1").write_text("not a library")
    assert doctor.LibrarySearch([str(decoy)], {}, []).find("libprovided.so.1", need, info) is None


def test_check_libraries_names_the_folder_that_fixes_it(built_libs: Path, tmp_path: Path) -> None:
    _shared_tree(tmp_path, built_libs)
    broken = doctor.check_libraries(
        str(tmp_path), doctor.LibrarySearch.from_environment({"LD_LIBRARY_PATH": ""})
    )
    assert broken.status == doctor.FAIL
    assert broken.details == [
        f"libprovided.so.1 (needed by {EXT_FOLDER}/libneed.so): "
        f"add {tmp_path / LIB_FOLDER} to LD_LIBRARY_PATH"
    ]
    fixed = doctor.check_libraries(
        str(tmp_path),
        doctor.LibrarySearch.from_environment({"LD_LIBRARY_PATH": str(tmp_path / LIB_FOLDER)}),
    )
    assert fixed.status == doctor.PASS, fixed


def test_doctor_on_this_machine_reports_missing_gpu_packages_as_not_present(
    tmp_path: Path,
) -> None:
    """Run as a worker would: `python3 doctor.py`, standalone, PYTHONPATH naming the folder."""
    shared = tmp_path / "shared"
    wheel = build_wheel(tmp_path / "wheels", "doctor-fixture-only", "1.0")
    subprocess.run(
        [uv_bin(), "pip", "install", "--quiet", "--no-index", "--target", str(shared),
         "--python", sys.executable, str(wheel)],
        check=True,
    )  # fmt: skip
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(DOCTOR, alone / "doctor.py")  # no gpubuild next to it
    env = {**os.environ, "PYTHONPATH": f"{shared}:/app"}
    env.pop("LD_LIBRARY_PATH", None)
    proc = subprocess.run(
        [sys.executable, str(alone / "doctor.py"), "--json",
         "--shared", str(shared)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    statuses = {c["name"]: (c["status"], c["message"]) for c in report["checks"]}
    assert statuses["torch"] == ("skip", "not present")
    assert statuses["onnxruntime"] == ("skip", "not present")
    assert {name: s for name, (s, _) in statuses.items()} == {
        "shared-dir": "pass", "sys.path": "pass", "shadowed": "pass", "pruned": "skip",
        "libraries": "pass",
        "torch": "skip", "onnxruntime": "skip",
    }  # fmt: skip
    assert proc.returncode == 0 and report["ok"] is True

    env["PYTHONPATH"] = f"/app:{shared}"
    text = subprocess.run(
        [sys.executable, str(alone / "doctor.py"), "--shared", str(shared)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert text.returncode == 1
    assert "FAIL  sys.path" in text.stdout and "/app comes before" in text.stdout

    missing = run_cli("doctor", "--shared", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1
    assert "FAIL  shared-dir" in missing.stdout and "does not exist" in missing.stdout


def _run_doctor(
    client: docker.DockerClient, image: str, shared: Path, script: Path, env: dict[str, str]
) -> tuple[int, dict]:
    container = client.containers.run(
        image,
        ["python3", "/opt/doctor/doctor.py", "--json"],
        volumes={
            str(shared): {"bind": "/shared-packages", "mode": "ro"},
            str(script.parent): {"bind": "/opt/doctor", "mode": "ro"},
        },
        environment=env,
        network_mode="host",
        detach=True,
    )
    try:
        status = container.wait(timeout=300)["StatusCode"]
        output = container.logs(stdout=True, stderr=False).decode()
        errors = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    assert output.strip(), errors
    return status, json.loads(output)


def test_doctor_in_a_container_finds_shadow_and_missing_library_folder(
    tmp_path: Path, docker_client: docker.DockerClient, base_image: str, built_libs: Path
) -> None:
    wheels = tmp_path / "wheels"
    image_wheel = build_wheel(wheels / "image", "shadow-me", "1.0")
    shared_wheels = [
        build_wheel(wheels / "shared", "shadow-me", "2.0"),
        build_wheel(wheels / "shared", "only-shared", "0.3"),
    ]
    tag = "gpubuild-test/doctor-worker:latest"
    docker_client.images.build(
        fileobj=docker_context(
            {
                "Dockerfile": (
                    f"FROM {base_image}\nCOPY {image_wheel.name} /tmp/\n"
                    "RUN python3 -m pip install --no-index --no-deps --break-system-packages "
                    f"/tmp/{image_wheel.name} && rm /tmp/{image_wheel.name}\n"
                ).encode(),
                image_wheel.name: image_wheel.read_bytes(),
            }
        ),
        custom_context=True,
        tag=tag,
        network_mode="host",
        rm=True,
    )
    script = tmp_path / "doctor" / "doctor.py"
    script.parent.mkdir()
    shutil.copy(DOCTOR, script)

    def shared_folder(name: str, dists: list[Path]) -> Path:
        folder = tmp_path / name
        subprocess.run(
            [uv_bin(), "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
             str(folder), "--python", sys.executable, *map(str, dists)],
            check=True,
        )  # fmt: skip
        _shared_tree(folder, built_libs)
        return folder

    try:
        broken = shared_folder("shared-broken", shared_wheels)
        status, report = _run_doctor(
            docker_client, tag, broken, script, {"PYTHONPATH": "/shared-packages:/app"}
        )
        checks = {c["name"]: c for c in report["checks"]}
        assert status == 1 and report["ok"] is False
        assert checks["sys.path"]["status"] == "pass"
        assert checks["shadowed"]["status"] == "fail"
        [clash] = [d for d in checks["shadowed"]["details"] if "shadows" in d]
        assert clash.startswith("shadow-me 2.0 in /shared-packages shadows shadow-me 1.0 in /")
        assert "only-shared" not in json.dumps(checks["shadowed"])
        assert checks["libraries"]["status"] == "fail"
        assert checks["libraries"]["details"] == [
            f"libprovided.so.1 (needed by {EXT_FOLDER}/libneed.so): "
            f"add /shared-packages/{LIB_FOLDER} to LD_LIBRARY_PATH"
        ]  # libc.so.6, the other NEEDED entry, resolves through the image's ldconfig cache
        assert (checks["torch"]["status"], checks["torch"]["message"]) == ("skip", "not present")
        assert checks["onnxruntime"]["status"] == "skip"

        fixed = shared_folder("shared-fixed", shared_wheels[1:])
        status, report = _run_doctor(
            docker_client,
            tag,
            fixed,
            script,
            {
                "PYTHONPATH": "/shared-packages:/app",
                "LD_LIBRARY_PATH": f"/shared-packages/{LIB_FOLDER}",
            },
        )
        assert status == 0, report
        assert report["ok"] is True
        assert {c["name"]: c["status"] for c in report["checks"]} == {
            "shared-dir": "pass", "sys.path": "pass", "shadowed": "pass", "pruned": "skip",
        "libraries": "pass",
            "torch": "skip", "onnxruntime": "skip",
        }  # fmt: skip
    finally:
        docker_client.images.remove(tag, force=True)


@pytest.mark.network
def test_onnxruntime_without_cuda_is_a_clear_fail_and_the_tiny_model_is_valid(
    tmp_path: Path,
) -> None:
    """The CPU onnxruntime from the public index: no CUDAExecutionProvider is a FAIL line, not
    a crash; and the hand-encoded model runs (so the GPU session test can trust it)."""
    shared = tmp_path / "shared"
    subprocess.run(
        [uv_bin(), "pip", "install", "--quiet", "--target", str(shared), "--python",
         sys.executable, "onnxruntime", "numpy"],
        check=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(shared)}
    model = doctor.tiny_onnx_model().hex()
    ran = subprocess.run(
        [sys.executable, "-c",
         "import sys, numpy, onnxruntime as ort\n"
         "s = ort.InferenceSession(bytes.fromhex(sys.argv[1]), providers=['CPUExecutionProvider'])\n"
         "print(s.run(None, {'x': numpy.array([3.5], dtype=numpy.float32)})[0][0])",
         model],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert ran.stdout.strip() == "3.5"
    proc = subprocess.run(
        [sys.executable, str(DOCTOR), "--json", "--shared", str(shared)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["onnxruntime"]["status"] == "fail"
    assert "offers no CUDAExecutionProvider" in checks["onnxruntime"]["message"]
    assert proc.returncode == 1


# --- the torch and onnxruntime probes, against fake packages that crash or fail as real ones do --

ORT_VERSION = "1.19.2"
TORCH_VERSION = "2.4.0"
# Sonames that no machine provides: the fake provider libraries NEED them, and the stubs they
# were linked against are deleted, so they never resolve (as libnvinfer.so.10 does not beside
# onnxruntime-gpu, which does not ship TensorRT).
MISSING_TRT_DEP = "libnvinfer-doctor-fixture.so.10"
MISSING_CUDA_DEP = "libcublasLt-doctor-fixture.so.12"

# A stand-in for onnxruntime-gpu: what the probe uses (version, providers, a session) and
# nothing else; the provider libraries are the files in onnxruntime/capi/.
FAKE_ORT = f'''
__version__ = "{ORT_VERSION}"


def get_available_providers():
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class SessionOptions:
    log_severity_level = 2


class InferenceSession:
    def __init__(self, model, options=None, providers=None):
        self._providers = [*(providers or []), "CPUExecutionProvider"]

    def get_providers(self):
        return self._providers
'''
FAKE_IMPORT_ERROR = (
    'raise ImportError("libcudnn.so.9: cannot open shared object file: No such file or '
    'directory")\n'
)
# A torch whose torch.cuda.is_available() loads the crashing library, as a CUDA build does
# when it initialises the driver.
FAKE_TORCH = f'''
import ctypes
import os

__version__ = "{TORCH_VERSION}"


class version:
    cuda = "12.1"


class cuda:
    @staticmethod
    def is_available():
        ctypes.CDLL(os.path.join(os.path.dirname(__file__), "libsegv.so"))
        return True

    @staticmethod
    def device_count():
        return 1
'''


@pytest.fixture(scope="module")
def provider_libs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libsegv.so (its constructor raises SIGSEGV), libplain.so (loads fine), and provider
    libraries whose DT_NEEDED names a library that no longer exists anywhere."""
    out = tmp_path_factory.mktemp("provider-libs")
    _gcc("-o", str(out / "libsegv.so"), str(LIBS / "segv.c"))
    _gcc("-o", str(out / "libplain.so"), str(LIBS / "provided.c"))
    stubs = out / "stubs"
    stubs.mkdir()
    for soname, provider in (
        (MISSING_TRT_DEP, "libonnxruntime_providers_tensorrt.so"),
        (MISSING_CUDA_DEP, "libcuda-provider-missing-dep.so"),
    ):
        _gcc(f"-Wl,-soname,{soname}", "-o", str(stubs / soname), str(LIBS / "provided.c"))
        _gcc("-o", str(out / provider), str(LIBS / "need.c"), f"-L{stubs}", f"-l:{soname}")
    shutil.rmtree(stubs)  # gone: what NEEDS them cannot resolve them
    return out


def _fake_package(shared: Path, name: str, init: str, files: dict[str, Path] | None = None) -> None:
    """shared/<name>/__init__.py with `init`, and `files` (relative path -> source) copied in."""
    package = shared / name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(init)
    for relative, source in (files or {}).items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, package / relative)


def _doctor_json(shared: Path, cwd: Path) -> tuple[int, dict[str, dict]]:
    """`python doctor.py --json --shared SHARED` with SHARED first on PYTHONPATH, as in a pod."""
    env = {**os.environ, "PYTHONPATH": str(shared)}
    env.pop("LD_LIBRARY_PATH", None)
    proc = subprocess.run(
        [sys.executable, str(DOCTOR), "--json", "--shared", str(shared)],
        capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=600,
    )  # fmt: skip
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is (proc.returncode == 0)
    return proc.returncode, {c["name"]: c for c in report["checks"]}


def test_onnxruntime_probe_tells_a_crash_from_an_import_failure(
    provider_libs: Path, tmp_path: Path
) -> None:
    crashing = tmp_path / "crashing"
    _fake_package(
        crashing,
        "onnxruntime",
        FAKE_ORT,
        {"capi/libonnxruntime_providers_cuda.so": provider_libs / "libsegv.so"},
    )
    status, checks = _doctor_json(crashing, tmp_path)
    assert status == 1
    assert {name: c["status"] for name, c in checks.items()} == {
        "shared-dir": "pass", "sys.path": "pass", "shadowed": "pass", "pruned": "skip",
        "libraries": "pass",
        "torch": "skip", "onnxruntime": "fail",
    }  # fmt: skip
    assert checks["onnxruntime"]["message"] == (
        f"onnxruntime {ORT_VERSION} imports, but loading libonnxruntime_providers_cuda.so "
        "crashed the probe (SIGSEGV)"
    )

    # A crash in the import itself is still a crash, not an ImportError.
    crashing_import = tmp_path / "crashing-import"
    _fake_package(
        crashing_import,
        "onnxruntime",
        "import ctypes, os\nctypes.CDLL(os.path.join(os.path.dirname(__file__), 'libsegv.so'))\n",
        {"libsegv.so": provider_libs / "libsegv.so"},
    )
    status, checks = _doctor_json(crashing_import, tmp_path)
    assert status == 1
    assert checks["onnxruntime"]["status"] == "fail"
    assert checks["onnxruntime"]["message"] == "import onnxruntime crashed the probe (SIGSEGV)"

    failing = tmp_path / "failing"
    _fake_package(failing, "onnxruntime", FAKE_IMPORT_ERROR)
    status, checks = _doctor_json(failing, tmp_path)
    assert status == 1
    assert checks["onnxruntime"]["status"] == "fail"
    assert checks["onnxruntime"]["message"] == (
        "import onnxruntime fails: ImportError: libcudnn.so.9: cannot open shared object file: "
        "No such file or directory"
    )
    assert "crashed" not in json.dumps(checks["onnxruntime"])


def test_torch_probe_tells_a_crash_from_an_import_failure(
    provider_libs: Path, tmp_path: Path
) -> None:
    crashing = tmp_path / "crashing"
    _fake_package(crashing, "torch", FAKE_TORCH, {"libsegv.so": provider_libs / "libsegv.so"})
    status, checks = _doctor_json(crashing, tmp_path)
    assert status == 1
    assert {name: c["status"] for name, c in checks.items()} == {
        "shared-dir": "pass", "sys.path": "pass", "shadowed": "pass", "pruned": "skip",
        "libraries": "pass",
        "torch": "fail", "onnxruntime": "skip",
    }  # fmt: skip
    assert checks["torch"]["message"] == (
        f"torch {TORCH_VERSION} imports, but torch.cuda.is_available() crashed the probe (SIGSEGV)"
    )

    failing = tmp_path / "failing"
    _fake_package(failing, "torch", FAKE_IMPORT_ERROR)
    status, checks = _doctor_json(failing, tmp_path)
    assert status == 1
    assert checks["torch"]["status"] == "fail"
    assert checks["torch"]["message"] == (
        "import torch fails: ImportError: libcudnn.so.9: cannot open shared object file: "
        "No such file or directory"
    )
    assert "crashed" not in json.dumps(checks["torch"])


def test_optional_tensorrt_provider_without_tensorrt_is_a_note_not_a_fail(
    provider_libs: Path, tmp_path: Path
) -> None:
    """onnxruntime-gpu ships libonnxruntime_providers_tensorrt.so but not TensorRT: a correct
    install passes; a missing dependency of the CUDA provider still fails."""
    shared = tmp_path / "shared"
    capi = "capi/libonnxruntime_providers_"
    _fake_package(
        shared,
        "onnxruntime",
        FAKE_ORT,
        {
            f"{capi}cuda.so": provider_libs / "libplain.so",
            f"{capi}shared.so": provider_libs / "libplain.so",
            f"{capi}tensorrt.so": provider_libs / "libonnxruntime_providers_tensorrt.so",
        },
    )
    (shared / ".gpubuild").mkdir()
    (shared / ".gpubuild" / "installed").write_text("0123abcd store\n")
    status, checks = _doctor_json(shared, tmp_path)
    assert {name: c["status"] for name, c in checks.items()} == {
        "shared-dir": "pass", "sys.path": "pass", "shadowed": "pass", "pruned": "skip",
        "libraries": "pass",
        "torch": "skip", "onnxruntime": "pass",
    }  # fmt: skip
    assert status == 0
    assert checks["shared-dir"]["details"] == [
        "installed by gpubuild: 0123abcd (from the verified store)"
    ]
    [note] = checks["libraries"]["details"]
    assert note.startswith(
        f"note: {MISSING_TRT_DEP} (needed by onnxruntime/{capi}tensorrt.so): optional"
    )
    assert "TensorRT" in note

    shutil.copy(
        provider_libs / "libcuda-provider-missing-dep.so", shared / "onnxruntime" / f"{capi}cuda.so"
    )
    status, checks = _doctor_json(shared, tmp_path)
    assert status == 1
    assert checks["libraries"]["status"] == "fail"
    assert checks["libraries"]["message"].startswith("1 library does not resolve")
    assert checks["libraries"]["details"][0] == (
        f"{MISSING_CUDA_DEP} (needed by onnxruntime/{capi}cuda.so): "
        f"not in {shared}: the image must provide it"
    )
    assert checks["libraries"]["details"][1] == note
    assert checks["onnxruntime"]["status"] == "fail"
    assert "does not load" in checks["onnxruntime"]["message"]

    # A library that the CUDA provider needs too is not optional, whoever else needs it.
    shutil.copy(
        provider_libs / "libonnxruntime_providers_tensorrt.so",
        shared / "onnxruntime" / f"{capi}cuda.so",
    )
    both = doctor.check_libraries(str(shared), doctor.LibrarySearch.from_environment({}))
    assert both.status == doctor.FAIL
    assert both.details == [
        f"{MISSING_TRT_DEP} (needed by onnxruntime/{capi}cuda.so, onnxruntime/{capi}tensorrt.so): "
        f"not in {shared}: the image must provide it"
    ]


@pytest.mark.parametrize(
    ("marker", "shown"),
    [
        ("0123abcd store\n", "0123abcd (from the verified store)"),
        ("0123abcd pip\n", "0123abcd (by the pip fallback: not verified)"),
        ("0123abcd\n", "0123abcd (from the verified store)"),  # the init script's default
    ],
)
def test_installed_marker_says_where_the_set_came_from(
    tmp_path: Path, marker: str, shown: str
) -> None:
    (tmp_path / ".gpubuild").mkdir()
    (tmp_path / ".gpubuild" / "installed").write_text(marker)
    (tmp_path / "somepackage").mkdir()
    check = doctor.check_shared_dir(str(tmp_path))
    assert check.status == doctor.PASS
    assert check.details == [f"installed by gpubuild: {shown}"]


def test_a_probe_that_hangs_or_finds_a_leftover_folder_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step a hung probe was in is named; a folder without __init__.py is not "imports"."""
    hanging = tmp_path / "hanging"
    _fake_package(
        hanging,
        "onnxruntime",
        FAKE_ORT + "\n\ndef get_available_providers():\n    import time\n    time.sleep(120)\n",
    )
    monkeypatch.setenv("PYTHONPATH", str(hanging))
    monkeypatch.setattr(doctor, "_PROBE_TIMEOUT", 3)
    check = doctor.check_onnxruntime()
    assert (check.status, check.message) == (
        doctor.FAIL,
        f"onnxruntime {ORT_VERSION} imports, but listing its execution providers gave no "
        "answer within 3 s",
    )

    leftover = tmp_path / "leftover"
    (leftover / "torch" / "lib").mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", str(leftover))
    check = doctor.check_torch()
    assert check.status == doctor.FAIL
    assert check.message.startswith(
        f"import torch finds only a folder without __init__.py ({leftover / 'torch'})"
    )
