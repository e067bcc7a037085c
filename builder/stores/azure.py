"""A store in Azure Blob Storage (or Azurite), through azure-storage-blob.

Every message made from an SDK error is scrubbed (builder.secrets) and says what to check.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

from builder.errors import BadInputError, StoreError
from builder.fields import PROFILE_NAME, SHA256
from builder.manifest import blob_key, manifest_key
from builder.secrets import scrub
from builder.stores.base import (
    ProgressCallback,
    Store,
    StoredBlob,
    StoredManifest,
    check_local_blob,
    check_sha256,
    file_size,
)
from builder.stores.credentials import (
    AzureCredentials,
    credential_hint,
    identity_credential,
    sas_expiry,
    sas_time,
)
from builder.stores.urls import AzureLocation

if TYPE_CHECKING:  # the SDK is imported when a store is opened, not with the CLI
    from azure.core.credentials import AzureSasCredential, TokenCredential

# Azure tuning: blocks of 16 MiB keep a 4 GB wheel shard at about 250 requests (the limit is
# 50,000 blocks a blob) and are above the 4 MiB threshold for high-throughput block blobs.
# Files up to 8 MiB go in one request.
_UPLOAD_BLOCK_BYTES = 16 * 1024 * 1024
_SINGLE_PUT_BYTES = 8 * 1024 * 1024
_DOWNLOAD_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_CONCURRENCY = 4
# An unreachable endpoint must fail in seconds: the SDK's default retry policy backs off
# 15 s, 18 s, 24 s ... before giving up on a refused connection.
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 120
# A SAS starts a few minutes in the past so that a pod whose clock is slightly behind the
# machine that made the token can use it at once.
_SAS_CLOCK_SKEW = timedelta(minutes=5)
_USER_DELEGATION_MAX = timedelta(days=7)


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

    # typeshed's parameter type is WriteableBuffer, a name only its stubs have; a memoryview
    # is what io.BufferedReader passes.
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
        max_concurrency: int = DEFAULT_CONCURRENCY,
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
            credential: dict[str, str] | AzureSasCredential | TokenCredential = {
                "account_name": location.account,
                "account_key": credentials.account_key or "",
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
            start = sas_time(creds.sas or "", "st")
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
            f"({code}); {credential_hint(creds)}"
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

        check_sha256(sha256)
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

        size = file_size(path) if overwrite else self._size_to_put(sha256, path)
        if size is None:
            return False
        check_local_blob(path, sha256)
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

        check_sha256(sha256)
        blob = self._container.get_blob_client(self._name(blob_key(sha256)))
        try:
            with self._errors(f"downloading {blob_key(sha256)}"):
                # One stream: the SDK cannot write a parallel download into a pipe (it needs a
                # seekable target), so parallelism comes from several shards.
                downloader = blob.download_blob(max_concurrency=1)
        except ResourceNotFoundError:
            raise self._missing_blob(sha256) from None
        reader = _ChunkReader(
            iter(downloader.chunks()), lambda: self._errors(f"downloading {blob_key(sha256)}")
        )
        return io.BufferedReader(reader, buffer_size=1024 * 1024)

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

    # -- maintenance

    def _listing(self) -> Iterator[tuple[str, int, datetime]]:
        """(name below the prefix, size, last modified) of every blob under the prefix."""
        from azure.core.exceptions import ResourceNotFoundError

        start = f"{self.prefix}/" if self.prefix else ""
        try:
            with self._errors("listing"):
                for item in self._container.list_blobs(name_starts_with=start or None):
                    yield item.name[len(start) :], int(item.size), item.last_modified
        except ResourceNotFoundError:
            return  # no container yet: nothing was ever published

    def list_manifests(self) -> list[StoredManifest]:
        found = []
        for name, _size, modified in self._listing():
            parts = name.split("/")
            if (
                len(parts) == 3
                and parts[2] == "manifest.json"
                and PROFILE_NAME.match(parts[0])
                and SHA256.match(parts[1])
            ):
                found.append(StoredManifest(parts[0], parts[1], modified))
        return found

    def list_blobs(self) -> list[StoredBlob]:
        found = []
        for name, size, modified in self._listing():
            folder, _, file = name.partition("/")
            sha256 = file.removesuffix(".tar.zst")
            if folder == "blobs" and file.endswith(".tar.zst") and SHA256.match(sha256):
                found.append(StoredBlob(sha256, size, modified))
        return found

    def refresh_blob(self, sha256: str, *, older_than: datetime) -> bool:
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        check_sha256(sha256)
        blob = self._container.get_blob_client(self._name(blob_key(sha256)))
        try:
            with self._errors(
                f"refreshing {blob_key(sha256)}", (ResourceNotFoundError, ResourceModifiedError)
            ):
                # Setting metadata gives the blob a new Last-Modified; the condition makes it
                # one request, and a no-op for a blob that is recent already (HTTP 412).
                blob.set_blob_metadata(
                    {"gpubuild_refreshed": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")},
                    if_unmodified_since=older_than,
                )
        except ResourceModifiedError:
            return True
        except ResourceNotFoundError:
            return False
        return True

    def delete_blob(self, sha256: str, *, unmodified_since: datetime) -> bool:
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        check_sha256(sha256)
        blob = self._container.get_blob_client(self._name(blob_key(sha256)))
        try:
            with self._errors(
                f"deleting {blob_key(sha256)}", (ResourceNotFoundError, ResourceModifiedError)
            ):
                # The service tests the time and deletes in one step: a publisher's refresh
                # that lands first makes this a 412, never a deleted blob under its manifest.
                blob.delete_blob(if_unmodified_since=unmodified_since)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    def delete_manifest(self, profile: str, digest: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        blob = self._container.get_blob_client(self._name(manifest_key(profile, digest)))
        with (
            contextlib.suppress(ResourceNotFoundError),
            self._errors(f"deleting {manifest_key(profile, digest)}"),
        ):
            blob.delete_blob()

    def _unexpected(self, action: str, exc: Exception) -> StoreError:
        code = _error_code(exc) or type(exc).__name__
        status = getattr(exc, "status_code", None)
        return StoreError(
            scrub(
                f"{action} at {self.display_url} failed: HTTP {status} {code}",
                self.credentials.secrets,
            )
        )

    def read_sas(
        self,
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
        signs with a user delegation key (at most 7 days).
        """
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=timezone.utc)
        now = datetime.now(timezone.utc)
        if expiry <= now:
            raise BadInputError(f"the SAS expiry {expiry:%Y-%m-%dT%H:%M:%SZ} is not in the future")
        if profile is not None and digest is not None:
            self.get_manifest(profile, digest)
        creds = self.credentials
        start = now - _SAS_CLOCK_SKEW
        permission = ContainerSasPermissions(read=True)
        # Plain http only for loopback emulators; a real account's token is https-only.
        protocol = "https" if creds.endpoint.startswith("https://") else None
        if creds.kind == "key":
            try:
                return generate_container_sas(
                    self.account,
                    self.container,
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
            with self._errors("getting a user delegation key"):
                delegation = self._service.get_user_delegation_key(start, expiry)
            return generate_container_sas(
                self.account,
                self.container,
                user_delegation_key=delegation,
                permission=permission,
                expiry=expiry,
                start=start,
                protocol=protocol,
            )
        raise BadInputError(
            f"cannot make a SAS for {self.display_url} from {creds.source}: a SAS is signed with an "
            "account key (AZURE_STORAGE_CONNECTION_STRING) or an Azure AD identity (`az login`)"
        )


def _error_code(exc: Exception) -> str | None:
    """The service's error code as text (the SDK gives an enum for codes it knows)."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code)) if code else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"
