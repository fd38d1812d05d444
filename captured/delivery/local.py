"""The `file://` destination: sealed files moved (or copied) into a local directory tree."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
from collections.abc import Callable

from captured.errors import LocalDeliveryError


def file_uri_path(uri: str) -> str:
    """The local directory of a `file:///abs/path` destination (or a plain absolute path).

    The configuration stores `file://` followed by the path as written, not percent-encoded,
    so a directory named `out%41#1` stays `out%41#1`.
    """
    return uri[len("file://") :] if uri.startswith("file://") else uri


#: Causes of a failed local delivery by errno; any other is named after its errno (`eio`, ...).
LOCAL_CAUSES = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "quota_exceeded",
    errno.EACCES: "access_denied",
    errno.EPERM: "access_denied",
    errno.EROFS: "read_only_filesystem",
}
#: Causes a retry soon will not mend: tried again every `Delivery.FATAL_RETRY_S`.
LOCAL_FATAL = frozenset({"access_denied", "read_only_filesystem"})


def local_error(exc: OSError) -> LocalDeliveryError:
    """What a failed `file://` delivery raises: `cause` after the errno (counted and logged)."""
    code = exc.errno or 0
    cause = LOCAL_CAUSES.get(code) or errno.errorcode.get(code, "os_error").lower()
    return LocalDeliveryError(cause=cause, retryable=cause not in LOCAL_FATAL, message=str(exc))


class LocalDestination:
    """`<root>/<key>`, appearing atomically: rename within a filesystem, else copy + rename."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = file_uri_path(uri)
        os.makedirs(self.root, exist_ok=True)

    async def start(self) -> None:
        return None

    async def tidy(self, own_prefix: str, waiting: Callable[[], set[str]]) -> None:
        """Nothing to tidy: a copy that failed removed its temporary file; a crash mid-copy
        leaves a hidden `.{name}.tmp` that the next delivery of the same file overwrites."""
        return None

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        try:
            await asyncio.to_thread(self._put, path, key)
        except OSError as exc:
            raise local_error(exc) from exc

    def _put(self, path: str, key: str) -> None:
        target = os.path.join(self.root, key)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        try:
            os.rename(path, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # Another filesystem: a hidden temporary name that Model Monitor (which reads *.jsonl
        # only) never picks up, fsync, then an atomic rename into place.
        tmp = os.path.join(directory, f".{os.path.basename(target)}.tmp")
        src_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            with open(src_fd, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a full disk keeps no half copy (it would hold the space)
            raise
        os.rename(tmp, target)
        os.unlink(path)

    async def close(self) -> None:
        return None
