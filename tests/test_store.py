"""Stores against real storage: a local folder, and Azurite for Azure Blob (no mocks)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from builder.errors import BadInputError, IntegrityError, NotPublishedError, StoreError
from builder.manifest import blob_key, manifest_key
from builder.secrets import scrub
from builder.stores import (
    AzureStore,
    FileStore,
    Store,
    default_store_url,
    open_store,
    parse_store_url,
)
from builder.stores.credentials import sas_expiry
from builder.stores.sas import make_read_sas
from tests.helpers import run_cli
from tests.support.services import AzuriteEndpoint

# Above the store's single-request limit (8 MiB), so Azure uploads it in staged blocks.
LARGE = 12 * 1024 * 1024


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says which credential it uses; nothing comes from the caller's shell."""
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _blob_file(folder: Path, size: int, name: str = "shard") -> tuple[str, Path]:
    data = os.urandom(size)
    path = folder / name
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


def _sha256_of(reader: object) -> str:
    digest = hashlib.sha256()
    with reader:  # type: ignore[attr-defined]
        while chunk := reader.read(1024 * 1024):  # type: ignore[attr-defined]
            digest.update(chunk)
    return digest.hexdigest()


def _container() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _signature(token: str) -> str:
    return token.split("sig=", 1)[1].split("&", 1)[0]


def _assert_secret_free(texts: list[str], *secrets: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text
            assert urllib.parse.unquote(secret) not in text


@pytest.fixture
def key_env(azurite_endpoint: AzuriteEndpoint, monkeypatch: pytest.MonkeyPatch) -> AzuriteEndpoint:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_endpoint.connection_string)
    return azurite_endpoint


@pytest.fixture
def azure_store(key_env: AzuriteEndpoint) -> AzureStore:
    store = open_store(f"az://{key_env.account}/{_container()}/team/cache")
    assert isinstance(store, AzureStore)
    return store


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    store = open_store((tmp_path / "store").as_uri())
    assert isinstance(store, FileStore)
    return store


@pytest.fixture(params=["file", "azure"])
def any_store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue(f"{request.param}_store")


def _blob_properties(endpoint: AzuriteEndpoint, store: AzureStore, key: str) -> tuple[str, object]:
    """ETag and last-modified as the service reports them, read past the store under test."""
    client = BlobServiceClient.from_connection_string(endpoint.connection_string)
    props = client.get_blob_client(store.container, f"{store.prefix}/{key}").get_blob_properties()
    return props.etag, props.last_modified


# --- URLs ---------------------------------------------------------------------------------


def test_store_urls_are_read_by_kind(tmp_path: Path) -> None:
    assert parse_store_url(f"file://{tmp_path}/s").root == tmp_path / "s"  # type: ignore[union-attr]
    assert parse_store_url(str(tmp_path)).root == tmp_path  # type: ignore[union-attr]
    az = parse_store_url("az://myaccount/gpu-cache/team/a")
    assert (az.account, az.container, az.prefix, az.endpoint) == (  # type: ignore[union-attr]
        "myaccount",
        "gpu-cache",
        "team/a",
        None,
    )
    https = parse_store_url("https://myaccount.blob.core.windows.net/gpu-cache?sv=1&sig=abc")
    assert https.endpoint == "https://myaccount.blob.core.windows.net"  # type: ignore[union-attr]
    assert https.query == "sv=1&sig=abc"  # type: ignore[union-attr]
    assert "sig" not in https.display_url  # type: ignore[union-attr]
    local = parse_store_url("http://127.0.0.1:10000/devstoreaccount1/gpu-cache/p")
    assert local.endpoint == "http://127.0.0.1:10000/devstoreaccount1"  # type: ignore[union-attr]
    assert (local.container, local.prefix) == ("gpu-cache", "p")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "url",
    ["s3://bucket/prefix", "gs://bucket", "ftp://host/x", "store-folder"],
)
def test_unknown_scheme_or_shape_is_bad_input(url: str) -> None:
    with pytest.raises(BadInputError) as caught:
        open_store(url)
    assert caught.value.exit_code == 2
    assert "az://" in str(caught.value) and "file://" in str(caught.value)


def test_a_file_url_needs_an_absolute_path() -> None:
    with pytest.raises(BadInputError, match="file:///"):
        open_store("file://relative/store")


def test_bad_container_name_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="container name"):
        open_store("az://myaccount/Bad_Name")


def test_default_store_is_under_the_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_store_url() == (tmp_path / "gpubuild" / "store").as_uri()
    assert isinstance(open_store(default_store_url()), FileStore)


