"""Streamed trace replay speed: write a synthetic trace file, replay it with `traces.replay_file`, report.

The trace has the library's file format: its header is the one `Trace.save` writes (taken from a 1-step
trace saved by it), its tensors are streamed to disk a chunk at a time, so a trace larger than memory can
be written (1M tokens of a 48-layer, 128-expert model in bfloat16 is 12 GB). The logits are random
normal, rounded to the stored dtype. Before each timed pass the file's pages are dropped from the page
cache (posix_fadvise DONTNEED, after fsync), so the read comes from disk.

Timed: a read-only pass over every layer in chunks (the disk's share), then `replay_file` (read and
route). Prints one JSON line last. The file is deleted afterwards unless --keep.

    python benchmarks/replay_bench.py                       # 62,500 steps x 16, 48 layers, oea k0=4
    python benchmarks/replay_bench.py --layers 2            # a smaller file; per-layer time extrapolates
    python benchmarks/replay_bench.py --layers 4 --baseline # also without the compiled CPU kernel (torch.topk)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

import torch

from moe_reroute import RouterSpec, make_policy, traces
from moe_reroute.kernels import cpu_top
from moe_reroute.traces import Trace

DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}


def library_header(spec: RouterSpec, layers: int, steps: int, batch: int, dtype: torch.dtype, tmp: Path) -> str:
    """The trace header `Trace.save` writes for this shape: saved for one step, then its step count set."""
    one = Trace({i: torch.zeros(1, batch, spec.num_experts, dtype=dtype) for i in range(layers)},
                torch.ones(1, batch, dtype=torch.bool), {i: spec for i in range(layers)}, {"model": "synthetic"})
    from safetensors import safe_open

    path = one.save(tmp / "header.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["moe_reroute"])
    path.unlink()
    header["steps"] = steps
    return json.dumps(header)


def write_trace(path: Path, spec: RouterSpec, layers: int, steps: int, batch: int, dtype_name: str,
                chunk: int, seed: int) -> None:
    """A safetensors file of `layers` logits tensors [steps, batch, E] and valid [steps, batch], streamed."""
    dtype, st_dtype = DTYPES[dtype_name]
    E = spec.num_experts
    item = torch.empty((), dtype=dtype).element_size()
    layer_bytes = steps * batch * E * item
    entries, offset = {}, 0
    for i in range(layers):
        entries[f"logits.{i}"] = {"dtype": st_dtype, "shape": [steps, batch, E], "data_offsets": [offset, offset + layer_bytes]}
        offset += layer_bytes
    entries["valid"] = {"dtype": "BOOL", "shape": [steps, batch], "data_offsets": [offset, offset + steps * batch]}
    with tempfile.TemporaryDirectory() as tmp:
        meta = library_header(spec, layers, steps, batch, dtype, Path(tmp))
    head = json.dumps({"__metadata__": {"moe_reroute": meta}, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _ in range(layers):
            for s0 in range(0, steps, chunk):
                n = min(chunk, steps - s0)
                x = torch.randn(n, batch, E, generator=g).to(dtype)  # [n, B, E]
                f.write((x.view(torch.int16) if dtype == torch.bfloat16 else x).numpy().tobytes())  # numpy has no bf16
        f.write(torch.ones(steps, batch, dtype=torch.bool).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (True if it could)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def read_only(path: Path, chunk: int) -> float:
    """Seconds to read every logits tensor of the file in chunks of steps (no routing)."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name.startswith("logits."):
                x = f.get_slice(name)
                S = x.get_shape()[0]
                for s0 in range(0, S, chunk):
                    x[s0:s0 + chunk].sum()  # touch it
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--steps", type=int, default=62_500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--k0", type=int, default=4, help="oea's base experts per token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--chunk-steps", type=int, default=None, help="steps per policy call (default: the library's)")
    p.add_argument("--dir", type=Path, default=Path("."), help="where to write the trace file")
    p.add_argument("--keep", action="store_true", help="keep the trace file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", action="store_true",
                   help="also replay with the compiled CPU top-m kernel turned off (torch.topk), in the same run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; on a machine busy with other work 1 can be much faster)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    spec = RouterSpec(a.experts, a.top_k)
    chunk = a.chunk_steps or traces.default_chunk_steps(a.batch, a.experts)
    path = a.dir / f"replay_bench_{os.getpid()}.safetensors"
    t0 = time.perf_counter()
    write_trace(path, spec, a.layers, a.steps, a.batch, a.dtype, chunk, a.seed)
    write_s = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**30:.2f} GiB) in {write_s:.1f}s", flush=True)
    try:
        policy = make_policy("oea", k0=a.k0, backend="torch")
        dropped = drop_cache(path)
        read_s = read_only(path, chunk)
        print(f"read only: {read_s:.1f}s ({size / read_s / 2**20:.0f} MiB/s)", flush=True)
        kernel, why = cpu_top.available()
        print("compiled CPU top-m kernel: " + ("on" if kernel else f"off ({why})"), flush=True)
        drop_cache(path)
        t0 = time.perf_counter()
        u = traces.replay_file(path, policy, chunk_steps=a.chunk_steps)
        seconds = time.perf_counter() - t0
        baseline_s = None
        if a.baseline:
            os.environ["MOE_REROUTE_CPU_KERNEL"] = "0"
            cpu_top.reset()
            drop_cache(path)
            t0 = time.perf_counter()
            u_base = traces.replay_file(path, policy, chunk_steps=a.chunk_steps)
            baseline_s = time.perf_counter() - t0
            del os.environ["MOE_REROUTE_CPU_KERNEL"]
            cpu_top.reset()
            if any(not torch.equal(u[k], u_base[k]) for k in u):
                raise SystemExit("replay with and without the compiled kernel disagree")
            print(f"baseline (torch.topk): {baseline_s:.1f}s, {baseline_s / seconds:.2f}x the time", flush=True)
    finally:
        if not a.keep:
            path.unlink()
    token_layers = a.steps * a.batch * a.layers
    mean_u = sum(traces.summary(u).values()) / len(u)
    rate = token_layers / seconds
    print(f"replay: {seconds:.1f}s, {rate:,.0f} token-layers/s, mean U {mean_u:.1f} of {a.experts}; "
          f"{seconds / a.layers:.2f}s per layer of {a.steps * a.batch:,} tokens "
          f"(48 layers: {48 * seconds / a.layers:.0f}s)", flush=True)
    print(json.dumps({
        "bench": "replay_file", "policy": f"oea:k0={a.k0}", "token_layers_per_s": round(rate),
        "seconds": round(seconds, 2), "cpu_kernel": kernel,
        "baseline_torch_topk_seconds": None if baseline_s is None else round(baseline_s, 2), "read_only_seconds": round(read_s, 2), "write_seconds": round(write_s, 1),
        "seconds_per_layer": round(seconds / a.layers, 3), "page_cache_dropped": dropped,
        "shape": {"layers": a.layers, "steps": a.steps, "batch": a.batch, "experts": a.experts, "top_k": a.top_k},
        "dtype": a.dtype, "file_bytes": size, "chunk_steps": chunk, "mean_unique_experts": round(mean_u, 2),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
