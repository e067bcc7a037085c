#!/usr/bin/env python3
"""`gpubuild doctor`: look inside a running worker container for what `check` cannot read off files.

Runs with the image's own interpreter and the standard library only, so it works where gpubuild
is not installed (copy this one file in, or pipe it in):

    kubectl exec -i POD -c ray-worker -- python3 - --json < builder/doctor.py
    python3 doctor.py [--json] [--shared /shared-packages]

It is one long file on purpose: piped into a container's python it must be whole, so it cannot
be split into modules or import anything of gpubuild's.

Checks, each a PASS / FAIL / SKIP line (exit 1 when any fails):
  shared-dir  the shared folder exists and no gpubuild install was left half done;
  sys.path    the shared folder is on sys.path, before site-packages and before /app;
  shadowed    distributions in the shared folder that the image has at another version;
  pruned      distributions shipped without their build-only files ([policy] prune);
  libraries   shared libraries (.so) in the shared folder whose DT_NEEDED entries do not resolve
              the way ld.so would look for them (the file's RPATH/RUNPATH, LD_LIBRARY_PATH, the
              ldconfig cache, the default folders), grouped by library, with the shared folder
              that holds it (the LD_LIBRARY_PATH entry that fixes it); one needed only by an
              optional onnxruntime execution provider (TensorRT, OpenVINO, ...: every
              libonnxruntime_providers_*.so but the CUDA one and the shared bridge) is a note;
  torch       when importable: torch.cuda.is_available();
  onnxruntime when importable: CUDAExecutionProvider offered, its library loads (dlopen), and a
              session on a tiny built-in model really runs on it (onnxruntime falls back to CPU
              without an error otherwise).
torch and onnxruntime are probed in child processes: a broken CUDA install can crash the
interpreter that imports it, and the doctor must still report. The child prints one line per step
as it goes, so a child killed by a signal is reported with the step it was in ("imports, but
loading libonnxruntime_providers_cuda.so crashed the probe (SIGSEGV)"), apart from an import that
fails (the exception's text).

Not modelled in `libraries`: a library satisfied only because its loader's DT_RPATH is inherited
or because another library with that soname was loaded first (torch preloads its CUDA
libraries by path); such a library is reported, and resolves once LD_LIBRARY_PATH names its
folder, which is what gpubuild's manifest env does.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import re
import shutil
import signal
import site
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field

PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"
DEFAULT_SHARED = "/shared-packages"
APP_DIR = "/app"
DEFAULT_LIBRARY_DIRS = (
    "/lib",
    "/usr/lib",
    "/lib64",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
)
# Provided by the NVIDIA container runtime on a GPU node, never by a package.
_DRIVER_LIBRARY = re.compile(r"^(libcuda\.so|libnvidia-|libnvcuvid\.so|libcudadebugger\.so)")
_SHARED_OBJECT = re.compile(r"\.so(\.\d+)*$")
_STATE_DIR = ".gpubuild"  # the init script's bookkeeping (installed digest, lock, staging)
_PROBE_TIMEOUT = 300
# onnxruntime's execution provider libraries. The CUDA one is what this doctor judges, and the
# shared one is the bridge it loads through; every other (TensorRT, OpenVINO, ...) is loaded only
# by a session that asks for that provider, and onnxruntime-gpu ships the TensorRT one without
# TensorRT itself: what those need but cannot find is a note, not a failure.
_ORT_PROVIDER = re.compile(r"^libonnxruntime_providers_(\w+?)\.so(\.\d+)*$")
_ORT_REQUIRED_PROVIDERS = frozenset({"cuda", "shared"})
_ORT_PROVIDER_NAMES = {
    "tensorrt": "TensorRT",
    "nv_tensorrt_rtx": "TensorRT RTX",
    "openvino": "OpenVINO",
    "migraphx": "MIGraphX",
    "rocm": "ROCm",
    "dnnl": "oneDNN",
    "vitisai": "Vitis AI",
    "qnn": "QNN",
    "cann": "CANN",
}


@dataclass
class Check:
    name: str
    status: str
    message: str
    details: list[str] = field(default_factory=list)


# --- ELF: the DT_NEEDED, DT_SONAME, DT_RPATH and DT_RUNPATH of a 64-bit little-endian file --------

_EHDR = struct.Struct("<HHIQQQIHHHHHH")  # the ELF64 header after e_ident
_PHDR = struct.Struct("<IIQQQQQQ")
_DYN = struct.Struct("<qQ")
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = (
    0, 1, 5, 10, 14, 15, 29,
)  # fmt: skip


@dataclass(frozen=True)
class ElfInfo:
    machine: int
    needed: tuple[str, ...] = ()
    soname: str | None = None
    rpath: tuple[str, ...] = ()
    runpath: tuple[str, ...] = ()


def elf_header(path: str) -> int | None:
    """e_machine of a 64-bit little-endian ELF file, else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    return int(struct.unpack_from("<H", head, 18)[0])


