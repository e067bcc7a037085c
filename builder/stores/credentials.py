"""Azure credentials: which one a store uses, in the order docs/design.md#stores gives
(connection string, SAS, an Azure AD sign-in), and the words to tell a person where it came
from. Every secret found here is registered with builder.secrets, so no message can carry it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from builder.errors import BadInputError, StoreError
from builder.secrets import register, scrub
from builder.stores.urls import AzureLocation, is_loopback_or_ip

if TYPE_CHECKING:  # the SDK is imported when a credential is made, not before
    from azure.core.credentials import TokenCredential


def sas_expiry(token: str) -> datetime | None:
    """The `se=` (signed expiry) of a SAS token, timezone-aware; None when absent or unreadable."""
    return sas_time(token, "se")


def sas_time(token: str, name: str) -> datetime | None:
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
    if is_loopback_or_ip(host):
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
    """Pick the credential in docs/design.md#stores order: connection string, SAS, DefaultAzureCredential."""
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


def identity_credential() -> TokenCredential:
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


def credential_hint(credentials: AzureCredentials) -> str:
    if credentials.kind == "key":
        return (
            f"check that the AccountKey in {credentials.source} is a current key of the account "
            "(keys are rotated: `az storage account keys list`)"
        )
    if credentials.kind == "sas":
        return (
            f"check that {credentials.source} was made for this account and container, has the "
            "permissions this needs (read to install; create and write to publish; list to "
            "verify; list and delete for gc) and has not expired (se=)"
        )
    return (
        "check that `az login` (or the workload identity) is signed in to the right tenant and "
        "has a Storage Blob Data role (Reader to install and verify, Contributor to publish and"
        " gc) on the account"
    )
