"""Stores for shards and manifests (DESIGN.md, "Stores"): a local folder or Azure Blob.

Layout, the same in both: `PREFIX/blobs/<sha256>.tar.zst` (shared by every profile) and
`PREFIX/<profile>/<digest>/manifest.json`. Blobs are content-addressed, so writing one that is
already there is a no-op, and two publishers writing the same blob at once both succeed.

Secrets (account keys, SAS signatures, connection strings) never reach an exception message,
`str(store)` or `display_url`: every message goes through `builder.secrets.scrub`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from builder.errors import BadInputError, IntegrityError, NotPublishedError, StoreError
from builder.manifest import blob_key, manifest_key
from builder.secrets import register, register_url, scrub

_SCHEME_HELP = (
    "file://PATH (or an absolute path), az://ACCOUNT/CONTAINER[/PREFIX], "
    "https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX][?SAS], "
    "or http://127.0.0.1:PORT/ACCOUNT/CONTAINER[/PREFIX] (Azurite)"
)

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes newly written since the previous call (a delta)."""

_COPY_CHUNK = 4 * 1024 * 1024
# Azure tuning: blocks of 16 MiB keep a 4 GB wheel shard at about 250 requests (the limit is
# 50,000 blocks a blob) and are above the 4 MiB threshold for high-throughput block blobs.
# Files up to 8 MiB go in one request.
_UPLOAD_BLOCK_BYTES = 16 * 1024 * 1024
_SINGLE_PUT_BYTES = 8 * 1024 * 1024
_DOWNLOAD_CHUNK_BYTES = 8 * 1024 * 1024
_DEFAULT_CONCURRENCY = 4
# An unreachable endpoint must fail in seconds: the SDK's default retry policy backs off
# 15 s, 18 s, 24 s ... before giving up on a refused connection.
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 120
# A SAS starts a few minutes in the past so that a pod whose clock is slightly behind the
# machine that made the token can use it at once.
_SAS_CLOCK_SKEW = timedelta(minutes=5)
_USER_DELEGATION_MAX = timedelta(days=7)