def read_elf(path: str) -> ElfInfo | None:
    """The dynamic section's names, read the way the loader does: through the program headers.

    DT_STRTAB is a virtual address; the PT_LOAD segment that holds it maps it to a file offset.
    Anything that is not a 64-bit little-endian ELF (or is damaged) gives None.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            fields = _EHDR.unpack_from(header, 16)
            machine, phoff, phentsize, phnum = fields[1], fields[4], fields[8], fields[9]
            if phentsize < _PHDR.size or phnum in (0, 0xFFFF):
                return ElfInfo(machine)
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
            loads, dynamic = [], None
            for index in range(phnum):
                p_type, _, offset, vaddr, _, filesz, _, _ = _PHDR.unpack_from(
                    table, index * phentsize
                )
                if p_type == _PT_LOAD:
                    loads.append((vaddr, offset, filesz))
                elif p_type == _PT_DYNAMIC:
                    dynamic = (offset, filesz)
            if dynamic is None:
                return ElfInfo(machine)  # static: needs nothing
            handle.seek(dynamic[0])
            data = handle.read(dynamic[1])
            entries = []
            for offset in range(0, len(data) - _DYN.size + 1, _DYN.size):
                tag, value = _DYN.unpack_from(data, offset)
                if tag == _DT_NULL:
                    break
                entries.append((tag, value))
            tags = dict(entries)
            if _DT_STRTAB not in tags:
                return ElfInfo(machine)
            address = tags[_DT_STRTAB]
            start = next(
                (off + address - va for va, off, size in loads if va <= address < va + size),
                None,
            )
            if start is None:
                return None
            handle.seek(start)
            strings = handle.read(tags.get(_DT_STRSZ, 1 << 20))
    except (OSError, struct.error):
        return None

    def text(offset: int) -> str:
        end = strings.find(b"\0", offset)
        return strings[offset : end if end >= 0 else len(strings)].decode("utf-8", "replace")

    def paths(tag: int) -> tuple[str, ...]:
        return tuple(
            p for v in (v for t, v in entries if t == tag) for p in text(v).split(":") if p
        )

    return ElfInfo(
        machine=machine,
        needed=tuple(text(v) for t, v in entries if t == _DT_NEEDED),
        soname=next((text(v) for t, v in entries if t == _DT_SONAME), None),
        rpath=paths(_DT_RPATH),
        runpath=paths(_DT_RUNPATH),
    )


# --- finding a library the way ld.so does --------------------------------------------------------


def ldconfig_cache() -> dict[str, list[str]]:
    """soname -> paths from `ldconfig -p` (empty when the image has no ldconfig)."""
    program = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), None
    )
    if program is None:
        return {}
    try:
        output = subprocess.run(
            [program, "-p"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cache: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = re.match(r"^\s*(\S+)\s+\([^)]*\)\s+=>\s+(\S+)\s*$", line)
        if match:
            cache.setdefault(match.group(1), []).append(match.group(2))
    return cache


def ld_so_conf_dirs(path: str = "/etc/ld.so.conf", depth: int = 0) -> list[str]:
    """The folders ld.so.conf names (what ldconfig caches), following `include` globs."""
    found: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return found
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include") and depth < 4:
            pattern = line.split(None, 1)[1] if " " in line else ""
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                found += ld_so_conf_dirs(included, depth + 1)
        elif os.path.isabs(line):
            found.append(line)
    return found


@dataclass
class LibrarySearch:
    library_path: list[str]  # LD_LIBRARY_PATH
    cache: dict[str, list[str]]
    default_dirs: list[str]
    _usable: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> LibrarySearch:
        environ = dict(os.environ) if environ is None else environ
        library_path = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        defaults = list(dict.fromkeys([*ld_so_conf_dirs(), *DEFAULT_LIBRARY_DIRS]))
        return cls(library_path, ldconfig_cache(), defaults)

    def usable(self, path: str, machine: int) -> bool:
        """ld.so skips a file of another class or machine and goes on looking."""
        if path not in self._usable:
            self._usable[path] = os.path.isfile(path) and elf_header(path) == machine
        return self._usable[path]

    def find(self, name: str, path: str, info: ElfInfo) -> str | None:
        if "/" in name:
            return name if os.path.exists(name) else None
        origins = list(
            dict.fromkeys([os.path.dirname(path), os.path.dirname(os.path.realpath(path))])
        )

        def expand(entries: tuple[str, ...]) -> list[str]:
            dirs = []
            for entry in entries:
                for origin in origins:
                    dirs.append(entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin))
            return dirs

        # DT_RPATH counts only when there is no DT_RUNPATH (ld.so(8), "Rpath token expansion").
        dirs = [
            *(expand(info.rpath) if not info.runpath else []),
            *self.library_path,
            *expand(info.runpath),
        ]
        for folder in dirs:
            candidate = os.path.join(folder, name)
            if self.usable(candidate, info.machine):
                return candidate
        for candidate in self.cache.get(name, []):
            if self.usable(candidate, info.machine):
                return candidate
        for folder in self.default_dirs:
            candidate = os.path.join(folder, name)
            if self.usable(candidate, info.machine):
                return candidate
        return None


# --- the checks -----------------------------------------------------------------------------


def _norm(path: str) -> str:
    return os.path.realpath(os.path.abspath(path or os.curdir))


def _under(path: str, root: str) -> bool:
    path, root = _norm(path), _norm(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def describe_installed(marker: str) -> str:
    """The init script's `installed` marker, "<digest> <source>", in words.

    The source is "store" (every blob verified against the manifest) or "pip" (the fallback,
    which verifies nothing against the manifest); a marker without one was written before the
    fallback existed, and the init script reads it as "store" too.
    """
    words = marker.split()
    if not words:
        return f"{_STATE_DIR}/installed is empty"
    digest, source = words[0], (words[1] if len(words) > 1 else "store")
    if source == "store":
        return f"{digest} (from the verified store)"
    if source == "pip":
        return f"{digest} (by the pip fallback: not verified)"
    return f"{digest} (from {source!r}, a source this doctor does not know)"


def check_shared_dir(shared: str) -> Check:
    if not os.path.isdir(shared):
        return Check(
            "shared-dir",
            FAIL,
            f"{shared} does not exist: the initContainer did not run, or the volume is not "
            "mounted into this container (volumeMounts of the Ray container)",
        )
    state = os.path.join(shared, _STATE_DIR)
    details = []
    if os.path.exists(os.path.join(state, "incomplete")):
        return Check(
            "shared-dir",
            FAIL,
            f"{shared} holds a half-replaced package set ({_STATE_DIR}/incomplete): the "
            "initContainer was killed while switching sets; restart the pod to finish it",
        )
    try:
        with open(os.path.join(state, "installed"), encoding="utf-8") as handle:
            details.append(f"installed by gpubuild: {describe_installed(handle.read())}")
    except OSError:
        pass
    entries = [e for e in os.listdir(shared) if e != _STATE_DIR]
    if not entries:
        return Check("shared-dir", FAIL, f"{shared} is empty: the initContainer installed nothing")
    return Check("shared-dir", PASS, f"{shared}: {len(entries)} entries", details)


def check_sys_path(shared: str, path: list[str]) -> Check:
    entries = [_norm(p) for p in path]
    target, app = _norm(shared), _norm(APP_DIR)
    shown = ":".join(p or "''" for p in path)
    if target not in entries:
        return Check(
            "sys.path",
            FAIL,
            f"{shared} is not on sys.path: PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}; "
            f'set PYTHONPATH="{shared}:{APP_DIR}" in the pod env',
            [f"sys.path: {shown}"],
        )
    position = entries.index(target)
    sites = [
        i
        for i, p in enumerate(entries)
        if os.path.basename(p) in ("site-packages", "dist-packages")
    ]
    if sites and min(sites) < position:
        return Check(
            "sys.path",
            FAIL,
            f"{shared} comes after {path[min(sites)]}: the image's packages win over the shared "
            "ones (was it added by a .pth file or sys.path.append instead of PYTHONPATH?)",
            [f"sys.path: {shown}"],
        )
    if app in entries and entries.index(app) < position:
        return Check(
            "sys.path",
            FAIL,
            f"{APP_DIR} comes before {shared}: a module in {APP_DIR} named like a shared "
            f'package wins; set PYTHONPATH="{shared}:{APP_DIR}"',
            [f"sys.path: {shown}"],
        )
    return Check("sys.path", PASS, f"{shared} is on sys.path before site-packages and {APP_DIR}")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(paths: list[str]) -> dict[str, tuple[str, str]]:
    """canonical name -> (version, folder) for the first distribution of each name on `paths`."""
    found: dict[str, tuple[str, str]] = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"] if dist.metadata else None
        if not name:
            continue
        where = str(dist.locate_file(""))
        found.setdefault(_canonical(name), (dist.version, where))
    return found


def image_paths(shared: str, path: list[str]) -> list[str]:
    """Where the image's own distributions live: sys.path and site's folders, minus shared."""
    candidates = list(path)
    if hasattr(site, "getsitepackages"):  # a virtualenv's old site.py lacks it
        candidates += site.getsitepackages()
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user, str):
        candidates.append(user)
    kept: list[str] = []
    for candidate in candidates:
        if (
            candidate
            and os.path.isdir(candidate)
            and not _under(candidate, shared)
            and _norm(candidate) not in {_norm(k) for k in kept}
        ):
            kept.append(candidate)
    return kept


def check_shadowed(shared: str, path: list[str]) -> Check:
    mine = distributions([shared])
    theirs = distributions(image_paths(shared, path))
    clashes, same = [], 0
    for name in sorted(mine):
        if name not in theirs:
            continue
        version, _ = mine[name]
        other, where = theirs[name]
        if version == other:
            same += 1
            continue
        clashes.append(f"{name} {version} in {shared} shadows {name} {other} in {where}")
    details = [f"{same} distribution(s) in both at the same version (harmless)"] if same else []
    if clashes:
        return Check(
            "shadowed",
            FAIL,
            f"{len(clashes)} distribution(s) in {shared} replace the image's own at another "
            "version (the image's packages, Ray included, import the shared one): resolve the "
            "set against the image's snapshot (gpubuild resolve) or allow it in writing",
            clashes + details,
        )
    return Check(
        "shadowed",
        PASS,
        f"{len(mine)} distribution(s) in {shared}, none at another version than the image's",
        details,
    )


def shared_objects(shared: str) -> tuple[list[str], dict[str, list[str]]]:
    """The .so files under `shared` (not links), and basename -> folders for every file name."""
    objects: list[str] = []
    names: dict[str, list[str]] = {}
    for folder, dirs, files in os.walk(shared):
        dirs[:] = sorted(d for d in dirs if d != _STATE_DIR or folder != shared)
        for name in sorted(files):
            names.setdefault(name, []).append(folder)
            full = os.path.join(folder, name)
            if _SHARED_OBJECT.search(name) and not os.path.islink(full):
                objects.append(full)
    return objects, names


def optional_provider(path: str) -> str | None:
    """The execution provider's name when `path` is an optional onnxruntime provider library."""
    match = _ORT_PROVIDER.match(os.path.basename(path))
    if match is None or match.group(1) in _ORT_REQUIRED_PROVIDERS:
        return None
    return _ORT_PROVIDER_NAMES.get(match.group(1), match.group(1))


