"""Who may talk to the daemon, and how many: socket mode and group, peer allow-lists (SO_PEERCRED),
the connection cap, and clients that stall or trickle in the middle of a frame.

The daemon runs in the test's own event loop (`captured.testing.inprocess`); blocking socket code
and forked clients run in threads meanwhile. A subprocess daemon is kept for its exit code and for
what is measured of its process (peak RSS, its open-files limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.client.aio import AsyncCaptureClient
from captured.daemon.peers import peer_groups
from captured.service.cli import query_status
from captured.service.config import Config
from captured.testing.daemon import DaemonProcess, read_error
from captured.testing.inprocess import FakeClock, eventually, run_daemon, status_doc, write_config
from captured.wire import frames


def capture_ok(d: DaemonProcess, n: int = 20) -> bool:
    with CaptureClient(d.socket_path) as client:
        for i in range(n):
            client.capture(f"{i},1\n", "0", request_content_type="text/csv")
        return client.flush(timeout=10)


async def send_ok(socket_path: str, n: int = 20) -> bool:
    """`capture_ok` against a daemon in this event loop."""
    async with AsyncCaptureClient(socket_path) as client:
        for i in range(n):
            client.capture(f"{i},1\n", "0", request_content_type="text/csv")
        return await client.flush(timeout=10)


def closed(status: dict[str, Any]) -> dict[str, int]:
    return dict(status["ingest"]["connections_closed"])


async def status_over_socket(cfg: Config) -> dict[str, Any]:
    """A STATUS query over the socket, as `captured status` asks (in a thread: the daemon answers
    on this loop). Unlike `status_doc`, it is a client: counted, and subject to the allow-lists."""
    return await asyncio.to_thread(query_status, cfg.socket_path)


def config_in(short_tmp: Path, name: str, extra_toml: str = "") -> Config:
    """`write_config` under `short_tmp / name` (as `daemon_factory(name=...)` lays a daemon out)."""
    (short_tmp / name).mkdir(exist_ok=True)
    return write_config(short_tmp / name, extra_toml)


def daemon_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the in-process daemon logged (not a client in this process)."""
    return "".join(f"{r.getMessage()}\n" for r in caplog.records if not r.name.startswith("captured.client"))


def test_socket_file_gets_the_configured_mode_and_group(short_tmp: Path) -> None:
    default = config_in(short_tmp, "a")
    group = grp.getgrgid(os.getgid()).gr_name
    cfg = config_in(short_tmp, "b", f'[ingest]\nsocket_mode = 0o600\nsocket_group = "{group}"\n')

    async def main() -> None:
        async with run_daemon(default, clock=FakeClock()):
            assert stat.S_IMODE(os.stat(default.socket_path).st_mode) == 0o660
        async with run_daemon(cfg, clock=FakeClock()):
            st = os.stat(cfg.socket_path)
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()
            assert await send_ok(cfg.socket_path)
            assert not [p for p in os.listdir(os.path.dirname(cfg.socket_path)) if p.startswith(".captured-")]

    asyncio.run(main())


def test_an_unknown_socket_group_is_a_clear_start_error(daemon_factory: Any) -> None:
    d = daemon_factory(extra_toml='[ingest]\nsocket_group = "no-such-group-here"\n')
    d.write_config()
    try:
        d.start(timeout=10)
    except RuntimeError as exc:
        # Said before anything is opened, as `captured check` says it: file, key, value, rule.
        assert "ingest.socket_group = 'no-such-group-here': no such group on this host" in str(exc)
        assert "daemon exited with 2" in str(exc)
    else:
        raise AssertionError("the daemon started with a group that does not exist")


