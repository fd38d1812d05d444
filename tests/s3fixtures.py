"""Pytest fixtures for tests that need a real S3-compatible HTTP server on loopback.

The servers and proxies are `captured.testing.s3.MotoServer` and `captured.testing.proxy`'s
`FaultProxy` and `S3FaultProxy`; this plugin (named in conftest.py's `pytest_plugins`) only
makes and stops them:

* `moto_server` (session): one moto server subprocess for the whole run;
* `s3` (function): reset the server, then a boto3 client and a fresh bucket (`S3Sandbox`);
* `aws_env` (function): a full environment for daemon subprocesses that deliver to it;
* `s3_proxy`, `s3_fault_proxy` (function): a `FaultProxy` / `S3FaultProxy` in front of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from captured.testing.proxy import FaultProxy, S3FaultProxy
from captured.testing.s3 import MotoServer, S3Sandbox, unique_bucket


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
