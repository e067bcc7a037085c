"""Real services for tests, each owned by one context manager.

Every manager follows the same life: check the program exists, start it on a
free loopback port, wait until it answers a real request, yield an endpoint,
stop it by its process id. Nothing here is a mock: Azurite is Microsoft's
storage emulator, dockerd and docker-registry are the Debian packages, nginx
is nginx.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import docker
import docker.errors
from azure.storage.blob import BlobServiceClient
from docker.utils import parse_repository_tag

# Microsoft's documented development account; public and safe to commit.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE_TOOLS_BIN = Path("/opt/gpubuild-tools/node_modules/.bin/azurite-blob")

DOCKER_DATA_ROOT = Path("/var/lib/gpubuild-test-docker")
# The only flags under which dockerd may run here: no bridge, no NAT rules.
DOCKERD_NETWORK_FLAGS = (
    "--bridge=none",
    "--iptables=false",
    "--ip-forward=false",
    "--ip-masq=false",
)

BASE_IMAGE_TAG = "gpubuild-test/base:bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = (
    "python3", "python3-pip", "ca-certificates", "bash", "curl", "zstd", "libarchive-tools",
    "b3sum",
)  # fmt: skip
ROOTFS_CACHE = Path("/var/cache/gpubuild-test/rootfs-bookworm")

# Unix socket paths longer than this do not fit sockaddr_un (108 bytes with
# the terminator); containerd adds its own suffix under dockerd's exec-root.
_MAX_SOCKET_DIR = 60


class ServiceError(RuntimeError):
    """A service could not be started or did not become ready."""


def require_program(name: str, provider: str, *, env_var: str | None = None) -> str:
    """Path of ``name``, or a RuntimeError saying which package provides it."""
    if env_var and os.environ.get(env_var):
        path = os.environ[env_var]
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{env_var}={path} is not an executable file")
        return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"program {name!r} not found on PATH; it is provided by {provider} "
            "(.ci/run installs it; tests that need it are not skipped)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    timeout: float,
) -> None:
    """Poll ``ready`` until it is true; fail early when ``proc`` has died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            if ready():
                return
        except Exception:
            pass  # refused, reset, 5xx: the service is still starting
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} not ready after {timeout:.0f}s; log {log}:\n{_tail(log)}")
        time.sleep(0.2)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session keeps a Ctrl-C in the terminal from killing the
        # service before the fixture's own teardown stops it.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, *, grace: float = 20.0) -> None:
    """SIGTERM ``pid``, wait up to ``grace`` seconds, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------
# Azurite (Azure Blob Storage)


def _azurite_program() -> str:
    if os.environ.get("GPUBUILD_AZURITE"):
        return require_program("azurite-blob", "npm package azurite@3", env_var="GPUBUILD_AZURITE")
    if AZURITE_TOOLS_BIN.exists():
        program = str(AZURITE_TOOLS_BIN)
    else:
        try:
            program = require_program("azurite-blob", "npm package azurite@3")
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}; install it with `npm install --prefix /opt/gpubuild-tools azurite@3`"
                " or point GPUBUILD_AZURITE at an azurite-blob executable"
            ) from None
    # azurite-blob is a node script (#!/usr/bin/env node).
    require_program("node", "Debian package nodejs")
    return program


class _AzuriteServer:
    """One Azurite location and port; can be stopped and started again."""

    def __init__(self, tmp: Path) -> None:
        self.program = _azurite_program()
        self.port = free_port()
        self.location = tmp / "azurite"
        self.log = tmp / "azurite.log"
        self.location.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.blob_url};"
        )

    def start(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        # --disableTelemetry is required: otherwise Azurite reaches out to a
        # telemetry host, which this network forbids.
        argv = [
            self.program,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(self.location),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--loose",
        ]
        self.proc = _spawn(argv, self.log)
        probe = BlobServiceClient.from_connection_string(
            self.connection_string, retry_total=0, connection_timeout=2, read_timeout=5
        )

        def ready() -> bool:
            if not _port_open(self.port):
                return False
            probe.get_service_properties()
            return True

        try:
            _wait_until(ready, what="azurite", proc=self.proc, log=self.log, timeout=60)
        except BaseException:
            self.stop()
            raise
        finally:
            probe.close()
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM lets Azurite flush its metadata database to --location,
            # so a restart finds the blobs written before.
            stop_process(self.proc)
            self.proc = None


@dataclass
class AzuriteEndpoint:
    """A running Azurite blob service. ``pid`` is 0 while it is stopped."""

    blob_url: str
    account: str
    key: str
    connection_string: str
    pid: int
    _server: _AzuriteServer = field(repr=False, compare=False)

    @property
    def port(self) -> int:
        return self._server.port

    def stop(self) -> None:
        """Stop the service; its data stays on disk for :meth:`start`."""
        self._server.stop()
        self.pid = 0

    def start(self) -> None:
        """Start it again on the same port and data location."""
        self.pid = self._server.start()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Keep the service down inside the block, and up again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def blob_service_client(self) -> BlobServiceClient:
        return BlobServiceClient.from_connection_string(self.connection_string)


@contextlib.contextmanager
def azurite(tmp: Path) -> Iterator[AzuriteEndpoint]:
    server = _AzuriteServer(tmp)
    pid = server.start()
    endpoint = AzuriteEndpoint(
        blob_url=server.blob_url,
        account=AZURITE_ACCOUNT,
        key=AZURITE_KEY,
        connection_string=server.connection_string,
        pid=pid,
        _server=server,
    )
    try:
        yield endpoint
    finally:
        server.stop()


# --------------------------------------------------------------------------
# Docker engine


def _existing_engine() -> docker.DockerClient | None:
    """A client for an engine that already answers, or None."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return None
    try:
        client = docker.from_env(version="auto", timeout=600)
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


