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
    "https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX] (a SAS may follow as its query), "
    "http://127.0.0.1:PORT/ACCOUNT/CONTAINER[/PREFIX] (Azurite), "
    "oci://REGISTRY/REPOSITORY or oci+http://HOST:PORT/REPOSITORY (a plain-HTTP registry on loopback)"
)
# The distribution spec's repository name: lowercase path components.
REPOSITORY_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
# A registry host: DNS labels (letters, digits, inner hyphens) joined by dots, or an IPv6
# address in brackets; an optional port.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_REGISTRY_HOST = re.compile(
    rf"(?P<host>{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[(?P<ipv6>[0-9a-fA-F:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DEFAULT_PORTS = {"https": "443", "http": "80"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_ACCOUNT_NAME = re.compile(r"^[a-z0-9]{3,24}$")


def default_store_path() -> Path:
    """The embedded default store: `$XDG_CACHE_HOME/gpubuild/store` (or `~/.cache/...`)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "gpubuild" / "store"


def default_store_url() -> str:
    return default_store_path().as_uri()


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


@dataclass(frozen=True)
class OciLocation:
    """A repository in an OCI registry: `oci://REGISTRY/REPOSITORY` (https) or
    `oci+http://HOST:PORT/REPOSITORY` (plain HTTP, for a registry on loopback)."""

    registry: str  # host[:port]
    repository: str
    scheme: str  # "https" or "http"

    @property
    def display_url(self) -> str:
        prefix = "oci" if self.scheme == "https" else "oci+http"
        return f"{prefix}://{self.registry}/{self.repository}"

    @property
    def api(self) -> str:
        return f"{self.scheme}://{self.registry}/v2/{self.repository}"


def _shown_oci(url: str) -> str:
    """`url` as messages show it: without the userinfo its registry part may carry (refused),
    query or fragment, control characters escaped. Only the registry part is userinfo: an
    `@` in the path is a digest reference (`repo@sha256:...`), never a password."""
    scheme, sep, rest = url.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        rest = authority.rsplit("@", 1)[-1] + slash + path
    shown = (scheme + sep + rest).split("?", 1)[0].split("#", 1)[0]
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", shown[:300])


def _registry_host(registry: str, scheme: str, shown: str) -> str:
    """The registry part, checked and normalised: lowercase, no default port (`:443` names
    the same registry as none, for the Docker config as for the kubelet)."""
    match = _REGISTRY_HOST.fullmatch(registry)
    if match is None:
        raise BadInputError(f"store URL {shown}: expected oci://REGISTRY/REPOSITORY")
    host, port = match.group("host").lower(), match.group("port")
    if match.group("ipv6") is not None:
        try:
            ipaddress.IPv6Address(match.group("ipv6"))
        except ValueError:
            raise BadInputError(f"store URL {shown}: {host} is not an IPv6 address") from None
    if port is not None and not 1 <= int(port) <= 65535:
        raise BadInputError(f"store URL {shown}: port {port} is not from 1 to 65535")
    if port is None or port.lstrip("0") == _DEFAULT_PORTS[scheme]:
        return host
    return f"{host}:{int(port)}"


def parse_oci_url(url: str) -> tuple[OciLocation, str | None]:
    """(location, reference): the reference is a tag or `sha256:...` after `:` or `@`, or None."""
    shown = _shown_oci(url)
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in ("oci", "oci+http", "oci+https"):
        raise BadInputError(f"store URL {shown}: unknown scheme {scheme!r}; expected {SCHEME_HELP}")
    if "@" in rest.split("/", 1)[0] or "?" in rest or "#" in rest:
        raise BadInputError(
            f"store URL {shown}: a registry URL takes no credentials, query or fragment; give"
            " credentials through `docker login` or GPUBUILD_REGISTRY_USERNAME/_PASSWORD"
        )
    registry, slash, path = rest.partition("/")
    if not slash or not path:
        raise BadInputError(f"store URL {shown}: expected oci://REGISTRY/REPOSITORY")
    http = "http" if scheme == "oci+http" else "https"
    registry = _registry_host(registry, http, shown)
    if http == "http" and not is_loopback(registry_hostname(registry)):
        raise BadInputError(
            f"store URL {shown}: oci+http:// (plain HTTP) is only for a registry on this machine"
            " (localhost or a loopback address); use oci:// (https) for"
            f" {registry}"
        )
    reference: str | None = None
    if "@" in path:
        path, reference = path.split("@", 1)
        if not _DIGEST.fullmatch(reference):
            # The URL is shown without the reference: `repo@x` reads as userinfo to scrub.
            raise BadInputError(
                f"{_shown_oci(f'{scheme}://{registry}/{path}')}: the reference after '@',"
                f" {reference[:80]!r}, is not a sha256:<64 hex> digest"
            )
    else:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, reference = path.rsplit(":", 1)
            if not _TAG.fullmatch(reference):
                raise BadInputError(f"{shown}: {reference[:80]!r} is not a valid tag")
    path = path.strip("/")
    if not REPOSITORY_NAME.fullmatch(path):
        raise BadInputError(
            f"store URL {shown}: {path[:80]!r} is not a repository name (lowercase letters,"
            " digits, and . _ - between them, path components separated by /)"
        )
    return OciLocation(registry, path, http), reference


def registry_hostname(registry: str) -> str:
    """The host of `host[:port]` (`[::1]:5000` -> `::1`)."""
    if registry.startswith("["):
        return registry[1:].split("]", 1)[0]
    return registry.split(":", 1)[0]


def is_loopback(host: str) -> bool:
    """localhost, or a loopback address (127.0.0.0/8, ::1; IPv6 without its brackets)."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def parse_store_url(url: str) -> FileLocation | AzureLocation | OciLocation:
    """Read a store URL without touching the network or the environment."""
    if url.lower().startswith(("oci://", "oci+http://", "oci+https://")):
        # Only the registry part can be userinfo (refused below): `repo@sha256:` is a digest.
        authority = url.partition("://")[2].split("/", 1)[0]
        if "@" in authority:
            register_url(url.split("://", 1)[0] + "://" + authority)
        location, reference = parse_oci_url(url)
        if reference is not None:
            raise BadInputError(
                f"store URL {redact_url(url)}: a store is a repository; name no tag or digest"
                " (fetch takes oci://REGISTRY/REPOSITORY@sha256:...)"
            )
        return location
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