def probe_as(uid: int, gid: int, path: str, groups: tuple[int, ...] = ()) -> str:
    """Connect as another user (a forked child drops to uid/gid and the supplementary `groups`),
    send a FLUSH and return the daemon's ERROR text ("" if it answered with an ACK instead)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, so it needs no access to this interpreter's files
        code = 1
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(path)
                # Refused and closed before the FLUSH arrived: its ERROR is still there to read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(frames.encode_frame(frames.Kind.FLUSH, (1,)))
                reader = frames.FrameReader()
                answer = ""
                while not answer and (data := s.recv(65536)):
                    for kind, payload in reader.feed(data):
                        if kind == frames.Kind.ERROR:
                            answer = bytes(payload).decode()
                        elif kind == frames.Kind.ACK:
                            answer = "ACK"
            os.write(w, answer.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the probe failed"
    return out


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_peers_outside_the_allow_lists_are_refused_and_counted(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """allowed_uids names someone else: a client running as `nobody` (the socket is 0666 here, so
    only the allow-list stands in its way) is refused with an ERROR frame before anything it sends
    is read, and counted as peer_refused; root and the daemon's own user always pass; listing the
    client's uid or one of its groups lets it in."""
    nobody = pwd.getpwnam("nobody")
    open_socket = "[ingest]\nsocket_mode = 0o666\n"
    others = config_in(short_tmp, "a", open_socket + "allowed_uids = [4242]\n")
    by_uid = config_in(short_tmp, "b", open_socket + f"allowed_uids = [{nobody.pw_uid}]\n")
    by_gid = config_in(short_tmp, "c", open_socket + f"allowed_gids = [{nobody.pw_gid}]\n")

    async def probe(cfg: Config) -> str:
        root = Path(cfg.socket_path).parent
        for directory in (root, root.parent):
            os.chmod(directory, 0o755)
        # The probe forks and waits for its child, which needs the daemon: in a thread.
        return await asyncio.to_thread(probe_as, nobody.pw_uid, nobody.pw_gid, cfg.socket_path)

    async def main() -> None:
        async with run_daemon(others, clock=FakeClock()):
            assert "is not allowed to send captures" in await probe(others)
            st = await status_over_socket(others)  # root's own status query passes
            assert closed(st) == {"peer_refused": 1}
            assert st["counters"]["received"] == 0
        assert "peer_refused" in daemon_log(caplog)
        async with run_daemon(by_uid, clock=FakeClock()):
            assert await probe(by_uid) == "ACK" and closed(await status_over_socket(by_uid)) == {}
        async with run_daemon(by_gid, clock=FakeClock()):
            assert await probe(by_gid) == "ACK" and closed(await status_over_socket(by_gid)) == {}

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon checks that each daemon exited 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_a_supplementary_group_admits_a_peer_without_reading_proc(short_tmp: Path) -> None:
    """A peer whose only listed group is a supplementary one is let in. Its groups come from
    SO_PEERGROUPS (the kernel's record at connect), not /proc, which the shipped unit's
    `ProtectProc=invisible` hides from the daemon: `peer_groups` alone sees the group."""
    nobody = pwd.getpwnam("nobody")
    extra = 4343
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_tmp / "g.sock"))
    os.chmod(short_tmp / "g.sock", 0o666)
    os.chmod(short_tmp, 0o755)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([extra])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(short_tmp / "g.sock"))
                c.recv(1)
            code = 0
        finally:
            os._exit(code)
    conn, _ = listener.accept()
    try:
        assert peer_groups(conn) == frozenset({extra})
    finally:
        conn.close()
        listener.close()
        os.waitpid(pid, 0)
    cfg = config_in(short_tmp, "d", f"[ingest]\nsocket_mode = 0o666\nallowed_gids = [{extra}]\n")
    for directory in (short_tmp / "d", short_tmp):
        os.chmod(directory, 0o755)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            # The probes fork and wait for their child, which needs the daemon: in threads.
            got = await asyncio.to_thread(probe_as, nobody.pw_uid, nobody.pw_gid, cfg.socket_path, (extra,))
            assert got == "ACK"
            assert "is not allowed" in await asyncio.to_thread(
                probe_as, nobody.pw_uid, nobody.pw_gid, cfg.socket_path
            )
            assert closed(await status_over_socket(cfg)) == {"peer_refused": 1}

    asyncio.run(main())