_PRUNED_FILE = "GPUBUILD_PRUNED"  # builder/prune.py writes it into a pruned dist-info


def check_pruned(shared: str) -> Check:
    """Distributions whose build-only files gpubuild's [policy] prune removed: what fails
    because of it (a C++ extension build needs the headers) is named before anyone debugs it."""
    found = []
    try:
        names = sorted(os.listdir(shared))
    except OSError:
        names = []
    for name in names:
        marker = os.path.join(shared, name, _PRUNED_FILE)
        if not name.endswith(".dist-info") or not os.path.isfile(marker):
            continue
        fields: dict[str, list[str]] = {}
        try:
            with open(marker, encoding="utf-8", errors="replace") as handle:
                for line in handle.read(65536).splitlines():
                    key, _, value = line.partition(": ")
                    fields.setdefault(key, []).append(value)
        except OSError:
            continue
        files = (fields.get("files") or ["?"])[0]
        size = (fields.get("bytes") or ["0"])[0]
        megabytes = int(size) / 1e6 if size.isdigit() else 0.0
        patterns = ", ".join(fields.get("pattern", []))
        found.append(
            f"{name[: -len('.dist-info')]}: {files} files ({megabytes:,.1f} MB): {patterns}"
        )
    if not found:
        return Check("pruned", SKIP, "no distribution was pruned")
    return Check(
        "pruned",
        PASS,
        f"{len(found)} distribution(s) shipped without build-only files ([policy] prune):"
        " compiling against them here (torch.utils.cpp_extension, torch.compile's C++ backend)"
        " needs the unpruned set",
        found,
    )


