"""Pytest fixtures for tests that need a real S3-compatible HTTP server on loopback.

* `MotoServer`: moto's server mode in a child process on a free 127.0.0.1 port. The child
  watches its stdin and exits as soon as the parent closes it or dies, and it also has a
  hard lifetime cap, so it can never outlive the test run.
* `FaultProxy`: a TCP proxy in front of any host:port, run by an asyncio loop in one
  background thread, whose mode (`pass`, `refuse`, `stall`) the test switches at run time.
* `S3FaultProxy`: an HTTP proxy in front of the S3 server that knows each request's S3
  operation and, by a rule the test sets, forwards it, cuts its response after S3 acted on it,
  answers 503 without forwarding, or resets the connection.

Fixtures: `moto_server` (session), `s3` (function: reset server + fresh bucket),
`aws_env` (function: environment for daemon subprocesses), `s3_proxy`, `s3_fault_proxy`
(function).

PYTEST_DONT_REWRITE: test modules import this file before `pytest_plugins` names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import boto3
import pytest
from botocore.config import Config

REGION = "us-east-1"
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
LOOPBACK = "127.0.0.1"

# The child: start moto's threaded server on port 0, report the port on stdout, then block
# on stdin; EOF (parent closed the pipe, or the parent died) or the lifetime cap ends it.
_LAUNCHER = """
import os, sys, threading
host, max_lifetime = sys.argv[1], float(sys.argv[2])
threading.Timer(max_lifetime, os._exit, (3,)).start()
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
os.environ["MOTO_PORT"] = str(port)
sys.stdout.write(f"{port}\\n")
sys.stdout.flush()
try:
    sys.stdin.buffer.read()
finally:
    os._exit(0)
"""


def _http(
    host: str, port: int, method: str, path: str, body: bytes = b"", timeout: float = 5.0
) -> tuple[int, bytes]:
    """A bare HTTP request (http.client ignores *_PROXY variables, unlike urllib)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def client_config(
    *,
    total_max_attempts: int = 1,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    **kwargs: Any,
) -> Config:
    """botocore Config for tests: path-style addressing, no retries unless asked.

    Note botocore's `retries={"max_attempts": N}` counts RETRIES (N=1 means two attempts);
    `total_max_attempts` counts attempts, so the default 1 means exactly one request.
    """
    return Config(
        region_name=REGION,
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": total_max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        **kwargs,
    )


