"""Credentials for an OCI registry, from where `docker login` and `az acr login` leave them.

In this order: GPUBUILD_REGISTRY_USERNAME and GPUBUILD_REGISTRY_PASSWORD; the Docker config
file ($DOCKER_CONFIG/config.json or ~/.docker/config.json): a credential helper named for the
registry (credHelpers) or for all (credsStore), else its `auths` entry (a user and password, or
the identity token `az acr login` writes). None of them: anonymous. Every secret found is
registered with builder.secrets, so no message or file can carry it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import BadInputError, StoreError
from builder.secrets import register

USERNAME_VARIABLE = "GPUBUILD_REGISTRY_USERNAME"
PASSWORD_VARIABLE = "GPUBUILD_REGISTRY_PASSWORD"
# docker-credential helpers answer this user name when the secret is an identity token.
_TOKEN_USER = "<token>"


@dataclass(frozen=True)
class RegistryCredentials:
    source: str  # where they came from, for messages ("none": anonymous)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)  # an OAuth2 refresh token

    def __post_init__(self) -> None:
        for secret in (self.password, self.identity_token):
            register(secret)

    @property
    def anonymous(self) -> bool:
        return not (self.password or self.identity_token)


def docker_config_path(environ: Mapping[str, str]) -> Path:
    folder = environ.get("DOCKER_CONFIG")
    return Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    """`https://myacr.azurecr.io/v1/` and `myacr.azurecr.io` name the same registry."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return host.lower()


def _from_helper(helper: str, registry: str, environ: Mapping[str, str]) -> RegistryCredentials:
    program = shutil.which(f"docker-credential-{helper}", path=environ.get("PATH"))
    if program is None:
        raise BadInputError(
            f"the Docker config names the credential helper {helper!r} for {registry}, but"
            f" docker-credential-{helper} is not on PATH; install it, or log in again"
        )
    try:
        answer = subprocess.run(
            [program, "get"], input=registry, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StoreError(f"docker-credential-{helper} failed for {registry}: {exc}") from None
    if answer.returncode != 0:
        # "credentials not found in native keychain": anonymous, like docker itself.
        return RegistryCredentials("none")
    try:
        document = json.loads(answer.stdout)
        username, secret = str(document["Username"]), str(document["Secret"])
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"docker-credential-{helper} answered something unreadable") from None
    source = f"docker-credential-{helper}"
    if username == _TOKEN_USER:
        return RegistryCredentials(source, identity_token=secret)
    return RegistryCredentials(source, username=username, password=secret)


def _from_auths(entry: Any, where: str) -> RegistryCredentials:
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
    return RegistryCredentials("none")


def registry_credentials(
    registry: str, environ: Mapping[str, str] | None = None
) -> RegistryCredentials:
    """The credentials for `registry` (host[:port]), found without contacting it."""
    env = dict(os.environ) if environ is None else environ
    username, password = env.get(USERNAME_VARIABLE), env.get(PASSWORD_VARIABLE)
    if password:
        return RegistryCredentials(
            f"{USERNAME_VARIABLE}/{PASSWORD_VARIABLE}", username=username or "", password=password
        )
    path = docker_config_path(env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return RegistryCredentials("none")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the Docker config: {exc}") from None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise BadInputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{path}: must be a JSON object")
    host = registry.lower()
    helpers = config.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _host_of(str(key)) == host and isinstance(helper, str) and helper:
                return _from_helper(helper, registry, env)
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        raise BadInputError(f"{path}: [auths] must be an object")
    for key, entry in auths.items():
        if _host_of(str(key)) == host:
            found = _from_auths(entry, f"{path}: [auths.{key}]")
            if not found.anonymous:
                return found
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, registry, env)
    return RegistryCredentials("none")
