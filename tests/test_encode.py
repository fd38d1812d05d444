"""The SageMaker record encoder: encoding rule (spec 4), line layout (spec 3), ids and times."""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captured.daemon.encode import (
    BASE64,
    CSV,
    JSON,
    LONG_TEXT,
    LineEncoder,
    choose_encoding,
    escape_text,
    media_type,
)
from captured.daemon.eventids import format_time, new_event_id_pieces, new_event_ids
from captured.testing.data import dcc, payloads
from captured.wire.frames import Record


def record(
    req: bytes | None, resp: bytes | None, req_ct: str | None, resp_ct: str | None, **kw: Any
) -> Record:
    return Record(req, resp, req_ct, resp_ct, kw.pop("t", 1621297742.5), **kw)


def encode_many(enc: LineEncoder, records: list[Record]) -> bytes:
    groups, invalid, _, _ = enc.group_lines(records, "AllTraffic", lambda v: v == "Canary")
    assert invalid == 0
    return b"".join(enc.encode(g.lines) for g in groups.values())


def encode_one(
    enc: LineEncoder,
    req: bytes | None,
    resp: bytes | None,
    req_ct: str | None,
    resp_ct: str | None,
    **kw: Any,
) -> dict[str, Any]:
    raw = encode_many(enc, [record(req, resp, req_ct, resp_ct, **kw)])
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    out: dict[str, Any] = json.loads(raw)
    return out


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/csv", CSV),
        ("text/csv; charset=utf-8", CSV),  # parameters are ignored
        ("TEXT/CSV ; header=present", CSV),  # media types compare case-insensitively
        ("application/json", JSON),
        ("application/json;charset=UTF-8", JSON),
        ("application/jsonlines", BASE64),  # not listed
        ("text/html; charset=utf-8", BASE64),
        ("application/x-npy", BASE64),
        (None, BASE64),  # missing content type
    ],
)
def test_encoding_table(content_type: str | None, expected: str) -> None:
    assert choose_encoding(content_type, frozenset({"text/csv"}), frozenset({"application/json"})) == expected


def test_no_content_type_header_means_base64_everywhere() -> None:
    assert choose_encoding("text/csv", None, None) == BASE64
    enc = LineEncoder(dcc(header=False))
    rec = encode_one(enc, b"1,2", b"{}", "text/csv", "application/json")
    sides = rec["captureData"]
    assert sides["endpointInput"]["encoding"] == BASE64
    assert sides["endpointInput"]["data"] == base64.b64encode(b"1,2").decode()
    assert sides["endpointOutput"]["encoding"] == BASE64


def test_only_csv_list_given() -> None:
    enc = LineEncoder(dcc(csv=("text/csv",), js=None))
    assert enc.encoding_for("text/csv") == CSV
    assert enc.encoding_for("application/json") == BASE64


def test_media_type() -> None:
    assert media_type(" Application/JSON ; charset=utf-8") == "application/json"


def test_csv_body_that_is_not_utf8_is_base64() -> None:
    enc = LineEncoder(dcc())
    body = b"caf\xe9,1\n"  # latin-1
    rec = encode_one(enc, body, b"0.5", "text/csv", "text/csv")
    inp = rec["captureData"]["endpointInput"]
    assert inp == {
        "observedContentType": "text/csv",
        "mode": "INPUT",
        "data": base64.b64encode(body).decode(),
        "encoding": BASE64,
    }
    assert base64.b64decode(inp["data"]) == body


def test_missing_content_type_is_null_and_base64() -> None:
    enc = LineEncoder(dcc())
    rec = encode_one(enc, b"\x00\x01", None, None, None)
    inp = rec["captureData"]["endpointInput"]
    assert inp["observedContentType"] is None and inp["encoding"] == BASE64
    assert "endpointOutput" not in rec["captureData"]


def test_json_text_is_kept_verbatim_with_trailing_newline() -> None:
    enc = LineEncoder(dcc())
    body = '{"a": "é\\n", "b": [1, 2]}\n'.encode()
    rec = encode_one(enc, body, body, "application/json", "application/json")
    assert rec["captureData"]["endpointInput"]["data"] == body.decode()