@contextlib.contextmanager
def dockerd(tmp: Path) -> Iterator[docker.DockerClient]:
    """A Docker client; starts a private dockerd only when none answers.

    While a dockerd started here runs, DOCKER_HOST points at its socket so
    that code under test calling ``docker.from_env()`` or the ``docker`` CLI
    reaches it.
    """
    existing = _existing_engine()
    if existing is not None:
        try:
            yield existing
        finally:
            existing.close()
        return

    program = require_program("dockerd", "Debian package docker.io")
    tmp.mkdir(parents=True, exist_ok=True)
    short_dir: Path | None = None
    run_dir = tmp
    if len(str(tmp)) > _MAX_SOCKET_DIR:
        short_dir = Path(tempfile.mkdtemp(prefix="gpubuild-dockerd-"))
        run_dir = short_dir
    socket_path = run_dir / "docker.sock"
    exec_root = run_dir / "exec"
    pidfile = tmp / "dockerd.pid"
    log = tmp / "dockerd.log"
    data_root, data_root_lock = _claim_data_root(tmp)
    argv = [
        program,
        *DOCKERD_NETWORK_FLAGS,
        "-H",
        f"unix://{socket_path}",
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--pidfile",
        str(pidfile),
    ]
    proc = _spawn(argv, log)
    base_url = f"unix://{socket_path}"
    client: docker.DockerClient | None = None
    old_docker_host = os.environ.get("DOCKER_HOST")
    try:

        def ready() -> bool:
            nonlocal client
            if not socket_path.exists():
                return False
            if client is None:
                client = docker.DockerClient(base_url=base_url, version="auto", timeout=600)
            return bool(client.ping())

        _wait_until(ready, what="dockerd", proc=proc, log=log, timeout=90)
        assert client is not None
        os.environ["DOCKER_HOST"] = base_url
        yield client
    finally:
        if old_docker_host is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = old_docker_host
        if client is not None:
            client.close()
        # dockerd stops its containers (up to 15 s each) and its own
        # containerd on SIGTERM; a killed dockerd leaves containerd behind.
        containerd_pidfile = exec_root / "containerd" / "containerd.pid"
        containerd_pid = _read_pid(containerd_pidfile)
        stop_process(proc, grace=60)
        if containerd_pid is not None and _pid_alive(containerd_pid):
            stop_pid(containerd_pid)
        # dockerd leaves exec-root/netns/default bind-mounted after a clean
        # shutdown; unmount it so the temporary folder can be removed.
        _unmount_below(exec_root)
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)
        if data_root_lock is not None:
            data_root_lock.close()
        else:
            _unmount_below(data_root)
            shutil.rmtree(data_root, ignore_errors=True)