def check_libraries(shared: str, search: LibrarySearch) -> Check:
    objects, names = shared_objects(shared)
    missing: dict[str, list[str]] = {}
    scanned = 0
    for path in objects:
        info = read_elf(path)
        if info is None:
            continue
        scanned += 1
        for needed in info.needed:
            if search.find(needed, path, info) is None:
                missing.setdefault(needed, []).append(os.path.relpath(path, shared))
    library_path = ":".join(search.library_path) or "(not set)"
    failures, notes, fix = [], [], []
    for library in sorted(missing):
        users = missing[library]
        shown = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        folders = sorted(set(names.get(library, [])))
        providers = [optional_provider(user) for user in users]
        if all(providers):
            # Only optional providers need it: a session that does not ask for them never
            # loads them, so this is what a correct onnxruntime-gpu install looks like.
            named = ", ".join(sorted({str(p) for p in providers}))
            where = (
                f"add {':'.join(folders)} to LD_LIBRARY_PATH to use it"
                if folders
                else f"not in {shared}; install it to use that provider"
            )
            notes.append(
                f"note: {library} (needed by {shown}): optional: only onnxruntime's {named} "
                f"execution provider needs it, not the CUDA one; {where}"
            )
            continue
        if folders:
            fix += folders
            where = f"add {':'.join(folders)} to LD_LIBRARY_PATH"
        elif _DRIVER_LIBRARY.match(library):
            where = (
                "an NVIDIA driver library: the container runtime mounts it on a GPU node; "
                "no nvidia.com/gpu limit, or no NVIDIA runtime on the node"
            )
        else:
            where = f"not in {shared}: the image must provide it"
        failures.append(f"{library} (needed by {shown}): {where}")
    if not failures:
        but = (
            f", except {len(notes)} needed only by optional onnxruntime execution providers "
            "(noted below, not a failure)"
            if notes
            else ""
        )
        return Check(
            "libraries",
            PASS,
            f"every library that {scanned} shared object(s) in {shared} need resolves "
            f"(LD_LIBRARY_PATH={library_path}){but}",
            notes,
        )
    count = f"{len(failures)} librar{'y does' if len(failures) == 1 else 'ies do'}"
    message = f"{count} not resolve with LD_LIBRARY_PATH={library_path}"
    if fix:
        wanted = ":".join(dict.fromkeys([*search.library_path, *sorted(set(fix))]))
        message += f"; LD_LIBRARY_PATH={wanted} would find those in {shared}"
    return Check("libraries", FAIL, message, failures + notes)


