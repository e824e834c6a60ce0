"""Every policy as one Triton kernel: scoring, ranking, the batch-wide set and the K output slots, fused.

T = tokens, E = experts (padded to E_BLOCK, a power of 2), K = experts per token, BT = tokens per program,
S = steps.

Each program routes BT tokens of one step: the grid is (programs per step, steps), and every step is its
own batch (its own set, its own padding anchor), at offsets of one step in every tensor. Policies without a batch-wide set (native, cap) finish in one launch on
any grid. Policies with one (oea: the loaded set; sere: the primary set; budget: the expert set; xshare:
the batch's logit sums and the fixed rows' experts) run in
one launch when the batch fits one program (PHASE 0), else in two: PHASE 1 writes each program's part
of the set ([NB, E_BLOCK] int32: a union is a max, a sum of whole numbers is exact in any order; xshare's
sums are float64, as the torch policy's) and
PHASE 2 reads all parts, rebuilds the set in every program and routes. lynx needs three: PHASE 1 writes each
program's count of rows per bucket and expert ([NB, beta + 1, E_BLOCK] int32), PHASE 2 the votes of its rows
by the batch's popularity (and its fixed rows' experts), PHASE 3 rebuilds the keep set and routes.
The ranking rule is the library's with ties="lower-id": by score, equal scores to the lower expert id, so
every program computes the same ranking and the same set without talking to the others.

Fixed rows (HAS_FIXED, a [T] uint8 mask): a valid fixed row writes its native top-K, and its part of the
set is its whole native top-K (oea's base, sere's primaries, budget's forced experts). Without the mask
(HAS_FIXED False) that code is not compiled in.

Expert parallelism (HAS_EP, oea and budget with `ep=D`; `moe_reroute.policies.ep`): the set is re-chosen under a
cap on experts per rank, greedily by a key, from the expert's rank (place_ptr: [E] int64, the layer's placement),
ep_ranks D and ep_cap C (-1: oea's ceil(|base set| / D)). oea's parts then also hold the re-routed rows'
quantised native mass (part_a's second half) and the forced experts (part_b). The greedy pick is written as
counts (`_rank_capped`): an expert's place among its rank's experts in key order is the number of them ahead
of it, so no sort is needed.
"""

from __future__ import annotations

import triton
import triton.language as tl

# POLICY
NATIVE, CAP, OEA, SERE, BUDGET, XSHARE, LYNX = 0, 1, 2, 3, 4, 5, 6
# SCORING
SOFTMAX, TOPK_SOFTMAX, SIGMOID = 0, 1, 2


@triton.jit
def _pick(key, avail, cols, BIG: tl.constexpr):
    """The best available expert of each row: highest key, ties to the lower id. [BT] (BIG: none available)."""
    v = tl.where(avail, key, float("-inf"))
    m = tl.max(v, axis=1)
    idx = tl.min(tl.where(avail & (v == m[:, None]), cols[None, :], BIG), axis=1)
    # a NaN key matches nothing: fall back to the lowest available id (garbage in, ids still in range)
    low = tl.min(tl.where(avail, cols[None, :], BIG), axis=1)
    return tl.where(idx == BIG, low, idx)


@triton.jit
def _top_n(v, avail, cols, n, BIG: tl.constexpr):
    """[E_BLOCK] bool: the n largest of v [E_BLOCK] among `avail`, ties to the lower id."""
    sel = cols < 0
    for r in range(n):
        a = avail & ~sel
        u = tl.where(a, v, float("-inf"))
        mx = tl.max(u, axis=0)
        idx = tl.min(tl.where(a & (u == mx), cols, BIG), axis=0)
        sel = sel | (cols == idx)
    return sel


@triton.jit
def _xs_allowed(logits_ptr, stride, valid_ptr, fixed_ptr, rows, key, cols, cmask, gsum, held, T,
                m, k0, gb, g, HAS_VALID: tl.constexpr, HAS_FIXED: tl.constexpr, BIG: tl.constexpr):
    """xshare: [BT, E_BLOCK] the experts each of `rows` may take: the batch's best m by logit sum (gsum,
    [E_BLOCK] float64), the row's own first k0 ranks, its group's best gb (groups of g consecutive rows,
    summed here from the group's counted rows; a remainder row takes the best gb of gsum), and `held`."""
    live = (rows >= 0)[:, None]
    allowed = (cols[None, :] < 0) & live
    allowed = allowed | _top_n(gsum, cmask, cols, m, BIG)[None, :]
    avail = cmask[None, :] & live
    for r in range(k0):
        idx = _pick(key, avail, cols, BIG)
        sel = cols[None, :] == idx[:, None]
        allowed = allowed | sel
        avail = avail & ~sel
    g1 = tl.maximum(g, 1)
    in_full = rows < T // g1 * g1
    start = rows // g1 * g1
    acc = tl.zeros([rows.shape[0], cols.shape[0]], tl.float64)
    n_rows = g
    if gb == 0:
        n_rows = 0
    for i in range(n_rows):  # the group's rows, in order
        r2 = start + i
        c2 = in_full
        if HAS_VALID:
            c2 = c2 & (tl.load(valid_ptr + r2, mask=c2, other=0) != 0)
        if HAS_FIXED:
            c2 = c2 & (tl.load(fixed_ptr + r2, mask=c2, other=0) == 0)
        x2 = tl.load(logits_ptr + r2[:, None].to(tl.int64) * stride + cols[None, :], mask=c2[:, None] & cmask[None, :],
                     other=0.0)
        acc = acc + x2.to(tl.float32).to(tl.float64)
    key_g = tl.where(in_full[:, None], acc, gsum[None, :])
    avail = cmask[None, :] & live
    for r in range(gb):
        idx = _pick(key_g, avail, cols, BIG)
        sel = cols[None, :] == idx[:, None]
        allowed = allowed | sel
        avail = avail & ~sel
    return allowed | held[None, :]


