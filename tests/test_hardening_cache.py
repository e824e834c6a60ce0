"""The CPU kernel cache loads only a library it built and can verify: planted, linked, foreign, writable or
incomplete files mean torch.topk and one warning, never their code."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_reroute.kernels import cpu_top

needs_kernel = pytest.mark.skipif(not cpu_top.available()[0], reason=f"no CPU kernel: {cpu_top.available()[1]}")
PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
%s
"""


PROBE = """
import json, warnings, torch
warnings.simplefilter("always")
from moe_reroute.kernels import cpu_top
x = torch.randn(16, 128)
first, second = cpu_top.topk(x, 4), cpu_top.topk(x, 4)
ok = first is not None and torch.equal(first[1], torch.topk(x, 4).indices)
print(json.dumps({"ran": ok, "available": cpu_top.available()}))
"""


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def probe(folder: Path, umask: int | None = None) -> tuple[bool, str, str]:
    """(kernel ran and was right, why not, stderr) in a fresh process: a library loaded once in a process
    stays loaded, so only a new process shows what the cache would load."""
    import json
    import sys

    env = {**os.environ, "MOE_REROUTE_CACHE": str(folder)}
    env.pop("MOE_REROUTE_CPU_KERNEL", None)
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600,
                       preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["ran"], out["available"][1], r.stderr


def built(folder: Path, umask: int | None = None) -> Path:
    """Build the kernel into `folder` (in a fresh process) and return its library."""
    ran, why, err = probe(folder, umask)
    assert ran, why + err
    (lib,) = folder.glob("cpu_top-*.so")
    return lib


def plant(tmp_path: Path, at: Path, with_top_rows: bool = True) -> Path:
    """Compile a library whose load writes a marker file; put it at `at`; return the marker's path."""
    marker = tmp_path / "marker"
    src = tmp_path / "planted.c"
    body = "int top_rows(void) { return 0; }" if with_top_rows else "int something_else(void) { return 0; }"
    src.write_text(PLANTED % body)
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(tmp_path / "planted.so"), str(src)],
                   check=True)
    at.unlink(missing_ok=True)
    shutil.copy(tmp_path / "planted.so", at)
    os.chmod(at, 0o700)
    return marker


def falls_back(folder: Path, match: str) -> None:
    """The kernel does not run from `folder`: torch.topk, and one warning saying `match`."""
    ran, why, err = probe(folder)
    assert not ran and match in why, (why, err)
    assert err.count("CPU top-k kernel is unavailable") == 1, err  # one warning, not one per call
    assert "Traceback" not in err, err


@needs_kernel
def test_folder_and_files_are_private_whatever_the_umask(cache):
    lib = built(cache, umask=0)
    assert cache.stat().st_mode & 0o777 == 0o700
    for f in (lib, lib.with_name(lib.name + ".sha256")):
        assert f.stat().st_mode & 0o022 == 0, oct(f.stat().st_mode)
        assert f.stat().st_uid == os.geteuid()


@needs_kernel
def test_a_planted_library_with_a_stale_record_is_not_loaded(cache, tmp_path):
    lib = built(cache)
    marker = plant(tmp_path, lib)
    falls_back(cache, "does not match the hash recorded")
    assert not marker.exists()


@needs_kernel
def test_a_planted_library_without_a_record_is_replaced_by_a_build(cache, tmp_path):
    lib = built(cache)
    lib.with_name(lib.name + ".sha256").unlink()
    marker = plant(tmp_path, lib)
    assert probe(cache)[0] and not marker.exists()


@needs_kernel
def test_a_symbolic_link_is_not_followed(cache, tmp_path):
    lib = built(cache)
    copy = tmp_path / "elsewhere.so"
    shutil.copy(lib, copy)  # the same bytes: the hash would match
    lib.unlink()
    lib.symlink_to(copy)
    falls_back(cache, "cannot be opened as a regular file")
    (tmp_path / "linked").symlink_to(cache)
    falls_back(tmp_path / "linked", "symbolic link")


@needs_kernel
def test_a_library_without_top_rows_falls_back(cache, tmp_path):
    import hashlib

    lib = built(cache)
    marker = plant(tmp_path, lib, with_top_rows=False)
    lib.with_name(lib.name + ".sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest() + "\n")
    falls_back(cache, "has no top_rows function")
    assert marker.exists()  # its record matched: it was loaded, and then refused without an AttributeError


@needs_kernel
def test_writable_folder_or_library_is_refused(cache, tmp_path):
    lib = built(cache)
    os.chmod(lib, 0o777)
    falls_back(cache, "writable by other users")
    os.chmod(lib, 0o700)
    os.chmod(cache, 0o777)
    falls_back(cache, "writable by other users")


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing owners needs root")
def test_a_folder_or_library_of_another_user_is_refused(cache, tmp_path):
    lib = built(cache)
    os.chown(lib, 12345, 12345)
    falls_back(cache, "belongs to user id 12345")
    os.chown(lib, 0, 0)
    os.chown(cache, 12345, 12345)
    falls_back(cache, "belongs to user id 12345")