# --- both kinds ---------------------------------------------------------------------------


def test_round_trip_of_blob_and_manifest(any_store: Store, tmp_path: Path) -> None:
    sha, path = _blob_file(tmp_path, LARGE + 12345)
    assert any_store.has_blob(sha) is None
    progress: list[int] = []
    assert any_store.put_blob(sha, path, progress.append) is True
    assert sum(progress) == path.stat().st_size
    assert any_store.has_blob(sha) == path.stat().st_size
    assert _sha256_of(any_store.open_blob(sha)) == sha

    manifest = b'{"format": 1}\n'
    any_store.put_manifest("onnx-gpu", "d" * 64, manifest)
    assert any_store.get_manifest("onnx-gpu", "d" * 64) == manifest
    assert any_store.has_manifest("onnx-gpu", "d" * 64)
    assert any_store.blob_url(sha) == f"{any_store.base_url}/{blob_key(sha)}"
    assert any_store.manifest_url("onnx-gpu", "d" * 64).endswith(
        "/" + manifest_key("onnx-gpu", "d" * 64)
    )


def test_missing_manifest_is_not_published(any_store: Store) -> None:
    with pytest.raises(NotPublishedError, match="onnx-gpu/" + "e" * 64):
        any_store.get_manifest("onnx-gpu", "e" * 64)
    assert not any_store.has_manifest("onnx-gpu", "e" * 64)


def test_missing_blob_cannot_be_opened(any_store: Store) -> None:
    with pytest.raises(StoreError, match="publish"):
        any_store.open_blob("f" * 64)


def _race(store_a: Store, store_b: Store, sha: str, path: Path) -> list[bool | BaseException]:
    """Publisher A is mid-upload when publisher B, in another thread, publishes the same blob
    from start to finish; then A completes. Deterministic: A waits in its progress callback."""
    results: dict[str, bool | BaseException] = {}

    def publish(name: str, store: Store, hook: Callable[[int], None] | None) -> None:
        try:
            results[name] = store.put_blob(sha, path, hook)
        except BaseException as exc:
            results[name] = exc

    other = threading.Thread(target=publish, args=("b", store_b, None))
    started = threading.Lock()  # the SDK calls the hook from several upload threads

    def a_progress(_delta: int) -> None:
        with started:
            if other.ident is None:
                other.start()
                other.join(timeout=120)

    publish("a", store_a, a_progress)
    assert "b" in results, "publisher B never ran"
    return [results["a"], results["b"]]


def test_concurrent_publishers_of_one_blob_leave_one_intact_copy_in_a_folder(
    tmp_path: Path,
) -> None:
    sha, path = _blob_file(tmp_path, LARGE)
    url = (tmp_path / "store").as_uri()
    outcomes = _race(open_store(url), open_store(url), sha, path)
    # Both wrote a whole copy; the later rename replaced the earlier one.
    assert outcomes == [True, True]
    store = open_store(url)
    assert _sha256_of(store.open_blob(sha)) == sha
    # Only the blob: no temp file of either writer is left beside it.
    assert [p.name for p in (tmp_path / "store" / "blobs").iterdir()] == [f"{sha}.tar.zst"]


def test_concurrent_publishers_of_one_blob_leave_one_intact_copy_in_azure(
    key_env: AzuriteEndpoint, tmp_path: Path
) -> None:
    sha, path = _blob_file(tmp_path, LARGE)
    url = f"az://{key_env.account}/{_container()}/race"
    outcomes = _race(open_store(url), open_store(url), sha, path)
    # B committed first; A's commit then met B's blob, which counts as published.
    assert outcomes == [False, True]
    assert _sha256_of(open_store(url).open_blob(sha)) == sha


def test_putting_a_blob_twice_writes_it_once_in_a_folder(
    file_store: FileStore, tmp_path: Path
) -> None:
    sha, path = _blob_file(tmp_path, 1000)
    assert file_store.put_blob(sha, path) is True
    stored = file_store.root / blob_key(sha)
    before = stored.stat()
    assert file_store.put_blob(sha, path) is False
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_putting_a_blob_twice_uploads_it_once_to_azure(
    key_env: AzuriteEndpoint, azure_store: AzureStore, tmp_path: Path
) -> None:
    sha, path = _blob_file(tmp_path, 1000)
    assert azure_store.put_blob(sha, path) is True
    before = _blob_properties(key_env, azure_store, blob_key(sha))
    progress: list[int] = []
    assert azure_store.put_blob(sha, path, progress.append) is False
    assert _blob_properties(key_env, azure_store, blob_key(sha)) == before
    assert progress == []


