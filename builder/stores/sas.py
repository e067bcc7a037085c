"""What `gpubuild sas` needs around AzureStore.read_sas: the lifetime cap and the words."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from builder.errors import BadInputError
from builder.stores.azure import AzureStore
from builder.stores.base import Store
from builder.units import parse_duration

SAS_DEFAULT_MAX = timedelta(days=365)
SAS_HARD_MAX = timedelta(days=3650)  # even with --allow-long-expiry


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


def make_read_sas(
    store: Store, *, expiry: datetime, profile: str | None = None, digest: str | None = None
) -> str:
    """A read-only SAS for the store's container (AzureStore.read_sas); a local folder has
    none: BadInputError."""
    if not isinstance(store, AzureStore):
        raise BadInputError(
            f"{store.display_url} is a local folder: it needs no SAS (curl reads file:// URLs)"
        )
    return store.read_sas(expiry=expiry, profile=profile, digest=digest)
