"""Where packages come from for one run: the default index and the profile's routed indexes
(docs/design.md#resolution-rules, rule 4), with command-line overrides applied."""

from __future__ import annotations

from dataclasses import dataclass, replace

from builder.errors import BadInputError
from builder.profile import Index, Profile
from builder.secrets import redact_url

USE_DEFAULT_INDEX = "default"


@dataclass(frozen=True)
class IndexSettings:
    """Where packages come from for this run: the default index and the routed ones."""

    default_url: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()  # (index name, URL or "default")


def effective_indexes(profile: Profile, settings: IndexSettings) -> tuple[Index, ...]:
    """The profile's [[index]] tables after command-line overrides; "default" drops the routing."""
    known = {index.name for index in profile.indexes}
    overrides = dict(settings.overrides)
    for name in overrides:
        if name not in known:
            raise BadInputError(
                f"--index {name}=...: the profile {profile.path} has no [[index]] named {name!r}"
                f" (it has: {', '.join(sorted(known)) or 'none'})"
            )
    result = []
    for index in profile.indexes:
        url = overrides.get(index.name, index.url)
        if url == USE_DEFAULT_INDEX:
            continue
        result.append(replace(index, url=url.rstrip("/")))
    return tuple(result)


def real_index_urls(profile: Profile, settings: IndexSettings) -> dict[str, str]:
    """Locks record index URLs without credentials; map them back to the URLs to install from."""
    urls = [index.url for index in effective_indexes(profile, settings)]
    if settings.default_url:
        urls.append(settings.default_url)
    return {redact_url(url).rstrip("/"): url for url in urls}
