"""Read captures back: ours and SageMaker's, local or in S3, plain or zstd (`captured read`).

    import captured
    for c in captured.read("s3://bucket/capture", endpoint="churn", start="2024-06-01T12:00Z"):
        c.inference_id, c.inference_time, c.input.json(), c.output.text()

`layout` says where captures lie and what a read selects, `sources` lists and fetches files,
`records` parses a line into a typed `Capture`, `stream` streams them, `lint` counts what
Model Monitor or Athena would stumble on (`batch` a block of lines at a time), `report` is what
it found and the text `captured read --stats` prints.
"""

from captured.reader.records import Capture, Side
from captured.reader.stream import read

__all__ = ["Capture", "Side", "read"]
