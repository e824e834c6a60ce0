"""Reading and writing the library's files with errors that name the file (and the option it came from).

Inputs are read from regular files only, up to a size limit: a FIFO, a device such as /dev/zero, a socket
or a folder is refused before anything is read, so a bad path can neither hang a command nor fill its
memory. Outputs are written beside their final name and renamed into place, and only over a regular file:
a device, FIFO, socket or folder at an output path is refused before any work, never replaced.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_TEXT_BYTES = 1 << 30  # text, JSON and JSONL inputs: 1 GiB


class MissingFileError(FileNotFoundError, ValueError):
    """A missing input file: a FileNotFoundError, and a ValueError like every other bad input a loader refuses."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file_problem(path: str | Path, limit: int | None = MAX_TEXT_BYTES) -> tuple[str, str] | None:
    """None when `path` is a regular file (symlinks followed) of at most `limit` bytes, else
    (kind, sentence): kind "missing", "not-regular", "too-large" or "unreadable"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", "no such file"
    except OSError as e:
        return "unreadable", f"cannot read it ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not-regular", ("is a folder" if stat.S_ISDIR(st.st_mode) else
                               f"is {_kind(st.st_mode)}, not a regular file")
    if limit is not None and st.st_size > limit:
        return "too-large", f"is {st.st_size / (1 << 20):,.0f} MiB, more than the {limit >> 20:,} MiB read at most"
    return None


def read_regular_bytes(path: str | Path, name: str, what: str = "", limit: int | None = MAX_TEXT_BYTES,
                       error: type[Exception] = ValueError,
                       missing: type[Exception] | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them.

    `name` starts every message (an option and the path, "--text notes.txt", or just the path); `what`
    ("expected a JSONL task file") ends it. A missing file raises `missing` (default: `MissingFileError`
    where `error` is ValueError, else `error`), anything else that is not a readable regular file of at
    most `limit` bytes raises `error`.
    """
    tail = f"; {what}" if what else ""
    problem = regular_file_problem(path, limit)
    if problem:
        kind, sentence = problem
        if kind == "missing":
            cls = missing or (MissingFileError if error is ValueError else error)
        else:
            cls = error
        sep = ": " if kind in ("missing", "unreadable") else " "
        raise cls(f"{name}{sep}{sentence}{tail}")
    try:  # O_NONBLOCK: a FIFO swapped in after the check does not block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{name}: cannot read it ({e.strerror or e}){tail}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise error(f"{name} is not a regular file{tail}")
        data = f.read(limit + 1) if limit is not None else f.read()
    if limit is not None and len(data) > limit:
        raise error(f"{name} is larger than the {limit >> 20:,} MiB read at most{tail}")
    return data


def read_regular_text(path: str | Path, name: str, what: str = "", limit: int | None = MAX_TEXT_BYTES,
                      error: type[Exception] = ValueError, missing: type[Exception] | None = None,
                      how_to_fix: str = "convert it to UTF-8") -> str:
    """The UTF-8 text of the regular file `path` (a leading byte-order mark dropped); errors as
    `read_regular_bytes`, and text that is not UTF-8 raises `error` naming the byte."""
    data = read_regular_bytes(path, name, what, limit, error, missing)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise error(f"{name}: not UTF-8 text (byte {e.start}); {how_to_fix}") from None


def json_lines(text: str, bad_line: Callable[[int, str], Exception]):
    """(line number, value) of each non-blank line of the JSONL `text`; a line that is not JSON (or nests too
    deeply to read) raises `bad_line(number, why)`, so each reader names its file and line its own way."""
    import json

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise bad_line(n, e.msg) from None
        except RecursionError:
            raise bad_line(n, "nested too deeply to read") from None
        yield n, value


def output_problem(path: str | Path) -> str | None:
    """None when `path` is missing or a regular file (so it may be written), else why not: a folder,
    FIFO, device or socket at an output path is never written or replaced."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet: the folder checks say the rest
        return None
    except OSError as e:
        return f"cannot be checked ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError:
            return "is a dangling symbolic link"
    if stat.S_ISREG(st.st_mode):
        return None
    return f"is {_kind(st.st_mode)}; an output is written only as a regular file"


def check_output(path: str | Path, name: str | None = None) -> Path:
    """`path` may be written as a file: missing, or a regular file. Raises ValueError naming it."""
    path = Path(path)
    problem = output_problem(path)
    if problem:
        raise ValueError(f"{name or path} {problem}; give a file name")
    return path


def write_atomic(path: str | Path, write: Callable[[Path], object], name: str | None = None) -> Path:
    """Call `write(tmp)` for a temporary file beside `path`, then rename it onto `path`: readers see the
    old file or the complete new one. `path` must be missing or a regular file (checked before and again
    just before the rename, which goes onto the final target of a symbolic link); the temporary file is
    removed on any error or interrupt."""
    path = Path(path)
    check_output(path, name)
    target = path.resolve() if path.is_symlink() else path
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        check_output(path, name)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str, name: str | None = None) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file at `path`, on CPU.

    `what` says what the file should be ("a routing trace written by Trace.save"); a missing path raises
    FileNotFoundError, a folder, FIFO, device or a file that is empty, truncated or not safetensors
    raises ValueError naming the file and `what`.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    problem = regular_file_problem(path, limit=None)
    if problem:
        kind, sentence = problem
        if kind == "missing":
            raise FileNotFoundError(f"no file at {path}; expected {what}")
        if path.is_dir():
            sentence = "is a directory"
        raise ValueError(f"{path} {sentence}; expected {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise ValueError(f"{path} is not a readable safetensors file ({reason}); expected {what}") from None
    return tensors, metadata
