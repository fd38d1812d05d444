"""The SageMaker record encoder: encoding rule (spec 4), line layout (spec 3), ids and times."""

from __future__ import annotations

import base64
import json
import uuid

import msgspec
import pytest

from captured.config import CaptureContentTypeHeader, CaptureOption, DataCaptureConfig
from captured.encode import (
    BASE64,
    CSV,
    JSON,
    LineEncoder,
    choose_encoding,
    format_time,
    media_type,
    new_event_ids,
)


def dcc(
    csv: tuple[str, ...] | None = ("text/csv",),
    js: tuple[str, ...] | None = ("application/json",),
    modes: tuple[str, ...] = ("Input", "Output"),
    header: bool = True,
) -> DataCaptureConfig:
    return DataCaptureConfig(
        InitialSamplingPercentage=100,
        DestinationS3Uri="file:///tmp/out",
        CaptureOptions=tuple(CaptureOption(m) for m in modes),
        CaptureContentTypeHeader=CaptureContentTypeHeader(csv, js) if header else None,
    )


def encode_one(
    enc: LineEncoder,
    req: bytes | None,
    resp: bytes | None,
    req_ct: str | None,
    resp_ct: str | None,
    **kw: object,
) -> dict[str, object]:
    line = enc.line(
        request=req,
        response=resp,
        request_content_type=req_ct,
        response_content_type=resp_ct,
        second=int(kw.get("second", 1621297742)),  # type: ignore[call-overload]
        event_id=str(kw.get("event_id", "e")),
        inference_id=kw.get("inference_id"),  # type: ignore[arg-type]
        custom_attributes=kw.get("custom_attributes"),  # type: ignore[arg-type]
    )
    raw = enc.encode([line])
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    out: dict[str, object] = json.loads(raw)
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
    sides = rec["captureData"]  # type: ignore[index]
    assert sides["endpointInput"]["encoding"] == BASE64  # type: ignore[index]
    assert sides["endpointInput"]["data"] == base64.b64encode(b"1,2").decode()  # type: ignore[index]
    assert sides["endpointOutput"]["encoding"] == BASE64  # type: ignore[index]


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
    inp = rec["captureData"]["endpointInput"]  # type: ignore[index]
    assert inp == {
        "observedContentType": "text/csv",
        "mode": "INPUT",
        "data": base64.b64encode(body).decode(),
        "encoding": BASE64,
    }
    assert base64.b64decode(inp["data"]) == body  # type: ignore[index]


def test_missing_content_type_is_null_and_base64() -> None:
    enc = LineEncoder(dcc())
    rec = encode_one(enc, b"\x00\x01", None, None, None)
    inp = rec["captureData"]["endpointInput"]  # type: ignore[index]
    assert inp["observedContentType"] is None and inp["encoding"] == BASE64  # type: ignore[index]
    assert "endpointOutput" not in rec["captureData"]  # type: ignore[operator]


def test_json_text_is_kept_verbatim_with_trailing_newline() -> None:
    enc = LineEncoder(dcc())
    body = '{"a": "é\\n", "b": [1, 2]}\n'.encode()
    rec = encode_one(enc, body, body, "application/json", "application/json")
    assert rec["captureData"]["endpointInput"]["data"] == body.decode()  # type: ignore[index]


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
    assert ("endpointInput" in rec["captureData"]) is has_in  # type: ignore[operator]
    assert ("endpointOutput" in rec["captureData"]) is has_out  # type: ignore[operator]


def test_key_order_and_optional_metadata() -> None:
    enc = LineEncoder(dcc())
    line = enc.line(
        request=b"41,0,159.3,66\n",
        response=b"0.01216088142246008",
        request_content_type="text/csv",
        response_content_type="text/csv; charset=utf-8",
        second=1621297742,
        event_id="a727dc55-cbe1-498c-bcb9-9c12eea02b44",
        inference_id="58",
        custom_attributes=None,
    )
    assert enc.encode([line]) == (
        b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
        b'"data":"41,0,159.3,66\\n","encoding":"CSV"},"endpointOutput":{"observedContentType":'
        b'"text/csv; charset=utf-8","mode":"OUTPUT","data":"0.01216088142246008","encoding":"CSV"}},'
        b'"eventMetadata":{"eventId":"a727dc55-cbe1-498c-bcb9-9c12eea02b44","inferenceId":"58",'
        b'"inferenceTime":"2021-05-18T00:29:02Z"},"eventVersion":"0"}\n'
    )
    with_attrs = encode_one(enc, b"1", b"2", "text/csv", "text/csv", custom_attributes="trace=abc")
    assert list(with_attrs["eventMetadata"]) == ["eventId", "customAttributes", "inferenceTime"]  # type: ignore[arg-type]
    bare = encode_one(enc, b"1", b"2", "text/csv", "text/csv")
    assert list(bare["eventMetadata"]) == ["eventId", "inferenceTime"]  # type: ignore[arg-type]


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
    lines = [
        enc.line(
            request=b"a\nb",
            response=None,
            request_content_type="text/csv",
            response_content_type=None,
            second=5,
            event_id=str(i),
            inference_id=None,
            custom_attributes=None,
        )
        for i in range(3)
    ]
    raw = enc.encode(lines)
    assert raw.count(b"\n") == 3  # newlines inside data are escaped
    assert b" " not in raw
    assert [msgspec.json.decode(x)["eventMetadata"]["eventId"] for x in raw.splitlines()] == ["0", "1", "2"]