@pytest.mark.parametrize(
    ("modes", "has_in", "has_out"),
    [
        (("Input",), True, False),
        (("Output",), False, True),
        (("InputAndOutput",), True, True),
        (("Input", "Output"), True, True),
    ],
)
def test_capture_options_decide_the_sides(modes: tuple[str, ...], has_in: bool, has_out: bool) -> None:
    rec = encode_one(LineEncoder(dcc(modes=modes)), b"1", b"2", "text/csv", "text/csv")
    assert ("endpointInput" in rec["captureData"]) is has_in
    assert ("endpointOutput" in rec["captureData"]) is has_out


def test_key_order_and_optional_metadata() -> None:
    enc = LineEncoder(dcc())
    rec = record(
        b"41,0,159.3,66\n",
        b"0.01216088142246008",
        "text/csv",
        "text/csv; charset=utf-8",
        t=1621297742.731,
        event_id="a727dc55-cbe1-498c-bcb9-9c12eea02b44",
        inference_id="58",
    )
    assert encode_many(enc, [rec]) == (
        b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
        b'"data":"41,0,159.3,66\\n","encoding":"CSV"},"endpointOutput":{"observedContentType":'
        b'"text/csv; charset=utf-8","mode":"OUTPUT","data":"0.01216088142246008","encoding":"CSV"}},'
        b'"eventMetadata":{"eventId":"a727dc55-cbe1-498c-bcb9-9c12eea02b44","inferenceId":"58",'
        b'"inferenceTime":"2021-05-18T00:29:02Z"},"eventVersion":"0"}\n'
    )
    with_attrs = encode_one(enc, b"1", b"2", "text/csv", "text/csv", custom_attributes="trace=abc")
    assert list(with_attrs["eventMetadata"]) == ["eventId", "customAttributes", "inferenceTime"]
    bare = encode_one(enc, b"1", b"2", "text/csv", "text/csv")
    assert list(bare["eventMetadata"]) == ["eventId", "inferenceTime"]


def test_grouping_by_variant_and_hour_and_refusals() -> None:
    enc = LineEncoder(dcc())
    recs = [
        record(b"1", None, "text/csv", None, t=7199.9),
        record(b"2", None, "text/csv", None, t=7200.0),
        record(b"3", None, "text/csv", None, t=7200.5, variant_name="Canary"),
        record(b"4", None, "text/csv", None, t=7201.0),
        record(b"5", None, "text/csv", None, t=float("nan")),
        record(b"6", None, "text/csv", None, t=-1.0),
        record(b"7", None, "text/csv", None, t=7201.0, variant_name="Other"),
    ]
    groups, invalid, _, _ = enc.group_lines(recs, "AllTraffic", lambda v: v == "Canary")
    assert invalid == 3
    assert {k: len(g.lines) for k, g in groups.items()} == {
        ("AllTraffic", 1): 1,
        ("AllTraffic", 2): 2,
        ("Canary", 2): 1,
    }
    assert groups[("AllTraffic", 2)].first_time == 7200.0


def test_format_time() -> None:
    assert format_time(1621297742) == "2021-05-18T00:29:02Z"
    assert format_time(0) == "1970-01-01T00:00:00Z"


def test_event_ids_are_random_uuid4() -> None:
    ids = new_event_ids(1000)
    assert len(set(ids)) == 1000
    for s in ids:
        u = uuid.UUID(s)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == s


def test_lines_are_compact_and_one_per_record() -> None:
    enc = LineEncoder(dcc())
    raw = encode_many(enc, [record(b"a\nb", None, "text/csv", None, event_id=str(i)) for i in range(3)])
    assert raw.count(b"\n") == 3  # newlines inside data are escaped
    assert b" " not in raw
    assert [msgspec.json.decode(x)["eventMetadata"]["eventId"] for x in raw.splitlines()] == ["0", "1", "2"]


