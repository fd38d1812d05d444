"""A block of capture lines decoded as cheaply as msgspec allows, as strictly as the record path
(`records.StoredLine`): what `batch` counts over. Pure, no I/O.

`Line` requires what `records.StoredLine` requires, so a line the record path rejects fails here
too (its block then goes through the record path). `Decoder` learns the content types of the
data and decodes them as Literals; `canonical` tells whether a column of times is SageMaker's
`yyyy-mm-ddThh:mm:ssZ`, which `batch` then compares as text.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

#: SageMaker's `inferenceTime` (`yyyy-mm-ddThh:mm:ssZ`) with every digit as 0, and the offsets of
#: the tens of its minutes and seconds.
SHAPE = b"0000-00-00T00:00:00Z"
_DIGITS_AS_0 = bytes.maketrans(b"123456789", b"000000000")
_TENS = (14, 17)


_Mode = Literal["INPUT", "OUTPUT"]
_Encoding = Literal["CSV", "JSON", "BASE64"]


class Side(msgspec.Struct, gc=False):
    """`endpointInput` / `endpointOutput`, as strictly as `records.StoredSide` takes it. `mode` and
    `encoding` are SageMaker's literals, which msgspec hands out without making a string per record;
    a line with any other value (valid for the per-record path or not) sends its block there."""

    observedContentType: str | None
    mode: _Mode
    data: str
    encoding: _Encoding


class Data(msgspec.Struct, gc=False):
    endpointInput: Side | None = None
    endpointOutput: Side | None = None


class Meta(msgspec.Struct, gc=False, kw_only=True):
    """In the order SageMaker and the daemon write the keys (msgspec matches the next key first)."""

    eventId: str
    inferenceId: str | None = None
    #: As long as SageMaker's form: any other (a fraction, an offset) sends the block to the
    #: per-record path, which parses every ISO 8601 time.
    inferenceTime: Annotated[str, msgspec.Meta(min_length=len(SHAPE), max_length=len(SHAPE))]
    customAttributes: str | None = None


class Line(msgspec.Struct, gc=False):
    """`records.StoredLine` with the same fields required: a line the per-record path rejects is
    rejected here too, and its block goes there."""

    captureData: Data
    eventMetadata: Meta
    eventVersion: Literal["0"] = "0"


_decode = msgspec.json.Decoder(Line).decode


class Decoder:
    """Decodes a block's lines, with `observedContentType` a Literal of the content types met so far
    (a model server sends a few): msgspec then hands out the same string objects instead of making
    two strings per record, and counting them is comparing pointers. A block holding a type not met
    yet fails that decoder and is decoded with `Line` (a plain string), and its types are learned;
    past `MAX_LEARNED` types only `Line` is used."""

    MAX_LEARNED = 32

    def __init__(self) -> None:
        self.known: frozenset[str] = frozenset()
        self.learning = True
        self.learned: Callable[[bytes], Line] | None = None

    def lines(self, parts: list[bytes]) -> list[Line]:
        """Every part decoded; msgspec.DecodeError when one is not a valid line."""
        if self.learned is not None:
            try:
                return list(map(self.learned, parts))
            except msgspec.ValidationError:
                pass  # a new content type, or a line `Line` rejects too
        lines = list(map(_decode, parts))
        if self.learning:
            self._learn(lines)
        return lines

    def _learn(self, lines: list[Line]) -> None:
        met = set(map(_INPUT_TYPE, filter(_INPUT, lines))) | set(map(_OUTPUT_TYPE, filter(_OUTPUT, lines)))
        known = self.known | {t for t in met if t is not None}
        if known == self.known and self.learned is not None:
            return
        if len(known) > self.MAX_LEARNED:
            self.learning, self.learned = False, None
            return
        self.known = known
        self.learned = msgspec.json.Decoder(_line_type(tuple(sorted(known)))).decode if known else None


#: The decoder of this process (the content types it learned serve every read it makes).
DECODER = Decoder()


def _line_type(content_types: tuple[str, ...]) -> Any:
    """`Line` with `observedContentType` one of `content_types` or null."""
    side = msgspec.defstruct(
        "Side",
        [
            ("observedContentType", Literal[content_types] | None),
            ("mode", _Mode),
            ("data", str),
            ("encoding", _Encoding),
        ],
        gc=False,
    )
    data = msgspec.defstruct(
        "Data", [("endpointInput", side | None, None), ("endpointOutput", side | None, None)], gc=False
    )
    return msgspec.defstruct(
        "Line",
        [("captureData", data), ("eventMetadata", Meta), ("eventVersion", Literal["0"], "0")],
        gc=False,
    )


def canonical(times: list[str]) -> bool:
    """Whether every time (each as long as `SHAPE`) is `yyyy-mm-ddThh:mm:ssZ` with minutes and
    seconds below 60: then text order is time order. (The date and the hour are checked where each
    distinct hour is parsed, `strptime` raising ValueError.)"""
    try:
        text = "".join(times).encode("ascii")
    except UnicodeEncodeError:
        return False
    if text.translate(_DIGITS_AS_0) != SHAPE * len(times):
        return False
    return not any(text[i :: len(SHAPE)].lstrip(b"012345") for i in _TENS)


_INPUT = operator.attrgetter("captureData.endpointInput")
_OUTPUT = operator.attrgetter("captureData.endpointOutput")
_INPUT_TYPE = operator.attrgetter("captureData.endpointInput.observedContentType")
_OUTPUT_TYPE = operator.attrgetter("captureData.endpointOutput.observedContentType")
