"""The initContainer script (docs/design.md#the-init-script): rendering is pure.

`render_init_script` fills builder/data/init.sh.tmpl with one manifest's pins: its digest,
every shard's sha256, size and file count, and the folders to create before parallel
extraction. The template's header comment explains the layout on the volume, why only
verified bytes are unpacked, and the atomic switch.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from builder.errors import BadInputError, IntegrityError
from builder.fields import PROFILE_NAME, SHA256
from builder.files import write_atomically
from builder.lock import parse_lock
from builder.manifest import Manifest
from builder.secrets import has_credentials, malformed_userinfo, redact_url

FALLBACKS = ("pip",)
_TEMPLATE_NAME = "init.sh.tmpl"
# Bytes a shell here-document line may not hold; the tree's folder names become such lines.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_LABEL_LIMIT = 60
_HEREDOC_MARKERS = (
    "GPUBUILD_SHARDS",
    "GPUBUILD_DIRECTORIES",
    "GPUBUILD_LOCK",
    "GPUBUILD_INDEXES",
    "GPUBUILD_EXCLUDES",
    "GPUBUILD_EXCLUDE",
)


def template_text() -> str:
    """The template, shipped inside the package (builder/data/init.sh.tmpl)."""
    return (resources.files("builder") / "data" / _TEMPLATE_NAME).read_text(encoding="utf-8")


def check_store_url(url: str) -> str:
    """The URL written into the script: never a secret (docs/design.md#secrets), and one curl can read."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http", "file"):
        raise BadInputError(
            f"store URL {url.split('?', 1)[0]}: the init script reads https://, http:// or "
            "file:// stores (for az:// pass the store's blob URL)"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BadInputError(
            f"store URL {parts.scheme}://{parts.hostname or ''}{parts.path}: carries a query or "
            "credentials; the script must not hold a secret: give the SAS at run time "
            "(GPUBUILD_SAS or GPUBUILD_SAS_FILE)"
        )
    return url.rstrip("/")


def leaf_directories(directories: tuple[str, ...]) -> list[str]:
    """The deepest folders only: `mkdir -p` of them makes every folder of the tree."""
    checked = sorted({_check_relative(d) for d in directories})
    leaves = []
    for number, folder in enumerate(checked):
        following = checked[number + 1] if number + 1 < len(checked) else ""
        if not following.startswith(folder + "/"):
            leaves.append(folder)
    return leaves


def _check_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or ".." in pure.parts
        or _UNSAFE.search(path)
        or pure.parts[0] == ".gpubuild"
        or path in _HEREDOC_MARKERS
    ):
        raise IntegrityError(f"manifest lists an unsafe folder name {path!r}; pack it again")
    return str(pure)


def shard_label(packages: tuple[str, ...]) -> str:
    """A word for the progress lines: the shard's packages, shortened."""
    if not packages:
        return "shared-files"
    label = ",".join(packages)
    if len(label) <= _LABEL_LIMIT:
        return label
    head = label[:_LABEL_LIMIT].rsplit(",", 1)[0]
    return f"{head},+{len(packages) - head.count(',') - 1}-more"


def shard_table(manifest: Manifest) -> list[str]:
    """Largest first, so the long downloads start at once."""
    lines = []
    for shard in sorted(manifest.shards, key=lambda s: (-s.bytes, s.sha256)):
        if not SHA256.fullmatch(shard.sha256):
            raise IntegrityError(f"manifest shard {shard.sha256!r} is not a sha256 digest")
        label = shard_label(tuple(shard.packages))
        if _UNSAFE.search(label) or " " in label:
            raise IntegrityError(f"manifest shard {shard.sha256} names odd packages {label!r}")
        if shard.blake3 and not SHA256.fullmatch(shard.blake3):
            raise IntegrityError(f"manifest shard {shard.sha256} has a BLAKE3 {shard.blake3!r}")
        # "-": a manifest packed before BLAKE3 was recorded; the script checks the sha256.
        blake3 = shard.blake3 or "-"
        lines.append(f"{shard.sha256} {int(shard.bytes)} {int(shard.files)} {blake3} {label}")
    return lines


@dataclass(frozen=True)
class FallbackData:
    lock_text: str
    index_urls: tuple[str, ...]
    excluded: tuple[str, ...]


def fallback_data(lock_text: str, where: object = "the lock") -> FallbackData:
    """What the pip fallback needs from a lock: its text, its indexes, its excluded names."""
    lock = parse_lock(lock_text, where)
    excluded = [entry.name for entry in lock.excluded]
    indexes = sorted({p.index_url for p in lock.packages if p.index_url})
    for url in indexes:
        if has_credentials(url) or malformed_userinfo(url):
            raise BadInputError(
                f"the lock names the index {redact_url(url)} with credentials in its URL; a"
                " generated script never holds a secret: resolve again (gpubuild writes index"
                " URLs without them), and give the pod's pip its credentials at run time"
                " (PIP_EXTRA_INDEX_URL from a Secret, or a netrc)"
            )
        if _UNSAFE.search(url) or " " in url:
            raise BadInputError(
                f"the lock names an index URL that cannot go into a script: {redact_url(url)!r}"
            )
    return FallbackData(lock_text, tuple(indexes), tuple(excluded))


def _heredoc_function(name: str, marker: str, lines: list[str]) -> str:
    for line in lines:
        if line.strip() in _HEREDOC_MARKERS:
            raise BadInputError(f"cannot embed a line {line!r} in the script")
    body = "\n".join(lines)
    if body:
        return f"{name}() {{\n  cat <<'{marker}'\n{body}\n{marker}\n}}\n"
    return f"{name}() {{\n  :\n}}\n"


def _fallback_functions(data: FallbackData | None) -> str:
    if data is None:
        parts = [
            "# No pip fallback was built in (gpubuild init-script --fallback pip adds one).",
            _heredoc_function("fallback_lock", "GPUBUILD_LOCK", []),
            _heredoc_function("fallback_indexes", "GPUBUILD_INDEXES", []),
            _heredoc_function("fallback_excludes", "GPUBUILD_EXCLUDES", []),
        ]
    else:
        if _UNSAFE.search(data.lock_text.replace("\n", "").replace("\t", "")):
            raise BadInputError("the lock holds control characters; resolve again")
        parts = [
            "# The pip fallback: the lock (installed with --no-deps --require-hashes), the indexes",
            "# its packages come from, and the profile's excludes.",
            _heredoc_function("fallback_lock", "GPUBUILD_LOCK", data.lock_text.splitlines()),
            _heredoc_function("fallback_indexes", "GPUBUILD_INDEXES", list(data.index_urls)),
            _heredoc_function("fallback_excludes", "GPUBUILD_EXCLUDES", list(data.excluded)),
        ]
    return "\n" + "\n".join(parts)


def render_init_script(
    manifest: Manifest, store_base_url: str, *, fallback_lock: str | None = None
) -> str:
    """The self-contained bash script that installs `manifest` from the store at `store_base_url`.

    `store_base_url` is the folder holding `blobs/` (`Store.base_url`); it must carry no secret.
    `fallback_lock`, the lock's text, builds in `--fallback pip`: used only when the store cannot
    be reached, never after a verification failure.
    """
    if not SHA256.match(manifest.digest):
        raise IntegrityError(f"manifest digest {manifest.digest!r} is not a sha256 digest")
    if not PROFILE_NAME.match(manifest.profile):
        raise IntegrityError(f"manifest profile {manifest.profile!r} is not a profile name")
    install_dir = manifest.install_dir
    if not install_dir.startswith("/") or _UNSAFE.search(install_dir) or install_dir == "/":
        raise IntegrityError(f"manifest install_dir {install_dir!r} is not an absolute folder")
    store = check_store_url(store_base_url)
    data = fallback_data(fallback_lock) if fallback_lock is not None else None
    values = {
        "@PROFILE_COMMENT@": manifest.profile,
        "@DIGEST@": manifest.digest,
        "@INSTALL_DIR_COMMENT@": install_dir,
        "@DIGEST_Q@": shlex.quote(manifest.digest),
        "@PROFILE_Q@": shlex.quote(manifest.profile),
        "@INSTALL_DIR_Q@": shlex.quote(install_dir),
        "@STORE_URL_Q@": shlex.quote(store),
        "@SHARD_COUNT@": str(len(manifest.shards)),
        "@TOTAL_BYTES@": str(manifest.total_bytes),
        "@TOTAL_RAW_BYTES@": str(sum(s.raw_bytes for s in manifest.shards)),
        "@TOTAL_FILES@": str(manifest.total_files),
        "@FALLBACK_Q@": shlex.quote("pip" if data is not None else "none"),
        "@SHARD_TABLE@": "\n".join(shard_table(manifest)),
        "@DIRECTORIES@": "\n".join(leaf_directories(manifest.directories)),
        "@FALLBACK_DATA@": _fallback_functions(data),
    }
    text = template_text()
    # One pass, so that a value can never be mistaken for another placeholder.
    pattern = re.compile("|".join(re.escape(key) for key in values))
    return pattern.sub(lambda match: values[match.group(0)], text)


# --- I/O edges ----------------------------------------------------------------------------


def write_script(path: Path, text: str, mode: int = 0o755) -> None:
    """Write the script (executable by default), atomically."""
    write_atomically(path, text, mode=mode)