def _claim_data_root(tmp: Path) -> tuple[Path, IO[str] | None]:
    """The shared, persistent data root if free, else a private one in ``tmp``.

    Two dockerd cannot share a data root (they would fight over its bolt
    databases), and two test sessions may run at once on one machine. The
    second one gets an empty private root: slower (the base image is
    imported again from the cached rootfs) but correct. The returned lock is
    held while the shared root is in use.
    """
    DOCKER_DATA_ROOT.mkdir(parents=True, exist_ok=True)
    lock = open(DOCKER_DATA_ROOT.with_name(DOCKER_DATA_ROOT.name + ".lock"), "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        private = tmp / "data-root"
        private.mkdir(parents=True, exist_ok=True)
        return private, None
    return DOCKER_DATA_ROOT, lock


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# Image registry (stands in for Azure Container Registry)


def _http_status(url_host: str, port: int, path: str) -> int:
    conn = http.client.HTTPConnection(url_host, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@contextlib.contextmanager
def registry(tmp: Path, *, users: dict[str, str] | None = None) -> Iterator[str]:
    """A CNCF distribution registry on loopback; yields ``127.0.0.1:PORT``.

    Docker treats 127.0.0.0/8 registries as insecure by default, so pushes
    need neither TLS nor daemon configuration. `users` (name -> password) turns
    on htpasswd basic authentication (bcrypt entries made by Debian's htpasswd).
    """
    program = require_program("docker-registry", "Debian package docker-registry")
    port = free_port()
    storage = tmp / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    config = tmp / "registry.yml"
    log = tmp / "registry.log"
    auth = ""
    if users:
        htpasswd = require_program("htpasswd", "Debian package apache2-utils")
        passwords = tmp / "htpasswd"
        passwords.write_text("")
        for name, password in users.items():
            subprocess.run(
                [htpasswd, "-bB", str(passwords), name, password], check=True, capture_output=True
            )
        auth = f"auth:\n  htpasswd:\n    realm: gpubuild-test\n    path: {passwords}\n"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    proc = _spawn([program, "serve", str(config)], log)
    try:
        _wait_until(
            lambda: _http_status("127.0.0.1", port, "/v2/") in (200, 401),
            what="docker-registry",
            proc=proc,
            log=log,
            timeout=30,
        )
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------
# containerd (what a node's kubelet uses), beside dockerd with its own files


@dataclass(frozen=True)
class Containerd:
    socket: Path
    ctr: str

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`ctr` against this containerd; raises with its output on failure."""
        done = subprocess.run(
            [self.ctr, "-a", str(self.socket), *args], capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(f"ctr {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done


@contextlib.contextmanager
def containerd() -> Iterator[Containerd]:
    """A containerd with its own root, state and socket (short path: sockaddr_un's limit),
    stopped and removed after."""
    program = require_program("containerd", "Debian package containerd")
    ctr = require_program("ctr", "Debian package containerd")
    folder = Path(tempfile.mkdtemp(prefix="gpb-ctd-", dir="/tmp"))
    socket_path = folder / "c.sock"
    config = folder / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{folder}/root"\nstate = "{folder}/state"\n'
        f'[grpc]\n  address = "{socket_path}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable_apparmor = true\n'
    )
    log = folder / "containerd.log"
    proc = _spawn([program, "--config", str(config)], log)
    try:
        _wait_until(
            lambda: (
                socket_path.exists()
                and subprocess.run(
                    [ctr, "-a", str(socket_path), "version"], capture_output=True
                ).returncode
                == 0
            ),
            what="containerd",
            proc=proc,
            log=log,
            timeout=60,
        )
        yield Containerd(socket_path, ctr)
    finally:
        stop_process(proc)
        _unmount_below(folder)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------
# nginx (plain static HTTP, for speed figures)


@contextlib.contextmanager
def nginx_serving(folder: Path, tmp: Path) -> Iterator[str]:
    """Serve ``folder`` read-only with nginx; yields ``http://127.0.0.1:PORT``.

    The workers run as a normal user (nobody), as a stock nginx's do: a store whose files only
    their owner may read is refused (HTTP 403) here as it would be in production. So `folder`
    and every folder above it must be readable by others (pytest's tmp folders are not: use
    `tests.support.users.nonroot_folder`).
    """
    program = require_program("nginx", "Debian package nginx-light")
    folder = Path(folder).resolve()
    unreachable = [p for p in (folder, *folder.parents) if not p.stat().st_mode & 0o001]
    if unreachable and os.geteuid() == 0:
        raise ServiceError(
            f"nginx's workers (user nobody) cannot reach {folder}: {unreachable[-1]} is not "
            "searchable by others; serve a folder made with tests.support.users.nonroot_folder"
        )
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    log = tmp / "nginx.log"
    conf.write_text(
        "daemon off;\n"
        + ("user nobody nogroup;\n" if os.geteuid() == 0 else "")
        + "worker_processes 2;\n"
        f"pid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/error.log warn;\n"
        "events {}\n"
        "http {\n"
        "  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
        "  default_type application/octet-stream;\n"
        f"  client_body_temp_path {tmp}/client_body;\n"
        f"  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fastcgi;\n"
        f"  uwsgi_temp_path {tmp}/uwsgi;\n"
        f"  scgi_temp_path {tmp}/scgi;\n"
        f"  server {{ listen 127.0.0.1:{port}; root {folder}; }}\n"
        "}\n"
    )
    # -e and -p keep nginx from touching /var/log/nginx before it has read
    # the configuration.
    argv = [program, "-c", str(conf), "-p", f"{tmp}/", "-e", str(tmp / "error.log")]
    proc = _spawn(argv, log)
    try:
        _wait_until(
            lambda: _http_status("127.0.0.1", port, "/") > 0,
            what="nginx",
            proc=proc,
            log=tmp / "error.log",
            timeout=30,
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        # The master stops its workers on SIGTERM ("fast shutdown").
        stop_process(proc)


# --------------------------------------------------------------------------
# A Debian base image built locally (no outside registry is reachable)


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key is not None:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield (
            fields.get("types", "").split(),
            fields.get("uris", "").split(),
            fields.get("suites", "").split(),
        )


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        rest = words[1:]
        if rest[0].startswith("["):
            # Options: "[arch=amd64 signed-by=...]", possibly several words.
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            yield [words[0]], [rest[0]], [rest[1]]


def debian_mirror(suite: str = BASE_SUITE, etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt uses, read from its sources.

    The mirror is read at run time so that no index host is written into
    the repository.
    """
    entries: list[tuple[list[str], list[str], list[str]]] = []
    classic = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in classic:
        if path.is_file():
            entries.extend(_one_line_entries(path.read_text()))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        entries.extend(_deb822_entries(path.read_text()))
    binary = [(uris, suites) for types, uris, suites in entries if "deb" in types and uris]
    for uris, suites in binary:
        if suite in suites:
            return uris[0].rstrip("/")
    # A host on another Debian release: its main archive (not -security or
    # -updates) still carries the suite.
    for uris, suites in binary:
        if any("-" not in s and "/" not in s for s in suites):
            return uris[0].rstrip("/")
    raise RuntimeError(f"no Debian archive found in {etc_apt}/sources.list(.d); cannot debootstrap")


def _unmount_below(path: Path) -> None:
    """Unmount what a failed debootstrap left mounted (proc, sys) in ``path``."""
    prefix = str(path.resolve()) + "/"
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def _remove_rootfs(path: Path) -> None:
    if path.exists():
        _unmount_below(path)
        shutil.rmtree(path)


# Bump when the cleaning below or the import changes, so that cached trees
# and images made by an older recipe are rebuilt rather than reused.
_RECIPE_REVISION = 2
_RECIPE_LABEL = "org.gpubuild.test.recipe"


def _recipe(suite: str) -> str:
    return f"{suite} minbase {','.join(BASE_PACKAGES)} r{_RECIPE_REVISION}"


def _recipe_id(suite: str) -> str:
    return hashlib.sha256(_recipe(suite).encode()).hexdigest()[:16]


def _clean_rootfs(rootfs: Path) -> None:
    # What Debian's slim images drop: package caches, lists, logs and docs
    # (about a quarter of the tree), which keeps imports and pushes quick.
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/locale/*",
        "usr/share/info/*",
    ):
        for item in rootfs.glob(pattern):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            elif item.name != "lock":
                item.unlink()
    shutil.rmtree(rootfs / "debootstrap", ignore_errors=True)


def ensure_rootfs(rootfs: Path = ROOTFS_CACHE, suite: str = BASE_SUITE) -> Path:
    """A debootstrapped minbase tree at ``rootfs``, reused when complete."""
    marker = rootfs.with_name(rootfs.name + ".complete")
    wanted = _recipe(suite) + "\n"
    if rootfs.is_dir() and marker.is_file() and marker.read_text() == wanted:
        return rootfs
    program = require_program("debootstrap", "Debian package debootstrap")
    mirror = debian_mirror(suite)
    marker.unlink(missing_ok=True)
    _remove_rootfs(rootfs)
    partial = rootfs.with_name(rootfs.name + ".partial")
    _remove_rootfs(partial)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    log = rootfs.with_name(rootfs.name + ".log")
    argv = [
        program,
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        suite,
        str(partial),
        mirror,
    ]
    with open(log, "wb") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        detail = _tail(partial / "debootstrap" / "debootstrap.log")
        _remove_rootfs(partial)
        raise RuntimeError(f"debootstrap failed ({result.returncode}); log {log}:\n{detail}")
    _clean_rootfs(partial)
    partial.rename(rootfs)
    # Written last: a tree without it is an interrupted run and is rebuilt.
    marker.write_text(wanted)
    return rootfs


def _tar_stream(stdout: IO[bytes], chunk: int = 1 << 20) -> Iterator[bytes]:
    # A generator makes requests send the body chunked; a pipe object would
    # be sent with a wrong Content-Length.
    while data := stdout.read(chunk):
        yield data


def _image_is_current(client: docker.DockerClient, tag: str, recipe_id: str) -> bool:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return bool(image.labels.get(_RECIPE_LABEL) == recipe_id)


def local_base_image(client: docker.DockerClient, tag: str = BASE_IMAGE_TAG) -> str:
    """Make sure ``tag`` (a Debian bookworm minbase image) exists; return it.

    The image stands in for the real base images (which no outside registry
    here can provide): Python 3.11, pip, bash, curl, zstd, CA certificates.
    An image under ``tag`` made by an older recipe is replaced.
    """
    recipe_id = _recipe_id(BASE_SUITE)
    if _image_is_current(client, tag, recipe_id):
        return tag
    ROOTFS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent test sessions building the same tree and image.
    with open(ROOTFS_CACHE.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _image_is_current(client, tag, recipe_id):
            return tag
        outdated = None
        with contextlib.suppress(docker.errors.ImageNotFound):
            outdated = client.images.get(tag).id
        rootfs = ensure_rootfs()
        tar = require_program("tar", "Debian package tar")
        tar_log = ROOTFS_CACHE.with_name(ROOTFS_CACHE.name + ".tar.log")
        repository, image_tag = parse_repository_tag(tag)
        with open(tar_log, "wb") as errors:
            proc = subprocess.Popen(
                [tar, "--numeric-owner", "-C", str(rootfs), "-c", "."],
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        assert proc.stdout is not None
        try:
            client.api.import_image_from_data(
                _tar_stream(proc.stdout),
                repository=repository,
                tag=image_tag or "latest",
                changes=[
                    "ENV LANG=C.UTF-8",
                    # The images this stands in for let pip install into
                    # their Python; Debian's marks it externally managed
                    # (PEP 668), so lift that here.
                    "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
                    f"LABEL {_RECIPE_LABEL}={recipe_id}",
                    'CMD ["/bin/bash"]',
                ],
            )
        finally:
            proc.stdout.close()
            if proc.wait() != 0:
                raise RuntimeError(f"tar of {rootfs} failed; see {tar_log}:\n{_tail(tar_log)}")
        if not _image_is_current(client, tag, recipe_id):
            raise RuntimeError(f"docker import did not produce {tag} with label {recipe_id}")
        if outdated is not None:
            # Untagged by the import; drop it unless a container still uses it.
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(outdated)
    return tag
