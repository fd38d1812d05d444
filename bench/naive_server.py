"""The baseline: a capture server as a user would write it in an afternoon.

Standard library only, the default asyncio loop, one `readline()` and one `json.loads` per
record, one dict per SageMaker record and one `json.dumps(record) + "\\n"` write per record to
an hourly file (kept open, Python's default buffering). No batching tricks.

Wire format: newline-delimited JSON objects
`{"request": str, "response": str, "request_content_type": str, "response_content_type": str}`.
The line `{"op": "count"}` is answered with `{"received": r, "written": w}` on the same
connection. SIGTERM or SIGINT: stop accepting, close the file (flushing it), exit 0.

    python bench/naive_server.py --socket /tmp/x/naive.sock --out-dir /tmp/x/out [--sampling 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import uuid
from datetime import UTC, datetime
from typing import TextIO


class NaiveCapture:
    def __init__(self, out_dir: str, sampling: int) -> None:
        self.out_dir = out_dir
        self.sampling = sampling
        self.received = 0
        self.written = 0
        self.hour: str | None = None
        self.file: TextIO | None = None

    def output(self, now: datetime) -> TextIO:
        hour = now.strftime("%Y-%m-%d-%H")
        if hour != self.hour or self.file is None:
            if self.file is not None:
                self.file.close()
            self.file = open(os.path.join(self.out_dir, f"capture-{hour}.jsonl"), "a")  # noqa: SIM115
            self.hour = hour
        return self.file

    def capture(self, msg: dict[str, str]) -> None:
        self.received += 1
        if self.sampling < 100 and random.random() * 100 >= self.sampling:
            return
        now = datetime.now(UTC)
        record = {
            "captureData": {
                "endpointInput": {
                    "observedContentType": msg["request_content_type"],
                    "mode": "INPUT",
                    "data": msg["request"],
                    "encoding": "CSV",
                },
                "endpointOutput": {
                    "observedContentType": msg["response_content_type"],
                    "mode": "OUTPUT",
                    "data": msg["response"],
                    "encoding": "CSV",
                },
            },
            "eventMetadata": {
                "eventId": str(uuid.uuid4()),
                "inferenceTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "eventVersion": "0",
        }
        self.output(now).write(json.dumps(record) + "\n")
        self.written += 1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "op" in msg:
                    reply = {"received": self.received, "written": self.written}
                    writer.write((json.dumps(reply) + "\n").encode())
                    await writer.drain()
                    continue
                self.capture(msg)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


async def main(socket_path: str, out_dir: str, sampling: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    capture = NaiveCapture(out_dir, sampling)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_unix_server(capture.handle, path=socket_path)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    capture.close()
    print(f"stopped: received {capture.received}, written {capture.written}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--sampling", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.socket, args.out_dir, args.sampling))
