"""Several endpoints on one daemon, and sampling by inference id.

Real parts throughout: the daemon in the test's loop (`run_daemon`) on real Unix sockets, the
client libraries, a `file://` directory and the moto S3 server (with SSE-KMS) as destinations.
Every test counts on both sides: what the clients sent, the daemon's counters per endpoint and
in total, and the lines that reached each destination.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from captured.client.aio import AsyncCaptureClient
from captured.client.record import prepare_record
from captured.client.sync import CaptureClient
from captured.daemon.sample import keep_id
from captured.errors import ConfigError
from captured.service.config import Config, load_config, render_toml
from captured.service.configfile import Overrides
from captured.testing.inprocess import FakeClock, run_daemon
from captured.testing.s3 import S3Sandbox
from captured.wire import frames

BOTH = '[{ CaptureMode = "Input" }, { CaptureMode = "Output" }]'
INPUT = '[{ CaptureMode = "Input" }]'


def endpoint(
    name: str,
    destination: str,
    *,
    percentage: int = 100,
    mode: str | None = None,
    options: str = BOTH,
    kms: str | None = None,
    variant: str | None = None,
) -> str:
    return (
        "[[endpoints]]\n"
        f'endpoint_name = "{name}"\n'
        + (f'variant_name = "{variant}"\n' if variant else "")
        + (f'sampling_mode = "{mode}"\n' if mode else "")
        + "[endpoints.DataCaptureConfig]\n"
        f"InitialSamplingPercentage = {percentage}\n"
        f'DestinationS3Uri = "{destination}"\n'
        f"CaptureOptions = {options}\n"
        + (f'KmsKeyId = "{kms}"\n' if kms else "")
        + "[endpoints.DataCaptureConfig.CaptureContentTypeHeader]\n"
        'CsvContentTypes = ["text/csv"]\n'
    )


def write(root: Path, body: str, top: str = "", name: str = "captured.toml") -> Path:
    path = root / name
    path.write_text(f'socket_path = "{root / "c.sock"}"\nspool_dir = "{root / "spool"}"\n{top}{body}')
    return path


def load(root: Path, body: str, top: str = "") -> Config:
    return load_config(str(write(root, body, top)))


def problems(path: Path, **kw: Any) -> list[str]:
    """What loading `path` reports, the file named as the user gave it (relative)."""
    with pytest.raises(ConfigError) as info:
        load_config(path.name, cwd=str(path.parent), **kw)
    return info.value.problems


def local_lines(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Relative key -> the capture records in that delivered file, under `root`."""
    return {
        str(p.relative_to(root)): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(root.rglob("*.jsonl"))
    }