# --- torch and onnxruntime, each in a child interpreter ----------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def tiny_onnx_model() -> bytes:
    """ModelProto bytes for y = Identity(x), x: float[1], encoded by hand (no onnx package).

    Field numbers from onnx.proto: ModelProto ir_version=1 graph=7 opset_import=8;
    GraphProto node=1 name=2 input=11 output=12; NodeProto input=1 output=2 op_type=4;
    ValueInfoProto name=1 type=2; TypeProto tensor_type=1; Tensor elem_type=1 shape=2;
    TensorShapeProto dim=1; Dimension dim_value=1. elem_type 1 is FLOAT.
    """
    shape = _field(2, _field(1, _field(1, 1)))
    tensor_type = _field(1, _field(1, 1) + shape)

    def value_info(name: str) -> bytes:
        return _field(1, name.encode()) + _field(2, tensor_type)

    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    graph = (
        _field(1, node) + _field(2, b"doctor") + _field(11, value_info("x"))
        + _field(12, value_info("y"))
    )  # fmt: skip
    opset = _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)


# The probes' protocol: the child writes one line per step, each `_PROBE_MARK` + a JSON object,
# and flushes it before the step's work starts. {"doing": "..."} names the step now running;
# other keys are facts learned; {"done": true} is the last line of a probe that got to its end.
# A library that kills the child with a signal (a CUDA library on a node without a GPU can)
# leaves the parent every line written before, so it knows what crashed. The marker sets the
# lines apart from anything an imported library prints on stdout.
_PROBE_MARK = "@gpubuild-doctor-probe "

