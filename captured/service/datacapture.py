"""SageMaker's `DataCaptureConfig`, verbatim: its keys, its rules (spec, section 2), and ours for local use.

Users already have this object: they pass it to `CreateEndpointConfig` and get it back from
`DescribeEndpointConfig`. It is accepted unchanged, with the SageMaker Python SDK's spellings too,
as the `[DataCaptureConfig]` table of the TOML file or as a JSON file (`configfile`), and declared
here like every other setting (`config`): type, range and description on each field.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta

from captured.service import configrules as rules
from captured.service.configcheck import whole

#: Items of `CsvContentTypes` / `JsonContentTypes` (API); use with `fullmatch`.
CONTENT_TYPE_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*/[a-zA-Z0-9](-*[a-zA-Z0-9.])*")
_KMS_KEY_CHARS = "[a-zA-Z0-9:/_-]"

_MediaType = Annotated[
    str,
    Meta(
        max_length=256,
        pattern=whole(CONTENT_TYPE_PATTERN),
        extra={
            "rule": "must be a media type such as text/csv: 1 to 256 letters, digits, hyphens, a '/'"
            " and dots after it"
        },
    ),
]


def _media_types(encoding: str) -> Meta:
    what = (
        f"media types (before any `;`, lower-cased) whose bodies are written as text, encoding `{encoding}`"
    )
    return Meta(min_length=1, max_length=10, description=what, extra={"items": "content types"})


class CaptureContentTypeHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    CsvContentTypes: Annotated[tuple[_MediaType, ...], _media_types("CSV")] | None = None
    JsonContentTypes: Annotated[tuple[_MediaType, ...], _media_types("JSON")] | None = None


class CaptureOption(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Normalised to "Input", "Output" or "InputAndOutput".
    CaptureMode: Annotated[
        str,
        Meta(
            extra={
                "parse": rules.capture_mode,
                "rule": "must be one of Input, Output, InputAndOutput (or the SDK's REQUEST, RESPONSE)",
            }
        ),
    ]


class DataCaptureConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    InitialSamplingPercentage: Annotated[
        int, Meta(ge=0, le=100, description="per request, input and output together")
    ]
    #: `s3://bucket[/prefix]` as given (a trailing "/" kept), or `file://` + an absolute, normalised path.
    DestinationS3Uri: Annotated[
        str,
        Meta(
            description="`s3://bucket[/prefix]` (bucket by S3 naming rules, no `//` in the prefix, a trailing"
            " `/` is fine), `file:///absolute/dir`, or a plain directory; at most"
            f" {rules.MAX_DESTINATION_CHARS} characters. SageMaker's `https://` form is refused with a hint"
            " to use `s3://`.",
            extra={
                "parse": rules.destination,
                "rule": "must be s3://bucket[/prefix] or a local directory",
                "default": "`file://…/captured-data/out` (or under `$STATE_DIRECTORY`)",
            },
        ),
    ]
    CaptureOptions: Annotated[
        tuple[CaptureOption, ...],
        Meta(
            min_length=1,
            max_length=32,
            description="what is captured: `Input`, `Output` or `InputAndOutput`; the SDK's `REQUEST` and"
            " `RESPONSE` are accepted",
            extra={"items": 'capture options such as {CaptureMode = "Input"}'},
        ),
    ]
    EnableCapture: Annotated[
        bool,
        Meta(
            description="`false`: captures are still accepted and counted (`capture_disabled`), nothing is"
            " written; status `Stopped`"
        ),
    ] = True
    KmsKeyId: (
        Annotated[
            str,
            Meta(
                max_length=2048,
                pattern=rf"\A{_KMS_KEY_CHARS}*\Z",
                description="the SSE-KMS key of S3 uploads",
                extra={
                    "rule": "must be a KMS key id, key ARN, alias name or alias ARN:"
                    f" at most 2048 of {_KMS_KEY_CHARS}"
                },
            ),
        ]
        | None
    ) = None
    CaptureContentTypeHeader: Annotated[
        CaptureContentTypeHeader | None,
        Meta(
            description="which bodies are written as text (`CSV`, `JSON`) rather than `BASE64`; **absent in a"
            " `[DataCaptureConfig]` table, everything is `BASE64`** (the API's rule)"
        ),
    ] = None

    @property
    def capture_input(self) -> bool:
        return any(o.CaptureMode in ("Input", "InputAndOutput") for o in self.CaptureOptions)

    @property
    def capture_output(self) -> bool:
        return any(o.CaptureMode in ("Output", "InputAndOutput") for o in self.CaptureOptions)