@triton.jit
def _rank_capped(key, forced, allowed, place, cap, total, cols, cmask, E: tl.constexpr, E_BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr, HAS_CAP: tl.constexpr, HAS_TOTAL: tl.constexpr):
    """[E_BLOCK] bool: `moe_reroute.policies.ep.rank_capped_set` over E experts. Taken greedily by decreasing
    key (int64; equal keys: lower id): a forced expert always; another if allowed and (HAS_CAP) fewer than
    `cap` experts of its rank (place: [E_BLOCK] ranks) come before it in key order, and (HAS_TOTAL) fewer
    than `total` eligible experts in all do. Counts over [CHUNK, E_BLOCK] tiles, chunk by chunk. Without
    HAS_CAP it is budget's plain set: the forced experts, then the best by key up to `total`."""
    if HAS_CAP:
        elig = cols < 0
        for c in range(E_BLOCK // CHUNK):  # a loop, not unrolled: compile time
            cc = c * CHUNK + tl.arange(0, CHUNK)
            at = cols[None, :] == cc[:, None]  # [CHUNK, E_BLOCK]
            kc = tl.sum(tl.where(at, key[None, :], 0), axis=1)
            pc = tl.sum(tl.where(at, place[None, :], 0), axis=1)
            fc = tl.max(tl.where(at, forced[None, :].to(tl.int32), 0), axis=1) > 0
            ac = tl.max(tl.where(at, allowed[None, :].to(tl.int32), 0), axis=1) > 0
            ahead = (key[None, :] > kc[:, None]) | ((key[None, :] == kc[:, None]) & (cols[None, :] < cc[:, None]))
            ahead = ahead & cmask[None, :] & (place[None, :] == pc[:, None])
            ec = (fc | ((tl.sum(ahead.to(tl.int32), axis=1) < cap) & ac)) & (cc < E)
            elig = elig | (tl.max(tl.where(at, ec[:, None].to(tl.int32), 0), axis=0) > 0)
    else:
        elig = (forced | allowed) & cmask
    if HAS_TOTAL:
        take = forced & cmask
        for c in range(E_BLOCK // CHUNK):  # a loop, not unrolled: compile time
            cc = c * CHUNK + tl.arange(0, CHUNK)
            at = cols[None, :] == cc[:, None]
            kc = tl.sum(tl.where(at, key[None, :], 0), axis=1)
            ec = tl.max(tl.where(at, elig[None, :].to(tl.int32), 0), axis=1) > 0
            ahead = (key[None, :] > kc[:, None]) | ((key[None, :] == kc[:, None]) & (cols[None, :] < cc[:, None]))
            ahead = ahead & elig[None, :]
            tc = ec & (tl.sum(ahead.to(tl.int32), axis=1) < total)
            take = take | (tl.max(tl.where(at, tc[:, None].to(tl.int32), 0), axis=0) > 0)
    else:
        take = elig
    return take


@triton.jit
def _lynx_levels(x, alpha, beta):
    """lynx: [BT, E_BLOCK] int32 bucket depths l = -q, q = ceil(alpha * (x - max x)) in float32, every
    q <= -beta at -beta (so 0 <= l <= beta; -inf logits and padded columns at beta)."""
    raw = alpha * (x - tl.max(x, axis=1)[:, None])
    return tl.where(raw <= -beta, beta, -tl.ceil(raw)).to(tl.int32)


@triton.jit
def _lynx_rows(valid_ptr, T, T_CHUNK: tl.constexpr, HAS_VALID: tl.constexpr):
    """lynx: B, the step's valid rows (at least 1), float64."""
    nv = T - T
    if HAS_VALID:
        for c in range(0, T, T_CHUNK):
            ta = c + tl.arange(0, T_CHUNK)
            nv += tl.sum(tl.where(tl.load(valid_ptr + ta, mask=ta < T, other=0) != 0, 1, 0), axis=0)
    else:
        nv = T
    return tl.maximum(nv, 1).to(tl.float64)


@triton.jit
def _lynx_votes(lv, rcount, rvote, cols, cmask, part_a_ptr, nb, part_len, B, beta,
                LOCAL: tl.constexpr, K: tl.constexpr, E_BLOCK: tl.constexpr, P_CHUNK: tl.constexpr,
                BIG: tl.constexpr):
    """lynx: [BT, E_BLOCK] each `rvote` row's K best by q + (pop - h) / B, ties to the lower id. pop, the
    sum of h = B ** -l over the step's valid rows, by Horner's rule over the buckets from the deepest, from
    the counts of this program's `rcount` rows (LOCAL: the program holds the step) or of every program's
    part (part_a: [nb, beta + 1, E_BLOCK] int32 counts); h = 1 / B / B ... (l divisions). Every value is an
    exact count or a correctly rounded float64 operation in a fixed order: the torch policy's, bit for bit."""
    pop = tl.zeros([E_BLOCK], tl.float64)
    for i in range(beta + 1):
        d = beta - i
        if LOCAL:
            c = tl.sum(tl.where(rcount[:, None] & (lv == d) & cmask[None, :], 1, 0), axis=0)
        else:
            c = tl.zeros([E_BLOCK], tl.int32)
            for p0 in range(0, nb, P_CHUNK):
                pr = p0 + tl.arange(0, P_CHUNK)
                parts = tl.load(part_a_ptr + pr[:, None] * part_len + d * E_BLOCK + cols[None, :],
                                mask=(pr < nb)[:, None] & (cols[None, :] < E_BLOCK), other=0)
                c += tl.sum(parts, axis=0)
        pop = pop / B + c.to(tl.float64)
    h = tl.full(lv.shape, 1.0, tl.float64)
    step = B / B
    for d in range(1, beta + 1):
        step = step / B
        h = tl.where(lv == d, step, h)
    mod = -(lv.to(tl.float64)) + (pop[None, :] - h) / B
    votes = (cols[None, :] < 0) & rvote[:, None]
    avail = cmask[None, :] & rvote[:, None]
    for j in tl.static_range(K):
        idx = _pick(mod, avail, cols, BIG)
        sel = cols[None, :] == idx[:, None]
        votes = votes | (sel & rvote[:, None])
        avail = avail & ~sel
    return votes


@triton.jit
def _round_bf16(x):
    """float32 rounded to the nearest bfloat16 (ties to even), kept in float32; by bits, so that the
    interpreter (which truncates casts to bfloat16) and the GPU agree. x finite."""
    b = x.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16  # shifts keep uint32 (a 0xFFFF0000 mask would widen it)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _col(tile, kc, j):
    """Column j of a [BT, K_BLOCK] tile. [BT]"""
    return tl.sum(tl.where(kc[None, :] == j, tile, tl.zeros_like(tile)), axis=1)


@triton.jit
def _scores(logits_ptr, stride, bias_ptr, rows, rmask, rvalid, cols, cmask,
            SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, SANITIZE: tl.constexpr,
            N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
            G_BLOCK: tl.constexpr, BIG: tl.constexpr):
    """(x, key, gate) [BT, E_BLOCK] float32: raw logits, what the model ranks by (-inf: never), gate mass."""
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if SANITIZE:
        x = tl.where(rvalid[:, None], x, 0.0)
    x = tl.where(cmask[None, :], x, float("-inf"))
    if SCORING == 2:
        s = 1.0 / (1.0 + tl.exp(-x))
        s = tl.where(cmask[None, :], s, 0.0)
        key = s
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            key = s + b[None, :]
        key = tl.where(cmask[None, :], key, float("-inf"))
        if TOPK_GROUP < N_GROUP:
            g_of = cols // GROUP_SIZE
            gc = tl.arange(0, G_BLOCK)
            gscore = tl.full([key.shape[0], G_BLOCK], float("-inf"), tl.float32)
            for g in tl.static_range(N_GROUP):
                ing = (g_of == g)[None, :] & cmask[None, :]
                v = tl.where(ing, key, float("-inf"))
                m1 = tl.max(v, axis=1)
                i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], BIG), axis=1)
                m2nd = tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), v), axis=1)
                gscore = tl.where(gc[None, :] == g, (m1 + m2nd)[:, None], gscore)
            gavail = (gc < N_GROUP)[None, :] & (gscore == gscore)
            chosen = gc[None, :] < 0
            for j in tl.static_range(TOPK_GROUP):
                gi = _pick(gscore, gavail, gc, BIG)
                hit = gc[None, :] == gi[:, None]
                chosen = chosen | hit
                gavail = gavail & ~hit
            allowed = cols[None, :] < 0
            for g in tl.static_range(N_GROUP):
                cg = tl.max(tl.where((gc[None, :] == g) & chosen, 1, 0), axis=1) > 0
                allowed = allowed | ((g_of == g)[None, :] & cg[:, None])
            key = tl.where(allowed, key, float("-inf"))
        gate = s
    else:
        m = tl.max(x, axis=1)
        ex = tl.exp(x - m[:, None])
        ex = tl.where(cmask[None, :], ex, 0.0)
        key = x
        if SCORING == 0:
            gate = ex / tl.sum(ex, axis=1)[:, None]
        else:
            gate = ex
    return x, key, gate


