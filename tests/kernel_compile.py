"""Compile the routing kernel for a Hopper GPU (sm_90) without one: Triton's own compiler and the ptxas it
ships, as a GPU would, so that code the interpreter accepts but the compiler refuses is caught on CPU.

python tests/kernel_compile.py [--experts E] [POLICY[:SCORING[:PHASE]] ...]   (names: native cap oea sere
budget xshare lynx, and oea+ep budget+ep (with `ep`); softmax topk_softmax sigmoid; phases 0 1 2, and 3 for lynx;
E default 128); exits 1 if any case fails. Run without
TRITON_INTERPRET. The seconds each case took are printed: how moe_reroute.kernels.MAX_EXPERTS was chosen.
"""

from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: it replaces the kernel by the interpreter")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moe_reroute.kernels import triton_route as tr  # noqa: E402

POLICIES = {"native": tr.NATIVE, "cap": tr.CAP, "oea": tr.OEA, "sere": tr.SERE, "budget": tr.BUDGET, "xshare": tr.XSHARE,
            "lynx": tr.LYNX, "oea+ep": tr.OEA, "budget+ep": tr.BUDGET}
SCORINGS = {"softmax": tr.SOFTMAX, "topk_softmax": tr.TOPK_SOFTMAX, "sigmoid": tr.SIGMOID}
TYPES = dict(logits_ptr="*bf16", stride="i32", stride_s="i64", valid_ptr="*u8", fixed_ptr="*u8", bias_ptr="*fp32", sim_ptr="*fp32",
             part_a_ptr="*i32", part_b_ptr="*i32", ids_ptr="*i64", w_ptr="*fp32", place_ptr="*i64", T="i32", nb="i32",
             rsf="fp32", k_param="i32", k_max="i32", max_rank="i32", p_top="fp32", threshold="fp32", k_group="i32",
             part_len="i32", ep_ranks="i32", ep_cap="i32")


def compile_case(policy: str, scoring: str, phase: int, E: int = 128) -> float:
    """Seconds to compile one case at E experts, K=8 (DeepSeek-V3's groups for sigmoid), every option on,
    with the block sizes `moe_reroute.kernels.route` gives E on a GPU."""
    import torch

    from moe_reroute.kernels import _TILE, _p2, block_tokens

    E_BLOCK = max(_p2(E), 16)
    consts = dict(POLICY=POLICIES[policy], SCORING=SCORINGS[scoring], PHASE=phase, K=8, K_BLOCK=8, E=E,
                  E_BLOCK=E_BLOCK, BT=block_tokens(64, E, torch.device("cuda")), T_CHUNK=64,
                  P_CHUNK=max(1, min(64, _TILE // E_BLOCK)), HAS_VALID=True, HAS_FIXED=True, HAS_BIAS=False,
                  RENORM=True, CAP_RENORM=True, N_GROUP=1, TOPK_GROUP=1, GROUP_SIZE=E, G_BLOCK=2, ROUND_BF16=False,
                  ROUND_FP16=False, TOP_P=policy.startswith("oea"), LIMIT_RANK=policy.startswith("oea"), GRID=256,
                  CHUNK=max(1, min(E_BLOCK, _TILE // E_BLOCK)), HAS_EP=policy.endswith("+ep"))
    if scoring == "sigmoid":
        consts.update(HAS_BIAS=True, N_GROUP=8, TOPK_GROUP=4, GROUP_SIZE=E // 8, G_BLOCK=8)
    if scoring == "topk_softmax":
        consts.update(ROUND_BF16=True)
    names = tr.route_kernel.arg_names
    types = dict(TYPES, part_a_ptr="*fp64") if policy == "xshare" else TYPES  # xshare's parts: float64 logit sums
    signature = {a: "constexpr" if a in consts else types[a] for a in names}
    src = ASTSource(tr.route_kernel, signature, {(names.index(k),): v for k, v in consts.items()})
    t0 = time.time()
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    return time.time() - t0


def cases(args: list[str]):
    for a in args or [f"{p}:{s}" for p in POLICIES for s in SCORINGS]:
        parts = a.split(":")
        policy, scorings = parts[0], [parts[1]] if len(parts) > 1 else list(SCORINGS)
        for s in scorings:
            every = [0, 1, 2, 3] if policy == "lynx" else [0, 1, 2]
            phases = [int(parts[2])] if len(parts) > 2 else ([0] if policy in ("native", "cap") else every)
            for ph in phases:
                yield policy, s, ph


if __name__ == "__main__":
    args, experts = sys.argv[1:], 128
    if args[:1] == ["--experts"]:
        experts, args = int(args[1]), args[2:]
    failed = 0
    for case in cases(args):
        try:
            print(f"ok   {case} E={experts} {compile_case(*case, experts):.1f}s", flush=True)
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"FAIL {case} {type(e).__name__}: {str(e)[:2000]}", flush=True)
    sys.exit(1 if failed else 0)