def test_the_bench_data_generator_encodes_and_reads_back() -> None:
    """The seeded records every benchmark uses (captured.testing.data) encode to lines whose data
    are exactly the generated CSV bodies: the benches measure what the tests check."""
    pairs = payloads(300, seed=3, size=250)
    assert pairs == payloads(300, seed=3, size=250)  # seeded: the same every run
    enc = LineEncoder(dcc())
    raw = encode_many(
        enc, [record(q, a, "text/csv", "text/csv", event_id=str(i)) for i, (q, a) in enumerate(pairs)]
    )
    docs = [json.loads(line) for line in raw.splitlines()]
    assert [d["captureData"]["endpointInput"]["data"].encode() for d in docs] == [q for q, _ in pairs]
    assert [d["captureData"]["endpointOutput"]["data"].encode() for d in docs] == [a for _, a in pairs]
    assert all(240 <= len(q) <= 250 and q.endswith(b"\n") for q, _ in pairs)


# -- the column-by-column path for uniform batches ---------------------------------------------------

_GENERATED_ID = re.compile(
    rb'"eventId":"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"'
)


def _mask_ids(data: bytes) -> bytes:
    return _GENERATED_ID.sub(b'"eventId":"*"', data)


def assert_uniform_matches_records(enc: LineEncoder, records: list[Record]) -> bool:
    """When `encode_uniform` takes the batch, its bytes are exactly those of the record-by-record
    path (generated event ids aside); returns whether it took the batch."""
    ok = lambda v: v == "Canary"  # noqa: E731
    uniform = enc.encode_uniform(records, "AllTraffic", ok)
    groups, invalid, _, _ = enc.group_lines(records, "AllTraffic", ok)
    if uniform is None:
        return False
    assert invalid == 0
    ((key, group),) = groups.items()
    assert (uniform.variant, uniform.hour) == key and uniform.first_time == group.first_time
    assert _mask_ids(uniform.data) == _mask_ids(enc.encode(group.lines))
    assert uniform.data.count(b"\n") == len(records)
    return True


_texts = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=60),
    # long enough for the other escaper (`LONG_TEXT`)
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).map(
        lambda t: t * (LONG_TEXT // len(t) + 1)
    ),
).map(str.encode)
_printable = st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=64)
# Mostly what model servers send (text bodies, listed content types, metadata that is valid or
# absent), with the odd values the record path must handle in the mix.
_field_values = {
    "request": st.one_of(_texts, _texts, st.none(), st.binary(max_size=80)),
    "response": st.one_of(_texts, _texts, st.none(), st.binary(max_size=80)),
    "request_content_type": st.sampled_from(
        ["text/csv", "text/csv", "application/json", "TEXT/CSV; x=1", None, "text/x-npy"]
    ),
    "response_content_type": st.sampled_from(
        ["application/json", "application/json", "text/csv", None, "text/html", '\x00"\\']
    ),
    "inference_time": st.one_of(
        st.floats(1621296000, 1621299599),
        st.floats(1621296000, 1621303200),
        st.sampled_from([float("nan"), -1.0, 3599.999, 3600.0]),
    ),
    "event_id": st.one_of(st.none(), st.none(), st.text(min_size=1, max_size=40)),
    "inference_id": st.one_of(st.none(), _printable, st.text(min_size=1, max_size=64)),
    "custom_attributes": st.one_of(
        st.none(), st.text(st.characters(max_codepoint=127), max_size=40), st.text()
    ),
    "variant_name": st.sampled_from([None, None, "Canary", "Other"]),
}


@st.composite
def nearly_uniform_batches(draw: st.DrawFn) -> list[Record]:
    """A base record repeated with, now and then, one field drawn afresh: batches that are
    uniform often, and otherwise differ from uniform in one field or a few."""
    base = {name: draw(values) for name, values in _field_values.items()}
    records = []
    for _ in range(draw(st.integers(1, 12))):
        fields = dict(base)
        if draw(st.integers(0, 7)) == 0:
            name = draw(st.sampled_from(sorted(_field_values)))
            fields[name] = draw(_field_values[name])
        records.append(Record(**fields))
    return records


@settings(max_examples=400, deadline=None)
@given(
    nearly_uniform_batches(),
    st.sampled_from([("Input", "Output"), ("Input",), ("Output",)]),
    st.sampled_from([True, True, True, False]),  # with a content type header, mostly
)
def test_uniform_path_writes_the_same_bytes_as_the_record_path(
    records: list[Record], modes: tuple[str, ...], header: bool
) -> None:
    assert_uniform_matches_records(LineEncoder(dcc(modes=modes, header=header)), records)


