"""The capture socket: the one systemd passed (socket activation), or one bound here.

`bind_socket` binds under a temporary name beside the path, sets mode and group, and renames it
into place, so no client ever sees the socket with other permissions; it replaces a stale socket
file, never a live daemon's, nor anything that is not a socket.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat

from captured.wire.rules import MAX_SOCKET_PATH

log = logging.getLogger("captured.daemon")


def listening_socket(
    inherited: list[socket.socket], path: str, mode: int, group: str | None
) -> tuple[socket.socket, bool]:
    """The socket systemd passed, else our own bound at `path`; and whether it was passed."""
    for sock in inherited:
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            sock.setblocking(False)
            name = sock.getsockname()
            if name != path:
                log.warning(
                    "the socket systemd passed is %r, not socket_path %s (which `captured status` uses)",
                    name,
                    path,
                )
            log.info("listening on the socket systemd passed: %s", name)
            return sock, True
    if inherited:
        log.warning("systemd passed %d socket(s), none a Unix stream socket: binding our own", len(inherited))
    return bind_socket(path, mode, group), False


def bind_socket(path: str, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """Bind the capture socket, replacing a stale socket file but never a live daemon's.

    The socket is bound under a temporary name beside `path`, given its mode and group, and
    renamed into place: no client ever sees it with other permissions.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    gid = -1 if group is None else _group_id(group)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            os.unlink(path)  # stale: nobody listens
        else:
            raise FileExistsError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    tmp = os.path.join(os.path.dirname(path), f".captured-{os.getpid()}.sock")
    if len(os.fsencode(tmp)) > MAX_SOCKET_PATH:  # no room for a longer name: bind in place
        tmp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        try:
            os.chmod(tmp, mode)
            if gid != -1:
                os.chown(tmp, -1, gid)
            if tmp != path:
                os.rename(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"ingest.socket_group: no group named {group!r}") from None
