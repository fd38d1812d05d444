"""Process-wide settings the daemon makes once at start: the allocator and the open-files limit."""

from __future__ import annotations

import contextlib
import ctypes
import resource

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep glibc from returning and re-faulting the same memory for every batch.

    Each batch allocates and frees buffers of a few hundred KiB. By default glibc serves those
    with mmap/munmap (above 128 KiB) and trims the heap top after each free, so the next batch
    page-faults the same memory back in, and much of the daemon's CPU went to the kernel
    (measured in bench/README.md). Serving them from the heap and trimming only past 64 MiB of free space
    removes those faults; RSS stays bounded by the largest burst, not by time. A no-op where the
    C library has no `mallopt` (musl, macOS).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok: bool = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024) == 1 and ok
    return ok


def raise_open_files_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward `want` (at most the hard limit); return the new soft
    limit. systemd starts services at 1024 soft, fewer than `ingest.max_connections` plus the
    spool's files need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft
