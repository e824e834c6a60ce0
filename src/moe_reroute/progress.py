"""Progress bars for long work: tqdm when it is installed (it comes with transformers), else silent."""

from __future__ import annotations


class _Silent:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def progress(total: int, enabled: bool = True, desc: str | None = None, unit: str = "it", leave: bool = True):
    """A bar with `.update(n)` and `.close()`; a silent one when disabled or without tqdm."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            return _Silent()
        return tqdm(total=total, desc=desc, unit=unit, leave=leave)
    return _Silent()