_PROBE_PRELUDE = """
import json, sys, traceback

def report(**facts):
    sys.stdout.write(@MARK@ + json.dumps(facts) + "\\n")
    sys.stdout.flush()

def failure(exc):
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != "<string>"]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
    return {"text": text[-600:], "where": where}

def import_module(name):
    report(doing="import " + name)
    try:
        return __import__(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            report(present=False, done=True)
            sys.exit(0)
        report(import_error=failure(exc), done=True)
    except Exception as exc:
        report(import_error=failure(exc), done=True)
    sys.exit(0)

def import_package(name):
    module = import_module(name)
    if getattr(module, "__file__", None) is None:
        report(namespace=[str(p) for p in getattr(module, "__path__", [])], done=True)
        sys.exit(0)
    report(present=True, version=str(getattr(module, "__version__", "?")), file=module.__file__)
    return module
""".replace("@MARK@", repr(_PROBE_MARK))

_TORCH_PROBE = """
torch = import_package("torch")
try:
    report(doing="reading torch.version.cuda")
    report(cuda=torch.version.cuda)
    report(doing="torch.cuda.is_available()")
    available = bool(torch.cuda.is_available())
    report(available=available, devices=0)
    if available:
        report(doing="torch.cuda.device_count()")
        report(devices=int(torch.cuda.device_count()))
except Exception as exc:
    report(error=failure(exc))
report(done=True)
"""

_ONNXRUNTIME_PROBE = """
import ctypes, os
ort = import_package("onnxruntime")
try:
    report(doing="listing its execution providers")
    providers = [str(p) for p in ort.get_available_providers()]
    report(providers=providers)
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    if "CUDAExecutionProvider" in providers:
        try:
            # The CUDA provider resolves its symbols through the shared bridge: load it first.
            for name, mode in (("libonnxruntime_providers_shared.so", ctypes.RTLD_GLOBAL),
                               ("libonnxruntime_providers_cuda.so", ctypes.DEFAULT_MODE)):
                library = os.path.join(capi, name)
                if name.endswith("_shared.so") and not os.path.exists(library):
                    continue
                report(doing="loading " + name, library=library)
                ctypes.CDLL(library, mode=mode)
            report(dlopen=None)
        except OSError as exc:
            report(dlopen=str(exc))
        else:
            report(doing="running a session on CUDAExecutionProvider")
            try:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                session = ort.InferenceSession(bytes.fromhex(sys.argv[1]), options,
                                               providers=["CUDAExecutionProvider"])
                report(session=[str(p) for p in session.get_providers()])
            except Exception as exc:
                report(session_error=str(exc)[:600])
except Exception as exc:
    report(error=failure(exc))
report(done=True)
"""


@dataclass
class ProbeRun:
    """What a probe child reported (its facts merged, later lines winning) and how it ended."""

    facts: dict[str, object]
    finished: bool  # it wrote {"done": true}
    ended: str | None  # how it ended, when not by a plain exit 0: "crashed the probe (SIGSEGV)"
    stderr: str
    signal: str | None = None  # the signal that killed it: "SIGSEGV"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _text(stream: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even from a text-mode run.
    if isinstance(stream, bytes):
        return stream.decode("utf-8", "replace")
    return stream or ""


