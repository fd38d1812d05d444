"""A real S3-compatible server on loopback for tests: moto's server mode in a child process.

* `MotoServer`: moto's server mode in a child process on a free 127.0.0.1 port. The child
  watches its stdin and exits as soon as the parent closes it or dies, and it also has a
  hard lifetime cap, so it can never outlive the test run. It gives boto3 and aiobotocore
  client arguments (dummy credentials, path-style, no retries) and a full environment for
  daemon subprocesses that deliver to it.
* `S3Sandbox`: a boto3 S3 client plus a bucket made for one test.

Needs `moto[server]` and `boto3` (the `test` extra) where a server is started or a boto3
client made; they are imported there, not when this module is.

    server = MotoServer().start()
    try:
        s3 = server.boto3_client()
        s3.create_bucket(Bucket=unique_bucket())
        daemon = DaemonProcess(root, env=server.aws_env())
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def http_request(
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
    """moto's server mode in a subprocess on 127.0.0.1:<free port>.

    `log_path`: where the child's stderr goes (default: nowhere); `max_lifetime`: seconds after
    which the child exits by itself (exit code 3) whatever happens to this process; `env`: the
    child's environment (default: this process's; moto reads some settings, such as
    S3_UPLOAD_PART_MIN_SIZE, from it at start-up). Also a context manager (start, stop).
    """

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

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> MotoServer:
        """Start the child and wait until it answers HTTP; RuntimeError (with its log) if not."""
        cmd = self.command()
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
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
        if importlib.util.find_spec("moto") is None:
            raise RuntimeError("MotoServer needs moto[server]: pip install 'captured[test]'")
        return [sys.executable, "-c", _LAUNCHER, self.host, str(self.max_lifetime)]

    def answers(self) -> bool:
        return http_request(self.host, self.port, "GET", "/moto-api/reset", timeout=2.0)[0] == 400

    def stop(self, timeout: float = 10.0) -> None:
        """Close the child's stdin (it exits at once) and wait for it; SIGKILL after `timeout`."""
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
        """The last 5000 characters of the child's log."""
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-5000:]
        return "(no log)"

    def reset(self) -> None:
        """Forget every bucket, key, object, upload... on every moto backend."""
        status, body = http_request(self.host, self.port, "POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset failed: {status} {body!r}")

    def set_auth(self, initial_no_auth_action_count: float) -> float:
        """Switch moto's IAM authentication on after N more unauthenticated requests.

        `set_auth(0)` enforces SigV4 signatures from IAM access keys and IAM policies from
        the next request on; `set_auth(float("inf"))` switches it off (the default).
        Returns the previous setting. Global for the whole server: restore it.
        """
        status, body = http_request(
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
        import boto3

        return boto3.session.Session().client(service, **self.client_kwargs(**kwargs))

    def aws_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment (a fresh dict) for a subprocess that talks to this server: `base`
        (default: this process's environment) without AWS_* and proxy variables, plus dummy
        credentials, us-east-1, no IMDS probing, no ~/.aws files, no HTTP proxies for loopback
        and AWS_ENDPOINT_URL_S3 = this server."""
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


def unique_bucket(prefix: str = "test") -> str:
    """A bucket name no other test uses: `prefix`, "-" and 16 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
