"""The typed status: built from stage snapshots, carried as MessagePack, shown as text and JSON,
and rendered as Prometheus metrics (with every known reason at 0 from the start)."""

from __future__ import annotations

import json

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from captured.daemon.ingest import CLOSE_REASONS, IngestStats
from captured.daemon.ledger import SessionStats
from captured.daemon.pipeline import DROP_REASONS, CounterStats
from captured.daemon.spool import SpoolStats
from captured.daemon.watermark import WatermarkStats
from captured.delivery.queue import DeliveryStats
from captured.service import status
from captured.service.metrics import KNOWN_FAILURE_CAUSES, render
from captured.service.status import EndpointStatus, Status


def make_status(**over: object) -> Status:
    fields: dict[str, object] = {
        "endpoint_name": "churn",
        "variant_name": "AllTraffic",
        "enable_capture": True,
        "capture_status": "Started",
        "capture_status_reason": None,
        "current_sampling_percentage": 20,
        "destination_s3_uri": "s3://bucket/capture",
        "kms_key_id": "alias/k",
        "counters": CounterStats(received=10, written=7, dropped={"sampled_out": 3}, resent=2),
        "spool": SpoolStats(dir="/s", open_files=1, files_sealed=4, bytes_written=1234, sealed_for_room=0),
        "watermark": WatermarkStats(
            capturing=True,
            reason=None,
            since=1.0,
            stops=0,
            used_percent=12.5,
            free_bytes=10**10,
            total_bytes=2 * 10**10,
            high_percent=75.0,
            low_percent=70.0,
            min_free_bytes=0,
        ),
        "delivery": DeliveryStats(
            files_delivered=3,
            bytes_delivered=999,
            retries=1,
            failures={"throttled": 1},
            files_waiting=1,
            bytes_waiting=100,
            oldest_waiting_s=2.5,
        ),
        "ingest": IngestStats(connections=2, connections_total=5, connections_closed={"idle_evicted": 1}),
        "sessions": SessionStats(remembered=2, journal_bytes=512, journal_ok=True),
        "socket_path": "/run/captured/capture.sock",
        "metrics": None,
        "uptime_s": 61.0,
        "version": "0.2.0",
        "pid": 42,
    }
    fields.update(over)
    if "endpoints" not in fields:  # the single endpoint, as the daemon shows it
        fields["endpoints"] = [endpoint_status(fields)]
    return Status(**fields)  # type: ignore[arg-type]


def endpoint_status(fields: dict[str, object], **over: object) -> EndpointStatus:
    names = set(EndpointStatus.__struct_fields__) - {"sampling_mode"}
    values = {k: v for k, v in fields.items() if k in names}
    return EndpointStatus(**{"sampling_mode": "random", **values, **over})  # type: ignore[arg-type]


def two_endpoints() -> Status:
    """churn (default, 20 %) and fraud (100 %, by inference id); 4 records no endpoint took."""
    churn = CounterStats(received=10, written=7, dropped={"sampled_out": 3}, resent=2)
    fraud = CounterStats(received=6, written=6, dropped={}, resent=0)
    total = CounterStats(received=20, written=13, dropped={"sampled_out": 3, "unknown_endpoint": 4}, resent=2)
    base = msgspec.structs.asdict(make_status())
    endpoints = [
        endpoint_status(base, counters=churn),
        endpoint_status(
            base,
            endpoint_name="fraud",
            current_sampling_percentage=100,
            destination_s3_uri="file:///var/lib/captured/fraud",
            kms_key_id=None,
            sampling_mode="inference_id",
            counters=fraud,
        ),
    ]
    return make_status(counters=total, endpoints=endpoints)


def test_the_document_keeps_sagemakers_names_and_round_trips_the_wire() -> None:
    st = make_status()
    doc = json.loads(status.to_json(st))
    assert doc["EndpointName"] == "churn" and doc["CaptureStatus"] == "Started"
    assert doc["CurrentSamplingPercentage"] == 20 and doc["KmsKeyId"] == "alias/k"
    assert (
        doc["ingest"]["connections_closed"] == {"idle_evicted": 1} and "protocol_errors" not in doc["ingest"]
    )
    assert status.decode(msgspec.msgpack.encode(st)) == st


def test_the_text_view_says_what_matters() -> None:
    text = status.format_status(make_status(capture_status="Stopped", capture_status_reason="disk 80% used"))
    assert "CaptureStatus       Stopped (disk 80% used)" in text
    assert "dropped: sampled_out 3; resent (skipped) 2" in text
    assert "failures: throttled 1" in text and "closed by the daemon: idle_evicted 1" in text
    assert "(SSE-KMS alias/k)" in text and "12.5% used" in text
    broken = status.format_status(
        make_status(sessions=SessionStats(remembered=0, journal_bytes=0, journal_ok=False))
    )
    assert "CANNOT BE WRITTEN" in broken


