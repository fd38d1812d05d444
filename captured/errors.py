"""The package's exceptions: one root, a leaf per way things fail.

::

    CapturedError
    ├── ConfigError            the configuration was refused (`problems`: one line each)
    ├── ProtocolError          a peer sent bad frames (`reason`: the counter name)
    ├── DeliveryError          a destination could not take a file (`cause`, `retryable`)
    │   ├── UploadError        s3://
    │   └── LocalDeliveryError file://
    └── SpoolWriteError        a spool write failed (also an OSError; `written`)

Fields are keyword-only: two strings side by side (`cause`, `message`) are never swapped by
position. The delivery queue reads `cause` (its counter label) and `retryable` (back off and try
soon, or try again slowly until someone fixes something) of a `DeliveryError`; anything else a
destination raises is a bug. Imports nothing but the standard library, so every module may
import it without making an import circle.
"""

from __future__ import annotations

import functools
from typing import Any


class CapturedError(Exception):
    """The root: everything `captured` raises on purpose derives from it."""


class ConfigError(CapturedError):
    """The configuration was refused; `problems` holds one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


class ProtocolError(CapturedError):
    """The peer broke the protocol; `reason` is the counter name (`bad_header`, ...)."""

    def __init__(self, *, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial(type(self), reason=self.reason, message=str(self)), ()


class DeliveryError(CapturedError):
    """A file could not be delivered. `cause` is the counter label (`disk_full`, `timeout`,
    ...); `retryable` says whether a retry soon may succeed (network, throttling, a full disk)
    or only after someone changed something (access denied, no such bucket)."""

    def __init__(self, *, cause: str, retryable: bool, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        make = functools.partial(type(self), cause=self.cause, retryable=self.retryable, message=str(self))
        return make, ()


class UploadError(DeliveryError):
    """An `s3://` upload (or listing, or abort) failed: `delivery.s3.classify` names why."""


class LocalDeliveryError(DeliveryError):
    """A `file://` delivery failed; the `OSError` is its `__cause__`, `cause` named after it."""


class SpoolWriteError(CapturedError, OSError):
    """A spool write failed. `errno`, `strerror` and `filename` are the failed call's (the
    `OSError` itself is `error`, and `__cause__` when raised `from` it); `written` is how many
    bytes of the data (whole lines) went into spool files before the failure: they are in the
    spool all the same."""

    def __init__(self, *, error: OSError, written: int) -> None:
        if error.errno is None:
            super().__init__(*error.args)
        else:
            super().__init__(error.errno, error.strerror, error.filename, None, error.filename2)
        self.error = error
        self.written = written

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial(type(self), error=self.error, written=self.written), ()