def test_a_file_that_is_not_its_digest_is_refused(file_store: FileStore, tmp_path: Path) -> None:
    _, path = _blob_file(tmp_path, 1000)
    with pytest.raises(IntegrityError, match="pack it again"):
        file_store.put_blob("0" * 64, path)
    assert file_store.has_blob("0" * 64) is None
    assert list((file_store.root / "blobs").iterdir()) == []


def test_file_store_urls_are_readable_like_curl_reads_them(
    file_store: FileStore, tmp_path: Path
) -> None:
    sha, path = _blob_file(tmp_path, 1000)
    file_store.put_blob(sha, path)
    with urllib.request.urlopen(file_store.blob_url(sha)) as response:
        assert response.read() == path.read_bytes()


def test_file_store_has_no_sas(file_store: FileStore) -> None:
    with pytest.raises(BadInputError, match="local folder"):
        make_read_sas(file_store, expiry=datetime.now(timezone.utc) + timedelta(hours=1))


# --- Azure failures -----------------------------------------------------------------------


def test_a_missing_container_is_created_on_first_write(
    key_env: AzuriteEndpoint, tmp_path: Path
) -> None:
    container = _container()
    client = BlobServiceClient.from_connection_string(key_env.connection_string)
    assert not client.get_container_client(container).exists()
    store = open_store(f"az://{key_env.account}/{container}")
    sha, path = _blob_file(tmp_path, 100)
    assert store.has_blob(sha) is None
    assert store.put_blob(sha, path) is True
    assert client.get_container_client(container).exists()
    assert store.has_blob(sha) == 100


