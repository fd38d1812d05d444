"""Who is on the other end of a capture connection: uid and groups as the kernel recorded them.

Used by ingest's allow-lists (`ingest.allowed_uids`, `ingest.allowed_gids`). SO_PEERCRED gives the
uid and primary gid, SO_PEERGROUPS (Linux 4.13) the supplementary groups at connect(2); /proc is
read only on an older kernel, and the shipped unit's `ProtectProc=invisible` hides it.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

_UCRED = struct.Struct("3i")


#: SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as the kernel recorded them at
#: connect(2). Not every Python names the constant; its value is fixed by the kernel ABI.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")


def peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The peer's supplementary groups from SO_PEERGROUPS, or None where the kernel cannot say.

    No /proc is read: under the shipped unit's `ProtectProc=invisible` another user's
    /proc/<pid>/status is hidden from the daemon, so a peer admitted only through a
    supplementary group was refused."""
    size = 64 * _GID.size
    for _ in range(3):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < (1 << 20):
                size *= 16  # more groups than that: NGROUPS_MAX is 65536
                continue
            return None
        return frozenset(g for (g,) in _GID.iter_unpack(raw[: len(raw) // _GID.size * _GID.size]))
    return None


def peer_credentials(transport: asyncio.BaseTransport) -> tuple[int, frozenset[int]] | None:
    """(uid, the peer's groups) from SO_PEERCRED and SO_PEERGROUPS, or None if they cannot be read.

    The groups are the primary gid SO_PEERCRED reports plus the supplementary groups of that
    process when it connected (SO_PEERGROUPS; on a kernel without it, /proc/<pid>/status at the
    time of the check, which `ProtectProc=invisible` hides, leaving the primary gid only).
    """
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    groups = {gid}
    supplementary = peer_groups(sock)
    if supplementary is not None:
        groups |= supplementary
        return uid, frozenset(groups)
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return uid, frozenset(groups)
