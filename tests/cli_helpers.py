"""Running `moe-reroute` in tests: a bad input must end with exit status 2, one stderr line, no traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from moe_reroute.cli import main


def bad_input(capsys, argv: list[str], *needles: str) -> str:
    """Run `moe-reroute *argv`; assert it exits with status 2 and prints exactly one line on stderr,
    holding every one of `needles` and no traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, f"exit status {e.value.code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"moe-reroute {argv[0]}: error: ") or line.startswith("moe-reroute: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file and folder under `roots` (folders as ""), to show nothing was written."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out
