"""Progress of long work (downloads, extraction, loading) on stderr, so that stdout stays clean for results.

    with Progress("extracting", total=n_bytes, unit="MB", scale=1e6) as bar:
        for chunk in chunks:
            bar.update(len(chunk))

On a terminal the line is redrawn in place; in a log (no terminal) one line is written when the work ends.
"""

from __future__ import annotations

import sys
import time


def note(message: str) -> None:
    """One line of status on stderr."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A counter towards `total` (or an open-ended one), shown as `label  done/total unit  percent`."""

    def __init__(self, label: str, total: float | None = None, unit: str = "", scale: float = 1.0,
                 stream=None, min_interval: float = 0.1):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.stream = stream if stream is not None else sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.min_interval = 0.0, min_interval
        self._last_draw = 0.0
        self._start = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self) -> str:
        done = f"{self.done / self.scale:.1f}" if self.scale != 1 else f"{self.done:g}"
        if self.total is None:
            return f"{self.label}  {done} {self.unit}".rstrip()
        total = f"{self.total / self.scale:.1f}" if self.scale != 1 else f"{self.total:g}"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.label}  {done}/{total} {self.unit}  {percent:3.0f}%"

    def update(self, amount: float = 1) -> None:
        self.done += amount
        now = time.perf_counter()
        if self.live and now - self._last_draw >= self.min_interval:
            self._last_draw = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        elapsed = time.perf_counter() - self._start
        self.stream.write(("\r" if self.live else "") + f"{self._line()}  ({elapsed:.1f} s)\n")
        self.stream.flush()
