"""Progress for long work: a tqdm bar on a terminal; elsewhere (CI logs, files) a plain line at each
quarter of the work and at least every 20 s, so a log never gets a line per update nor a long silence.

`quiet_third_party_bars()` does the same for the bars of the libraries the commands call (transformers'
shard loading and writing, lm-eval): off when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
import time


class _Silent:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class _Milestones:
    """`desc: 25/100 (25%), 12 s` on stderr at each quarter, after `every` seconds without a line, and at
    the end."""

    def __init__(self, total: int, desc: str | None, unit: str, every: float = 20.0) -> None:
        self.total, self.desc, self.unit = max(int(total or 0), 0), desc or "progress", unit
        self.n, self.next_mark, self.t0, self.closed = 0, 1, time.time(), False
        self.every, self.last = every, self.t0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n >= self.total:
            return
        quarter = self.total and self.next_mark <= 3 and self.n >= self.total * self.next_mark / 4
        if quarter or time.time() - self.last >= self.every:
            while self.total and self.next_mark <= 3 and self.n >= self.total * self.next_mark / 4:
                self.next_mark += 1
            self._line()

    def _line(self) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        total = f"/{self.total}" if self.total else ""
        self.last = time.time()
        print(f"{self.desc}: {self.n}{total} {self.unit}{pct}, {self.last - self.t0:.0f} s", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line()


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(total: int, enabled: bool = True, desc: str | None = None, unit: str = "it", leave: bool = True):
    """A bar with `.update(n)` and `.close()`: tqdm on a terminal, quarter milestones elsewhere, silent
    when disabled (or without tqdm on a terminal)."""
    if not enabled:
        return _Silent()
    if not is_terminal():
        return _Milestones(total, desc, unit)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def quiet_third_party_bars() -> None:
    """Turn off other libraries' tqdm bars when stderr is not a terminal (tqdm reads TQDM_DISABLE; processes
    started from here inherit it). A value the user set is kept."""
    if not is_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
