"""Stores for shards and manifests: a local folder (file.py), Azure Blob (azure.py), or an OCI
registry (oci.py, the heavy set as an image).

`open_store(url)` reads the URL (urls.py), picks the credentials (credentials.py for Azure,
registry_auth.py for a registry) and returns a `Store` (base.py): the one interface every stage
uses. docs/design.md#stores has the layouts.
"""

from __future__ import annotations

from builder.errors import BadInputError
from builder.stores.azure import DEFAULT_CONCURRENCY, AzureStore
from builder.stores.base import BlobsVanished, ProgressCallback, Store, StoredBlob, StoredManifest
from builder.stores.credentials import choose_credentials
from builder.stores.file import FileStore
from builder.stores.urls import (
    AzureLocation,
    FileLocation,
    OciLocation,
    default_store_url,
    parse_store_url,
)

__all__ = [
    "AzureLocation",
    "AzureStore",
    "BlobsVanished",
    "FileLocation",
    "FileStore",
    "OciLocation",
    "ProgressCallback",
    "Store",
    "StoredBlob",
    "StoredManifest",
    "default_store_url",
    "open_store",
    "parse_store_url",
]


def open_store(
    url: str, *, sas: str | None = None, max_concurrency: int = DEFAULT_CONCURRENCY
) -> Store:
    """Open the store at `url` (file://, a path, az://, https://, Azurite's http://, oci://).

    Touches no network: an unreachable store or refused credentials fail on first use.
    `sas` is used when the URL carries none and AZURE_STORAGE_CONNECTION_STRING does not apply.
    """
    location = parse_store_url(url)
    if isinstance(location, FileLocation):
        if sas:
            raise BadInputError(f"{location.root}: a SAS is for Azure stores, not local folders")
        return FileStore(location.root)
    if isinstance(location, OciLocation):
        if sas:
            raise BadInputError(
                f"{location.display_url}: a SAS is for Azure stores, not registries"
            )
        # Imported here: it brings requests, which a folder or Azure store never needs.
        from builder.stores.oci import open_oci_store

        return open_oci_store(location)
    credentials = choose_credentials(location, sas=sas)
    return AzureStore(
        location.with_endpoint(credentials.endpoint),
        credentials,
        max_concurrency=max_concurrency,
    )