def ids(files: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [r["eventMetadata"]["inferenceId"] for lines in files.values() for r in lines]


async def send(socket_path: str, prefix: str, n: int, *, endpoint_name: str | None = None, **kw: Any) -> None:
    async with AsyncCaptureClient(socket_path, endpoint_name=endpoint_name) as client:
        for i in range(n):
            assert client.capture(
                f"{i},1", "0.5", request_content_type="text/csv", response_content_type="text/csv",
                inference_id=f"{prefix}-{i}", **kw,
            )  # fmt: skip
        assert await client.flush(timeout=10)
        assert client.stats()["dropped"] == {}


# --- the configuration -----------------------------------------------------------------------------------


def test_both_forms_at_once_are_refused_naming_the_keys(tmp_path: Path) -> None:
    path = write(tmp_path, endpoint("a", "out"), top='endpoint_name = "x"\nvariant_name = "V"\n')
    (line,) = problems(path)
    assert line.startswith("captured.toml: endpoints and endpoint_name, variant_name: ")
    assert "one form or the other" in line
    flags = problems(write(tmp_path, endpoint("a", "out")), overrides=Overrides(destination="/tmp/x"))
    assert flags[0].startswith("captured.toml: endpoints and DataCaptureConfig: ")


def test_endpoint_rules_are_checked_per_endpoint_and_across_them(tmp_path: Path) -> None:
    body = endpoint("a", "out", mode="sometimes") + endpoint("a", "out", percentage=101) + endpoint("b", "")
    path = write(tmp_path, body, top='default_endpoint = "zzz"\n')
    found = problems(path)
    assert "captured.toml: endpoints[0].sampling_mode = 'sometimes': must be random or inference_id" in found
    assert any(
        p.startswith("captured.toml: endpoints[1].DataCaptureConfig.InitialSamplingPercentage = 101")
        for p in found
    )
    assert any(
        p.startswith("captured.toml: endpoints[2].DataCaptureConfig.DestinationS3Uri = ''") for p in found
    )
    assert any("endpoints[1].endpoint_name = 'a': endpoint names must be unique" in p for p in found)
    assert any(
        p.startswith("captured.toml: default_endpoint = 'zzz': must be the endpoint_name of one")
        for p in found
    )
    single = problems(
        write(
            tmp_path,
            "",
            top='default_endpoint = "a"\n[DataCaptureConfig]\nInitialSamplingPercentage = 1\nDestinationS3Uri = "o"\nCaptureOptions = [{ CaptureMode = "Input" }]\n',
        )
    )
    assert single == ["captured.toml: default_endpoint = 'a': only with [[endpoints]] (the single endpoint takes every capture)"]  # fmt: skip


def test_several_endpoints_load_resolve_and_render_back(tmp_path: Path) -> None:
    """Relative destinations resolve against the file's directory, per endpoint; the rendered
    TOML (what `captured check` prints) has one [[endpoints]] table each and reads back equal."""
    body = endpoint("churn", "s3://bucket/capture", percentage=20, kms="alias/k", mode="inference_id")
    cfg = load(
        tmp_path,
        body + endpoint("fraud", "fraud-out", options=INPUT, variant="Blue"),
        'default_endpoint = "churn"\n',
    )
    churn, fraud = cfg.endpoint_configs
    assert (churn.endpoint_name, churn.sampling_mode, churn.DataCaptureConfig.KmsKeyId) == (
        "churn",
        "inference_id",
        "alias/k",
    )
    assert fraud.DataCaptureConfig.DestinationS3Uri == f"file://{tmp_path / 'fraud-out'}"
    assert (fraud.variant_name, fraud.sampling_mode, cfg.default_endpoint_name) == ("Blue", "random", "churn")
    text = render_toml(cfg)
    assert text.count("[[endpoints]]") == 2 and text.count("[endpoints.DataCaptureConfig]") == 2
    assert 'endpoint_name = "churn"' in text and "\nDataCaptureConfig" not in text
    again = tmp_path / "again"
    again.mkdir()
    (again / "c.toml").write_text(text)
    assert load_config(str(again / "c.toml")) == cfg
    assert load(tmp_path, endpoint("x", "o")).default_endpoint_name is None  # several: no default unless said
    single = load_config(
        None, overrides=Overrides(spool_dir=str(tmp_path / "s")), environ={}, cwd=str(tmp_path)
    )
    assert [e.endpoint_name for e in single.endpoint_configs] == ["local-endpoint"]
    assert single.default_endpoint_name == "local-endpoint"


# --- one daemon, several endpoints ------------------------------------------------------------------------


def test_each_record_lands_under_its_own_endpoint_exactly_once(
    short_tmp: Path, s3: S3Sandbox, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """churn (default endpoint): S3 with SSE-KMS, 100 %, input and output. fraud: a local
    directory, 50 % by inference id, input only. Clients name fraud, name nothing (churn),
    override per call (churn), and name an endpoint the daemon lacks (refused, counted, never
    written). Each record lands once under its endpoint's key; the counters add up per
    endpoint and in total."""
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    fraud_dir = short_tmp / "fraud"
    body = endpoint("churn", f"s3://{s3.bucket}/capture", kms="alias/churn")
    body += endpoint("fraud", f"file://{fraud_dir}", percentage=50, mode="inference_id", options=INPUT)
    cfg = load(short_tmp, body, 'default_endpoint = "churn"\n')

    async def main() -> dict[str, Any]:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await asyncio.gather(
                send(cfg.socket_path, "f", 400, endpoint_name="fraud"),
                send(cfg.socket_path, "d", 100),
                send(cfg.socket_path, "o", 50, endpoint_name="churn"),
                send(cfg.socket_path, "g", 30, endpoint_name="ghost"),
            )
            async with AsyncCaptureClient(cfg.socket_path, endpoint_name="fraud") as client:
                for i in range(20):  # the client says fraud, each call says churn
                    client.capture(
                        f"{i}",
                        "1",
                        request_content_type="text/csv",
                        inference_id=f"p-{i}",
                        endpoint_name="churn",
                    )
                assert await client.flush(timeout=10)
            return {e.endpoint_name: e for e in daemon.status().endpoints} | {"": daemon.status()}

    st = asyncio.run(main())
    kept = {f"f-{i}" for i in range(400) if keep_id(f"f-{i}", 50)}
    churn, fraud, total = st["churn"].counters, st["fraud"].counters, st[""].counters
    assert (churn.received, churn.written, churn.dropped) == (170, 170, {})
    assert (fraud.received, fraud.written) == (400, len(kept)) and fraud.dropped == {
        "sampled_out": 400 - len(kept)
    }
    assert total.received == 600 and total.written == 170 + len(kept)
    assert total.dropped == {"sampled_out": 400 - len(kept), "unknown_endpoint": 30}
    assert st[""].endpoint_name == "churn" and st["fraud"].sampling_mode == "inference_id"

    local = local_lines(fraud_dir)
    assert all(key.startswith("fraud/AllTraffic/") for key in local)
    assert sorted(ids(local)) == sorted(kept)
    assert all(set(r["captureData"]) == {"endpointInput"} for lines in local.values() for r in lines)

    objects = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="capture/")["Contents"]
    churn_ids: list[str] = []
    for obj in objects:
        assert obj["Key"].startswith("capture/churn/AllTraffic/") and obj["Key"].endswith(".jsonl")
        head = s3.client.head_object(Bucket=s3.bucket, Key=obj["Key"])
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == "alias/churn"
        body_text = s3.client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read().decode()
        for line in body_text.splitlines():
            record = json.loads(line)
            churn_ids.append(record["eventMetadata"]["inferenceId"])
            assert set(record["captureData"]) == {"endpointInput", "endpointOutput"} or record[
                "eventMetadata"
            ]["inferenceId"].startswith("p-")
    expected = [f"d-{i}" for i in range(100)] + [f"o-{i}" for i in range(50)] + [f"p-{i}" for i in range(20)]
    assert sorted(churn_ids) == sorted(expected)
    assert not any(i.startswith("g-") for i in churn_ids + ids(local))
    assert sorted(p.name for p in (short_tmp / "spool").iterdir()) == [".journal", ".lock"]


def test_without_a_default_endpoint_a_capture_naming_none_is_refused(short_tmp: Path) -> None:
    cfg = load(
        short_tmp, endpoint("a", f"file://{short_tmp / 'a'}") + endpoint("b", f"file://{short_tmp / 'b'}")
    )

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send(cfg.socket_path, "n", 25)
            await send(cfg.socket_path, "b", 5, endpoint_name="b")
            st = daemon.status()
            assert st.endpoint_name is None and st.capture_status is None and st.started
            assert st.counters.dropped == {"unknown_endpoint": 25} and st.counters.received == 30
            assert [e.counters.received for e in st.endpoints] == [0, 5]

    asyncio.run(main())
    assert not (short_tmp / "a").exists() or ids(local_lines(short_tmp / "a")) == []
    assert sorted(ids(local_lines(short_tmp / "b"))) == [f"b-{i}" for i in range(5)]


def test_a_reload_adds_and_removes_endpoints_while_clients_send_and_loses_nothing(short_tmp: Path) -> None:
    """a and b run; a client sends to a all along. The reload removes b (its open file is sealed
    and delivered to b's destination; later captures for b are refused) and adds c (captured
    from then on). Every record is delivered once or counted as refused: nothing else."""
    dest = {name: short_tmp / name for name in "abc"}
    before = endpoint("a", f"file://{dest['a']}") + endpoint("b", f"file://{dest['b']}")
    # a's sampling mode changes live (at 100 % nothing is sampled out either way)
    after = endpoint("a", f"file://{dest['a']}", mode="inference_id") + endpoint("c", f"file://{dest['c']}")
    path = write(short_tmp, before, 'default_endpoint = "a"\n')
    cfg = load_config(str(path))

    async def steady(socket_path: str, stop: asyncio.Event) -> int:
        sent = 0
        async with AsyncCaptureClient(socket_path, endpoint_name="a") as client:
            while not stop.is_set() or sent < 300:
                for _ in range(10):
                    assert client.capture(
                        f"{sent}", "1", request_content_type="text/csv", inference_id=f"a-{sent}"
                    )
                    sent += 1
                await asyncio.sleep(0.005)
            assert await client.flush(timeout=10)
        return sent

    async def main() -> tuple[int, Any]:
        async with run_daemon(cfg, clock=FakeClock(), reload=lambda: load_config(str(path))) as daemon:
            stop = asyncio.Event()
            a_task = asyncio.create_task(steady(cfg.socket_path, stop))
            await send(cfg.socket_path, "b", 40, endpoint_name="b")
            path.write_text(path.read_text().replace(before, after))
            daemon.reload()
            endpoints = daemon.status().endpoints
            assert [e.endpoint_name for e in endpoints] == ["a", "c"]
            assert endpoints[0].sampling_mode == "inference_id"
            await send(cfg.socket_path, "b-late", 15, endpoint_name="b")  # refused from now on
            await send(cfg.socket_path, "c", 60, endpoint_name="c")
            stop.set()
            a_sent = await a_task
            return a_sent, daemon.status()

    a_sent, st = asyncio.run(main())
    assert sorted(ids(local_lines(dest["a"])), key=lambda s: int(s[2:])) == [f"a-{i}" for i in range(a_sent)]
    assert sorted(ids(local_lines(dest["b"]))) == sorted(f"b-{i}" for i in range(40))
    assert sorted(ids(local_lines(dest["c"]))) == sorted(f"c-{i}" for i in range(60))
    total = st.counters
    assert total.received == a_sent + 40 + 15 + 60
    assert total.written == a_sent + 40 + 60 and total.dropped == {"unknown_endpoint": 15}
    assert {e.endpoint_name: e.counters.written for e in st.endpoints} == {"a": a_sent, "c": 60}


# --- the client ------------------------------------------------------------------------------------------


def test_the_client_names_its_endpoint_and_refuses_names_the_daemon_could_not_use(tmp_path: Path) -> None:
    """The wire record carries the endpoint only when one is named (older daemons read the rest);
    a name outside SageMaker's pattern (it becomes a path component) is a programming error."""
    plain, _ = prepare_record(b"1", b"2", "text/csv", "text/csv", None, None, None, None, None, 1024)
    assert len(plain) == 5
    named, size = prepare_record(
        b"1", b"2", "text/csv", "text/csv", None, None, None, None, None, 1024, None, "churn"
    )
    assert frames.record_decoder.decode(msgspec.msgpack.encode(named)).endpoint_name == "churn"
    assert (
        size == prepare_record(b"1", b"2", "text/csv", "text/csv", None, None, None, None, None, 1024)[1] + 5
    )
    per_call, _ = prepare_record(
        b"1", None, "text/csv", None, "id", None, None, None, None, 1024, "fraud", "churn"
    )
    assert frames.record_decoder.decode(msgspec.msgpack.encode(per_call)).endpoint_name == "fraud"
    for bad in ("../etc", "a.b", "", "x" * 64, "-a"):
        with pytest.raises(ValueError, match="endpoint_name"):
            CaptureClient(str(tmp_path / "none.sock"), endpoint_name=bad)
        with pytest.raises(ValueError, match="endpoint_name"):
            AsyncCaptureClient(str(tmp_path / "none.sock"), endpoint_name=bad)
    with CaptureClient(str(tmp_path / "none.sock"), endpoint_name="churn") as client:
        with pytest.raises(ValueError, match="endpoint_name"):
            client.capture(b"1", b"2", endpoint_name="a/b")
        assert client.endpoint_name == "churn"


# --- sampling by inference id -----------------------------------------------------------------------------


def test_keep_id_is_the_documented_function() -> None:
    """SHA-256 of the UTF-8 id, first 8 bytes big-endian, kept when h * 100 < percentage * 2**64:
    computed here from the hex digest, independently of the daemon's code."""
    for i in range(2000):
        inference_id = f"req-{i}-é"
        h = int(hashlib.sha256(inference_id.encode("utf-8")).hexdigest()[:16], 16)
        for p in (0, 1, 30, 99, 100):
            assert keep_id(inference_id, p) == (h * 100 < p * 2**64)


def test_the_kept_fraction_is_the_percentage_within_a_statistical_bound() -> None:
    n = 10_000
    for p in (1, 10, 30, 50, 90):
        kept = sum(keep_id(f"id-{i:06d}", p) for i in range(n))
        sigma = (n * p / 100 * (1 - p / 100)) ** 0.5
        assert abs(kept - n * p / 100) < 5 * sigma, (p, kept)  # 5 sigma: about 1 in 1.7 million


def test_two_daemons_and_a_restart_keep_exactly_the_same_inference_ids(tmp_path: Path) -> None:
    """Two hosts (separate daemons, spools and destinations) at 30 % in inference_id mode, fed
    the same 10,000 ids (half of them as a shadow variant), keep exactly the same ids, those
    `keep_id` names; host A restarted keeps them again. Records without an id fall back to a
    random draw, counted like the rest."""
    wanted = {f"req-{i}" for i in range(10_000) if keep_id(f"req-{i}", 30)}

    async def feed(cfg: Config) -> int:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            async with AsyncCaptureClient(cfg.socket_path, endpoint_name="m") as client:
                for i in range(10_000):
                    variant = "Shadow" if i % 2 else None
                    client.capture(
                        f"{i}",
                        None,
                        request_content_type="text/csv",
                        inference_id=f"req-{i}",
                        variant_name=variant,
                    )
                for i in range(1_000):
                    client.capture(f"{i}", None, request_content_type="text/csv")
                assert await client.flush(timeout=30)
            c = daemon.status().counters
            assert c.received == 11_000 and c.written + c.dropped["sampled_out"] == 11_000
            return c.written

    kept: dict[str, set[str]] = {}
    for name, host, out in (("A", "a", "out1"), ("B", "b", "out1"), ("A restarted", "a", "out2")):
        root = tmp_path / host
        root.mkdir(exist_ok=True)
        cfg = load(root, endpoint("m", f"file://{root / out}", percentage=30, mode="inference_id"))
        written = asyncio.run(feed(cfg))
        found = ids_or_none(local_lines(root / out))
        assert len(found) == written
        kept[name] = {i for i in found if i is not None}
        assert len(kept[name]) == len(found) - found.count(None)  # each kept id once
        without = found.count(None)
        assert abs(without - 300) < 5 * (1000 * 0.3 * 0.7) ** 0.5  # the random fallback, at 30 %
    assert kept["A"] == kept["B"] == kept["A restarted"] == wanted


def ids_or_none(files: dict[str, list[dict[str, Any]]]) -> list[str | None]:
    return [r["eventMetadata"].get("inferenceId") for lines in files.values() for r in lines]