class MotoServer:
    """moto's server mode in a subprocess on 127.0.0.1:<free port>."""

    def __init__(
        self,
        host: str = LOOPBACK,
        log_path: Path | None = None,
        max_lifetime: float = 3600.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.log_path = log_path
        self.max_lifetime = max_lifetime
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"{type(self).__name__} did not start (rc={self.proc.returncode}):\n{self.log()}"
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 64)
                if not chunk:
                    continue  # EOF: the poll() above reports the exit
                line += chunk
        self.port = int(line)
        while True:  # the socket listens already; wait until the app answers
            try:
                if self.answers():
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__} does not answer:\n{self.log()}")
            time.sleep(0.05)

    def command(self) -> list[str]:
        """The child: it prints its port on stdout, then serves until its stdin closes."""
        return [sys.executable, "-c", _LAUNCHER, self.host, str(self.max_lifetime)]

    def answers(self) -> bool:
        return _http(self.host, self.port, "GET", "/moto-api/reset", timeout=2.0)[0] == 400

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-5000:]
        return "(no log)"

    def reset(self) -> None:
        """Forget every bucket, key, object, upload... on every moto backend."""
        status, body = _http(self.host, self.port, "POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset failed: {status} {body!r}")

    def set_auth(self, initial_no_auth_action_count: float) -> float:
        """Switch moto's IAM authentication on after N more unauthenticated requests.

        `set_auth(0)` enforces SigV4 signatures from IAM access keys and IAM policies from
        the next request on; `set_auth(float("inf"))` switches it off (the default).
        Returns the previous setting. Global for the whole server: restore it.
        """
        status, body = _http(
            self.host, self.port, "POST", "/moto-api/reset-auth", str(initial_no_auth_action_count).encode()
        )
        if status != 200:
            raise RuntimeError(f"moto reset-auth failed: {status} {body!r}")
        return float(json.loads(body)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[None]:
        """Enforce IAM authentication inside the block, restore the previous setting after.

        Inside, the dummy credentials get 403 InvalidAccessKeyId; use `create_iam_user`
        (BEFORE entering: IAM calls are authenticated too) for keys that work.
        """
        previous = self.set_auth(0)
        try:
            yield
        finally:
            self.set_auth(previous)

    def create_iam_user(
        self, actions: tuple[str, ...] = ("s3:*",), resource: str = "*", name: str | None = None
    ) -> dict[str, str]:
        """An IAM user allowed `actions` on `resource`; returns boto3 credential kwargs
        (`aws_access_key_id`, `aws_secret_access_key`). Only matters under `iam_auth()`."""
        iam = self.boto3_client("iam")
        name = name or f"user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": resource}],
        }
        iam.put_user_policy(UserName=name, PolicyName="test", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}

    def client_kwargs(
        self,
        *,
        endpoint_url: str | None = None,
        aws_access_key_id: str = ACCESS_KEY_ID,
        aws_secret_access_key: str = SECRET_ACCESS_KEY,
        config: Config | None = None,
        **config_kwargs: Any,
    ) -> dict[str, Any]:
        """Keyword arguments for `create_client(service, **kw)` of boto3 or aiobotocore.

        Explicit dummy credentials, us-east-1, path-style, one attempt (no retries),
        connect/read timeouts 5/30 s, unless overridden in `config_kwargs` (see `client_config`).
        """
        return {
            "endpoint_url": endpoint_url or self.endpoint_url,
            "region_name": REGION,
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "config": config or client_config(**config_kwargs),
        }

    def boto3_client(self, service: str = "s3", **kwargs: Any) -> Any:
        """A boto3 client for this server (or `endpoint_url=`, e.g. a FaultProxy's);
        `kwargs` as for `client_kwargs`."""
        return boto3.session.Session().client(service, **self.client_kwargs(**kwargs))

    def aws_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment for a subprocess that talks to this server (see `aws_env`)."""
        env = dict(os.environ if base is None else base)
        for name in list(env):
            if name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
                del env[name]
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_ENDPOINT_URL_S3=self.endpoint_url,
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env


class S3Sandbox:
    """A boto3 S3 client plus a freshly created bucket; unknown attributes go to the client."""

    def __init__(self, client: Any, bucket: str, server: MotoServer) -> None:
        self.client = client
        self.bucket = bucket
        self.server = server
        self.endpoint_url = server.endpoint_url

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


Mode = Literal["pass", "refuse", "stall"]
MODES: tuple[Mode, ...] = ("pass", "refuse", "stall")


class FaultProxy:
    """TCP proxy 127.0.0.1:<free port> -> upstream, with run-time switchable faults.

    Modes (switch with `set_mode`, effective when it returns):
      * `pass`: forward both ways (stalled connections resume);
      * `refuse`: reset new connections at once and cut (RST) every existing one;
      * `stall`: accept new connections but neither forward nor answer; existing
        connections stop forwarding too (so pooled keep-alive connections stall as well);
        all are held open until the mode changes or the proxy stops.
    Counters: `accepted`, `refused`, `bytes_up` (client -> upstream), `bytes_down`,
    `active` (connections open now), `peak_active` (most connections open at once).
    """

    def __init__(self, upstream_host: str, upstream_port: int, host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.accepted = 0
        self.refused = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.peak_active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._error: BaseException | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def active(self) -> int:
        return len(self._conns)

    # -- test-thread API --------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> FaultProxy:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="FaultProxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"FaultProxy did not start: {self._error!r}")
        return self

    def set_mode(self, mode: Mode, timeout: float = 5.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._apply_mode(mode), self._loop).result(timeout)

    def reset_counters(self) -> None:
        self.accepted = self.refused = self.bytes_up = self.bytes_down = self.peak_active = 0

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("FaultProxy thread did not stop")
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- loop thread ------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start_server())
        except BaseException as exc:
            self._error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _start_server(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == "pass":
            self._flowing.set()
            return
        self._flowing.clear()
        if mode == "refuse":
            for task, writers in list(self._conns.items()):
                for w in writers:
                    _abort(w)
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task, writers in list(self._conns.items()):
            for w in writers:
                _abort(w)
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            self.refused += 1
            _abort(writer)
            return
        task = asyncio.current_task()
        assert task is not None and self._flowing is not None
        writers = [writer]
        self._conns[task] = writers
        self.peak_active = max(self.peak_active, len(self._conns))
        try:
            await self._flowing.wait()  # stall: hold the accepted connection, say nothing
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            writers.append(up_writer)
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer, "bytes_up")),
                asyncio.ensure_future(self._pump(up_reader, writer, "bytes_down")),
            ]
            try:
                # A closed or broken side ends the connection: no half-close (HTTP needs none).
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._conns.pop(task, None)
            for w in writers:
                _abort(w)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while True:
                data = await src.read(65536)
                if not data:
                    return
                await self._flowing.wait()  # stall: hold the bytes (and stop reading)
                dst.write(data)
                await dst.drain()
                setattr(self, counter, getattr(self, counter) + len(data))


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Action = Literal["pass", "cut", "fail", "reset"]
#: Hop-by-hop headers (and those the proxy's HTTP stack sets itself) are not copied across.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te", "upgrade"}
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def s3_operation(method: str, query: Any) -> str:
    """The S3 operation of a path-style request, from its method and query keys."""
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in query else "Post"
    if method == "PUT":
        return "UploadPart" if "uploadId" in query else "PutObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "Delete"
    if method == "GET" and "uploads" in query:
        return "ListMultipartUploads"
    return method.capitalize()


class S3FaultProxy:
    """HTTP proxy 127.0.0.1:<free port> -> an S3 server, with a fault decided per request.

    `rule(operation, n)` (n: this operation's 1-based count so far) names the action:
      * `pass`: forward the request and its response unchanged;
      * `cut`: forward it (S3 acts on it), send the response's status, headers and half of its
        body, then reset the connection: a response lost on the way back;
      * `fail`: answer 503 SlowDown without forwarding (S3 never sees it);
      * `reset`: reset the connection without forwarding.
    `seen[(operation, action)]` counts what was done. Runs an aiohttp server and client on an
    asyncio loop in one background thread; `rule` may be replaced at any time.

    moto reports one fixed `Initiated` time for every multipart upload; in ListMultipartUploads
    answers the proxy puts the time it saw each upload created (those created through it).
    """

    def __init__(self, upstream: str, host: str = LOOPBACK) -> None:
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = 0
        self.rule: Any = lambda op, n: "pass"
        self.counts: dict[str, int] = {}
        self.seen: dict[tuple[str, str], int] = {}
        self.initiated: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._session: Any = None
        self._error: BaseException | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def done(self, operation: str, action: str) -> int:
        return self.seen.get((operation, action), 0)

    def start(self, timeout: float = 10.0) -> S3FaultProxy:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="S3FaultProxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f"S3FaultProxy did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("S3FaultProxy thread did not stop")
        self._thread = None

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start_server())
        except BaseException as exc:
            self._error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._shutdown())
            loop.close()

    async def _start_server(self) -> None:
        import aiohttp
        from aiohttp import web

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        op = s3_operation(request.method, request.query)
        n = self.counts[op] = self.counts.get(op, 0) + 1
        action: Action = self.rule(op, n)
        self.seen[(op, action)] = self.seen.get((op, action), 0) + 1
        body = await request.read()
        if action == "fail":
            return web.Response(status=503, body=_SLOW_DOWN, content_type="application/xml")
        if action == "reset":
            _reset(request.transport)
            raise web.HTTPServiceUnavailable()  # never sent: the connection is gone
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as up:
            payload = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
        if up.status == 200 and op == "CreateMultipartUpload":
            if (m := re.search(rb"<UploadId>([^<]+)</UploadId>", payload)) is not None:
                now = datetime.datetime.now(datetime.UTC)
                self.initiated[m[1].decode()] = (
                    now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
                )
        elif up.status == 200 and op == "ListMultipartUploads":
            payload = re.sub(rb"<Upload>.*?</Upload>", self._initiated_as_seen, payload, flags=re.S)
        if action == "pass":
            return web.Response(status=up.status, headers=out_headers, body=payload)
        response = web.StreamResponse(status=up.status, headers=out_headers)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        _reset(request.transport)
        return response

    def _initiated_as_seen(self, m: re.Match[bytes]) -> bytes:
        upload = m[0]
        upload_id = re.search(rb"<UploadId>([^<]+)</UploadId>", upload)
        when = self.initiated.get(upload_id[1].decode()) if upload_id else None
        if when is None:
            return upload
        return re.sub(rb"<Initiated>[^<]*</Initiated>", f"<Initiated>{when}</Initiated>".encode(), upload)


def _reset(transport: Any) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if transport is not None:
        transport.abort()


def unique_bucket(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server subprocess for the whole run (log: <basetemp>/moto*/moto.log)."""
    server = MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: MotoServer) -> S3Sandbox:
    """Reset moto, then a boto3 S3 client (`s3.client`, or call methods on `s3`) and `s3.bucket`."""
    moto_server.reset()
    client = moto_server.boto3_client()
    bucket = unique_bucket()
    client.create_bucket(Bucket=bucket)
    return S3Sandbox(client, bucket, moto_server)


@pytest.fixture
def aws_env(moto_server: MotoServer) -> dict[str, str]:
    """Full environment (a fresh dict) for daemon subprocesses: dummy credentials, us-east-1,
    no IMDS probing, no ~/.aws files, no HTTP proxies, AWS_ENDPOINT_URL_S3 = moto."""
    return moto_server.aws_env()


@pytest.fixture
def s3_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A FaultProxy in `pass` mode in front of the moto server; stopped afterwards."""
    proxy = FaultProxy(moto_server.host, moto_server.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_fault_proxy(moto_server: MotoServer) -> Iterator[S3FaultProxy]:
    """An S3FaultProxy in front of the moto server, passing everything until `rule` is set."""
    proxy = S3FaultProxy(moto_server.endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()