def _probe(code: str, *args: str) -> ProbeRun:
    """Run `code` (after the prelude) in a child interpreter and read what it reported."""
    ended: str | None = None
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_PRELUDE + code, *args],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
        stdout, stderr, returncode = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, returncode = _text(exc.stdout), _text(exc.stderr), 0
        ended = f"gave no answer within {_PROBE_TIMEOUT} s"
    except OSError as exc:
        return ProbeRun({}, False, f"could not start the probe ({exc})", "")
    killed_by = _signal_name(-returncode) if returncode < 0 else None
    if killed_by is not None:
        ended = f"crashed the probe ({killed_by})"
    elif returncode > 0:
        ended = f"ended the probe with exit status {returncode}"
    facts: dict[str, object] = {}
    for line in stdout.splitlines():
        # find, not startswith: a library's own unterminated output may precede the marker.
        at = line.find(_PROBE_MARK)
        if at < 0:
            continue
        try:
            fields = json.loads(line[at + len(_PROBE_MARK) :])
        except ValueError:
            continue  # a line cut short by the crash
        if isinstance(fields, dict):
            facts.update(fields)
    return ProbeRun(facts, bool(facts.get("done")), ended, _text(stderr).strip()[-800:], killed_by)


def _probe_failure(module: str, run: ProbeRun) -> Check | None:
    """The FAIL for a probe that did not get to its end, or whose import failed; else None.

    Three different faults, three different messages: the import raised (its exception's text),
    the child died by a signal or exited (the step it was in: the last "doing" it wrote), or an
    exception after the import (its text).
    """
    facts = run.facts
    details = run.stderr.splitlines()[-5:]
    if run.signal is not None:
        # No Python exception exists to show: name the likely culprit instead.
        details.append(
            f"{run.signal} killed the child interpreter: a native library crashed it (CUDA "
            "libraries can when no GPU is visible or the driver is older than their CUDA)"
        )
    error = facts.get("import_error")
    if isinstance(error, dict):
        where = [f"raised at {error['where']}"] if error.get("where") else []
        return Check(module, FAIL, f"import {module} fails: {error['text']}", where)
    namespace = facts.get("namespace")
    if isinstance(namespace, list):
        folders = ", ".join(str(f) for f in namespace)
        return Check(
            module,
            FAIL,
            f"import {module} finds only a folder without __init__.py ({folders}): what a "
            f"removed or half-copied {module} leaves behind, imported as a namespace package",
        )
    if not facts.get("present"):
        if run.finished:
            return None  # not present: the caller's SKIP
        return Check(module, FAIL, f"import {module} {run.ended or 'did not report'}", details)
    imported = f"{module} {facts.get('version')} imports, but"
    doing = str(facts.get("doing") or "the probe")
    if not run.finished:
        return Check(
            module,
            FAIL,
            f"{imported} {doing} {run.ended or 'did not report'}",
            [f"imported from {facts.get('file')}", *details],
        )
    error = facts.get("error")
    if isinstance(error, dict):
        return Check(
            module,
            FAIL,
            f"{imported} {doing} fails: {error['text']}",
            [f"imported from {facts.get('file')}"]
            + ([f"raised at {error['where']}"] if error.get("where") else []),
        )
    return None


def _after_exit(run: ProbeRun) -> list[str]:
    """A detail for a child that finished its report and still ended badly (a crash at exit)."""
    return [f"after reporting, the probe's interpreter {run.ended}"] if run.ended else []


def check_torch() -> Check:
    run = _probe(_TORCH_PROBE)
    failed = _probe_failure("torch", run)
    if failed is not None:
        return failed
    result = run.facts
    if not result.get("present"):
        return Check("torch", SKIP, "not present")
    label = f"torch {result['version']} ({result['file']})"
    if result["available"]:
        return Check(
            "torch",
            PASS,
            f"{label}: CUDA available, {result['devices']} device(s)",
            _after_exit(run),
        )
    if not result["cuda"]:
        return Check(
            "torch",
            FAIL,
            f"{label} is a CPU-only build: torch.cuda.is_available() is False",
            _after_exit(run),
        )
    return Check(
        "torch",
        FAIL,
        f"{label}, built for CUDA {result['cuda']}: torch.cuda.is_available() is False: no GPU "
        "visible (nvidia.com/gpu limit, NVIDIA_VISIBLE_DEVICES) or the driver is older than "
        "that CUDA",
        _after_exit(run),
    )


