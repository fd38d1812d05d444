"""Who may talk to the daemon, and how many: socket mode and group, peer allow-lists (SO_PEERCRED),
the connection cap, and clients that stall or trickle in the middle of a frame."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.daemon.peers import peer_groups
from captured.testing.daemon import DaemonProcess, read_error, wait_for
from captured.wire import frames


def capture_ok(d: DaemonProcess, n: int = 20) -> bool:
    with CaptureClient(d.socket_path) as client:
        for i in range(n):
            client.capture(f"{i},1\n", "0", request_content_type="text/csv")
        return client.flush(timeout=10)


def closed(d: DaemonProcess) -> dict[str, int]:
    return dict(d.status()["ingest"]["connections_closed"])


def test_socket_file_gets_the_configured_mode_and_group(daemon_factory: Any) -> None:
    default = daemon_factory(name="a").start()
    assert stat.S_IMODE(os.stat(default.socket_path).st_mode) == 0o660
    group = grp.getgrgid(os.getgid()).gr_name
    d = daemon_factory(
        name="b", extra_toml=f'[ingest]\nsocket_mode = 0o600\nsocket_group = "{group}"\n'
    ).start()
    st = os.stat(d.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()
    assert capture_ok(d)
    assert not [p for p in os.listdir(os.path.dirname(d.socket_path)) if p.startswith(".captured-")]


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
def test_peers_outside_the_allow_lists_are_refused_and_counted(daemon_factory: Any) -> None:
    """allowed_uids names someone else: a client running as `nobody` (the socket is 0666 here, so
    only the allow-list stands in its way) is refused with an ERROR frame before anything it sends
    is read, and counted as peer_refused; root and the daemon's own user always pass; listing the
    client's uid or one of its groups lets it in."""
    nobody = pwd.getpwnam("nobody")
    open_socket = "[ingest]\nsocket_mode = 0o666\n"

    def probe(d: DaemonProcess) -> str:
        for directory in (d.root, d.root.parent):
            os.chmod(directory, 0o755)
        return probe_as(nobody.pw_uid, nobody.pw_gid, d.socket_path)

    others = daemon_factory(name="a", extra_toml=open_socket + "allowed_uids = [4242]\n").start()
    assert "is not allowed to send captures" in probe(others)
    assert closed(others) == {"peer_refused": 1}
    assert others.status()["counters"]["received"] == 0  # and root's own status query passed
    assert "peer_refused" in others.log()

    by_uid = daemon_factory(name="b", extra_toml=open_socket + f"allowed_uids = [{nobody.pw_uid}]\n").start()
    assert probe(by_uid) == "ACK" and closed(by_uid) == {}
    by_gid = daemon_factory(name="c", extra_toml=open_socket + f"allowed_gids = [{nobody.pw_gid}]\n").start()
    assert probe(by_gid) == "ACK" and closed(by_gid) == {}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_a_supplementary_group_admits_a_peer_without_reading_proc(
    daemon_factory: Any, short_tmp: Path
) -> None:
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
    d = daemon_factory(extra_toml=f"[ingest]\nsocket_mode = 0o666\nallowed_gids = [{extra}]\n").start()
    for directory in (d.root, d.root.parent):
        os.chmod(directory, 0o755)
    assert probe_as(nobody.pw_uid, nobody.pw_gid, d.socket_path, groups=(extra,)) == "ACK"
    assert "is not allowed" in probe_as(nobody.pw_uid, nobody.pw_gid, d.socket_path)
    assert closed(d) == {"peer_refused": 1}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_a_refused_client_accounts_for_every_record(daemon_factory: Any) -> None:
    """A CaptureClient running as `nobody`, whom the allow-list refuses: its flush() is False and
    its counters still add up: the records it wrote are held (buffered), not shown as sent and
    gone. The daemon counts the refusals and no record."""
    import json

    nobody = pwd.getpwnam("nobody")
    d = daemon_factory(extra_toml="[ingest]\nsocket_mode = 0o666\nallowed_uids = [4242]\n").start()
    for directory in (d.root, d.root.parent):
        os.chmod(directory, 0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a model server process running as nobody
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            client = CaptureClient(d.socket_path, reconnect_max_s=0.1)
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
        got = json.loads(fh.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and got, "the client process failed"
    assert got["flushed"] is False
    assert got["captured"] == 20 and got["acknowledged"] == 0 and got["dropped"] == {}
    assert got["buffered"] == 20  # held for a daemon that lets it in: nothing unaccounted
    assert closed(d).get("peer_refused", 0) >= 1
    assert d.status()["counters"]["received"] == 0


def test_connections_past_the_cap_are_refused_and_the_others_served(daemon_factory: Any) -> None:
    """max_connections = 4 and four idle clients: a fifth connection (a capture client or
    `captured status` alike) is refused with an ERROR frame and counted; once the idle ones go,
    clients are served again."""
    d = daemon_factory(extra_toml="[ingest]\nmax_connections = 4\n").start()
    wait_for(lambda: d.status()["ingest"]["connections"] == 1)  # (this status query)
    idle = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket_path)
            idle.append(s)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.connect(d.socket_path)
            assert "at most 4 clients" in read_error(extra)
    finally:
        for s in idle:
            s.close()
    # The daemon may accept the next connection before it has seen the four close: then that
    # one is refused too (counted), and the status query is tried again.
    refused_again = 0
    while True:
        try:
            if d.status()["ingest"]["connections"] == 1:
                break
        except ConnectionError as exc:
            assert "at most 4 clients" in str(exc)
            refused_again += 1
        assert refused_again < 100
        time.sleep(0.02)
    assert closed(d) == {"too_many_connections": 1 + refused_again}
    assert capture_ok(d)


def test_a_client_trickling_a_frame_is_closed_while_others_are_served(daemon_factory: Any) -> None:
    """One byte every 0.1 s of a 1000-byte frame: it has not arrived whole after frame_timeout_s
    (1 s), so the connection is closed as stalled_frame; a well-behaved client meanwhile captures
    as usual."""
    d = daemon_factory(extra_toml="[ingest]\nframe_timeout_s = 1\n").start()
    frame = frames.frame(frames.Kind.BATCH, b"\x91" + b"\xc0" * 999)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(d.socket_path)
        t0 = time.monotonic()
        for i in range(len(frame)):
            try:
                slow.sendall(frame[i : i + 1])
            except OSError:
                break  # cut off
            if i == 3:
                assert capture_ok(d)
            if time.monotonic() - t0 > 10 or closed(d).get("stalled_frame"):
                break
            time.sleep(0.1)
        assert time.monotonic() - t0 < 10
    wait_for(lambda: closed(d).get("stalled_frame") == 1)
    assert d.status()["counters"]["received"] == 20  # the trickled frame never counted
    assert capture_ok(d)


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
