"""`--profile`: sample a server with py-spy while the senders run, then summarise where it spent time.

py-spy (`pip install py-spy`) attaches from outside, so the server needs no change; it needs
ptrace rights (root, or CAP_SYS_PTRACE, or kernel.yama.ptrace_scope = 0). The "raw" format is
collapsed stacks (one `frame;frame;... count` per line), which `summarize` reads and which
speedscope or inferno render as a flame graph.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE_HZ = 250
_LINE = re.compile(r"^(.*) (\d+)$")


def py_spy_binary() -> str:
    local = Path(sys.executable).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


class Recorder:
    """`py-spy record` on one pid, from `start()` until `stop()`."""

    def __init__(self, pid: int, out_path: str, fmt: str = "raw") -> None:
        self.out_path = out_path
        self.log_path = out_path + ".log"
        self.cmd = [py_spy_binary(), "record", "--pid", str(pid), "--rate", str(RATE_HZ),
                    "--format", fmt, "--output", out_path, "--nonblocking", "--threads"]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "process_batch (captured/pipeline.py:83)"; drop the line number
    # so that all samples of one function add up.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({_short(path)})" if path else name


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3", "/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path)


def summarize(path: str, top: int = 15) -> tuple[int, list[tuple[str, float, float]]]:
    """(samples, [(function, self %, total %)]) for the `top` functions by own time.

    py-spy leaves idle samples out (a thread waiting in `epoll`), so the percentages are of the
    time the process was busy. Time in C code (uvloop's socket reads, for instance) shows as the
    Python frame that called it: `Runner.run` for the event loop itself.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(path) as fh:
        for line in fh:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            frames = [_frame_name(f) for f in m.group(1).split(";") if not f.startswith("thread (")]
            count = int(m.group(2))
            samples += count
            if frames:
                own[frames[-1]] += count
            for name in set(frames):
                total[name] += count
    if not samples:
        return 0, []
    rows = [(name, 100.0 * n / samples, 100.0 * total[name] / samples) for name, n in own.most_common(top)]
    return samples, rows