def check_onnxruntime() -> Check:
    run = _probe(_ONNXRUNTIME_PROBE, tiny_onnx_model().hex())
    failed = _probe_failure("onnxruntime", run)
    if failed is not None:
        return failed
    result = run.facts
    if not result.get("present"):
        return Check("onnxruntime", SKIP, "not present")
    label = f"onnxruntime {result['version']} ({result['file']})"
    after = _after_exit(run)
    offered = result.get("providers")
    providers = [str(p) for p in offered] if isinstance(offered, list) else []
    if "CUDAExecutionProvider" not in providers:
        return Check(
            "onnxruntime",
            FAIL,
            f"{label} offers no CUDAExecutionProvider (only {', '.join(providers)}): the "
            "CPU-only onnxruntime package is installed, or shadows onnxruntime-gpu",
            after,
        )
    if result.get("dlopen"):
        return Check(
            "onnxruntime",
            FAIL,
            f"{label}: libonnxruntime_providers_cuda.so does not load, so sessions silently run "
            "on CPU; the `libraries` check names the folder LD_LIBRARY_PATH lacks",
            [str(result["dlopen"]), *after],
        )
    if result.get("session_error"):
        return Check(
            "onnxruntime",
            FAIL,
            f"{label}: a session with CUDAExecutionProvider fails",
            [str(result["session_error"]), *after],
        )
    session = result.get("session")
    session = [str(p) for p in session] if isinstance(session, list) else []
    if "CUDAExecutionProvider" not in session:
        return Check(
            "onnxruntime",
            FAIL,
            f"{label}: a session asked for CUDAExecutionProvider got {session} (the silent CPU "
            "fallback: cuDNN/CUDA libraries or the GPU are missing)",
            after,
        )
    return Check("onnxruntime", PASS, f"{label}: a session runs on CUDAExecutionProvider", after)


# --- running ----------------------------------------------------------------------------------


def diagnose(shared: str, *, probes: bool = True) -> list[Check]:
    checks = [check_shared_dir(shared)]
    if checks[0].status == FAIL and not os.path.isdir(shared):
        checks.append(check_sys_path(shared, sys.path))
    else:
        checks += [
            check_sys_path(shared, sys.path),
            check_shadowed(shared, sys.path),
            check_pruned(shared),
            check_libraries(shared, LibrarySearch.from_environment()),
        ]
    if probes:
        checks += [check_torch(), check_onnxruntime()]
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for item in checks:
        lines.append(f"{item.status.upper():<5} {item.name:<12} {item.message}")
        lines += [f"      {'':<12} {detail}" for detail in item.details]
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append(
        f"doctor: {len(failed)} check(s) failed" + (f": {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines)


def document(shared: str, checks: list[Check]) -> dict[str, object]:
    return {
        "ok": not any(c.status == FAIL for c in checks),
        "shared": shared,
        "python": sys.executable,
        "checks": [asdict(c) for c in checks],
    }


def run(shared: str, as_json: bool = False) -> int:
    checks = diagnose(shared)
    if as_json:
        print(json.dumps(document(shared, checks), indent=2, sort_keys=True))
    else:
        print(render(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def default_shared() -> str:
    return os.environ.get("GPUBUILD_TARGET") or DEFAULT_SHARED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpubuild doctor",
        description="Check a worker container: sys.path, shadowed packages, shared libraries, "
        "torch and onnxruntime on the GPU. Exit 1 when a check fails.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument(
        "--shared",
        default=default_shared(),
        help="the shared packages folder (default: $GPUBUILD_TARGET or /shared-packages)",
    )
    options = parser.parse_args(argv)
    return run(options.shared, options.json)


if __name__ == "__main__":
    sys.exit(main())
