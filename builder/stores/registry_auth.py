"""Credentials for an OCI registry, from where `docker login` and `az acr login` leave them, and
the rules for answering a registry's authentication challenge with them.

Where credentials come from, the first that has some:

1. GPUBUILD_REGISTRY_USERNAME and GPUBUILD_REGISTRY_PASSWORD: for the registry that
   GPUBUILD_REGISTRY_HOST names, or, when it is not set, for the one registry the command was
   given (never for a token service on another origin: nothing ties them to that host).
2. The Docker config file ($DOCKER_CONFIG/config.json or ~/.docker/config.json), in Docker's
   order: the credential helper `credHelpers` names for the registry, then the one `credsStore`
   names for all, then the registry's `auths` entry (a user and password, or the identity
   token `az acr login` writes). A helper that answers "credentials not found" passes on to
   the next.

None of them: anonymous. Every secret found is registered with builder.secrets, so no message
or file can carry it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from builder.errors import BadInputError, StoreError
from builder.secrets import register, scrub
from builder.stores.urls import is_loopback

USERNAME_VARIABLE = "GPUBUILD_REGISTRY_USERNAME"
PASSWORD_VARIABLE = "GPUBUILD_REGISTRY_PASSWORD"
HOST_VARIABLE = "GPUBUILD_REGISTRY_HOST"
# docker-credential helpers answer this user name when the secret is an identity token.
_TOKEN_USER = "<token>"
_HELPER_NAME = re.compile(r"[A-Za-z0-9._-]+")
_HELPER_OUTPUT_LIMIT = 64 * 1024
# RFC 7235 token68: what may follow "Bearer " in a header (no space, no CR or LF).
TOKEN68 = re.compile(r"[A-Za-z0-9._~+/=-]+")
TOKEN_LIMIT = 16 * 1024
_AUTH_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,19}")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Origin = tuple[str, str, int]  # scheme, host, port: where an Authorization header may go


@dataclass(frozen=True)
class RegistryCredentials:
    source: str  # where they came from, for messages ("none": anonymous)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)  # an OAuth2 refresh token
    # Found for this registry's host (Docker config, GPUBUILD_REGISTRY_HOST): they may go to
    # the token service its challenge names on another origin. The environment's alone are
    # only the registry's own.
    bound_to_host: bool = True

    def __post_init__(self) -> None:
        for secret in (self.password, self.identity_token):
            register(secret)

    @property
    def anonymous(self) -> bool:
        return not (self.password or self.identity_token)


ANONYMOUS = RegistryCredentials("none")


def docker_config_path(environ: Mapping[str, str]) -> Path:
    folder = environ.get("DOCKER_CONFIG")
    return Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"


def normal_host(key: str) -> str:
    """`https://myacr.azurecr.io/v1/`, `myacr.azurecr.io:443` and `myacr.azurecr.io` name the
    same registry."""
    host = key.strip().split("://", 1)[-1].split("/", 1)[0].lower()
    return host.removesuffix(":443")


def printable(text: str, limit: int = 200) -> str:
    """Text from outside (a helper's error, a registry's word) safe to put in a message."""
    return _CONTROL.sub("?", scrub(text))[:limit]


def _from_helper(
    helper: str, registry: str, environ: Mapping[str, str], where: str
) -> RegistryCredentials | None:
    """What `docker-credential-HELPER get` answers for `registry`; None: it has none."""
    if not _HELPER_NAME.fullmatch(helper):
        raise BadInputError(
            f"{where}: {printable(helper, 80)!r} is not a credential helper name (letters,"
            " digits, '.', '_' and '-'; a program docker-credential-NAME on PATH)"
        )
    program = shutil.which(f"docker-credential-{helper}", path=environ.get("PATH"))
    if program is None:
        raise BadInputError(
            f"{where} names the credential helper {helper!r} for {registry}, but"
            f" docker-credential-{helper} is not on PATH; install it, or log in again"
        )
    try:
        answer = subprocess.run(
            [program, "get"], input=registry.encode(), capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StoreError(
            f"docker-credential-{helper} failed for {registry}: {printable(str(exc))}"
        ) from None
    said = (answer.stdout[:_HELPER_OUTPUT_LIMIT] + answer.stderr[:_HELPER_OUTPUT_LIMIT]).decode(
        "utf-8", "replace"
    )
    if answer.returncode != 0:
        # Docker's own words for "nothing stored for this registry": the next source is asked.
        if "credentials not found" in said.lower():
            return None
        first = next((line for line in said.splitlines() if line.strip()), "no message")
        raise StoreError(
            f"docker-credential-{helper} failed for {registry} (exit {answer.returncode}):"
            f" {printable(first)}; log in again (`docker login {registry}`)"
        )
    try:
        document = json.loads(answer.stdout.decode("utf-8"))
        username, secret = document["Username"], document["Secret"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise StoreError(
            f"docker-credential-{helper} answered something unreadable for {registry}"
            " (not UTF-8 JSON with Username and Secret)"
        ) from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise StoreError(f"docker-credential-{helper}: Username and Secret must be strings")
    if not secret:
        return None
    source = f"docker-credential-{helper}"
    if username == _TOKEN_USER:
        return RegistryCredentials(source, identity_token=secret)
    return RegistryCredentials(source, username=username, password=secret)


def _from_auths(entry: Any, where: str) -> RegistryCredentials | None:
    if not isinstance(entry, dict):
        raise BadInputError(f"{where}: must be an object")
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return RegistryCredentials(f"{where} (identity token)", identity_token=token)
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadInputError(f"{where}.auth: not base64 of user:password") from None
        if not sep:
            raise BadInputError(f"{where}.auth: not base64 of user:password")
        return RegistryCredentials(where, username=username, password=password)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and secret:
        return RegistryCredentials(where, username=user, password=secret)
    return None


def _from_environment(registry: str, env: Mapping[str, str]) -> RegistryCredentials | None:
    password = env.get(PASSWORD_VARIABLE)
    if not password:
        return None
    source = f"{USERNAME_VARIABLE}/{PASSWORD_VARIABLE}"
    username = env.get(USERNAME_VARIABLE) or ""
    host = env.get(HOST_VARIABLE, "").strip()
    if not host:
        return RegistryCredentials(
            source, username=username, password=password, bound_to_host=False
        )
    if normal_host(host) != normal_host(registry):
        return None  # for another registry: this one gets the Docker config's, or none
    return RegistryCredentials(f"{source} (for {HOST_VARIABLE}={normal_host(host)})",
                               username=username, password=password)  # fmt: skip


def registry_credentials(
    registry: str, environ: Mapping[str, str] | None = None
) -> RegistryCredentials:
    """The credentials for `registry` (host[:port]), found without contacting it."""
    env = dict(os.environ) if environ is None else environ
    found = _from_environment(registry, env)
    if found is not None:
        return found
    path = docker_config_path(env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ANONYMOUS
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the Docker config: {exc}") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadInputError(f"{path}: not JSON ({printable(str(exc))})") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: must be a JSON object")
    host = normal_host(registry)
    helpers = config.get("credHelpers") or {}
    if not isinstance(helpers, dict):
        raise BadInputError(f"{path}: [credHelpers] must be an object")
    for key, helper in helpers.items():
        if normal_host(str(key)) == host and isinstance(helper, str) and helper:
            found = _from_helper(helper, registry, env, f"{path}: [credHelpers.{key}]")
            if found is not None:
                return found
            break
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        found = _from_helper(store, registry, env, f"{path}: [credsStore]")
        if found is not None:
            return found
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        raise BadInputError(f"{path}: [auths] must be an object")
    for key, entry in auths.items():
        if normal_host(str(key)) == host:
            found = _from_auths(entry, f"{path}: [auths.{key}]")
            if found is not None:
                return found
    return ANONYMOUS


# --- answering a challenge (pure) ---------------------------------------------------------


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of a URL; the default port when it names none."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # no port a request could use: matches no origin
    default = {"https": 443, "http": 80}.get(scheme, -1)
    return scheme, (parts.hostname or "").lower(), default if port is None else port


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "basic", "bearer", or another (bounded, printable)
    realm: str
    service: str | None
    scope: str | None


def parse_challenge(header: str) -> Challenge:
    """A `WWW-Authenticate` header: its scheme and the parameters a token request uses."""
    kind, _, rest = header.strip().partition(" ")
    scheme = kind.lower() if _AUTH_SCHEME.fullmatch(kind) else "unknown"
    params = dict(_CHALLENGE_PARAM.findall(rest))
    return Challenge(scheme, params.get("realm", ""), params.get("service"), params.get("scope"))


def basic_authorization(username: str, password: str) -> str:
    """The Basic header, encoded as UTF-8 (requests' auth tuple encodes Latin-1 and fails on
    anything else)."""
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def token_problem(token: str) -> str | None:
    """Why a token service's answer cannot go into an Authorization header, or None."""
    if not token:
        return "no token"
    if len(token) > TOKEN_LIMIT:
        return f"a token longer than {TOKEN_LIMIT} characters"
    if not TOKEN68.fullmatch(token):
        return "a token with characters no header may carry"
    return None


def realm_problem(
    realm: str, registry: Origin, credentials: RegistryCredentials, *, registry_is_http: bool
) -> str | None:
    """Why the token realm a registry named must not be asked, or None.

    https only, unless the registry itself is a plain-HTTP one on loopback and so is the
    realm; credentials from the environment alone are never sent off the registry's origin."""
    if not realm:
        return "its challenge names no token realm"
    scheme, host, port = origin_of(realm)
    if scheme not in ("https", "http") or not host or port < 0:
        return "its token realm is not an http(s) URL"
    if scheme == "http" and not (registry_is_http and is_loopback(host)):
        return (
            f"its token realm {scheme}://{host} is plain HTTP; credentials and tokens go over"
            " https only (plain HTTP only for a registry and realm on loopback)"
        )
    unbound = not credentials.bound_to_host and not credentials.anonymous
    if unbound and (scheme, host, port) != registry:
        return (
            f"its token service is on another host ({host}), and {credentials.source} are"
            f" tied to no host: set {HOST_VARIABLE} to the registry's host to send them"
            " there, or log in with `docker login`"
        )
    return None
