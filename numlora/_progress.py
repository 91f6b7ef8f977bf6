"""A small progress bar on stderr: drawn only when stderr is a terminal, silent otherwise
(logs and pipes stay clean). No dependency."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", unit: str = "B", enabled: bool | None = None, stream=None):
        self.total = max(int(total), 1)
        self.done = 0
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._last = 0.0

    def _fmt(self, n: float) -> str:
        if self.unit != "B":
            return f"{n:,.0f}"
        for u in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or u == "GiB":
                return f"{n:.1f} {u}" if u != "B" else f"{n:.0f} B"
            n /= 1024
        return str(n)

    def update(self, n: int, item: str = "") -> None:
        self.done += int(n)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self.done / max(now - self._t0, 1e-9)
        tail = f" {item}" if item else ""
        line = (f"\r{self.desc} [{bar}] {100 * frac:5.1f}% {self._fmt(self.done)}/{self._fmt(self.total)} "
                f"{self._fmt(rate)}/s{tail}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
