"""Every fatal error gpubuild raises, each with its exit status and a message that says what to do.

Exit statuses follow docs/design.md#exit-status-and-output: 1 for a failure of the job, 2 for bad input or usage.
"""

from __future__ import annotations

from builder.secrets import scrub


class GpubuildError(Exception):
    """A failure the user can act on; the CLI prints the message and exits with `exit_code`.

    The message is scrubbed of secrets when the error is made (builder.secrets), so no caller
    can put a SAS, a key or a URL's credentials into one by quoting what a service said.
    """

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*(scrub(arg) if isinstance(arg, str) else arg for arg in args))


class BadInputError(GpubuildError):
    """Bad input or usage (a profile, an option, a file the user named)."""

    exit_code = 2


class FormatError(BadInputError):
    """A file gpubuild reads (profile, snapshot, lock, manifest) that breaks its format: the
    message names the file (or URL) and the field."""

    def __init__(self, path: object, key: str | None, problem: str) -> None:
        where = f"{path}: [{key}]" if key else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.key = key


class ProfileError(FormatError):
    """A profile that does not follow the contract; names the file and the key."""


class BackendUnavailableError(BadInputError):
    """The chosen resolver backend cannot resolve for this target."""


class ResolutionError(GpubuildError):
    """The resolver could not find a conflict-free set (its own explanation is included)."""


class PolicyViolationError(GpubuildError):
    """A resolved or packed set breaks the profile's policy (shadowing, excluded packages)."""


class ToolFailedError(GpubuildError):
    """An external program (uv, pip-compile, docker) failed for a reason other than resolution."""


class DockerError(GpubuildError):
    """The Docker engine is unreachable or an image operation failed."""


class StoreError(GpubuildError):
    """A store is unreachable, refuses credentials, or holds something other than expected."""


class IntegrityError(GpubuildError):
    """Downloaded or packed bytes do not match their recorded digest."""


class NotPublishedError(GpubuildError):
    """The store has no manifest for the requested profile and digest."""


class DiskFullError(GpubuildError):
    """A filesystem ran out of space (ENOSPC) while packing or unpacking."""


class OverBudgetError(GpubuildError):
    """The estimated peak disk of an image build is above the budget."""