def refused_client(socket_path: str) -> dict[str, Any]:
    """A model server process running as nobody (forked) captures 20 records and flushes with a
    1 s timeout; its flush() result and stats()."""
    import json

    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a model server process running as nobody
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            client = CaptureClient(socket_path, reconnect_max_s=0.1)
            for i in range(20):
                client.capture(f"{i},1\n", "0", request_content_type="text/csv")
            flushed = client.flush(timeout=1.0)
            stats = client.stats()
            os.write(w, json.dumps({"flushed": flushed, **stats}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        got: dict[str, Any] = json.loads(fh.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and got, "the client process failed"
    return got


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_a_refused_client_accounts_for_every_record(short_tmp: Path) -> None:
    """A CaptureClient running as `nobody`, whom the allow-list refuses: its flush() is False and
    its counters still add up: the records it wrote are held (buffered), not shown as sent and
    gone. The daemon counts the refusals and no record."""
    cfg = config_in(short_tmp, "d", "[ingest]\nsocket_mode = 0o666\nallowed_uids = [4242]\n")
    for directory in (short_tmp / "d", short_tmp):
        os.chmod(directory, 0o755)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            # The client process is forked and waited for in a thread: the daemon runs meanwhile.
            got = await asyncio.to_thread(refused_client, cfg.socket_path)
            assert got["flushed"] is False
            assert got["captured"] == 20 and got["acknowledged"] == 0 and got["dropped"] == {}
            assert got["buffered"] == 20  # held for a daemon that lets it in: nothing unaccounted
            assert closed(status_doc(daemon)).get("peer_refused", 0) >= 1
            assert status_doc(daemon)["counters"]["received"] == 0

    asyncio.run(main())


def test_connections_past_the_cap_are_refused_and_the_others_served(short_tmp: Path) -> None:
    """max_connections = 4 and four idle clients: a fifth connection (a capture client or
    `captured status` alike) is refused with an ERROR frame and counted; once the idle ones go,
    clients are served again."""
    cfg = write_config(short_tmp, "[ingest]\nmax_connections = 4\n")

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(cfg.socket_path)
        return s

    def status_refused(path: str) -> str:
        """The ERROR answering a STATUS request, as `captured status` sends it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it arrived
                s.sendall(frames.encode_frame(frames.Kind.STATUS, ()))
            return read_error(s)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            assert (await status_over_socket(cfg))["ingest"]["connections"] == 1  # (this status query)
            await eventually(lambda: status_doc(daemon)["ingest"]["connections"] == 0)
            idle = []
            try:
                for _ in range(4):
                    idle.append(await asyncio.to_thread(connect))
                with await asyncio.to_thread(connect) as extra:
                    assert "at most 4 clients" in await asyncio.to_thread(read_error, extra)
                assert "at most 4 clients" in await asyncio.to_thread(status_refused, cfg.socket_path)
            finally:
                for s in idle:
                    s.close()
            # Once the daemon has seen the four close, a status query is served (and counted).
            await eventually(lambda: status_doc(daemon)["ingest"]["connections"] == 0)
            st = await status_over_socket(cfg)
            assert st["ingest"]["connections"] == 1
            assert closed(st) == {"too_many_connections": 2}  # the fifth client and the status query
            assert await send_ok(cfg.socket_path)

    asyncio.run(main())


def test_a_client_trickling_a_frame_is_closed_while_others_are_served(short_tmp: Path) -> None:
    """One byte every 0.1 s of a 1000-byte frame: it has not arrived whole after frame_timeout_s
    (1 s), so the connection is closed as stalled_frame; a well-behaved client meanwhile captures
    as usual."""
    cfg = write_config(short_tmp, "[ingest]\nframe_timeout_s = 1\n")
    frame = frames.frame(frames.Kind.BATCH, b"\x91" + b"\xc0" * 999)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
                slow.connect(cfg.socket_path)
                t0 = time.monotonic()
                for i in range(len(frame)):
                    try:
                        slow.sendall(frame[i : i + 1])  # one byte: never blocks the loop
                    except OSError:
                        break  # cut off
                    if i == 3:
                        assert await send_ok(cfg.socket_path)
                    if time.monotonic() - t0 > 10 or closed(status_doc(daemon)).get("stalled_frame"):
                        break
                    await asyncio.sleep(0.1)
                assert time.monotonic() - t0 < 10
            await eventually(lambda: closed(status_doc(daemon)).get("stalled_frame") == 1)
            assert status_doc(daemon)["counters"]["received"] == 20  # the trickled frame never counted
            assert await send_ok(cfg.socket_path)

    asyncio.run(main())


def test_thousands_of_idle_connections_cannot_lock_out_an_active_client(daemon_factory: Any) -> None:
    """1,500 connections opened at once and left idle, against the default cap of 1,024: those past
    the cap are refused (too_many_connections: none of the others has been idle a second yet);
    a client that comes a second later gets in by closing the longest-idle one (idle_evicted) and
    captures; the daemon stays small."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip("needs 2,000 open files in the test process")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)), hard))
    d = daemon_factory().start()
    idle = []
    try:
        for _ in range(1500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            idle.append(s)
        time.sleep(1.2)  # now they have been idle for over a second
        assert capture_ok(d, 200)
        st = d.status()
        assert st["ingest"]["connections"] <= 1024
        errors = st["ingest"]["connections_closed"]
        assert errors["too_many_connections"] >= 400 and errors["idle_evicted"] >= 1, errors
        assert st["counters"]["written"] == 200
        with open(f"/proc/{d.proc.pid}/status") as fh:  # type: ignore[union-attr]
            peak_mb = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
        assert peak_mb < 200
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
