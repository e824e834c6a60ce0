"""A compiled CPU kernel for the m best logits of each row (small m), which trace replay spends its time on.

`torch.topk(x, m, dim=-1)` on CPU costs about as much for m = 9 of 128 experts as a sort; `topk(x, m)` here
answers the same with m passes of a branch-free (vectorised) max over each row's keys, value and id packed
in one integer so that each pass finds one more of the best, several times faster, on float32, bfloat16 and
float16 CPU tensors, rows split between torch's threads.

The C source (`cpu_top.c`, shipped with the package) is compiled on first use with the system's C compiler
(`$CC`, else `cc`, `gcc` or `clang`) into the cache directory (`$MOE_REROUTE_CACHE`, else
`$XDG_CACHE_HOME/moe-reroute` or `~/.cache/moe-reroute`), once per source version and machine type. Without
a compiler, or with `MOE_REROUTE_CPU_KERNEL=0`, `topk` returns None and callers use `torch.topk` (one warning
says why when a build fails). `available()` says whether it runs and why not.

The cache trusts nothing it finds: the folder is made 0700 (whatever the umask) and, made or found, must
be a real folder (no symbolic link) owned by this user and writable by no one else; the library and the
SHA-256 of it recorded at build time must be regular files owned by this user, writable by no one else,
and the library's bytes must hash to the record. It is opened without following links, checked, and
loaded through that same descriptor. Any doubt (and a library without `top_rows`) means torch.topk and
one warning naming the file; nothing found in the cache is run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_top.c")
MAX_M = 64  # the C kernel's limit
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
MIN_ROWS_PER_THREAD = 8192  # below this a second thread costs more than it saves
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CACHE_LAYOUT = b"sha256-record/1"  # part of the library's name: builds from before the hash record are not loaded

_lock = threading.Lock()
_fn = None  # the C function once loaded
_why: str | None = None  # why it cannot run, once known
_pool: ThreadPoolExecutor | None = None


def cache_dir() -> Path:
    env = os.environ.get("MOE_REROUTE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-reroute"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Untrusted(RuntimeError):
    """The cache folder or a file in it is not safe to load code from."""


def _owned_private(path: Path, want_dir: bool) -> os.stat_result:
    """lstat of `path`, which must be a real folder (want_dir) or regular file, not a symbolic link, owned
    by this process's user, writable by no group or other user; raises Untrusted saying which rule fails."""
    st = os.lstat(path)
    kind = "folder" if want_dir else "file"
    if stat.S_ISLNK(st.st_mode):
        raise Untrusted(f"{path} is a symbolic link; the kernel cache {kind} must be a real {kind}")
    if want_dir and not stat.S_ISDIR(st.st_mode) or not want_dir and not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"{path} is not a {'folder' if want_dir else 'regular file'}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise Untrusted(f"{path} belongs to user id {st.st_uid}, not to this user ({os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Untrusted(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")
    return st


def _private_folder(folder: Path) -> None:
    """Make the cache folder 0700 if missing (whatever the umask); check it either way."""
    try:
        os.lstat(folder)
    except FileNotFoundError:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask; this does not
        except FileExistsError:
            pass  # made by another process meanwhile: checked below as any existing folder
    _owned_private(folder, want_dir=True)


def _digest(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _open_verified(lib: Path) -> int:
    """An open descriptor of `lib` once it and its recorded hash (`lib.sha256`, written at build) pass
    every check: both real files of this user that no one else may write, and the bytes behind the
    descriptor hash to the record. The library is then loaded through that descriptor, so the file
    checked is the file loaded."""
    record = lib.with_name(lib.name + ".sha256")
    _owned_private(record, want_dir=False)
    want = record.read_text(encoding="ascii", errors="replace").strip()
    try:
        fd = os.open(lib, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise Untrusted(f"{lib} cannot be opened as a regular file ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()) \
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            _owned_private(lib, want_dir=False)  # says which rule fails
            raise Untrusted(f"{lib} changed while it was checked")
        if _digest(fd) != want:
            raise Untrusted(f"{lib} does not match the hash recorded when it was built; delete it to rebuild")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _dlopen(lib: Path, fd: int) -> ctypes.CDLL:
    proc = Path(f"/proc/self/fd/{fd}")
    return ctypes.CDLL(str(proc) if proc.exists() else str(lib))


def _build() -> ctypes._CFuncPtr:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(FLAGS).encode(), platform.machine().encode(),
                                     CACHE_LAYOUT]))
    folder = cache_dir()
    _private_folder(folder)
    out = folder / f"cpu_top-{tag.hexdigest()[:16]}.so"
    record = out.with_name(out.name + ".sha256")
    if not os.path.lexists(out) or not os.path.lexists(record):
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: safe across processes
            built = Path(tmp) / out.name
            # x86-64 builds carry an AVX2 clone picked at load time; a compiler without target_clones gets a
            # second try without it
            for extra in ((), ("-DMOE_REROUTE_NO_CLONES",)):
                r = subprocess.run([cc, *FLAGS, *extra, "-o", str(built), str(SOURCE)], capture_output=True,
                                   text=True, timeout=300)
                if r.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cc} failed to compile {SOURCE}: {(r.stderr or r.stdout).strip()[-500:]}")
            os.chmod(built, 0o700)
            fd = os.open(built, os.O_RDONLY)
            try:
                digest = _digest(fd)
            finally:
                os.close(fd)
            hashed = Path(tmp) / record.name
            hashed.write_text(digest + "\n", encoding="ascii")
            os.chmod(hashed, 0o600)
            os.replace(built, out)  # the library first: a record without its library is never left behind
            os.replace(hashed, record)
    fd = _open_verified(out)
    try:
        fn = _dlopen(out, fd).top_rows
    except AttributeError:
        raise Untrusted(f"{out} has no top_rows function; delete it to rebuild") from None
    finally:
        os.close(fd)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    return fn


def _load() -> ctypes._CFuncPtr | None:
    global _fn, _why
    if _fn is not None or _why is not None:
        return _fn
    with _lock:
        if _fn is None and _why is None:
            if os.environ.get("MOE_REROUTE_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
                _why = "turned off by MOE_REROUTE_CPU_KERNEL=0"
            else:
                try:
                    _fn = _build()
                except (OSError, RuntimeError, AttributeError, ValueError, subprocess.SubprocessError) as e:
                    _why = str(e)
                    warnings.warn(f"moe_reroute: the compiled CPU top-k kernel is unavailable ({_why}); "
                                  "using torch.topk, which is slower", RuntimeWarning, stacklevel=3)
    return _fn


def available() -> tuple[bool, str]:
    """(True, "") when the kernel runs here, else (False, why)."""
    _load()
    return (_fn is not None, "" if _fn is not None else str(_why))


def reset() -> None:
    """Forget the loaded kernel and any failure (the next call builds or loads it again; for tests)."""
    global _fn, _why
    with _lock:
        _fn, _why = None, None


def topk(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values float32 [..., m], ids int64 [..., m]) of the m largest of each row along the last dimension,
    largest first, as `torch.topk(x, m, dim=-1)` (NaN largest; equal values lowest id first), or None when
    the kernel does not apply (not a CPU tensor, another dtype, m outside 1..min(E, MAX_M), no compiler):
    then use torch.topk."""
    if (x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 1 or not 1 <= m <= min(x.shape[-1], MAX_M)
            or x.requires_grad):
        return None
    fn = _load()
    if fn is None:
        return None
    E = x.shape[-1]
    rows = x.reshape(-1, E)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < E):
        rows = rows.contiguous()
    R = rows.shape[0]
    vals = torch.empty(R, m, dtype=torch.float32)
    ids = torch.empty(R, m, dtype=torch.int64)
    if R:
        code, stride = _DTYPES[x.dtype], rows.stride(0) if R > 1 else E
        item = rows.element_size()
        threads = max(1, min(torch.get_num_threads(), R // MIN_ROWS_PER_THREAD))

        def run(r0: int, r1: int) -> int:
            return fn(rows.data_ptr() + r0 * stride * item, code, r1 - r0, E, stride, m,
                      vals.data_ptr() + r0 * m * 4, ids.data_ptr() + r0 * m * 8)

        bounds = [R * i // threads for i in range(threads + 1)]
        if threads == 1:
            codes = [run(0, R)]
        else:  # ctypes releases the GIL during the call, so the threads run at once
            codes = list(_executor().map(run, bounds[:-1], bounds[1:]))
        if any(codes):
            raise RuntimeError(f"cpu_top.top_rows refused its arguments (m={m}, E={E}, dtype={x.dtype})")
    return vals.reshape(*x.shape[:-1], m), ids.reshape(*x.shape[:-1], m)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="moe-reroute-top")
        return _pool
