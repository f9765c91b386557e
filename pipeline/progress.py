"""A live progress line for ``opsbot run``: done / failed / retrying / in flight, rate, ETA.

On a terminal the line redraws in place; elsewhere (CI logs, pipes) a plain line is printed at
most every ``plain_every`` seconds so logs stay readable.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def render(counts: dict[str, int], elapsed: float, width: int = 24) -> str:
    total = counts.get("total", 0) or 0
    done = counts.get("succeeded", 0) + counts.get("failed", 0) + counts.get("cancelled", 0) \
        + counts.get("ignored", 0)
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    return (f"[{bar}] {done}/{total} ok {counts.get('succeeded', 0)}"
            f" failed {counts.get('failed', 0)} retrying {counts.get('retrying', 0)}"
            f" in flight {counts.get('running', 0)} | {rate * 60:.1f}/min"
            f" | ETA {_fmt(eta)}")


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, plain_every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every = plain_every
        self._last_plain = 0.0
        self._last_line = ""

    def update(self, counts: dict[str, Any], elapsed: float, final: bool = False) -> None:
        line = render(counts, elapsed)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
            self.stream.flush()
        elif final or (time.monotonic() - self._last_plain >= self.plain_every
                       and line != self._last_line):
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_plain = time.monotonic()
        self._last_line = line
