"""What an earlier run left in the spool: the lock, the scan, and cutting files to what counts.

A daemon that stopped cleanly leaves sealed files that were not delivered yet; one that crashed
(SIGKILL, power loss) also leaves `.part` files it was writing, whose ends may be torn or hold
records no client was told of. At start, under the spool's lock:

1. `scan_spool` finds the configured endpoints' regular files (`lstat`: a planted link is logged
   and left alone, never followed, truncated, renamed or delivered); files of an endpoint the
   configuration no longer has are named in the log and left in the spool, for a configuration
   that has it again;
2. `recover_part` cuts each to its end committed in the journal (`ledger`; what lies past it was
   never acknowledged, and its client sends it again), then back to its last complete line;
3. `.part` files are renamed to their sealed names, empty ones removed, and the sealed files
   handed to delivery; compressed copies (`.jsonl.zst`) an earlier run left are deleted, made
   again from their plain files at delivery.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections import Counter
from collections.abc import Collection

from captured.daemon.ledger import Ledger
from captured.daemon.spool import PART, SEALED, ZST

log = logging.getLogger("captured.daemon")


def recover(spool_dir: str, endpoints: Collection[str], ledger: Ledger) -> list[tuple[str, int]]:
    """Cut and seal what an earlier run left; return the sealed files (path, size), oldest first.

    Loads the journal's committed ends and sessions into `ledger`, and opens a fresh journal.
    """
    committed = ledger.load()
    remove_compressed(spool_dir)
    found, parts = scan_spool(spool_dir, endpoints)
    sealed = []
    for path in [p for p, _ in found] + parts:
        size = os.lstat(path).st_size
        kept = recover_part(path, committed.get(_stem(path)))
        if kept != size:
            log.warning("cut %s from %d to %d bytes (its end was torn or uncommitted)", path, size, kept)
        if kept == 0:
            os.unlink(path)
            continue
        if path.endswith(PART):
            target = path[: -len(PART)]
            os.rename(path, target)
            log.info("recovered %s (%d bytes of whole lines)", target, kept)
            path = target
        sealed.append((path, kept))
    ledger.open()
    if sealed:
        log.info("%d sealed file(s) from an earlier run queued for delivery", len(sealed))
    return sealed


def scan_spool(spool_dir: str, endpoints: Collection[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """Files a previous run left: (sealed files with sizes, `.part` files), oldest first.

    Only the regular files of `endpoints` are taken; those of other endpoints are counted in the
    log and left alone (never delivered somewhere their configuration does not say).
    A symbolic link or anything else that is not a regular file, under a spool file's name, is
    logged and left alone: never truncated, renamed, delivered or uploaded (`lstat`, no link is
    followed).
    """
    sealed: list[tuple[float, str, int]] = []
    parts: list[str] = []
    others: Counter[str] = Counter()
    with os.scandir(spool_dir) as it:
        for entry in it:
            if not entry.name.endswith((SEALED, SEALED + PART)) or "." not in entry.name:
                continue
            endpoint = entry.name.partition(".")[0]
            if endpoint not in endpoints:
                others[endpoint] += 1
                continue
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                log.warning(
                    "spool: %s is not a regular file (%s); left alone, never delivered",
                    entry.path,
                    "a symbolic link" if stat.S_ISLNK(st.st_mode) else f"mode {st.st_mode:o}",
                )
                continue
            if entry.name.endswith(SEALED):
                sealed.append((st.st_mtime, entry.path, st.st_size))
            else:
                parts.append(entry.path)
    for endpoint, n in sorted(others.items()):
        log.warning(
            "spool: %d file(s) of endpoint %s, which the configuration does not have, are left in %s"
            " (they are delivered once the endpoint is configured again)",
            n,
            endpoint,
            spool_dir,
        )
    sealed.sort()
    return [(p, s) for _, p, s in sealed], sorted(parts)


def remove_compressed(spool_dir: str) -> int:
    """Delete the `.jsonl.zst` files an earlier run left (a crash while compressing, or an
    object not stored yet): each is made again from its plain file, which stays until its object
    is stored (`delivery.compressing`). Links and other non-regular files are left alone."""
    removed = 0
    with os.scandir(spool_dir) as it:
        for entry in it:
            if entry.name.endswith(SEALED + ZST) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    if removed:
        log.info("removed %d compressed file(s) an earlier run left; compressed again at delivery", removed)
    return removed


def recover_part(path: str, committed: int | None = None) -> int:
    """Cut a file left by a crash after its last complete line; return the kept size.

    Only whole lines are ever delivered: a torn last line (no trailing newline) is removed.
    With `committed` (its end in the journal, `ledger`), the file is first cut to that: what lies
    past it was never acknowledged, and its client sends it again.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)  # never through a planted link
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    with open(fd, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        keep = size if committed is None else min(size, committed)
        block = 65536
        while keep > 0:
            start = max(0, keep - block)
            fh.seek(start)
            chunk = fh.read(keep - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            keep = start
        # Also when whole: a file with disk reserved past its end (`reserve`) gives it back.
        if keep != size or os.fstat(fh.fileno()).st_blocks * 512 > keep + 65536:
            fh.truncate(keep)
        return keep


def _stem(path: str) -> str:
    """A spool file's name without `.jsonl` / `.jsonl.part`: its name in the journal."""
    name = os.path.basename(path)
    return name.split(SEALED, 1)[0]


def lock_spool(spool_dir: str) -> int:
    """Hold an exclusive lock on the spool for the daemon's life (released when it exits).

    Recovery renames `.part` files: a second daemon on the same spool would seal a live
    daemon's open files under it. The lock makes the second one refuse to start instead.
    """
    path = os.path.join(spool_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link; refusing to use it (remove it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file; refusing to use it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(f"another daemon is using the spool {spool_dir}") from None
    return fd
