"""Store URLs, read without touching the network or the environment.

`file://PATH` (or an absolute path) is a folder on this machine; `az://ACCOUNT/CONTAINER/PREFIX`,
`https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS]` and Azurite's
`http://127.0.0.1:PORT/ACCOUNT/CONTAINER/PREFIX` are Azure Blob Storage (docs/design.md#stores).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from builder.errors import BadInputError
from builder.secrets import redact_url, register_url

SCHEME_HELP = (
    "file://PATH (or an absolute path), az://ACCOUNT/CONTAINER[/PREFIX], "
    "https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX][?SAS], "
    "or http://127.0.0.1:PORT/ACCOUNT/CONTAINER[/PREFIX] (Azurite)"
)
_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_ACCOUNT_NAME = re.compile(r"^[a-z0-9]{3,24}$")


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


def is_loopback_or_ip(host: str) -> bool:
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
        raise BadInputError(f"store URL {url}: names no container; expected {SCHEME_HELP}")
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
        raise BadInputError(f"store {url!r}: not a URL; expected {SCHEME_HELP}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    shown = redact_url(url)
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
        if is_loopback_or_ip(host):
            # Path-style, as Azurite serves it: http://127.0.0.1:PORT/ACCOUNT/CONTAINER/...
            segments = [p for p in unquote(parts.path).split("/") if p]
            if not segments:
                raise BadInputError(f"store URL {shown}: names no account; expected {SCHEME_HELP}")
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
                f"expected {SCHEME_HELP}"
            )
        return AzureLocation(account, container, prefix, endpoint, parts.query, shown.rstrip("/"))
    raise BadInputError(f"store URL {shown}: unknown scheme {scheme!r}; expected {SCHEME_HELP}")