def test_uniform_path_takes_what_one_model_server_sends() -> None:
    enc = LineEncoder(dcc())
    t = 1621297742.5

    def batch(**kw: Any) -> list[Record]:
        return [
            record(b"1,2\n", b'{"p": %d}' % i, "text/csv", "application/json", **{"t": t + i / 10, **kw})
            for i in range(30)
        ]

    assert assert_uniform_matches_records(enc, batch())  # crosses seconds: a time per record
    assert assert_uniform_matches_records(enc, batch(inference_id="id-1", custom_attributes="a=b"))
    assert assert_uniform_matches_records(enc, batch(event_id="e", variant_name="Canary"))
    assert assert_uniform_matches_records(enc, [record(b"\xff", None, "application/x-npy", None)])
    long_body = ('é,"1"\t\\\n' * LONG_TEXT).encode()
    assert assert_uniform_matches_records(
        enc, [record(long_body, long_body, "text/csv", "application/json")] * 3
    )
    # Nothing to capture: neither path writes it (`group_lines` counts it, never as `{}`).
    assert not assert_uniform_matches_records(enc, [record(None, None, None, None)])
    groups, invalid, empty, _ = enc.group_lines(
        [record(None, None, None, None)], "AllTraffic", lambda v: True
    )
    assert (groups, invalid, empty) == ({}, 0, 1)


@pytest.mark.parametrize(
    "odd",
    [
        record(b"1", b"2", "text/csv", "application/json", t=1621303200.0),  # the next hour
        record(b"1", b"2", "text/csv", "application/json", t=float("nan")),
        record(b"1", None, "text/csv", "application/json"),  # one side missing
        record(b"1", b"2", "text/csv; charset=utf-8", "application/json"),  # another content type
        record(b"\xff", b"2", "text/csv", "application/json"),  # not UTF-8: BASE64 for this one
        record(b"1", b"2", "text/csv", "application/json", inference_id="x"),
        record(b"1", b"2", "text/csv", "application/json", variant_name="Canary"),
        record(b"1", b"2", "text/csv", "application/json", event_id="e"),
    ],
)
def test_uniform_path_leaves_mixed_batches_to_the_record_path(odd: Record) -> None:
    enc = LineEncoder(dcc())
    records = [record(b"1", b"2", "text/csv", "application/json") for _ in range(5)] + [odd]
    assert enc.encode_uniform(records, "AllTraffic", lambda v: True) is None
    groups, invalid, _, _ = enc.group_lines(records, "AllTraffic", lambda v: True)
    assert sum(len(g.lines) for g in groups.values()) + invalid == 6


@pytest.mark.parametrize(
    "kw",
    [{"inference_id": " leading space"}, {"inference_id": "tab\there"}, {"custom_attributes": "café"}],
)
def test_uniform_path_refuses_bad_metadata_like_the_record_path(kw: dict[str, str]) -> None:
    enc = LineEncoder(dcc())
    records = [record(b"1", b"2", "text/csv", "text/csv", **kw) for _ in range(3)]
    assert enc.encode_uniform(records, "AllTraffic", lambda v: True) is None
    assert enc.group_lines(records, "AllTraffic", lambda v: True)[1] == 3


def test_event_id_pieces_are_quoted_uuid4_with_a_comma() -> None:
    pieces = new_event_id_pieces(1000)
    assert len(set(pieces)) == 1000
    for p in pieces:
        assert p[:1] == b'"' and p[-2:] == b'",'
        u = uuid.UUID(p[1:-2].decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == p[1:-2]
    assert new_event_id_pieces(0) == [] and len(new_event_id_pieces(1)) == 1


def test_text_bodies_are_escaped_exactly_as_msgspec_escapes_them() -> None:
    """The uniform path escapes text bodies with orjson, the record path with msgspec: the same
    JSON string for every code point (surrogates cannot come from decoded UTF-8). Escaping is
    per character, so one string holding every code point compares them all; the ones either
    library escapes (controls, quote, backslash, DEL, the line separators) also one by one."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert escape_text(every) == msgspec.json.encode(every)
    for ch in [*map(chr, range(0x21)), '"', "\\", "\x7f", "\u2028", "\u2029", "\ufeff"]:
        assert escape_text(ch) == msgspec.json.encode(ch)