def metric_samples(st: Status) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(render(st).decode()):
        for s in family.samples:
            assert s.labels.pop("endpoint", None) in (None, st.endpoint_name)
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_have_every_known_reason_at_zero_and_add_up_on_a_healthy_daemon() -> None:
    """A daemon that never dropped anything: the identity received = written + sum(dropped)
    still has every term, because each known reason has a series at 0."""
    healthy = make_status(counters=CounterStats(received=5, written=5, dropped={}, resent=0))
    m = metric_samples(healthy)
    dropped = {
        dict(labels)["reason"]: v
        for (name, labels), v in m.items()
        if name == "captured_records_dropped_total"
    }
    assert dropped == dict.fromkeys(DROP_REASONS, 0.0)
    assert (
        m[("captured_records_written_total", ())] + sum(dropped.values())
        == m[("captured_records_received_total", ())]
    )
    closed = {
        dict(labels)["reason"]
        for (name, labels), _ in m.items()
        if name == "captured_client_connections_closed_total"
    }
    assert closed == set(CLOSE_REASONS)
    causes = {
        dict(labels)["cause"] for (name, labels), _ in m.items() if name == "captured_delivery_failures_total"
    }
    assert causes == set(KNOWN_FAILURE_CAUSES) | {"throttled"}


def test_metrics_carry_the_status_values() -> None:
    st = make_status()
    m = metric_samples(st)
    assert m[("captured_records_dropped_total", (("reason", "sampled_out"),))] == 3
    assert m[("captured_delivery_failures_total", (("cause", "throttled"),))] == 1
    assert m[("captured_client_connections_closed_total", (("reason", "idle_evicted"),))] == 1
    assert m[("captured_sampling_percentage", ())] == 20 and m[("captured_capture_started", ())] == 1
    assert m[("captured_disk_used_percent", ())] == 12.5
    assert m[("captured_build_info", (("version", "0.2.0"),))] == 1
    no_reading = make_status(
        watermark=msgspec.structs.replace(st.watermark, used_percent=None, free_bytes=None, total_bytes=None)
    )
    assert ("captured_disk_used_percent", ()) not in metric_samples(no_reading)


def test_several_endpoints_each_show_what_describe_endpoint_shows_and_the_totals_stay() -> None:
    st = two_endpoints()
    doc = json.loads(status.to_json(st))
    assert [e["EndpointName"] for e in doc["endpoints"]] == ["churn", "fraud"]
    fraud = doc["endpoints"][1]
    assert fraud["CurrentSamplingPercentage"] == 100 and fraud["sampling_mode"] == "inference_id"
    assert (
        fraud["DestinationS3Uri"] == "file:///var/lib/captured/fraud" and fraud["CaptureStatus"] == "Started"
    )
    assert doc["counters"]["received"] == 20
    assert status.decode(msgspec.msgpack.encode(st)) == st
    text = status.format_status(st)
    assert "endpoint            churn (default), default variant AllTraffic" in text
    assert "endpoint            fraud, default variant AllTraffic" in text
    assert "sampling 100% by inference id\n" in text and "sampling 20%\n" in text
    assert "received 20, written 13" in text and "(all endpoints)" in text


def test_metrics_of_several_endpoints_sum_to_the_totals() -> None:
    """Each endpoint's series, and the endpoint="" series for what no endpoint took: summed over
    `endpoint` they are the daemon's totals, and each endpoint's identity holds on its own."""
    st = two_endpoints()
    rows: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(render(st).decode()):
        for s in family.samples:
            if "endpoint" in s.labels:
                rows[(s.name, s.labels["endpoint"], s.labels.get("reason", ""))] = s.value
    for name, total in (("received", 20), ("written", 13)):
        assert sum(v for (n, _, _), v in rows.items() if n == f"captured_records_{name}_total") == total
    for ep in ("churn", "fraud", ""):
        dropped = sum(v for (n, e, _), v in rows.items() if n == "captured_records_dropped_total" and e == ep)
        received = rows[("captured_records_received_total", ep, "")]
        assert received == rows[("captured_records_written_total", ep, "")] + dropped
    assert rows[("captured_records_dropped_total", "", "unknown_endpoint")] == 4
    assert rows[("captured_sampling_percentage", "fraud", "")] == 100
    assert rows[("captured_sampling_percentage", "churn", "")] == 20