@triton.jit
def _native(x, key, gate, cols, cmask, kc, rsf, K: tl.constexpr, K_BLOCK: tl.constexpr,
            SCORING: tl.constexpr, RENORM: tl.constexpr, ROUND_BF16: tl.constexpr,
            ROUND_FP16: tl.constexpr, BIG: tl.constexpr):
    """The model's top-K (ties to the lower id): ids [BT, K_BLOCK] int32, weights [BT, K_BLOCK] float32,
    and the gate mass of each chosen expert."""
    BT: tl.constexpr = x.shape[0]
    avail = (cols[None, :] < BIG) & cmask[None, :]
    ids = tl.zeros([BT, K_BLOCK], tl.int32)
    gk = tl.zeros([BT, K_BLOCK], tl.float32)
    xk = tl.full([BT, K_BLOCK], float("-inf"), tl.float32)
    for j in tl.static_range(K):
        idx = _pick(key, avail, cols, BIG)
        sel = cols[None, :] == idx[:, None]
        avail = avail & ~sel
        ids = tl.where(kc[None, :] == j, idx[:, None], ids)
        gk = tl.where(kc[None, :] == j, tl.sum(tl.where(sel, gate, 0.0), axis=1)[:, None], gk)
        xk = tl.where(kc[None, :] == j, tl.max(tl.where(sel, x, float("-inf")), axis=1)[:, None], xk)
    kin = (kc < K)[None, :]
    if SCORING == 1:  # softmax over the K chosen logits, in the logits' dtype (as GPT-OSS)
        mk = tl.max(xk, axis=1)
        ek = tl.where(kin, tl.exp(xk - mk[:, None]), 0.0)
        w = ek / tl.sum(ek, axis=1)[:, None]
        if ROUND_BF16:
            w = _round_bf16(w)
        if ROUND_FP16:
            w = w.to(tl.float16).to(tl.float32)
    elif SCORING == 0:
        w = gk
        if RENORM:
            w = w / tl.sum(w, axis=1)[:, None]
    else:
        w = gk
        if RENORM:
            w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
        w = w * rsf
    w = tl.where(kin, w, 0.0)
    return ids, w, gk


