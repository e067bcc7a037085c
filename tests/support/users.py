"""Running programs as a normal user, as production does (an init container is rarely root).

The tests run as root in CI; `as_nonroot` wraps a command so that it runs as `nobody`
(setpriv, from util-linux), and `nonroot_folder` makes a folder that user may write.
Run by a normal user already, both leave the command and the folder as they are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

NONROOT_UID = 65534  # nobody
NONROOT_GID = 65534  # nogroup


def is_root() -> bool:
    return os.geteuid() == 0


def as_nonroot(argv: list[str]) -> list[str]:
    if not is_root():
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is needed to run a test as a normal user")
    return [
        setpriv,
        f"--reuid={NONROOT_UID}",
        f"--regid={NONROOT_GID}",
        "--clear-groups",
        "--inh-caps=-all",
        *argv,
    ]


def give_to_nonroot(path: Path) -> None:
    """Make `path` (and everything below it) the normal user's."""
    if not is_root():
        return
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(folder, name), NONROOT_UID, NONROOT_GID)
    os.lchown(path, NONROOT_UID, NONROOT_GID)


@contextlib.contextmanager
def nonroot_folder(prefix: str = "gpubuild-nonroot-") -> Iterator[Path]:
    """A folder outside pytest's root-only tmp tree, owned by the normal user; removed after."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    give_to_nonroot(folder)
    try:
        yield folder
    finally:
        # What the user left may be unwritable (that is what some tests check): make it so.
        for root, dirs, _files in os.walk(folder):
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(folder, ignore_errors=True)
