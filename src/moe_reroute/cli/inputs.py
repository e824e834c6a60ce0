"""Checks every command runs on its inputs and output location before it starts working.

Each raises `InputError` with a message that says how to fix the input; `moe_reroute.cli.main`
prints it as one line and exits with status 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """A bad command-line input; the message names it and says how to fix it."""


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_below(path: Path, option: str) -> None:
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"{option} {path}: {base} is a file, so no folder can be made there; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {base} is not writable; choose a folder you can write to")


def package_folder() -> Path:
    """The installed package's own folder (its code, the shipped reference model): never an output."""
    return Path(__file__).resolve().parent.parent


def _outside_package(path: Path, option: str) -> None:
    here = path.absolute().resolve()
    pkg = package_folder()
    if here == pkg or pkg in here.parents:
        raise InputError(f"{option} {path} is inside the installed moe_reroute package ({pkg}); write outputs "
                         "somewhere else, such as the working directory")


def check_out_dir(path: str | Path, option: str = "--out", package: bool = False) -> Path:
    """`path` can be used (or made) as an output folder; nothing is created yet. `package`: the
    installed package's folder is allowed (for --refresh-shipped only)."""
    from ..files import output_problem

    path = Path(path)
    if path.exists() and not path.is_dir():
        kind = output_problem(path) or "is an existing file"
        raise InputError(f"{option} {path} {kind.split(';')[0]}, not a folder; give a folder (it is made if missing)")
    if not package:
        _outside_package(path, option)
    _writable_below(path, option)
    return path


def check_out_file(path: str | Path, option: str = "--out", example: str = "similarity.safetensors") -> Path:
    """`path` can be written as a file (its folder is made if missing): missing or a regular file, never
    a device, FIFO, socket or folder, and not inside the installed package; nothing is created yet.
    `example`: the file name a folder given instead is told to hold."""
    from ..files import output_problem

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name such as {path / example}")
    problem = output_problem(path)
    if problem:
        raise InputError(f"{option} {path} {problem}; give the name of a new or regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {path} exists and is not writable; choose another file")
    _outside_package(path, option)
    _writable_below(path.parent, option)
    return path


def read_text_file(path: str | Path, option: str) -> str:
    """The UTF-8 text of the regular file `path` (a FIFO, device or folder is refused before reading;
    at most files.MAX_TEXT_BYTES)."""
    from ..files import read_regular_text

    return read_regular_text(path, f"{option} {path}", error=InputError)


def read_json_file(path: str | Path, option: str, what: str) -> Any:
    """The JSON object in `path`, which should be `what` (said in every message)."""
    text = read_text_file(path, option)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{option} {path}: not valid JSON ({e}); expected {what}") from None
    except RecursionError:
        raise InputError(f"{option} {path}: the JSON is nested too deeply to read; expected {what}") from None
    if not isinstance(data, dict):
        raise InputError(f"{option} {path}: holds a JSON {type(data).__name__}, not an object; expected {what}")
    return data


def at_least(value: int, low: int, option: str) -> int:
    if value < low:
        raise InputError(f"{option} must be >= {low}, got {value}")
    return value


def in_range(value: float, low: float, high: float, option: str) -> float:
    """`value` is a number (not NaN) in low..high; else InputError naming `option`."""
    import math

    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{option} must be a number in {low:g}..{high:g}, got {value}")
    return value