@triton.jit
def _mass_q(gk, nat_ids, cols, kc, K: tl.constexpr, E_BLOCK: tl.constexpr, GRID: tl.constexpr):
    """[BT, E_BLOCK] int32: each row's native top-K weights normalised to sum 1, in whole 1/GRIDths (at least
    one), at its native experts; 0 elsewhere (budget's mass, whose sums are exact in any order)."""
    BT: tl.constexpr = gk.shape[0]
    mass_tot = tl.maximum(tl.sum(gk, axis=1), 1.1754943508222875e-38)
    q = tl.zeros([BT, E_BLOCK], tl.int32)
    for j in tl.static_range(K):
        e = _col(nat_ids, kc, j)
        qj = tl.maximum(tl.floor(_col(gk, kc, j) / mass_tot * GRID + 0.5).to(tl.int32), 1)
        q = tl.where(cols[None, :] == e[:, None], qj[:, None], q)
    return q


@triton.jit
def _weights(gate, kept_ids, keep, kc, rsf, SCORING: tl.constexpr, RENORM: tl.constexpr, K_BLOCK: tl.constexpr):
    """Gate weights of the kept slots, renormalised over them if the model renormalises. [BT, K_BLOCK]"""
    BT: tl.constexpr = gate.shape[0]
    w = tl.zeros([BT, K_BLOCK], tl.float32)
    for j in tl.static_range(K_BLOCK):
        e = _col(kept_ids, kc, j)
        gj = tl.sum(tl.where(tl.arange(0, gate.shape[1])[None, :] == e[:, None], gate, 0.0), axis=1)
        w = tl.where(kc[None, :] == j, gj[:, None], w)
    w = tl.where(keep, w, 0.0)
    if RENORM or SCORING == 1:
        if SCORING == 2:
            w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
        else:
            w = w / (tl.sum(w, axis=1)[:, None] + 1.1754943508222875e-38)
    if SCORING == 2:
        w = w * rsf
    return w


@triton.jit
def _unchanged(kept_ids, keep, nat_ids, nat_w, w, kc, K: tl.constexpr):
    """The model's own weights on rows that kept exactly their native top-K."""
    kin = (kc < K)[None, :]
    diff = tl.sum(tl.where(kin & ((kept_ids != nat_ids) | ~keep), 1, 0), axis=1)
    return tl.where((diff == 0)[:, None], nat_w, w)