_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_ACCOUNT_NAME = re.compile(r"^[a-z0-9]{3,24}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --- URLs and paths -----------------------------------------------------------------------


def default_store_url() -> str:
    """The embedded default store: `$XDG_CACHE_HOME/gpubuild/store` (or `~/.cache/...`)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return (base / "gpubuild" / "store").as_uri()


@dataclass(frozen=True)
class FileLocation:
    root: Path


@dataclass(frozen=True)
class AzureLocation:
    account: str
    container: str
    prefix: str  # "" or "a/b" (no leading or trailing slash)
    endpoint: str | None  # the account's blob endpoint; None for az:// (decided by credentials)
    query: str = field(repr=False)  # the URL's query string (a SAS), "" when none
    display_url: str  # the URL as given, without its query

    def with_endpoint(self, endpoint: str) -> AzureLocation:
        return AzureLocation(
            self.account, self.container, self.prefix, endpoint, self.query, self.display_url
        )


def _check_sha256(sha256: str) -> None:
    if not _SHA256.match(sha256):
        raise BadInputError(f"{sha256!r} is not a sha256 digest (64 lowercase hex characters)")


def _is_loopback_or_ip(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_container(path: str, url: str) -> tuple[str, str]:
    parts = [p for p in unquote(path).split("/") if p]
    if not parts:
        raise BadInputError(f"store URL {url}: names no container; expected {_SCHEME_HELP}")
    container, prefix = parts[0], "/".join(parts[1:])
    if not _CONTAINER_NAME.match(container):
        raise BadInputError(
            f"store URL {url}: {container!r} is not a valid container name "
            "(3-63 lowercase letters, digits and single hyphens)"
        )
    return container, prefix


def _check_account(account: str, url: str) -> str:
    account = account.lower()
    if not _ACCOUNT_NAME.match(account):
        raise BadInputError(
            f"store URL {url}: {account!r} is not a valid storage account name "
            "(3-24 lowercase letters and digits)"
        )
    return account


def parse_store_url(url: str) -> FileLocation | AzureLocation:
    """Read a store URL without touching the network or the environment."""
    register_url(url)
    if "://" not in url:
        if url.startswith(("/", "./", "../", "~")):
            return FileLocation(Path(url).expanduser().resolve())
        raise BadInputError(f"store {url!r}: not a URL; expected {_SCHEME_HELP}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    shown = url.split("?", 1)[0]
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BadInputError(
                f"store URL {shown}: a file URL needs an absolute path, like file:///srv/store"
            )
        if parts.query:
            raise BadInputError(f"store URL {shown}: a file URL takes no query string")
        return FileLocation(Path(unquote(parts.path)).resolve())
    if scheme == "az":
        account = _check_account(parts.netloc, shown)
        container, prefix = _split_container(parts.path, shown)
        return AzureLocation(account, container, prefix, None, parts.query, shown.rstrip("/"))
    if scheme in ("http", "https"):
        host = (parts.hostname or "").lower()
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        if _is_loopback_or_ip(host):
            # Path-style, as Azurite serves it: http://127.0.0.1:PORT/ACCOUNT/CONTAINER/...
            segments = [p for p in unquote(parts.path).split("/") if p]
            if not segments:
                raise BadInputError(f"store URL {shown}: names no account; expected {_SCHEME_HELP}")
            account = _check_account(segments[0], shown)
            container, prefix = _split_container("/".join(segments[1:]), shown)
            endpoint = f"{scheme}://{netloc}/{account}"
        elif ".blob." in host:
            account = _check_account(host.split(".", 1)[0], shown)
            container, prefix = _split_container(parts.path, shown)
            endpoint = f"{scheme}://{netloc}"
        else:
            raise BadInputError(
                f"store URL {shown}: {host} is not an Azure blob endpoint "
                "(ACCOUNT.blob.core.windows.net) or a loopback address; "
                f"expected {_SCHEME_HELP}"
            )
        return AzureLocation(account, container, prefix, endpoint, parts.query, shown.rstrip("/"))
    raise BadInputError(f"store URL {shown}: unknown scheme {scheme!r}; expected {_SCHEME_HELP}")


# --- secrets ------------------------------------------------------------------------------


def sas_expiry(token: str) -> datetime | None:
    """The `se=` (signed expiry) of a SAS token, timezone-aware; None when absent or unreadable."""
    return _sas_time(token, "se")


def _sas_time(token: str, name: str) -> datetime | None:
    values = parse_qs(token.lstrip("?")).get(name)
    if not values:
        return None
    text = values[0].strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _signature(token: str) -> str | None:
    values = parse_qs(token.lstrip("?")).get("sig")
    return values[0] if values else None


def parse_connection_string(text: str) -> dict[str, str]:
    """`Key=Value;...` into a dict with lowercase keys (values may contain `=`)."""
    settings = {}
    for item in text.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep and key:
            settings[key.strip().lower()] = value.strip()
    return settings


AZURITE_ACCOUNT = "devstoreaccount1"
# Microsoft's public, documented development key (not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def _connection_string_endpoint(settings: dict[str, str]) -> str | None:
    if settings.get("usedevelopmentstorage", "").lower() == "true":
        return f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}"
    if settings.get("blobendpoint"):
        return settings["blobendpoint"].rstrip("/")
    account = settings.get("accountname")
    if not account:
        return None
    protocol = settings.get("defaultendpointsprotocol", "https")
    suffix = settings.get("endpointsuffix", "core.windows.net")
    return f"{protocol}://{account}.blob.{suffix}"


def _endpoint_account(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if _is_loopback_or_ip(host):
        return parts.path.strip("/").split("/")[0].lower()
    return host.split(".", 1)[0]


def _same_endpoint(left: str, right: str) -> bool:
    def norm(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        return (parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/"))

    return norm(left) == norm(right)


# --- credentials --------------------------------------------------------------------------


@dataclass(frozen=True)
class AzureCredentials:
    """Which credential a store uses, and the words to tell a person where it came from."""

    source: str  # e.g. "AZURE_STORAGE_CONNECTION_STRING", "the SAS in the store URL"
    kind: str  # "key", "sas" or "identity"
    endpoint: str
    account_key: str | None = field(default=None, repr=False)
    sas: str | None = field(default=None, repr=False)
    ignored: str = ""  # why a credential higher in the order was not used

    @property
    def secrets(self) -> tuple[str, ...]:
        found = [self.account_key or "", self.sas or ""]
        if self.sas and _signature(self.sas):
            found.append(_signature(self.sas) or "")
        return tuple(s for s in found if s)

    def __post_init__(self) -> None:
        for secret in self.secrets:
            register(secret)


def choose_credentials(location: AzureLocation, *, sas: str | None = None) -> AzureCredentials:
    """Pick the credential by DESIGN.md's order: connection string, SAS, DefaultAzureCredential."""
    ignored = ""
    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
    if connection:
        settings = parse_connection_string(connection)
        cs_endpoint = _connection_string_endpoint(settings)
        cs_account = (
            settings.get("accountname")
            or (AZURITE_ACCOUNT if settings.get("usedevelopmentstorage") else "")
            or (_endpoint_account(cs_endpoint) if cs_endpoint else "")
        ).lower()
        if location.endpoint is None:
            matches = cs_endpoint is not None and cs_account == location.account
        else:
            matches = cs_endpoint is not None and _same_endpoint(cs_endpoint, location.endpoint)
        if matches and cs_endpoint is not None:
            key = settings.get("accountkey") or (
                AZURITE_KEY if settings.get("usedevelopmentstorage") else None
            )
            token = settings.get("sharedaccesssignature")
            source = "AZURE_STORAGE_CONNECTION_STRING"
            if key:
                return AzureCredentials(source, "key", cs_endpoint, account_key=key)
            if token:
                _check_not_expired(token, source, location.display_url)
                return AzureCredentials(source, "sas", cs_endpoint, sas=token.lstrip("?"))
            ignored = (
                "AZURE_STORAGE_CONNECTION_STRING has neither AccountKey nor SharedAccessSignature"
            )
        else:
            ignored = (
                f"AZURE_STORAGE_CONNECTION_STRING is for account {cs_account or '?'} "
                f"({scrub(cs_endpoint or '?')}), not for this store, so it was not used"
            )
    endpoint = location.endpoint or f"https://{location.account}.blob.core.windows.net"
    candidates = (
        (location.query, "the SAS in the store URL"),
        (sas or "", "the SAS given to this call"),
        (os.environ.get("AZURE_STORAGE_SAS_TOKEN", ""), "AZURE_STORAGE_SAS_TOKEN"),
    )
    for token, source in candidates:
        token = token.strip().lstrip("?")
        if not token:
            continue
        if not _signature(token):
            raise BadInputError(
                f"{source} for {location.display_url} is not a SAS token (it has no sig=)"
            )
        _check_not_expired(token, source, location.display_url)
        return AzureCredentials(source, "sas", endpoint, sas=token, ignored=ignored)
    sources = identity_sources()
    if not sources:
        raise StoreError(
            f"no Azure credentials for {location.display_url}: set"
            " AZURE_STORAGE_CONNECTION_STRING (with an account key), put a SAS in the URL's"
            " query or in AZURE_STORAGE_SAS_TOKEN, or sign in: `az login` (the Azure CLI must"
            " be on PATH), a workload identity (AZURE_CLIENT_ID, AZURE_TENANT_ID,"
            " AZURE_FEDERATED_TOKEN_FILE), or a managed identity (AZURE_CLIENT_ID, or"
            f" {MANAGED_IDENTITY_VARIABLE}=1 for a system-assigned one)"
            + (f" ({ignored})" if ignored else "")
        )
    return AzureCredentials(
        f"DefaultAzureCredential ({', '.join(sources)})", "identity", endpoint, ignored=ignored
    )


MANAGED_IDENTITY_VARIABLE = "GPUBUILD_AZURE_MANAGED_IDENTITY"


def identity_sources(environ: dict[str, str] | None = None) -> list[str]:
    """The Azure AD sign-ins this machine offers, found without touching the network.

    DefaultAzureCredential tries every kind it knows, probing the instance metadata endpoint
    and several CLIs with timeouts: with none present that takes about 33 s and logs ~60
    lines. Only the kinds found here are tried."""
    env = dict(os.environ) if environ is None else environ
    found = []
    if (
        env.get("AZURE_CLIENT_ID")
        and env.get("AZURE_TENANT_ID")
        and (
            env.get("AZURE_CLIENT_SECRET")
            or env.get("AZURE_CLIENT_CERTIFICATE_PATH")
            or env.get("AZURE_FEDERATED_TOKEN_FILE")
        )
    ):
        found.append(
            "environment" if not env.get("AZURE_FEDERATED_TOKEN_FILE") else "workload identity"
        )
    if (
        env.get("IDENTITY_ENDPOINT")
        or env.get("MSI_ENDPOINT")
        or env.get(MANAGED_IDENTITY_VARIABLE) == "1"
        or (env.get("AZURE_CLIENT_ID") and not found)
    ):
        found.append("managed identity")
    if shutil.which("az", path=env.get("PATH")):
        found.append("Azure CLI")
    if shutil.which("azd", path=env.get("PATH")):
        found.append("Azure Developer CLI")
    return found


def identity_credential() -> object:
    """DefaultAzureCredential limited to the sign-ins `identity_sources` found, quietly: its
    own log lists every kind it tried, and the store's message says what to do instead."""
    import logging

    from azure.identity import DefaultAzureCredential

    logging.getLogger("azure.identity").setLevel(logging.CRITICAL)
    sources = identity_sources()
    return DefaultAzureCredential(
        exclude_environment_credential=not {"environment", "workload identity"} & set(sources),
        exclude_workload_identity_credential="workload identity" not in sources,
        exclude_managed_identity_credential="managed identity" not in sources,
        exclude_cli_credential="Azure CLI" not in sources,
        exclude_developer_cli_credential="Azure Developer CLI" not in sources,
        exclude_powershell_credential=True,
        exclude_visual_studio_code_credential=True,
        exclude_shared_token_cache_credential=True,
        exclude_interactive_browser_credential=True,
        exclude_broker_credential=True,
    )


def _check_not_expired(token: str, source: str, display_url: str) -> None:
    expiry = sas_expiry(token)
    if expiry is not None and expiry <= datetime.now(timezone.utc):
        raise StoreError(
            f"{source} for {display_url} has expired (se={expiry:%Y-%m-%dT%H:%M:%SZ}): "
            "make a new one, e.g. `gpubuild sas STORE_URL --expires-in 24h`"
        )


def _credential_hint(credentials: AzureCredentials) -> str:
    if credentials.kind == "key":
        return (
            f"check that the AccountKey in {credentials.source} is a current key of the account "
            "(keys are rotated: `az storage account keys list`)"
        )
    if credentials.kind == "sas":
        return (
            f"check that {credentials.source} was made for this account and container, has the "
            "permissions this needs (read to install; create and write to publish) and has not "
            "expired (se=)"
        )
    return (
        "check that `az login` (or the workload identity) is signed in to the right tenant and "
        "has a Storage Blob Data role (Reader to install, Contributor to publish) on the account"
    )


# --- the store interface ------------------------------------------------------------------


class Store:
    """Where shards and manifests live. Subclasses: FileStore, AzureStore."""

    display_url: str  # for messages: never holds a secret
    base_url: str  # the folder that holds blobs/, as the init script reads it (no secret)

    def __str__(self) -> str:
        return self.display_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    def has_blob(self, sha256: str) -> int | None:
        """The blob's size in bytes when the store has it, else None."""
        raise NotImplementedError

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        """Store the file at `path` as blob `sha256`; False when it was already there.

        `overwrite`: replace what the store holds under that name (a damaged copy)."""
        raise NotImplementedError

    def open_blob(self, sha256: str) -> BinaryIO:
        """A streaming reader of the blob (close it when done)."""
        raise NotImplementedError

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        raise NotImplementedError

    def get_manifest(self, profile: str, digest: str) -> bytes:
        """The manifest's bytes; NotPublishedError when the store has none."""
        raise NotImplementedError

    def has_manifest(self, profile: str, digest: str) -> bool:
        try:
            self.get_manifest(profile, digest)
        except NotPublishedError:
            return False
        return True

    def blob_digest(self, sha256: str) -> tuple[str, int] | None:
        """(sha256, size) of what the store really holds as blob `sha256`, read in a stream
        (bounded memory); None when it has no such blob."""
        try:
            stream = self.open_blob(sha256)
        except StoreError:
            if self.has_blob(sha256) is None:
                return None
            raise
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := stream.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        finally:
            stream.close()
        return digest.hexdigest(), size

    def blob_url(self, sha256: str) -> str:
        return f"{self.base_url}/{quote(blob_key(sha256))}"

    def manifest_url(self, profile: str, digest: str) -> str:
        return f"{self.base_url}/{quote(manifest_key(profile, digest))}"

    def _size_to_put(self, sha256: str, path: Path) -> int | None:
        """The file's size when the blob must be written; None when the store has it already.

        A blob present at another size is damaged: refused, never silently overwritten.
        """
        size = _file_size(path)
        present = self.has_blob(sha256)
        if present == size:
            return None
        if present is not None:
            raise self._wrong_size(sha256, present, size)
        return size

    def _wrong_size(self, sha256: str, found: int, expected: int) -> StoreError:
        return StoreError(
            f"{self.display_url}/{blob_key(sha256)} holds {found} bytes, not {expected}: the copy "
            "in the store is damaged; delete it there and publish again"
        )

    def _missing_blob(self, sha256: str) -> StoreError:
        return StoreError(
            f"{self.display_url} has no {blob_key(sha256)}: it was deleted or never published; "
            "publish the profile again"
        )

    def _not_published(self, profile: str, digest: str) -> NotPublishedError:
        return NotPublishedError(
            f"{self.display_url} has no {manifest_key(profile, digest)}: publish it first "
            "(gpubuild publish-cache) or check the profile name and digest"
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file to publish") from None


class _ProgressDeltas:
    """Turns the SDK's cumulative (and, across threads, unordered) counts into deltas."""

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback
        self._seen = 0
        self._lock = threading.Lock()

    def __call__(self, current: int, _total: int | None = None) -> None:
        with self._lock:
            delta = current - self._seen
            if delta <= 0:
                return
            self._seen = current
        self._callback(delta)


# --- file store ---------------------------------------------------------------------------


class FileStore(Store):
    """A folder on this machine. Writes go to a temp file in the same folder, then os.replace,
    so a reader or a second writer only ever sees a whole file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base_url = root.as_uri()
        self.display_url = self.base_url

    def _blob_path(self, sha256: str) -> Path:
        _check_sha256(sha256)
        return self.root / blob_key(sha256)

    def has_blob(self, sha256: str) -> int | None:
        try:
            return self._blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the store at {self.display_url}: {exc}") from None

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        if not overwrite and self._size_to_put(sha256, path) is None:
            return False
        _file_size(path)
        target = self._blob_path(sha256)
        digest = hashlib.sha256()

        def copy(out: BinaryIO) -> None:
            with path.open("rb") as source:
                while chunk := source.read(_COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    if on_progress:
                        on_progress(len(chunk))
            if digest.hexdigest() != sha256:
                raise IntegrityError(
                    f"{path}: its sha256 is {digest.hexdigest()}, not {sha256}; pack it again"
                )

        self._write_atomically(target, copy)
        return True

    def open_blob(self, sha256: str) -> BinaryIO:
        try:
            return self._blob_path(sha256).open("rb")
        except FileNotFoundError:
            raise self._missing_blob(sha256) from None

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        self._write_atomically(self.root / manifest_key(profile, digest), lambda f: f.write(data))

    def get_manifest(self, profile: str, digest: str) -> bytes:
        try:
            return (self.root / manifest_key(profile, digest)).read_bytes()
        except FileNotFoundError:
            raise self._not_published(profile, digest) from None
        except OSError as exc:
            raise StoreError(f"cannot read the store at {self.display_url}: {exc}") from None

    def _write_atomically(self, target: Path, write: Callable[[BinaryIO], object]) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise StoreError(f"cannot write to the store at {self.display_url}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                # A crash after the rename must not leave a right-sized file of zeros, which
                # has_blob would take for a published blob.
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot write to the store at {self.display_url}: {exc}"
                ) from None
            raise


# --- Azure store --------------------------------------------------------------------------


class _ChunkReader(io.RawIOBase):
    """A file-like reader over `download_blob().chunks()`; errors mapped as the store maps them."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        errors: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._chunks = chunks
        self._errors = errors
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not len(self._pending):
            with self._errors():
                chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class AzureStore(Store):
    """A container (and optional prefix) in Azure Blob Storage, or in Azurite."""

    def __init__(
        self,
        location: AzureLocation,
        credentials: AzureCredentials,
        *,
        max_concurrency: int = _DEFAULT_CONCURRENCY,
    ) -> None:
        from azure.storage.blob import BlobServiceClient, ExponentialRetry

        self.location = location
        self.credentials = credentials
        self.max_concurrency = max_concurrency
        self.display_url = location.display_url
        self.account = location.account
        self.container = location.container
        self.prefix = location.prefix
        container_url = f"{credentials.endpoint}/{quote(location.container)}"
        self.base_url = (
            f"{container_url}/{quote(location.prefix)}" if location.prefix else container_url
        )
        if credentials.kind == "key":
            credential: object = {
                "account_name": location.account,
                "account_key": credentials.account_key,
            }
        elif credentials.kind == "sas":
            from azure.core.credentials import AzureSasCredential

            credential = AzureSasCredential(credentials.sas or "")
        else:
            credential = identity_credential()
        self._service = BlobServiceClient(
            account_url=credentials.endpoint,
            credential=credential,
            retry_policy=ExponentialRetry(
                initial_backoff=1,
                increment_base=2,
                retry_total=4,
                retry_connect=1,
                random_jitter_range=1,
            ),
            connection_timeout=_CONNECT_TIMEOUT_S,
            read_timeout=_READ_TIMEOUT_S,
            max_block_size=_UPLOAD_BLOCK_BYTES,
            max_single_put_size=_SINGLE_PUT_BYTES,
            max_single_get_size=_DOWNLOAD_CHUNK_BYTES,
            max_chunk_get_size=_DOWNLOAD_CHUNK_BYTES,
        )
        self._container = self._service.get_container_client(location.container)
        self._container_checked = False
        self._container_lock = threading.Lock()

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- errors

    @contextlib.contextmanager
    def _errors(
        self, action: str, passthrough: tuple[type[Exception], ...] | None = None
    ) -> Iterator[None]:
        """Turn SDK errors into StoreError with a scrubbed message that says what to check.

        Errors of the `passthrough` types (by default a 404) reach the caller unchanged,
        except refused credentials, which are always mapped.
        """
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        if passthrough is None:
            passthrough = (ResourceNotFoundError,)

        try:
            yield
        except (ServiceRequestError, ServiceResponseError) as exc:
            reason = scrub(_first_line(str(exc)), self.credentials.secrets)
            raise StoreError(
                f"cannot reach the store at {self.display_url}: {reason}; check the URL, the "
                "network and DNS"
            ) from None
        except ClientAuthenticationError as exc:
            raise self._auth_error(action, exc) from None
        except HttpResponseError as exc:
            if exc.status_code == 403:
                raise self._auth_error(action, exc) from None
            if isinstance(exc, passthrough):
                raise
            code = _error_code(exc) or exc.reason or "error"
            raise StoreError(
                f"{action} at {self.display_url} failed: HTTP {exc.status_code} {code}"
            ) from None

    def _auth_error(self, action: str, exc: Exception) -> StoreError:
        detail = str(getattr(exc, "message", "") or exc)
        code = _error_code(exc) or "AuthenticationFailed"
        creds = self.credentials
        if type(exc).__name__ == "CredentialUnavailableError" or (
            creds.kind == "identity" and getattr(exc, "status_code", None) is None
        ):
            return StoreError(
                f"no credentials for the store at {self.display_url}: set "
                "AZURE_STORAGE_CONNECTION_STRING, give a SAS (in the URL or "
                "AZURE_STORAGE_SAS_TOKEN), or sign in with `az login`"
                + (f" ({creds.ignored})" if creds.ignored else "")
            )
        if creds.kind == "sas":
            expiry = sas_expiry(creds.sas or "")
            expired = expiry is not None and expiry <= datetime.now(timezone.utc)
            if expired or "expir" in detail.lower():
                return StoreError(
                    f"{creds.source} for {self.display_url} has expired"
                    + (f" (se={expiry:%Y-%m-%dT%H:%M:%SZ})" if expiry else "")
                    + ": make a new one, e.g. `gpubuild sas STORE_URL --expires-in 24h`"
                )
            start = _sas_time(creds.sas or "", "st")
            if (start is not None and start > datetime.now(timezone.utc)) or (
                "time frame" in detail.lower()
            ):
                return StoreError(
                    f"{creds.source} for {self.display_url} is not valid at this time "
                    "(check its st= and se= and this machine's clock)"
                )
        if code == "AuthorizationPermissionMismatch":
            what = "lacks the permission"
        else:
            what = "was refused"
        message = (
            f"{action} at {self.display_url}: the credential from {creds.source} {what} "
            f"({code}); {_credential_hint(creds)}"
        )
        if creds.ignored:
            message += f" ({creds.ignored})"
        return StoreError(scrub(message, creds.secrets))

    def _ensure_container(self) -> None:
        """Create the container once, when a write finds it missing and the credential may."""
        from azure.core.exceptions import HttpResponseError, ResourceExistsError

        with self._container_lock:
            if self._container_checked:
                return
            with self._errors(f"creating container {self.container}"):
                try:
                    with contextlib.suppress(ResourceExistsError):
                        self._container.create_container()
                except HttpResponseError as exc:
                    code = _error_code(exc) or f"HTTP {exc.status_code}"
                    raise StoreError(
                        f"container {self.container} does not exist at {self.display_url} and "
                        f"the credential from {self.credentials.source} cannot create it "
                        f"({code}): create it (az storage container create --name "
                        f"{self.container} --account-name {self.account}), or use a "
                        "credential that may (an account key, or the Storage Blob Data "
                        "Contributor role)"
                    ) from None
            self._container_checked = True

    # -- the interface

    def has_blob(self, sha256: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError

        _check_sha256(sha256)
        blob = self._container.get_blob_client(self._name(blob_key(sha256)))
        try:
            with self._errors("reading"):
                return int(blob.get_blob_properties().size)
        except ResourceNotFoundError:
            return None

    def put_blob(
        self,
        sha256: str,
        path: Path,
        on_progress: ProgressCallback | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        size = _file_size(path) if overwrite else self._size_to_put(sha256, path)
        if size is None:
            return False
        # The parallel block upload reads the file out of order, so hash it first: a local
        # blob damaged after packing must never reach the store every pod reads.
        digest = hashlib.sha256()
        with path.open("rb") as source:
            while chunk := source.read(_COPY_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise IntegrityError(
                f"{path}: its sha256 is {digest.hexdigest()}, not {sha256}; delete it and pack again"
            )
        blob = self._container.get_blob_client(self._name(blob_key(sha256)))
        hook = _ProgressDeltas(on_progress) if on_progress else None

        def upload() -> None:
            with path.open("rb") as source:
                blob.upload_blob(
                    source,
                    length=size,
                    overwrite=overwrite,
                    max_concurrency=self.max_concurrency,
                    progress_hook=hook,
                )

        for attempt in range(2):
            try:
                with self._errors(f"uploading {blob_key(sha256)}", (HttpResponseError,)):
                    upload()
                return True
            except ResourceNotFoundError as exc:
                if attempt or _error_code(exc) != "ContainerNotFound":
                    raise self._unexpected("uploading", exc) from None
                self._ensure_container()
            except HttpResponseError as exc:
                # Another publisher committed the same blob first: ResourceExistsError for
                # overwrite=False, or a block-list error when its commit discarded our blocks.
                present = self.has_blob(sha256)
                if present == size:
                    return False
                if present is not None:
                    raise self._wrong_size(sha256, present, size) from None
                raise self._unexpected(f"uploading {blob_key(sha256)}", exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def open_blob(self, sha256: str) -> BinaryIO:
        from azure.core.exceptions import ResourceNotFoundError

        _check_sha256(sha256)
        blob = self._container.get_blob_client(self._name(blob_key(sha256)))
        try:
            with self._errors(f"downloading {blob_key(sha256)}"):
                # One stream: the SDK cannot write a parallel download into a pipe (it needs a
                # seekable target, DESIGN.md), so parallelism comes from several shards.
                downloader = blob.download_blob(max_concurrency=1)
        except ResourceNotFoundError:
            raise self._missing_blob(sha256) from None
        reader = _ChunkReader(
            iter(downloader.chunks()), lambda: self._errors(f"downloading {blob_key(sha256)}")
        )
        return io.BufferedReader(reader, buffer_size=1024 * 1024)  # type: ignore[return-value]

    def put_manifest(self, profile: str, digest: str, data: bytes) -> None:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        blob = self._container.get_blob_client(self._name(manifest_key(profile, digest)))
        for attempt in range(2):
            try:
                with self._errors(f"uploading {manifest_key(profile, digest)}"):
                    # Same digest, same bytes: a second publisher rewriting it changes nothing.
                    blob.upload_blob(
                        data,
                        overwrite=True,
                        content_settings=ContentSettings(content_type="application/json"),
                    )
                return
            except ResourceNotFoundError as exc:
                if attempt or _error_code(exc) != "ContainerNotFound":
                    raise self._unexpected("uploading the manifest", exc) from None
                self._ensure_container()

    def get_manifest(self, profile: str, digest: str) -> bytes:
        from azure.core.exceptions import ResourceNotFoundError

        blob = self._container.get_blob_client(self._name(manifest_key(profile, digest)))
        try:
            with self._errors(f"reading {manifest_key(profile, digest)}"):
                return blob.download_blob().readall()
        except ResourceNotFoundError:
            raise self._not_published(profile, digest) from None

    def _unexpected(self, action: str, exc: Exception) -> StoreError:
        code = _error_code(exc) or type(exc).__name__
        status = getattr(exc, "status_code", None)
        return StoreError(
            scrub(
                f"{action} at {self.display_url} failed: HTTP {status} {code}",
                self.credentials.secrets,
            )
        )


def _error_code(exc: Exception) -> str | None:
    """The service's error code as text (the SDK gives an enum for codes it knows)."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code)) if code else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"


# --- opening a store ----------------------------------------------------------------------


def open_store(
    url: str, *, sas: str | None = None, max_concurrency: int = _DEFAULT_CONCURRENCY
) -> Store:
    """Open the store at `url` (file://, a path, az://, https:// or Azurite's http://).

    Touches no network: an unreachable store or refused credentials fail on first use.
    `sas` is used when the URL carries none and AZURE_STORAGE_CONNECTION_STRING does not apply.
    """
    location = parse_store_url(url)
    if isinstance(location, FileLocation):
        if sas:
            raise BadInputError(f"{location.root}: a SAS is for Azure stores, not local folders")
        return FileStore(location.root)
    credentials = choose_credentials(location, sas=sas)
    return AzureStore(
        location.with_endpoint(credentials.endpoint),
        credentials,
        max_concurrency=max_concurrency,
    )


# --- read-only SAS ------------------------------------------------------------------------


def make_read_sas(
    store: Store,
    *,
    expiry: datetime,
    profile: str | None = None,
    digest: str | None = None,
) -> str:
    """A read-only SAS token (no leading `?`) for the store's container, for curl in a pod.

    Its scope is the whole container, read permission only (no list, write or delete): Azure
    offers no prefix-scoped SAS without a hierarchical namespace, and shards under `blobs/` are
    shared by every profile anyway. `profile` and `digest`, when given, are checked to be
    published first, so a SAS is never handed out for something a pod cannot install.

    Needs an account key (AZURE_STORAGE_CONNECTION_STRING) or an Azure AD identity, which
    signs with a user delegation key (at most 7 days). A local folder has no SAS: BadInputError.
    """
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    if not isinstance(store, AzureStore):
        raise BadInputError(
            f"{store.display_url} is a local folder: it needs no SAS (curl reads file:// URLs)"
        )
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=timezone.utc)
    now = datetime.now(timezone.utc)
    if expiry <= now:
        raise BadInputError(f"the SAS expiry {expiry:%Y-%m-%dT%H:%M:%SZ} is not in the future")
    if profile is not None and digest is not None:
        store.get_manifest(profile, digest)
    creds = store.credentials
    start = now - _SAS_CLOCK_SKEW
    permission = ContainerSasPermissions(read=True)
    # Plain http only for loopback emulators; a real account's token is https-only.
    protocol = "https" if creds.endpoint.startswith("https://") else None
    if creds.kind == "key":
        try:
            return generate_container_sas(
                store.account,
                store.container,
                account_key=creds.account_key,
                permission=permission,
                expiry=expiry,
                start=start,
                protocol=protocol,
            )
        except (ValueError, TypeError):  # binascii.Error is a ValueError
            raise BadInputError(
                f"the AccountKey from {creds.source} is not valid base64; copy the account's "
                "key or connection string again"
            ) from None
    if creds.kind == "identity":
        if expiry - now > _USER_DELEGATION_MAX:
            raise BadInputError(
                "a SAS signed with an Azure AD identity lasts at most 7 days; use a shorter "
                "--expires-in, or an account key (AZURE_STORAGE_CONNECTION_STRING)"
            )
        with store._errors("getting a user delegation key"):
            delegation = store._service.get_user_delegation_key(start, expiry)
        return generate_container_sas(
            store.account,
            store.container,
            user_delegation_key=delegation,
            permission=permission,
            expiry=expiry,
            start=start,
            protocol=protocol,
        )
    raise BadInputError(
        f"cannot make a SAS for {store.display_url} from {creds.source}: a SAS is signed with an "
        "account key (AZURE_STORAGE_CONNECTION_STRING) or an Azure AD identity (`az login`)"
    )


_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhd])\s*$")
SAS_DEFAULT_MAX = timedelta(days=365)
SAS_HARD_MAX = timedelta(days=3650)  # even with --allow-long-expiry
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, maximum: timedelta | None = None) -> timedelta:
    """`90s`, `30m`, `24h`, `7d` into a timedelta; above `maximum` is bad input, not a crash."""
    match = _DURATION.match(text.lower())
    if not match or int(match.group(1)) == 0:
        raise BadInputError(f"duration {text!r}: expected a positive number and s, m, h or d (24h)")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if maximum is not None and seconds > maximum.total_seconds():
        raise BadInputError(
            f"duration {text!r} is longer than {maximum.days} days, the most this allows"
        )
    return timedelta(seconds=seconds)


def sas_lifetime(text: str, *, allow_long: bool = False) -> timedelta:
    """A read SAS's lifetime: at most a year, or ten years when the user says so explicitly.

    A read token for the store outlives every pod that uses it and cannot be revoked except
    by rotating the account key; a short one with rotation is the safe habit."""
    limit = SAS_HARD_MAX if allow_long else SAS_DEFAULT_MAX
    try:
        return parse_duration(text, maximum=limit)
    except BadInputError as exc:
        if allow_long or "longer than" not in str(exc):
            raise
        raise BadInputError(
            f"--expires-in {text}: a SAS lasts at most {SAS_DEFAULT_MAX.days} days unless you"
            " pass --allow-long-expiry (up to ten years); prefer a short one and rotate it"
        ) from None


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), even when it already exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def sas_expiry_for(lifetime: timedelta) -> datetime:
    """The expiry of a token made now that lasts `lifetime`, to the second, in UTC."""
    return (datetime.now(timezone.utc) + lifetime).replace(microsecond=0)


def describe_read_sas(store: Store, expiry: datetime) -> str:
    """One line for stderr about a token from make_read_sas (no secret in it)."""
    where = (
        f"container {store.container} of account {store.account}"
        if isinstance(store, AzureStore)
        else store.display_url
    )
    return (
        f"read-only SAS for {where} (permission: read blobs; no list, write or delete), "
        f"expires {expiry:%Y-%m-%dT%H:%M:%SZ}"
    )
