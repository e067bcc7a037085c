"""The one home of secret scrubbing: nothing secret reaches a log, an error or a generated file.

What counts as secret: the userinfo (user:password) and the query string (tokens, SAS) of every
URL, SAS signatures (`sig=`), account keys and connection-string signatures, and every value
registered with `register` (credentials read from the environment or from a URL the user gave).
Three kinds of callers:

- `redact_url` for a URL that is shown or written down (a lock's `# index:` line, a message);
- `scrub` for any text that leaves the process (tool output, SDK errors, progress lines);
- `url_credentials` to refuse, before anything runs, a URL whose credentials would leak.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import quote, unquote, urlsplit, urlunsplit

_REGISTERED: set[str] = set()
_LOCK = threading.Lock()
# Environment variables whose whole value is a secret.
SECRET_VARIABLES = (
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_KEY",
    "GPUBUILD_SAS",
    "GPUBUILD_REGISTRY_PASSWORD",
    "AZURE_CLIENT_SECRET",
)
_MIN_SECRET = 6  # shorter values would scrub ordinary words

_PATTERNS = (
    re.compile(r"(?i)(\bsig=)[^&\s'\"]+"),
    re.compile(r"(?i)(AccountKey=)[^;\s'\"]+"),
    re.compile(r"(?i)(SharedAccessSignature=)[^;\s'\"]+"),
    re.compile(r"(?i)(\b(?:token|password|passwd|secret|api[_-]?key)=)[^&\s'\"]+"),
)
# user:password@ of a URL, up to the last '@' of the token (a password may hold '@');
# '@sha256:' is an image digest, not a password.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"<>]*@(?!sha256:)")
# The query (and fragment) of a URL.
_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")


def register(value: str | None) -> None:
    """Scrub `value` (and its percent-encoded forms) from every text from now on."""
    if not value or len(value) < _MIN_SECRET:
        return
    with _LOCK:
        _REGISTERED.update({value, quote(value, safe=""), unquote(value)})


def register_url(url: str | None) -> None:
    """Register the credentials a URL carries: its userinfo and its query's values."""
    if not url:
        return
    for secret in url_credentials(url):
        register(secret)


def register_environment(environ: dict[str, str] | None = None) -> None:
    """Register what the environment holds that must never be printed."""
    environ = dict(os.environ) if environ is None else environ
    for name in SECRET_VARIABLES:
        register(environ.get(name))
    connection = environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    for item in connection.split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip().lower() in ("accountkey", "sharedaccesssignature"):
            register(value.strip())
            for token in value.split("&"):
                if token.lower().startswith("sig="):
                    register(token[4:])
    for name in ("AZURE_STORAGE_SAS_TOKEN", "GPUBUILD_SAS"):
        for token in environ.get(name, "").lstrip("?").split("&"):
            if token.lower().startswith("sig="):
                register(token[4:])


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """(userinfo or None, the rest) of what follows a URL's `://`, query and fragment kept.

    The authority ends at the first '/'; an '@' in it ends the userinfo, even when the
    password holds '?' or '#'. An '@' after that '/' but before the query, in a URL whose
    authority has none, is taken for a password holding an unencoded '/', unless it starts an
    image digest (`repo@sha256:...`)."""
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        return userinfo, host + slash + path
    head = path.split("?", 1)[0].split("#", 1)[0]
    if "@" in head and "@sha256:" not in head:
        cut = len(authority) + len(slash) + head.rindex("@")
        return rest[:cut], rest[cut + 1 :]
    return None, rest


def url_credentials(url: str) -> list[str]:
    """The secret parts of `url`: its userinfo (even a malformed one) and its query values."""
    found = []
    _, sep, rest = url.partition("://")
    if sep:
        userinfo, rest = _split_userinfo(rest)
        if userinfo:
            found.append(userinfo)
            found += [part for part in userinfo.split(":", 1) if part]
    query = rest.split("#", 1)[0].split("?", 1)[1] if "?" in rest.split("#", 1)[0] else ""
    if query:
        found.append(query)
        for item in query.split("&"):
            name, eq, value = item.partition("=")
            found.append(value if eq else name)
    fragment = rest.split("#", 1)[1] if "#" in rest else ""
    if fragment:
        found.append(fragment)
    return [secret for secret in found if secret]


def has_credentials(url: str) -> bool:
    return bool(url_credentials(url))


def redact_url(url: str) -> str:
    """`url` without userinfo, query or fragment: safe to print and to write into a file."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("?", 1)[0].split("#", 1)[0]
    _, rest = _split_userinfo(rest)
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    parts = urlsplit(f"{scheme}://{rest}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def malformed_userinfo(url: str) -> bool:
    """True when the userinfo holds an unencoded '/' (`http://user:pa/ss@host/`), which
    parsers and tools split wrongly (and then print the password as part of a path)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return False
    userinfo, _ = _split_userinfo(rest)
    return userinfo is not None and "/" in userinfo


def scrub(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """`text` with every known secret, URL userinfo, URL query and signature removed."""
    with _LOCK:
        given = {secret for secret in secrets if secret and len(secret) >= _MIN_SECRET}
        known = sorted(_REGISTERED | given, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "***")
    text = _USERINFO.sub(r"\1***@", text)
    text = _QUERY.sub(r"\1", text)
    for pattern in _PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text