# Integers that vary with the batch or the batch-size bucket are not specialised (Triton would otherwise
# compile one variant for 1, one for multiples of 16 and one for the rest): every batch size of a layer
# runs the same compiled kernel per phase.
@triton.jit(do_not_specialize=["T", "nb", "stride_s", "k_param", "k_max", "max_rank", "k_group"])
def route_kernel(
    logits_ptr, stride, stride_s, valid_ptr, fixed_ptr, bias_ptr, sim_ptr, part_a_ptr, part_b_ptr, ids_ptr, w_ptr,
    place_ptr, T, nb, rsf, k_param, k_max, max_rank, p_top, threshold, k_group, part_len, ep_ranks, ep_cap,
    POLICY: tl.constexpr, SCORING: tl.constexpr, PHASE: tl.constexpr,
    K: tl.constexpr, K_BLOCK: tl.constexpr, E: tl.constexpr, E_BLOCK: tl.constexpr, BT: tl.constexpr,
    T_CHUNK: tl.constexpr, P_CHUNK: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_FIXED: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    CAP_RENORM: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, G_BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, TOP_P: tl.constexpr, LIMIT_RANK: tl.constexpr,
    GRID: tl.constexpr, CHUNK: tl.constexpr, HAS_EP: tl.constexpr,
):
    """Route BT tokens of one layer. k_param: cap's k, oea's k0, sere's primary, budget's budget, xshare's m
    (xshare: k_max = k0, max_rank = group budget, k_group = group size; m = k0 = group budget = 0: native),
    lynx's beta (p_top: its alpha; k_max = 1: variant quant_flatten_remove). part_len: elements of one program's part_a (E_BLOCK; lynx: a count per
    bucket, (beta + 1) * E_BLOCK; oea with HAS_EP: 2 * E_BLOCK). HAS_EP: place_ptr, ep_ranks, ep_cap (module
    docstring)."""
    BIG: tl.constexpr = 1 << 30
    pid = tl.program_id(0)
    step = tl.program_id(1).to(tl.int64)  # each step is its own batch: move every pointer to its rows
    logits_ptr += step * stride_s
    valid_ptr += step * T
    fixed_ptr += step * T
    part_a_ptr += step * nb * part_len
    part_b_ptr += step * nb * E_BLOCK
    ids_ptr += step * T * K
    w_ptr += step * T * K
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    cols = tl.arange(0, E_BLOCK)
    cmask = cols < E
    kc = tl.arange(0, K_BLOCK)
    if HAS_VALID:
        rvalid = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
    else:
        rvalid = rmask
    if HAS_FIXED:  # rows that keep native routing; an invalid row is padding whatever it says
        rfixed = (tl.load(fixed_ptr + rows, mask=rmask, other=0) != 0) & rvalid
    else:
        rfixed = rows < 0
    SANITIZE: tl.constexpr = POLICY != 0
    x, key, gate = _scores(logits_ptr, stride, bias_ptr, rows, rmask, rvalid, cols, cmask, SCORING, HAS_BIAS,
                           SANITIZE, N_GROUP, TOPK_GROUP, GROUP_SIZE, G_BLOCK, BIG)
    nat_ids, nat_w, gk = _native(x, key, gate, cols, cmask, kc, rsf, K, K_BLOCK, SCORING, RENORM,
                                 ROUND_BF16, ROUND_FP16, BIG)
    kin = (kc < K)[None, :]
    out_mask = rmask[:, None] & kin
    out_off = rows[:, None].to(tl.int64) * K + kc[None, :]
    if HAS_FIXED and POLICY >= 2:  # each row's native top-K as a set: a fixed row's part of the batch's set
        nat_set = cols[None, :] < 0
        for j in tl.static_range(K):
            nat_set = nat_set | (cols[None, :] == _col(nat_ids, kc, j)[:, None])
        nat_set = nat_set & rfixed[:, None]

    if POLICY == 0:
        tl.store(ids_ptr + out_off, nat_ids.to(tl.int64), mask=out_mask)
        tl.store(w_ptr + out_off, nat_w, mask=out_mask)
    else:
        # ---- this program's part of the batch-wide set (PHASE 0 and 1) ----
        if POLICY == 2:  # oea: base sets, n_i = min(k0, t_i)
            n = tl.zeros([BT], tl.int32) + k_param
            if TOP_P:
                allowed = key > float("-inf")
                total = tl.sum(tl.where(allowed, gate, 0.0), axis=1)
                total = tl.maximum(total, 1.1754943508222875e-38)
                cum = tl.zeros([BT], tl.float32)
                below = tl.zeros([BT], tl.int32)
                for j in tl.static_range(K):
                    pj = _col(gk, kc, j) / total
                    cum = cum + pj
                    below = below + tl.where((cum < p_top) & (j < k_param), 1, 0)
                n = tl.minimum(below + 1, k_param)
            base = cols[None, :] < 0
            for j in tl.static_range(K):
                e = _col(nat_ids, kc, j)
                base = base | ((cols[None, :] == e[:, None]) & (j < n)[:, None])
            members = base & rvalid[:, None]
            if HAS_FIXED:
                members = tl.where(rfixed[:, None], nat_set, members)
            part_a = tl.max(tl.where(members, 1, 0), axis=0)  # [E_BLOCK]
            if HAS_EP:  # the re-routed rows' quantised native mass; forced: their top-1s, the fixed rows' experts
                rerouted = rvalid & ~rfixed
                q = _mass_q(gk, nat_ids, cols, kc, K, E_BLOCK, GRID)
                part_c = tl.sum(tl.where(rerouted[:, None], q, 0), axis=0)
                forced_rows = (cols[None, :] == _col(nat_ids, kc, 0)[:, None]) & rerouted[:, None]
                if HAS_FIXED:
                    forced_rows = forced_rows | nat_set
                part_b = tl.max(tl.where(forced_rows, 1, 0), axis=0)
        elif POLICY == 3:  # sere: primary slots
            prim = cols[None, :] < 0
            for j in tl.static_range(K):
                e = _col(nat_ids, kc, j)
                prim = prim | ((cols[None, :] == e[:, None]) & (j < k_param))
            prim = prim & rvalid[:, None]
            if HAS_FIXED:
                prim = prim | nat_set
            part_a = tl.max(tl.where(prim, 1, 0), axis=0)
        elif POLICY == 4:  # budget: quantised native mass per expert, and the forced top-1s
            part_a = tl.sum(tl.where(rvalid[:, None], _mass_q(gk, nat_ids, cols, kc, K, E_BLOCK, GRID), 0), axis=0)
            top1 = _col(nat_ids, kc, 0)
            forced_rows = (cols[None, :] == top1[:, None]) & rvalid[:, None]
            if HAS_FIXED:
                forced_rows = forced_rows | nat_set
            part_b = tl.max(tl.where(forced_rows, 1, 0), axis=0)
        elif POLICY == 5:  # xshare: the counted rows' logit sums (float64), and the valid fixed rows' experts
            counted = rvalid & ~rfixed
            part_a = tl.sum(tl.where(counted[:, None] & cmask[None, :], x.to(tl.float64), 0.0), axis=0)
            if HAS_FIXED:
                part_b = tl.max(tl.where(nat_set, 1, 0), axis=0)
            else:
                part_b = tl.zeros([E_BLOCK], tl.int32)
        elif POLICY == 6:  # lynx: PHASE 1 bucket counts, PHASE 2 votes (and fixed rows' experts), PHASE 3 routes
            lv = _lynx_levels(x, p_top, k_param)
            if PHASE == 1:
                for d in range(k_param + 1):
                    cnt = tl.sum(tl.where(rvalid[:, None] & (lv == d) & cmask[None, :], 1, 0), axis=0)
                    tl.store(part_a_ptr + pid * part_len + d * E_BLOCK + cols, cnt)
            if PHASE == 0 or PHASE == 2:
                votes = _lynx_votes(lv, rvalid, rvalid & ~rfixed, cols, cmask, part_a_ptr, nb, part_len,
                                    _lynx_rows(valid_ptr, T, T_CHUNK, HAS_VALID), k_param, PHASE == 0, K, E_BLOCK,
                                    P_CHUNK, BIG)
                if HAS_FIXED:
                    votes = votes | nat_set
                part_b = tl.max(tl.where(votes, 1, 0), axis=0)
                if PHASE == 2:
                    tl.store(part_b_ptr + pid * E_BLOCK + cols, part_b)
                else:
                    in_set = (part_b > 0) & cmask
            if PHASE == 3:
                acc_b = tl.zeros([E_BLOCK], tl.int32)
                for c in range(0, nb, P_CHUNK):
                    pr = c + tl.arange(0, P_CHUNK)
                    pm = (pr < nb)[:, None] & (cols[None, :] < E_BLOCK)
                    acc_b = tl.maximum(acc_b, tl.max(tl.load(part_b_ptr + pr[:, None] * E_BLOCK + cols[None, :],
                                                             mask=pm, other=0), axis=0))
                in_set = (acc_b > 0) & cmask

        if POLICY >= 2 and POLICY != 6 and PHASE != 2:
            tl.store(part_a_ptr + pid * part_len + cols, part_a)
            if POLICY >= 4 or (POLICY == 2 and HAS_EP):
                tl.store(part_b_ptr + pid * E_BLOCK + cols, part_b)
            if POLICY == 2 and HAS_EP:
                tl.store(part_a_ptr + pid * part_len + E_BLOCK + cols, part_c)

        if PHASE != 1 and not (POLICY == 6 and PHASE == 2):  # (PHASE 1, and lynx's 2, end with parts written)
            if POLICY >= 2 and POLICY != 6:
                if PHASE == 0:
                    tl.debug_barrier()
                # ---- the whole batch's set, rebuilt from every program's part ----
                if POLICY == 5:
                    acc_a = tl.zeros([E_BLOCK], tl.float64)
                else:
                    acc_a = tl.zeros([E_BLOCK], tl.int32)
                acc_b = tl.zeros([E_BLOCK], tl.int32)
                acc_c = tl.zeros([E_BLOCK], tl.int32)
                for c in range(0, nb, P_CHUNK):
                    pr = c + tl.arange(0, P_CHUNK)
                    pm = (pr < nb)[:, None] & (cols[None, :] < E_BLOCK)
                    parts = tl.load(part_a_ptr + pr[:, None] * part_len + cols[None, :], mask=pm, other=0)
                    if POLICY >= 4 or (POLICY == 2 and HAS_EP):
                        acc_b = tl.maximum(acc_b, tl.max(tl.load(part_b_ptr + pr[:, None] * E_BLOCK + cols[None, :],
                                                                 mask=pm, other=0), axis=0))
                    if POLICY >= 4:
                        acc_a = acc_a + tl.sum(parts, axis=0)
                    else:
                        acc_a = tl.maximum(acc_a, tl.max(parts, axis=0))
                    if POLICY == 2 and HAS_EP:
                        acc_c = acc_c + tl.sum(tl.load(part_a_ptr + pr[:, None] * part_len + E_BLOCK + cols[None, :],
                                                       mask=pm, other=0), axis=0)
                if POLICY == 4:  # budget: the forced experts, then the most mass up to the budget (under EP: the cap)
                    forced = (acc_b > 0) & cmask
                    if HAS_EP:
                        place = tl.load(place_ptr + cols, mask=cmask, other=0)
                    else:
                        place = cols
                    in_set = _rank_capped(tl.where(forced, 1 << 62, acc_a.to(tl.int64)), forced, cmask, place, ep_cap,
                                          k_param, cols, cmask, E, E_BLOCK, CHUNK, HAS_EP, True)
                elif POLICY == 5:
                    gsum = acc_a
                    held = (acc_b > 0) & cmask
                else:
                    in_set = (acc_a > 0) & cmask
                if POLICY == 2 and HAS_EP:  # oea: the set under a cap on experts per rank (policies/ep.py)
                    place = tl.load(place_ptr + cols, mask=cmask, other=0)
                    forced = (acc_b > 0) & cmask
                    # forced, then the base set, then the rest, each by mass
                    ekey = tl.where(in_set, 1 << 40, 0).to(tl.int64) + acc_c.to(tl.int64)
                    ekey = tl.where(forced, 1 << 62, ekey)
                    cap = ep_cap
                    if ep_cap < 0:
                        cap = (tl.sum(in_set.to(tl.int32), axis=0) + ep_ranks - 1) // ep_ranks
                    in_set = _rank_capped(ekey, forced, ekey > 0, place, cap, 0, cols, cmask, E, E_BLOCK, CHUNK,
                                          True, False)

            # ---- the anchor for padding rows: top-1 of the first valid row (row 0 if none) ----
            if HAS_VALID:
                first = T
                for c in range(0, T, T_CHUNK):
                    ta = c + tl.arange(0, T_CHUNK)
                    va = tl.load(valid_ptr + ta, mask=ta < T, other=0) != 0
                    first = tl.minimum(first, tl.min(tl.where(va, ta, T), axis=0))
                first_valid = first < T
                first = tl.where(first_valid, first, 0)
                arow = tl.zeros([BT], tl.int32) + first
                avalid = (tl.zeros([BT], tl.int32) + first_valid.to(tl.int32)) > 0
                _, akey, _ = _scores(logits_ptr, stride, bias_ptr, arow, arow < T, avalid, cols, cmask, SCORING, HAS_BIAS,
                                     SANITIZE, N_GROUP, TOPK_GROUP, GROUP_SIZE, G_BLOCK, BIG)
                anchor = _pick(akey, cmask[None, :] & (arow >= 0)[:, None], cols, BIG)  # [BT], all equal
                if POLICY >= 5:  # the first valid row's slot 0 is its best allowed expert, not always its top-1
                    anat = cols[None, :] < 0
                    aav = cmask[None, :] & (arow >= 0)[:, None]
                    for j in tl.static_range(K):
                        aidx = _pick(akey, aav, cols, BIG)
                        asel = cols[None, :] == aidx[:, None]
                        anat = anat | asel
                        aav = aav & ~asel
                    if POLICY == 5:
                        a_ok = _xs_allowed(logits_ptr, stride, valid_ptr, fixed_ptr, arow, akey, cols, cmask, gsum,
                                           held, T, k_param, k_max, max_rank, k_group, HAS_VALID, HAS_FIXED, BIG)
                        a_on = ~((k_param == 0) & (k_max == 0) & (max_rank == 0))
                    else:
                        a_ok = in_set[None, :] & (arow >= 0)[:, None]
                        a_on = avalid
                    a_ok = a_ok & ((akey > float("-inf")) | anat) & cmask[None, :]
                    a_has = tl.max(tl.where(a_ok, 1, 0), axis=1) > 0
                    a_move = a_has & avalid & a_on
                    if HAS_FIXED:
                        a_move = a_move & (tl.load(fixed_ptr + arow) == 0)
                    anchor = tl.where(a_move, _pick(akey, a_ok, cols, BIG), anchor)

            if POLICY == 1:  # cap: the model's top-k, its weights cut (and rescaled to their native total)
                keep = (kc[None, :] < k_param) & kin
                out_ids = tl.where(keep, nat_ids, _col(nat_ids, kc, 0)[:, None])
                w = tl.where(keep, nat_w, 0.0)
                if CAP_RENORM:
                    w = w * (tl.sum(nat_w, axis=1) / tl.maximum(tl.sum(w, axis=1), 1.1754943508222875e-38))[:, None]
            elif POLICY == 3:  # sere: move secondary experts outside P to their most similar primary expert
                new_ids = nat_ids
                for j in tl.static_range(K):
                    if j > 0:
                        e = _col(nat_ids, kc, j)
                        e_in = tl.max(tl.where((cols[None, :] == e[:, None]) & in_set[None, :], 1, 0), axis=1) > 0
                        srow = tl.load(sim_ptr + e[:, None].to(tl.int64) * E + cols[None, :],
                                       mask=rmask[:, None] & cmask[None, :], other=0.0)
                        srow = tl.where(in_set[None, :], srow, float("-inf"))
                        best_sim = tl.max(srow, axis=1)
                        best = tl.min(tl.where(in_set[None, :] & (srow == best_sim[:, None]), cols[None, :], BIG), axis=1)
                        best = tl.where(best == BIG, 0, best)
                        critical = (threshold > 0) & (best_sim < threshold)
                        move = (j >= k_param) & ~e_in & ~critical
                        new_ids = tl.where((kc[None, :] == j) & move[:, None], best[:, None], new_ids)
                w = tl.zeros([BT, K_BLOCK], tl.float32)
                for j in tl.static_range(K):
                    nj = _col(new_ids, kc, j)
                    same = (new_ids == nj[:, None]) & (kc[None, :] <= j)
                    fj = tl.min(tl.where(same, kc[None, :], K_BLOCK), axis=1)
                    w = w + tl.where(kc[None, :] == fj[:, None], _col(nat_w, kc, j)[:, None], 0.0)
                out_ids = new_ids
            else:  # oea, budget, xshare, lynx: the best k_max (else K) experts of each token among those it may take
                if POLICY == 2:
                    if HAS_EP:  # a base expert the cap dropped is not kept (the top-1 is always in the set)
                        base = base & in_set[None, :]
                    elig = base | (in_set[None, :] & (key > float("-inf")))
                    if LIMIT_RANK:  # only the token's first max_rank ranks may be piggybacked
                        # loop-carried tiles keep one shape: [BT, E_BLOCK] from the start
                        ranked = (cols[None, :] < 0) & (rows >= 0)[:, None]
                        avail = cmask[None, :] & (rows >= 0)[:, None]
                        for r in range(max_rank):
                            idx = _pick(key, avail, cols, BIG)
                            sel = cols[None, :] == idx[:, None]
                            ranked = ranked | sel
                            avail = avail & ~sel
                        elig = base | (elig & ranked)
                    take = k_max
                if POLICY >= 4:
                    # budget, xshare, lynx: a token's native top-K stays allowed where its logits are -inf (fewer
                    # than K finite ones), as `scoring.route_within_set` keeps it, so that the no-op setting is native
                    # routing exactly
                    nat_row = cols[None, :] < 0
                    for j in tl.static_range(K):
                        nat_row = nat_row | (cols[None, :] == _col(nat_ids, kc, j)[:, None])
                    finite = (key > float("-inf")) | nat_row
                    take = K
                if POLICY == 4:  # budget: its set was chosen above
                    elig = in_set[None, :] & finite
                if POLICY == 5:
                    allowed = _xs_allowed(logits_ptr, stride, valid_ptr, fixed_ptr, rows, key, cols, cmask, gsum,
                                          held, T, k_param, k_max, max_rank, k_group, HAS_VALID, HAS_FIXED, BIG)
                    elig = allowed & finite
                if POLICY == 6:  # lynx: the batch's keep set
                    elig = in_set[None, :] & finite
                keep = kc[None, :] < 0
                out_ids = tl.zeros([BT, K_BLOCK], tl.int32)
                avail = elig & cmask[None, :]
                for j in tl.static_range(K):
                    idx = _pick(key, avail, cols, BIG)
                    ok = (tl.max(tl.where(avail, 1, 0), axis=1) > 0) & (j < take)
                    avail = avail & ~((cols[None, :] == idx[:, None]) & ok[:, None])
                    out_ids = tl.where((kc[None, :] == j) & ok[:, None], idx[:, None], out_ids)
                    keep = keep | ((kc[None, :] == j) & ok[:, None])
                if POLICY >= 5:  # a row allowed nothing keeps its best
                    none = (tl.max(tl.where(keep, 1, 0), axis=1) == 0)[:, None] & (kc[None, :] == 0)
                    out_ids = tl.where(none, nat_ids, out_ids)
                    keep = keep | none
                out_ids = tl.where(keep, out_ids, _col(out_ids, kc, 0)[:, None])
                if POLICY == 6:  # renormalised, or rescaled to the native top-K mass (Lynx)
                    w = _weights(gate, out_ids, keep, kc, rsf, SCORING, True, K_BLOCK)
                    if not RENORM:
                        w = w * tl.sum(nat_w, axis=1)[:, None]
                else:
                    w = _weights(gate, out_ids, keep, kc, rsf, SCORING, RENORM, K_BLOCK)
                w = _unchanged(out_ids, keep, nat_ids, nat_w, w, kc, K)
                if POLICY == 6:  # quant_flatten_remove (k_max = 1): bottom-bucket slots give their weight to slot 0
                    lv_k = tl.zeros([BT, K_BLOCK], tl.int32)
                    for j in tl.static_range(K):
                        ej = _col(out_ids, kc, j)
                        lj = tl.sum(tl.where(cols[None, :] == ej[:, None], lv, 0), axis=1)
                        lv_k = tl.where(kc[None, :] == j, lj[:, None], lv_k)
                    bottom = (lv_k == k_param) & (kc[None, :] >= 1) & kin & (k_max == 1)
                    moved = tl.sum(tl.where(bottom, w, 0.0), axis=1)
                    w = tl.where(bottom, 0.0, w)
                    w = tl.where(kc[None, :] == 0, w + moved[:, None], w)
                    out_ids = tl.where(bottom, _col(out_ids, kc, 0)[:, None], out_ids)
                if POLICY == 5:  # off at this batch size: native routing
                    off = (k_param == 0) & (k_max == 0) & (max_rank == 0)
                    out_ids = tl.where(off, nat_ids, out_ids)
                    w = tl.where(off, nat_w, w)

            if HAS_FIXED:
                out_ids = tl.where(rfixed[:, None], nat_ids, out_ids)
                w = tl.where(rfixed[:, None], nat_w, w)
            if HAS_VALID:
                out_ids = tl.where(rvalid[:, None], out_ids, anchor[:, None])
                w = tl.where(rvalid[:, None], w, 0.0)
            tl.store(ids_ptr + out_off, out_ids.to(tl.int64), mask=out_mask)
            tl.store(w_ptr + out_off, w, mask=out_mask)
