"""Units for people: sizes in decimal MB/GB as gpubuild prints them, and durations."""

from __future__ import annotations

import re
from datetime import timedelta

from builder.errors import BadInputError

KB = 1000
MB = 1000 * KB
GB = 1000 * MB


def megabytes(count: int) -> str:
    """123456789 -> "123.5 MB"; small amounts in kB, so nothing shows as 0.0 MB."""
    if count < 100 * KB:
        return f"{count / KB:,.1f} kB"
    return f"{count / MB:,.1f} MB"


def human_size(count: int | None) -> str:
    """Bytes with the unit that reads best: B, kB, MB or GB; "unknown" for None."""
    if count is None:
        return "unknown"
    if count >= GB:
        return f"{count / GB:,.2f} GB"
    if count >= MB:
        return f"{count / MB:,.1f} MB"
    if count >= KB:
        return f"{count / KB:,.1f} kB"
    return f"{count} B"


def rate(count: int, seconds: float) -> str:
    return f"{count / MB / max(seconds, 1e-6):,.0f} MB/s"


def plural(count: int, word: str) -> str:
    """ "1 file", "2,183 files"."""
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, maximum: timedelta | None = None) -> timedelta:
    """`90s`, `30m`, `24h`, `7d` into a timedelta; above `maximum` is bad input, not a crash."""
    match = _DURATION.match(text.lower())
    if not match or int(match.group(1)) == 0:
        raise BadInputError(f"duration {text!r}: expected a positive number and s, m, h or d (24h)")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if maximum is not None and seconds > maximum.total_seconds():
        raise BadInputError(
            f"duration {text!r} is longer than {maximum.days} days, the most this allows"
        )
    return timedelta(seconds=seconds)