def test_a_missing_container_that_the_credential_cannot_create_is_explained(
    azurite_endpoint: AzuriteEndpoint, tmp_path: Path
) -> None:
    container = _container()
    # A container SAS may write blobs but never create its container.
    token = generate_container_sas(
        azurite_endpoint.account,
        container,
        account_key=azurite_endpoint.key,
        permission=ContainerSasPermissions(read=True, create=True, write=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    store = open_store(f"{azurite_endpoint.blob_url}/{container}", sas=token)
    sha, path = _blob_file(tmp_path, 10)
    with pytest.raises(StoreError, match=r"does not exist .* cannot create it") as caught:
        store.put_blob(sha, path)
    assert "az storage container create" in str(caught.value)
    _assert_secret_free([str(caught.value)], _signature(token))


def test_secrets_are_scrubbed_from_sdk_messages() -> None:
    message = (
        "Max retries exceeded with url: /acct/c/blobs/x?sv=2024&sp=r&sig=AbC%2Bd%3D&se=1 "
        "(AccountKey=c2VjcmV0;EndpointSuffix=core.windows.net)"
    )
    scrubbed = scrub(message, ("verysecretvalue",))
    assert "AbC" not in scrubbed and "c2VjcmV0" not in scrubbed
    assert "sp=r" in scrubbed
    assert scrub("key verysecretvalue here", ("verysecretvalue",)) == "key *** here"


def test_an_unreachable_store_fails_quickly_without_leaking_the_sas(
    azurite_endpoint: AzuriteEndpoint,
) -> None:
    token = generate_container_sas(
        azurite_endpoint.account,
        "gpu-cache",
        account_key=azurite_endpoint.key,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    url = f"http://127.0.0.1:{_closed_port()}/{azurite_endpoint.account}/gpu-cache?{token}"
    store = open_store(url)
    with pytest.raises(StoreError, match="cannot reach the store at http://127") as caught:
        store.has_blob("a" * 64)
    _assert_secret_free([str(caught.value), str(store), repr(store)], _signature(token))


def test_a_wrong_account_key_names_its_source_and_not_the_key(
    azurite_endpoint: AzuriteEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_key = base64.b64encode(os.urandom(64)).decode()
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        azurite_endpoint.connection_string.replace(azurite_endpoint.key, wrong_key),
    )
    store = open_store(f"az://{azurite_endpoint.account}/{_container()}")
    for action in (lambda: store.has_blob("a" * 64), lambda: store.get_manifest("p", "d" * 64)):
        with pytest.raises(StoreError, match="AZURE_STORAGE_CONNECTION_STRING") as caught:
            action()
        assert "AccountKey" in str(caught.value)
        _assert_secret_free([str(caught.value), str(store), repr(store)], wrong_key)


def test_an_expired_sas_is_refused_before_any_request(
    azurite_endpoint: AzuriteEndpoint,
) -> None:
    token = generate_container_sas(
        azurite_endpoint.account,
        "gpu-cache",
        account_key=azurite_endpoint.key,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) - timedelta(minutes=1),
    )
    # A closed port: the refusal cannot have come from the service.
    url = f"http://127.0.0.1:{_closed_port()}/{azurite_endpoint.account}/gpu-cache"
    with pytest.raises(StoreError, match="has expired") as caught:
        open_store(url, sas=token)
    _assert_secret_free([str(caught.value)], _signature(token))


def test_a_sas_that_is_not_valid_yet_is_explained(azurite_endpoint: AzuriteEndpoint) -> None:
    now = datetime.now(timezone.utc)
    token = generate_container_sas(
        azurite_endpoint.account,
        "gpu-cache",
        account_key=azurite_endpoint.key,
        permission=ContainerSasPermissions(read=True),
        start=now + timedelta(hours=1),
        expiry=now + timedelta(hours=2),
    )
    store = open_store(f"{azurite_endpoint.blob_url}/gpu-cache?{token}")
    with pytest.raises(StoreError, match="not valid at this time") as caught:
        store.get_manifest("p", "d" * 64)
    _assert_secret_free([str(caught.value), str(store), store.display_url], _signature(token))


def test_the_connection_string_comes_before_a_sas(key_env: AzuriteEndpoint, tmp_path: Path) -> None:
    expired = generate_container_sas(
        key_env.account,
        "gpu-cache",
        account_key=key_env.key,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) - timedelta(minutes=1),
    )
    store = open_store(f"{key_env.blob_url}/{_container()}?{expired}")
    assert isinstance(store, AzureStore)
    assert store.credentials.source == "AZURE_STORAGE_CONNECTION_STRING"
    sha, path = _blob_file(tmp_path, 10)
    assert store.put_blob(sha, path) is True


def test_a_connection_string_for_another_account_is_not_used(
    azurite_endpoint: AzuriteEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=https;AccountName=otheraccount;AccountKey={azurite_endpoint.key}",
    )
    token = generate_container_sas(
        azurite_endpoint.account,
        "gpu-cache",
        account_key=azurite_endpoint.key,
        permission=ContainerSasPermissions(read=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", token)
    store = open_store(f"{azurite_endpoint.blob_url}/gpu-cache")
    assert isinstance(store, AzureStore)
    assert store.credentials.source == "AZURE_STORAGE_SAS_TOKEN"
    assert "otheraccount" in store.credentials.ignored


# --- read-only SAS ------------------------------------------------------------------------


@pytest.fixture
def published(azure_store: AzureStore, tmp_path: Path) -> Iterator[tuple[AzureStore, str, bytes]]:
    sha, path = _blob_file(tmp_path, 4096)
    azure_store.put_blob(sha, path)
    azure_store.put_manifest("onnx-gpu", "d" * 64, b'{"format": 1}\n')
    yield azure_store, sha, path.read_bytes()


def _status_of(request: urllib.request.Request | str) -> int:
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_read_sas_reads_with_plain_http_but_cannot_write_or_list(
    published: tuple[AzureStore, str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, sha, data = published
    token = make_read_sas(
        store,
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
        profile="onnx-gpu",
        digest="d" * 64,
    )
    assert "sp=r&" in token and "sr=c" in token
    with urllib.request.urlopen(f"{store.blob_url(sha)}?{token}") as response:
        assert response.read() == data
    with urllib.request.urlopen(f"{store.manifest_url('onnx-gpu', 'd' * 64)}?{token}") as r:
        assert r.read() == b'{"format": 1}\n'

    put = urllib.request.Request(
        f"{store.base_url}/blobs/{'0' * 64}.tar.zst?{token}",
        data=b"x",
        method="PUT",
        headers={"x-ms-blob-type": "BlockBlob"},
    )
    assert _status_of(put) == 403
    container_url = store.base_url.rsplit("/", 2)[0]  # the store has a two-level prefix
    assert _status_of(f"{container_url}?restype=container&comp=list&{token}") == 403

    # The same token through the store: reads work, a write names the SAS as the culprit.
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    reader = open_store(f"{store.base_url}?{token}")
    assert isinstance(reader, AzureStore) and reader.credentials.kind == "sas"
    assert reader.get_manifest("onnx-gpu", "d" * 64) == b'{"format": 1}\n'
    other_sha, other = _blob_file(tmp_path, 10, name="other")
    with pytest.raises(StoreError, match="SAS in the store URL lacks the permission") as caught:
        reader.put_blob(other_sha, other)
    _assert_secret_free(
        [str(caught.value), str(reader), repr(reader), reader.display_url, reader.base_url],
        _signature(token),
    )


def test_no_sas_for_a_digest_that_is_not_published(azure_store: AzureStore) -> None:
    with pytest.raises(NotPublishedError):
        make_read_sas(
            azure_store,
            expiry=datetime.now(timezone.utc) + timedelta(hours=1),
            profile="onnx-gpu",
            digest="c" * 64,
        )


def test_sas_command_writes_a_private_token_file(
    published: tuple[AzureStore, str, bytes], key_env: AzuriteEndpoint, tmp_path: Path
) -> None:
    store, sha, data = published
    out = tmp_path / "sas.txt"
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": key_env.connection_string}
    result = run_cli("sas", store.display_url, "--expires-in", "2h", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    token = out.read_text()
    assert "expires" in result.stderr and "read" in result.stderr
    _assert_secret_free([result.stderr], _signature(token))
    with urllib.request.urlopen(f"{store.blob_url(sha)}?{token}") as response:
        assert response.read() == data

    printed = run_cli("sas", store.display_url, "--expires-in", "30m", env=env)
    assert printed.returncode == 0, printed.stderr
    printed_token = printed.stdout.strip()
    assert len(printed_token.split()) == 1 and "sig=" in printed_token
    assert _status_of(f"{store.blob_url(sha)}?{printed_token}") == 200
    _assert_secret_free([printed.stderr], _signature(printed_token))


def test_sas_expiry_is_capped_and_bad_durations_are_bad_input(
    published: tuple[AzureStore, str, bytes], key_env: AzuriteEndpoint, tmp_path: Path
) -> None:
    store, _, _ = published
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": key_env.connection_string}
    out = tmp_path / "sas.txt"
    for duration in ("2900000d", "99999999d", "366d", "1e9s", "-5d", "0h"):
        result = run_cli(
            "sas", store.display_url, "--expires-in", duration, "--out", str(out), env=env
        )
        assert result.returncode == 2, (duration, result.stderr)
        assert "Traceback" not in result.stderr and not out.exists()
    capped = run_cli("sas", store.display_url, "--expires-in", "400d", env=env)
    assert "--allow-long-expiry" in capped.stderr
    allowed = run_cli(
        "sas", store.display_url, "--expires-in", "400d", "--allow-long-expiry",
        "--out", str(out), "--json", env=env,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    expires = datetime.fromisoformat(allowed.json()["expires"].replace("Z", "+00:00"))
    assert timedelta(days=399) < expires - datetime.now(timezone.utc) < timedelta(days=401)
    assert sas_expiry(out.read_text()) == expires
    too_long = run_cli(
        "sas", store.display_url, "--expires-in", "4000d", "--allow-long-expiry", env=env
    )
    assert too_long.returncode == 2 and "3650 days" in too_long.stderr


def test_no_azure_credentials_is_one_message_naming_what_exists(tmp_path: Path) -> None:
    """No connection string, SAS or sign-in: say what is missing at once, in one message, and
    name only options that exist (no DefaultAzureCredential dump, no minutes of probing)."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    for args in (
        ["sas", "az://myaccount/gpu-cache"],
        ["fetch", f"az://myaccount/gpu-cache/p/{'a' * 64}", "--into", str(tmp_path / "x")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, env=env
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "no Azure credentials" in lines[0]
        for hint in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "az login"):
            assert hint in lines[0]
        assert "--sas" not in lines[0]


def test_sas_command_refuses_a_local_folder(tmp_path: Path) -> None:
    result = run_cli("sas", tmp_path.as_uri(), "--expires-in", "1h")
    assert result.returncode == 2
    assert "local folder" in result.stderr
    assert result.stdout == ""


def test_identity_sources_are_found_without_the_network(tmp_path: Path) -> None:
    from builder.stores.credentials import identity_sources

    empty = {"PATH": str(tmp_path)}
    assert identity_sources(empty) == []
    service_principal = {
        **empty,
        "AZURE_CLIENT_ID": "c",
        "AZURE_TENANT_ID": "t",
        "AZURE_CLIENT_SECRET": "s",
    }
    assert identity_sources(service_principal) == ["environment"]
    workload = {**service_principal, "AZURE_FEDERATED_TOKEN_FILE": "/var/run/token"}
    del workload["AZURE_CLIENT_SECRET"]
    assert identity_sources(workload) == ["workload identity"]
    assert identity_sources({**empty, "GPUBUILD_AZURE_MANAGED_IDENTITY": "1"}) == [
        "managed identity"
    ]
    az = tmp_path / "az"
    az.write_text("#!/bin/sh\n")
    az.chmod(0o755)
    assert identity_sources(empty) == ["Azure CLI"]
