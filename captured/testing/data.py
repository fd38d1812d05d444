"""Test data: seeded request/response pairs shaped like a tabular model's traffic, and a
`DataCaptureConfig` for encoder tests.

A request is one CSV line of numeric features ending in "\\n" (about `size` bytes); a response is
one score such as "0.0121608814". Only `DISTINCT` different pairs are generated and then cycled,
so a million-record run holds a million references to a thousand objects, not a million bodies.
The benchmarks (bench/) send these pairs, and the tests check that they encode and read back.
"""

from __future__ import annotations

import random

from captured.service.datacapture import CaptureContentTypeHeader, CaptureOption, DataCaptureConfig

#: How many different pairs `payloads` generates before it starts cycling them.
DISTINCT = 1024

#: `--payload` choices of the benchmarks -> request body size in bytes.
PAYLOAD_SIZES = {"250": 250, "8k": 8 * 1024}

Pair = tuple[bytes, bytes]


def csv_record(rng: random.Random, size: int = 250) -> Pair:
    """One (request, response) pair: `size` bytes of CSV features ending in "\\n", and a score."""
    features: list[str] = []
    length = 1  # the final "\n"
    while True:
        value = f"{rng.uniform(-100.0, 1000.0):.4f}" if rng.random() < 0.7 else str(rng.randrange(0, 100000))
        extra = len(value) + (1 if features else 0)
        if length + extra > size:
            break
        features.append(value)
        length += extra
    line = ",".join(features)
    # Pad the last feature with zeros so that every request is exactly `size` bytes.
    line += "0" * (size - 1 - len(line))
    request = (line + "\n").encode("ascii")
    response = f"{rng.random():.10f}".encode("ascii")
    return request, response


def payloads(n: int, seed: int = 0, size: int = 250) -> list[Pair]:
    """`n` pairs: the first `DISTINCT` are generated from `seed`, then repeated in order."""
    rng = random.Random(seed)
    distinct = [csv_record(rng, size) for _ in range(min(n, DISTINCT))]
    if not distinct:
        return []
    return [distinct[i % len(distinct)] for i in range(n)]


def body_bytes(pairs: list[Pair]) -> int:
    """Request plus response bytes of `pairs`."""
    return sum(len(req) + len(resp) for req, resp in pairs)


def dcc(
    csv: tuple[str, ...] | None = ("text/csv",),
    js: tuple[str, ...] | None = ("application/json",),
    modes: tuple[str, ...] = ("Input", "Output"),
    header: bool = True,
) -> DataCaptureConfig:
    """A DataCaptureConfig for encoder tests: 100 %, these capture modes and content types."""
    return DataCaptureConfig(
        InitialSamplingPercentage=100,
        DestinationS3Uri="file:///tmp/out",
        CaptureOptions=tuple(CaptureOption(m) for m in modes),
        CaptureContentTypeHeader=CaptureContentTypeHeader(csv, js) if header else None,
    )


#: SageMaker's own capture lines (the spec's section 3, from real endpoints), verbatim.
SAMPLE_CSV = b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":"41,0,159.3,66\\n","encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8","mode":"OUTPUT","data":"0.01216088142246008","encoding":"CSV"}},"eventMetadata":{"eventId":"a727dc55-cbe1-498c-bcb9-9c12eea02b44","inferenceId":"58","inferenceTime":"2021-05-18T00:29:02Z"},"eventVersion":"0"}'  # noqa: E501
SAMPLE_JSON = b'{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT","data":"{\\"instances\\": [{\\"features\\": [28, 2, 133937, 9, 13, 2, 0, 0, 4, 1, 15024, 0, 55, 37]}]}","encoding":"JSON"},"endpointOutput":{"observedContentType":"application/json","mode":"OUTPUT","data":"{\\"predictions\\": [{\\"score\\": 0.9899773597717285, \\"predicted_label\\": 1}]}","encoding":"JSON"}},"eventMetadata":{"eventId":"7ddb2d7c-4d6a-4e67-a68e-23870399829d","inferenceTime":"2024-01-19T19:27:57Z"},"eventVersion":"0"}'  # noqa: E501
SAMPLE_JSONLINES = b'{"captureData":{"endpointInput":{"observedContentType":"application/jsonlines","mode":"INPUT","data":"{\\"features\\":[28,2,133937,9,13,2,0,0,4,1,15024,0,55,37]}\\n{\\"features\\":[43,2,72338,12,14,2,12,0,1,1,0,0,40,37]}","encoding":"JSON"},"endpointOutput":{"observedContentType":"application/jsonlines","mode":"OUTPUT","data":"{\\"predicted_label\\":1,\\"score\\":0.989977359771728}\\n{\\"predicted_label\\":1,\\"score\\":0.504138827323913}\\n","encoding":"JSON"}},"eventMetadata":{"eventId":"32aaea1b-1a60-4870-b81d-40271f950c4a","inferenceTime":"2023-01-19T05:31:46Z"},"eventVersion":"0"}'  # noqa: E501
SAMPLE_HTML = b'{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT","data":"{\\"median_income\\": [7.9761, 5.2907]}","encoding":"JSON"},"endpointOutput":{"observedContentType":"text/html; charset=utf-8","mode":"OUTPUT","data":"eyJtZWRpYW5faG91c2VfdmFsdWUiOiBbNDc4MDQ2LjY2LCAyMDY1NTEuMDFdfQ==","encoding":"BASE64"}},"eventMetadata":{"eventId":"fffc6319-59a6-446f-b30f-46c6ed1aac64","inferenceId":"c7f0edc0-9397-4cd3-a948-bd7b639da2f5","inferenceTime":"2021-09-12T08:03:35Z"},"eventVersion":"0"}'  # noqa: E501
SAGEMAKER_SAMPLES = (SAMPLE_CSV, SAMPLE_JSON, SAMPLE_JSONLINES, SAMPLE_HTML)
