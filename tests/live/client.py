"""Run inside the test container (tests/test_systemd_live.py), by the installed service's own
Python (/opt/captured/bin/python), as a model server's user. Prints one JSON document.

    client.py connect                  try to connect to /run/captured/capture.sock
    client.py send PREFIX COUNT [ENDPOINT]
                                       capture COUNT records (inference ids PREFIX-0, PREFIX-1,
                                       ...) with a CaptureClient that finds the daemon by itself,
                                       then flush
    client.py stream PREFIX COUNT RUNDIR
                                       capture COUNT records and flush (then RUNDIR/acked holds
                                       the report so far), then keep capturing one record every
                                       2 ms until RUNDIR/stop exists (at most 120 s), then flush
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

SOCKET = "/run/captured/capture.sock"


def connect() -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(SOCKET)
        except OSError as exc:
            return {"connected": False, "errno": exc.errno, "error": str(exc)}
    return {"connected": True}


def capture(client: Any, prefix: str, i: int) -> bool:
    return bool(
        client.capture(
            f"{i},1.5,2\n",
            "0.25\n",
            request_content_type="text/csv",
            response_content_type="text/csv",
            inference_id=f"{prefix}-{i}",
        )
    )


def report(client: Any, prefix: str, sent: list[int], flushed: bool) -> dict[str, Any]:
    return {
        "ids": [f"{prefix}-{i}" for i in sent],
        "flushed": flushed,
        "stats": client.stats(),
        "groups": sorted(os.getgroups()),
    }


def send(prefix: str, count: int, endpoint: str | None) -> dict[str, Any]:
    from captured import CaptureClient

    with CaptureClient(endpoint_name=endpoint) as client:
        sent = [i for i in range(count) if capture(client, prefix, i)]
        flushed = client.flush(timeout=30)
        return report(client, prefix, sent, flushed)


def stream(prefix: str, count: int, rundir: Path) -> dict[str, Any]:
    from captured import CaptureClient

    with CaptureClient() as client:
        sent = [i for i in range(count) if capture(client, prefix, i)]
        flushed = client.flush(timeout=30)
        (rundir / "acked.tmp").write_text(json.dumps(report(client, prefix, sent, flushed)))
        (rundir / "acked.tmp").rename(rundir / "acked")
        i = count
        deadline = time.monotonic() + 120
        while not (rundir / "stop").exists() and time.monotonic() < deadline:
            if capture(client, prefix, i):
                sent.append(i)
            i += 1
            time.sleep(0.002)
        flushed = client.flush(timeout=60)
        return report(client, prefix, sent, flushed)


def main(argv: list[str]) -> int:
    if argv[0] == "connect":
        doc = connect()
    elif argv[0] == "send":
        doc = send(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else None)
    elif argv[0] == "stream":
        doc = stream(argv[1], int(argv[2]), Path(argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
