"""Causal / non-causal flash-attention, forward and backward (FA2 style), q/k/v [B, H, T, D].

Kernels and their autotune configs only; launchers, autograd and torch.library wiring live
in gptfast/ops/_attention_triton.py.

Conventions shared by all kernels:
- Every tensor is addressed through explicit strides (q/k/v are strided views of a
  [B, T, 3, H, D] projection); Triton specializes a stride of 1, so the usual unit
  head-dim stride still gives vectorized loads.
- Softmax runs in base 2: scores are multiplied by qk_scale = scale * log2(e) and the saved
  log-sum-exp LSE is in log2 units, so exp2 (one MUFU op) replaces exp.
- Causal masking is bottom-right aligned (query i sees keys j <= i + Tk - Tq, as the
  reference and flash-attention). Each loop is split into blocks that need no mask at all
  (the bulk, cheap) and blocks that need one (the diagonal and the ragged tail of T).
- WINDOW (optional, a constexpr; off, the code is the causal/full one above): row b's queries
  see only keys KV_START[b] <= j < KV_END[b] ([B] int tensors, read on the device), on top of
  the causal limit, as a padding mask (left padding: the start; right padding: the end). The
  block the window starts inside and the blocks past the bulk take the masked path; the blocks
  wholly inside the window and the causal limit stay unmasked. A query that sees no key gets 0 (and
  its saved LSE is +inf, so the backward's exp2(s - LSE) is 0 there), as SDPA gives for a fully
  masked row.
- DROPOUT (optional, a constexpr; off, the code is the one above): dropout on the normalised
  weights P, as SDPA's dropout_p (kept weights scaled by 1 / (1 - p)). Whether weight (i, j) of
  head b * H + h is kept is a function of (seed, b * H + h, i * Tk + j) only (_dropout_keep:
  Philox, the 10-round counter-based generator of tl.rand), so the backward kernels regenerate
  the forward's mask whatever their tiles. The seed is an int64 tensor [1] read on the device.
  The row sums l, the max m and the saved LSE are those of the undropped P; only the P V
  product (forward) and dV, dP (backward) see the mask. delta = rowsum(dO * O) stays valid.
- Under TRITON_INTERPRET=1 nothing is autotuned: the launcher passes INTERPRETER_* configs.
"""
import functools

import triton
import triton.language as tl

from . import tma_config_allowed, tma_placeholder_block

LOG2E = 1.4426950408889634


# ---- tiles ---------------------------------------------------------------------------------

@triton.jit
def _load_tile(desc, ptrs, b, h, start, offs, bound, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               TRANS: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """Rows start + offs ([ROWS, HEAD_DIM]; TRANS: its transpose) of head (b, h) of a [B, H, T, D]
    tensor. TMA: through its descriptor at [b, h, start, 0] (rows past T read as zeros). Else
    through ptrs, the tile's pointers (already transposed if TRANS), rows >= bound read as zeros
    if MASKED."""
    if TMA:
        x = desc.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
        if TRANS:
            x = tl.trans(x)
    elif MASKED:
        if TRANS:
            x = tl.load(ptrs, mask=offs[None, :] < bound, other=0.0)
        else:
            x = tl.load(ptrs, mask=offs[:, None] < bound, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(desc, ptrs, x, b, h, start, offs, bound, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                TMA: tl.constexpr):
    """Store the [ROWS, HEAD_DIM] tile x at rows start + offs; rows >= bound are dropped (TMA:
    clipped by the descriptor's bounds)."""
    if TMA:
        desc.store([b, h, start, 0], x.reshape(1, 1, ROWS, HEAD_DIM))
    else:
        tl.store(ptrs, x, mask=offs[:, None] < bound)


@triton.jit
def _dot_operand(x, like_ptrs, UPCAST_DOT: tl.constexpr):
    """x (fp32) rounded to the element type of like_ptrs, the input dtype the dot that takes it
    multiplies in. UPCAST_DOT (interpreter only: its tl.dot multiplies bf16 as raw bits) widens it
    back to fp32 after the rounding, so the CPU tests see the rounding a GPU does."""
    y = x.to(like_ptrs.dtype.element_ty)
    if UPCAST_DOT:
        y = y.to(tl.float32)
    return y


@triton.jit
def _window(KV_START, KV_END, b, Tk, full_hi, hi, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, head_hi, full_hi, hi, kv_lo, kv_hi) of a key loop over blocks lo..hi: masked below
    head_hi, unmasked from there to full_hi, masked again up to hi. The caller's full_hi / hi are
    the causal ones (keys below full_hi seen by every row of the query block, none at or past hi).
    With a window, row b's keys [kv_lo, kv_hi) (clipped to [0, Tk]): the loop starts at the block
    holding kv_lo (masked when kv_lo is not block-aligned), stops at kv_hi, and the unmasked bulk
    is the blocks wholly inside both. Without one, lo = head_hi = 0: no head."""
    if WINDOW:
        kv_lo = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
        kv_hi = tl.minimum(tl.load(KV_END + b).to(tl.int32), Tk)
        hi = tl.minimum(hi, kv_hi)
        lo = (kv_lo // BLOCK_N) * BLOCK_N
        # lo <= head_hi <= full_hi <= hi, so the three ranges tile lo..hi (all empty if hi <= lo)
        head_hi = tl.maximum(tl.minimum(tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N, hi), lo)
        full_hi = tl.maximum(tl.minimum(full_hi, (kv_hi // BLOCK_N) * BLOCK_N), head_hi)
        return lo, head_hi, full_hi, hi, kv_lo, kv_hi
    else:
        return 0, 0, full_hi, hi, 0, Tk


@triton.jit
def _dropout_keep(seed, bh, q_idx, k_idx, Tk, dropout_p):
    """Whether the attention weight of query q_idx on key k_idx (broadcastable int32 tiles) of
    head bh = b * H + h survives dropout with probability 1 - dropout_p: a uniform draw of
    Philox keyed by seed (int64) with counter (q_idx * Tk + k_idx, bh, 0, 0), so any tiling
    (forward [M, N], dK/dV's transposed [N, M], dQ) regenerates the same mask. Needs
    Tq * Tk < 2**31 (checked by the launcher's caller)."""
    c0 = q_idx * Tk + k_idx
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, zero + bh, zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _keys_seen(offs_m, offs_n, kv_lo, kv_hi, causal_shift, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: whether query row offs_m sees key offs_n (in Tk, i.e. below kv_hi
    without a window; in kv_lo .. kv_hi - 1 with one; causal: at most offs_m + causal_shift)."""
    keep = offs_n[None, :] < kv_hi
    if WINDOW:
        keep = keep & (offs_n[None, :] >= kv_lo)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    return keep


# ---- forward ------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, k_desc, v_desc, b, h,
               offs_m, offs_n0, lo, hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale, seed, bh, dropout_p,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
               UPCAST_DOT: tl.constexpr, TMA: tl.constexpr):
    # k_ptrs: [HEAD_DIM, BLOCK_N] pointers to K^T of key block 0; v_ptrs: [BLOCK_N, HEAD_DIM] to V.
    # TMA: K and V come through their [B, H, Tk, D] tensor descriptors instead (rows past Tk
    # read as zeros, so no load mask).
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_desc, k_ptrs + start_n * stride_kn, b, h, start_n, offs_n, Tk,
                       BLOCK_N, HEAD_DIM, True, MASKED, TMA)
        v = _load_tile(v_desc, v_ptrs + start_n * stride_vn, b, h, start_n, offs_n, Tk,
                       BLOCK_N, HEAD_DIM, False, MASKED, TMA)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            qk = tl.where(_keys_seen(offs_m, offs_n, kv_lo, kv_hi, causal_shift, CAUSAL, WINDOW), qk, float("-inf"))
        # Without a window every row has a valid key in the first block it sees (key 0, since
        # Tq <= Tk when causal), so m_new is finite and no -inf - -inf NaN can appear. With one,
        # a row may see none yet: its exponent base is kept finite (l stays 0, acc 0).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if WINDOW:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # the undropped weights' sum (dropout acts after the softmax)
        if DROPOUT:  # the 1 / (1 - p) of the kept weights is applied once, to the output
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Tk, dropout_p), p, 0.0)
        acc = tl.dot(_dot_operand(p, v_ptrs, UPCAST_DOT), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Arguments the bodies never read (autotune keys): not specialized (== 1, divisible by 16), so
# their values do not multiply the compiled variants.
_KEY_ONLY = ["T_BUCKET", "TMA_OK"]


@triton.jit(do_not_specialize=_KEY_ONLY)
def attn_fwd_kernel(
    Q,    # [B, H, Tq, D] any strides
    K,    # [B, H, Tk, D] any strides
    V,    # [B, H, Tk, D] any strides
    O,    # [B, H, Tq, D] any strides (the launcher allocates [B, Tq, H, D] memory)
    LSE,  # [B, H, Tq] fp32 contiguous: log2-sum-exp2 of the scaled scores, for the backward
    KV_START, KV_END,  # [B] int32 / int64: each row's key window (WINDOW only; else None)
    SEED,      # [1] int64: the dropout mask's Philox seed (DROPOUT only; else None)
    dropout_p,  # probability of dropping a weight (DROPOUT only)
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Tq, Tk,
    T_BUCKET,  # next_pow2(max(Tq, Tk)): the autotune key (unused in the body)
    TMA_OK,    # 0 no descriptors, 1 TMA configs timed too, 2 TMA only: an autotune key (unused in the body)
    Q_desc, K_desc, V_desc, O_desc,  # TMA tensor descriptors of Q, K, V, O ([B, H, T, D], blocks
                                     # [1, 1, BLOCK_M or BLOCK_N, D]), or None
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact, no silent TF32); ignored for 16-bit
    UPCAST_DOT: tl.constexpr,     # interpreter only: its tl.dot multiplies bf16 as raw bits
    TMA: tl.constexpr,            # move Q, K, V, O tiles with TMA (Hopper) through the descriptors
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Query blocks on axis 0 (fastest varying) so the programs of one head run together
    # and share its K/V in L2. Causal: the last query blocks see the most keys; launch them
    # first so the short ones fill the tail of the wave.
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd

    q = _load_tile(Q_desc, q_ptrs, b, h, start_m, offs_m, Tq, BLOCK_M, HEAD_DIM, False, True, TMA)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    seed = tl.load(SEED) if DROPOUT else 0
    causal_shift = Tk - Tq
    if CAUSAL:
        # keys < full_hi are visible to every row of the block; keys >= hi to none
        hi = tl.minimum(start_m + BLOCK_M + causal_shift, Tk)
        full_hi = (tl.minimum(start_m + 1 + causal_shift, Tk) // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full_hi = (Tk // BLOCK_N) * BLOCK_N
    lo, head_hi, full_hi, hi, kv_lo, kv_hi = _window(KV_START, KV_END, b, Tk, full_hi, hi, WINDOW, BLOCK_N)
    if WINDOW:  # the block the window starts inside
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, K_desc, V_desc, b, h,
                                   offs_m, offs_n0, lo, head_hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale,
                                   seed, bh, dropout_p, True, CAUSAL, WINDOW, DROPOUT, BLOCK_N, HEAD_DIM,
                                   DOT_PRECISION, UPCAST_DOT, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, K_desc, V_desc, b, h,
                               offs_m, offs_n0, head_hi, full_hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale,
                               seed, bh, dropout_p, False, CAUSAL, WINDOW, DROPOUT, BLOCK_N, HEAD_DIM,
                               DOT_PRECISION, UPCAST_DOT, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, K_desc, V_desc, b, h,
                               offs_m, offs_n0, full_hi, hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale,
                               seed, bh, dropout_p, True, CAUSAL, WINDOW, DROPOUT, BLOCK_N, HEAD_DIM,
                               DOT_PRECISION, UPCAST_DOT, TMA)

    if WINDOW:  # a row that saw no key: output 0, LSE +inf (the backward's probabilities are 0)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    else:
        l_safe = l_i
        lse = m_i + tl.math.log2(l_i)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    o = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    _store_tile(O_desc, o_ptrs, o, b, h, start_m, offs_m, Tq, BLOCK_M, HEAD_DIM, TMA)
    tl.store(LSE + bh * Tq + offs_m, lse, mask=offs_m < Tq)


# ---- backward -----------------------------------------------------------------------------

@triton.jit
def attn_bwd_preprocess_kernel(
    O,      # [B, H, Tq, D] any strides
    DO,     # [B, H, Tq, D] any strides
    DELTA,  # [B, H, Tq] fp32 contiguous: rowsum(dO * O), the softmax-backward correction
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qm, stride_dom, q_desc, do_desc, b, h,
                offs_n, offs_m0, lo, hi, Tq, causal_shift, qk_scale, seed, bh, Tk, dropout_p, drop_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, TMA: tl.constexpr):
    # q_ptrs: [HEAD_DIM, BLOCK_M] pointers to Q^T of query block 0; do_ptrs: [BLOCK_M, HEAD_DIM];
    # lse_ptr / delta_ptr: this head's [Tq] rows. k, v: this program's [BLOCK_N, HEAD_DIM] block.
    # TMA: Q and dO tiles through their descriptors (rows past Tq read as zeros).
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        qT = _load_tile(q_desc, q_ptrs + start_m * stride_qm, b, h, start_m, offs_m, Tq,
                        BLOCK_M, HEAD_DIM, True, MASKED, TMA)
        do = _load_tile(do_desc, do_ptrs + start_m * stride_dom, b, h, start_m, offs_m, Tq,
                        BLOCK_M, HEAD_DIM, False, MASKED, TMA)
        if MASKED:
            lse = tl.load(lse_ptr + offs_m, mask=offs_m < Tq, other=0.0)
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < Tq, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        if UPCAST_DOT:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        # Work in the transposed frame [BLOCK_N, BLOCK_M] so dK, dV come out [BLOCK_N, D].
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            keep = offs_m[None, :] < Tq
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
            pT = tl.where(keep, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:  # dV = (P * Z)^T dO (its 1 / (1 - p) applied once, at the end); dP = Z * dO V^T / (1 - p)
            keptT = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Tk, dropout_p)
            dv = tl.dot(_dot_operand(tl.where(keptT, pT, 0.0), do_ptrs, UPCAST_DOT), do, dv,
                        input_precision=DOT_PRECISION)
            dpT = tl.where(keptT, dpT * drop_scale, 0.0)
        else:
            dv = tl.dot(_dot_operand(pT, do_ptrs, UPCAST_DOT), do, dv, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(_dot_operand(dsT, q_ptrs, UPCAST_DOT), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_KEY_ONLY)
def attn_bwd_dkdv_kernel(
    Q, K, V,  # [B, H, Tq|Tk, D] any strides
    DO,       # [B, H, Tq, D] any strides
    DK, DV,   # [B, H, Tk, D] any strides, written (not accumulated)
    LSE,      # [B, H, Tq] fp32 contiguous, log2 units (from the forward)
    DELTA,    # [B, H, Tq] fp32 contiguous (from the preprocess)
    KV_START, KV_END,  # [B] int: each row's key window (WINDOW only; else None)
    SEED, dropout_p,   # [1] int64 and the probability of the forward's dropout (DROPOUT only; else None, 0)
    qk_scale, scale,  # scale * log2(e), scale
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Tq, Tk, T_BUCKET, TMA_OK,
    Q_desc, K_desc, V_desc, DO_desc, DK_desc, DV_desc,  # TMA descriptors ([B, H, T, D]) or None
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per key block: dK and dV accumulate in registers over the query blocks
    # that see it, and are written once (no atomics, deterministic).
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_tile(K_desc, K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, b, h, start_n, offs_n, Tk, BLOCK_N, HEAD_DIM, False, True, TMA)
    v = _load_tile(V_desc, V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                   + offs_d[None, :] * stride_vd, b, h, start_n, offs_n, Tk, BLOCK_N, HEAD_DIM, False, True, TMA)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[None, :] * stride_qm + offs_d[:, None] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod
    lse_ptr = LSE + bh * Tq
    delta_ptr = DELTA + bh * Tq
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    seed = tl.load(SEED) if DROPOUT else 0
    drop_scale = 1.0 / (1.0 - dropout_p)

    causal_shift = Tk - Tq
    q_full_end = (Tq // BLOCK_M) * BLOCK_M  # query blocks below this need no row mask
    if CAUSAL:
        # first query block seeing any key of this block; first one seeing all of them
        lo = (tl.maximum(start_n - causal_shift, 0) // BLOCK_M) * BLOCK_M
        diag_end = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(diag_end, tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        diag_end = 0
    if WINDOW:
        # A key outside row b's window has no probability anywhere: its dK, dV rows are 0 (set
        # below; the loops' values for it are discarded), and a block wholly outside skips the
        # loops. Keys inside need no extra mask: the forward's LSE already excludes the others,
        # and a query that saw no key has LSE +inf, so p = 0 there.
        kv_lo = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
        kv_hi = tl.minimum(tl.load(KV_END + b).to(tl.int32), Tk)
        outside = (start_n + BLOCK_N <= kv_lo) | (start_n >= kv_hi)
        lo = tl.where(outside, Tq, lo)
        diag_end = tl.where(outside, Tq, diag_end)
        q_full_end = tl.where(outside, Tq, q_full_end)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qm, stride_dom, Q_desc, DO_desc,
                         b, h, offs_n, offs_m0, lo, diag_end, Tq, causal_shift, qk_scale,
                         seed, bh, Tk, dropout_p, drop_scale, True, CAUSAL, DROPOUT, BLOCK_M, HEAD_DIM,
                         DOT_PRECISION, UPCAST_DOT, TMA)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qm, stride_dom, Q_desc, DO_desc,
                         b, h, offs_n, offs_m0, diag_end, q_full_end, Tq, causal_shift, qk_scale,
                         seed, bh, Tk, dropout_p, drop_scale, False, CAUSAL, DROPOUT, BLOCK_M, HEAD_DIM,
                         DOT_PRECISION, UPCAST_DOT, TMA)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qm, stride_dom, Q_desc, DO_desc,
                         b, h, offs_n, offs_m0, tl.maximum(diag_end, q_full_end), Tq, Tq, causal_shift, qk_scale,
                         seed, bh, Tk, dropout_p, drop_scale, True, CAUSAL, DROPOUT, BLOCK_M, HEAD_DIM,
                         DOT_PRECISION, UPCAST_DOT, TMA)

    if WINDOW:
        in_window = ((offs_n >= kv_lo) & (offs_n < kv_hi))[:, None]
        dk = tl.where(in_window, dk, 0.0)
        dv = tl.where(in_window, dv, 0.0)
    dk = (dk * scale).to(DK.dtype.element_ty)  # dS was taken w.r.t. the unscaled scores
    if DROPOUT:
        dv = dv * drop_scale
    dv = dv.to(DV.dtype.element_ty)
    _store_tile(DK_desc, DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
                + offs_d[None, :] * stride_dkd, dk, b, h, start_n, offs_n, Tk, BLOCK_N, HEAD_DIM, TMA)
    _store_tile(DV_desc, DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
                + offs_d[None, :] * stride_dvd, dv, b, h, start_n, offs_n, Tk, BLOCK_N, HEAD_DIM, TMA)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, k_desc, v_desc, b, h,
              offs_m, offs_n0, lo, hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale, seed, bh, dropout_p, drop_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST_DOT: tl.constexpr, TMA: tl.constexpr):
    # k_ptrs, v_ptrs: [HEAD_DIM, BLOCK_N] pointers to K^T and V^T of key block 0 (TMA: descriptors)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kT = _load_tile(k_desc, k_ptrs + start_n * stride_kn, b, h, start_n, offs_n, Tk,
                        BLOCK_N, HEAD_DIM, True, MASKED, TMA)
        vT = _load_tile(v_desc, v_ptrs + start_n * stride_vn, b, h, start_n, offs_n, Tk,
                        BLOCK_N, HEAD_DIM, True, MASKED, TMA)
        if UPCAST_DOT:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_keys_seen(offs_m, offs_n, kv_lo, kv_hi, causal_shift, CAUSAL, WINDOW), p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if DROPOUT:  # dP = Z * dO V^T / (1 - p); dS = P * (dP - delta) with the undropped P
            dp = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Tk, dropout_p),
                          dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_dot_operand(ds, k_ptrs, UPCAST_DOT), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_KEY_ONLY)
def attn_bwd_dq_kernel(
    Q, K, V,  # [B, H, Tq|Tk, D] any strides
    DO,       # [B, H, Tq, D] any strides
    DQ,       # [B, H, Tq, D] any strides, written (not accumulated)
    LSE,      # [B, H, Tq] fp32 contiguous, log2 units
    DELTA,    # [B, H, Tq] fp32 contiguous
    KV_START, KV_END,  # [B] int: each row's key window (WINDOW only; else None)
    SEED, dropout_p,   # [1] int64 and the probability of the forward's dropout (DROPOUT only; else None, 0)
    qk_scale, scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Tq, Tk, T_BUCKET, TMA_OK,
    Q_desc, K_desc, V_desc, DO_desc, DQ_desc,  # TMA descriptors ([B, H, T, D]) or None
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A separate dQ pass (recomputing P) instead of fp32 atomics from the dK/dV kernel:
    # deterministic, and no [B, H, Tq, D] fp32 scratch. Longest (last) query blocks first.
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q_desc, Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, b, h, start_m, offs_m, Tq, BLOCK_M, HEAD_DIM, False, True, TMA)
    do = _load_tile(DO_desc, DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, b, h, start_m, offs_m, Tq, BLOCK_M, HEAD_DIM, False, True, TMA)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[None, :] * stride_vn + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    seed = tl.load(SEED) if DROPOUT else 0
    drop_scale = 1.0 / (1.0 - dropout_p)

    causal_shift = Tk - Tq
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M + causal_shift, Tk)
        full_hi = (tl.minimum(start_m + 1 + causal_shift, Tk) // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full_hi = (Tk // BLOCK_N) * BLOCK_N
    lo, head_hi, full_hi, hi, kv_lo, kv_hi = _window(KV_START, KV_END, b, Tk, full_hi, hi, WINDOW, BLOCK_N)
    if WINDOW:  # the block the window starts inside
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, K_desc, V_desc, b, h,
                       offs_m, offs_n0, lo, head_hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale,
                       seed, bh, dropout_p, drop_scale, True, CAUSAL, WINDOW, DROPOUT, BLOCK_N, HEAD_DIM,
                       DOT_PRECISION, UPCAST_DOT, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, K_desc, V_desc, b, h,
                   offs_m, offs_n0, head_hi, full_hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale,
                   seed, bh, dropout_p, drop_scale, False, CAUSAL, WINDOW, DROPOUT, BLOCK_N, HEAD_DIM,
                   DOT_PRECISION, UPCAST_DOT, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, K_desc, V_desc, b, h,
                   offs_m, offs_n0, full_hi, hi, Tk, kv_lo, kv_hi, causal_shift, qk_scale,
                   seed, bh, dropout_p, drop_scale, True, CAUSAL, WINDOW, DROPOUT, BLOCK_N, HEAD_DIM,
                   DOT_PRECISION, UPCAST_DOT, TMA)
    dq = (dq * scale).to(DQ.dtype.element_ty)
    _store_tile(DQ_desc, DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
                + offs_d[None, :] * stride_dqd, dq, b, h, start_m, offs_m, Tq, BLOCK_M, HEAD_DIM, TMA)


@triton.jit
def attn_dropout_mask_kernel(
    SEED,  # [1] int64, as the attention kernels take it
    Z,     # [B, H, Tq, Tk] int8 contiguous, written: 1 where _dropout_keep keeps the weight
    dropout_p, Tq, Tk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The keep mask the attention kernels apply for this seed (tests and debugging only)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(tl.load(SEED), bh, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
    tl.store(Z + bh.to(tl.int64) * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ---- configs --------------------------------------------------------------------------------
# Hopper-oriented candidates (to be measured on the H100, kernels/ATTENTION_NOTES.md). Key: the
# head dim, causality, dot precision (so the dtype family) and T bucketed to a power of two, so
# prompts of every length share one tuning per bucket (the autotuner adds the tensors' dtypes).
# All kernels write (never accumulate into) their outputs, so repeated tuning runs are harmless.
# Register limits below come from compiling every candidate for sm_90 with Triton 3.9 and
# reading ptxas's register / spill counts.

# TMA: each kernel's tensor descriptors (the kernel's *_desc arguments, in order) and the tile
# size that gives each its block rows. All are [B, H, T, D] with blocks [1, 1, rows, D].
TMA_DESCRIPTORS = {
    "fwd": {"Q_desc": "BLOCK_M", "K_desc": "BLOCK_N", "V_desc": "BLOCK_N", "O_desc": "BLOCK_M"},
    "dkdv": {"Q_desc": "BLOCK_M", "K_desc": "BLOCK_N", "V_desc": "BLOCK_N", "DO_desc": "BLOCK_M",
             "DK_desc": "BLOCK_N", "DV_desc": "BLOCK_N"},
    "dq": {"Q_desc": "BLOCK_M", "K_desc": "BLOCK_N", "V_desc": "BLOCK_N", "DO_desc": "BLOCK_M", "DQ_desc": "BLOCK_M"},
}


def set_tma_block_shapes(kind, nargs):
    """pre_hook of every config (the launcher calls it for a forced fixed one): a host
    descriptor's block shape is part of the kernel's signature. Under a TMA config it follows
    the tile; under a pointer config (descriptors given but unused) it goes back to the
    launcher's placeholder (tma_placeholder_block), so that config compiles once whatever ran
    before it."""
    for desc, rows in TMA_DESCRIPTORS[kind].items():
        d = nargs[desc]
        if d is not None:
            d.block_shape = ([1, 1, nargs[rows], nargs["HEAD_DIM"]] if nargs["TMA"]
                             else tma_placeholder_block(4, d.base.element_size()))


def _configs(kind, tiles, tma=False):
    """Configs of kernel `kind` ("fwd", "dkdv", "dq"), one per (BLOCK_M, BLOCK_N, warps, stages)."""
    hook = functools.partial(set_tma_block_shapes, kind)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TMA": tma}, num_warps=w, num_stages=st, pre_hook=hook)
            for bm, bn, w, st in tiles]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). 16-bit inputs use wgmma tensor cores.
FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 4),
             (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)]
# dK/dV: long key blocks held in registers, short query blocks streamed (FA2 / Triton tutorial).
DKDV_TILES = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 4)]
# dQ: long query blocks held, short key blocks streamed.
DQ_TILES = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS = (_configs(k, t) for k, t in
                                         (("fwd", FWD_TILES), ("dkdv", DKDV_TILES), ("dq", DQ_TILES)))
# The leading tiles again with every Q/K/V/O/dO/gradient tile moved by TMA (Hopper's copy
# engine: no address arithmetic or bounds masks in the loop; rows past T are zero-filled on
# load and clipped on store by the descriptor). Timed beside the pointer configs where the
# launcher gives descriptors (TMA_OK; GPTFAST_TMA), so TMA runs where it pays.
FWD_CONFIGS_TMA = _configs("fwd", FWD_TILES[:6], tma=True)
DKDV_CONFIGS_TMA = _configs("dkdv", DKDV_TILES[:4], tma=True)
DQ_CONFIGS_TMA = _configs("dq", DQ_TILES[:4], tma=True)
# Attention dropout only (the pruner keeps them under DROPOUT, drops them otherwise): with the
# Philox draws every dK/dV candidate above spills at D = 128 (8-64 bytes, Triton 3.9); these
# shorter query blocks do not (240-255 registers).
DKDV_TILES_DROPOUT = [(16, 128, 8, 3), (32, 64, 8, 3)]
DKDV_CONFIGS_DROPOUT = _configs("dkdv", DKDV_TILES_DROPOUT) + _configs("dkdv", DKDV_TILES_DROPOUT, tma=True)
# fp32 inputs (exact "ieee" dots run on FMA units): small tiles, 8 warps; larger ones spill
# hundreds of bytes per thread. Index 0: HEAD_DIM <= 64, index 1: HEAD_DIM = 128.
FWD_CONFIGS_FP32 = _configs("fwd", [(64, 32, 8, 2), (32, 16, 8, 2)])
DKDV_CONFIGS_FP32 = _configs("dkdv", [(16, 32, 8, 2), (16, 32, 8, 2)])
DQ_CONFIGS_FP32 = _configs("dq", [(64, 32, 8, 2), (32, 32, 8, 2)])
# Without autotuning (GPTFAST_ATTN_AUTOTUNE=0): [16-bit config for D <= 64, for D = 128].
FIXED_CONFIGS = {"fwd": [FWD_CONFIGS[0], FWD_CONFIGS[1]], "dkdv": [DKDV_CONFIGS[0], DKDV_CONFIGS[0]],
                 "dq": [DQ_CONFIGS[0], DQ_CONFIGS[0]]}
# ... and with dropout, configs that compiled without spills under it (the 4-warp 128 x 64 forward
# spills 336 bytes at D = 64, 128 x 64 tiles 8 at D = 128 through TMA; dK/dV at D = 128: above)
FIXED_CONFIGS_DROPOUT = {"fwd": [FWD_CONFIGS[1], FWD_CONFIGS[7]],
                         "dkdv": [DKDV_CONFIGS[0], DKDV_CONFIGS_DROPOUT[0]], "dq": [DQ_CONFIGS[0], DQ_CONFIGS[0]]}
_FP32 = {"fwd": FWD_CONFIGS_FP32, "dkdv": DKDV_CONFIGS_FP32, "dq": DQ_CONFIGS_FP32}
_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL", "WINDOW", "DROPOUT", "DOT_PRECISION", "TMA_OK"]


def fixed_config(kind, head_dim, fp32, dropout=False):
    """(meta-parameters, launch options) of one untuned config for this head dim."""
    table = _FP32[kind] if fp32 else (FIXED_CONFIGS_DROPOUT if dropout else FIXED_CONFIGS)[kind]
    c = table[0 if head_dim <= 64 else 1]
    return dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}


# Shared memory a block may opt into on the H100 / H200. Past it a config compiles but cannot
# launch. (GPUs with less, e.g. A100's 166912: Triton's autotuner times a config that fails to
# launch with OutOfResources as infinitely slow, so it is never chosen.)
MAX_SHARED_BYTES = 232448
# Barriers and reduction scratch on top of the staged tiles: 1-2 KB for every candidate compiled
# for sm_90 with Triton 3.6 and 3.9 (python -m gptfast.kernels.aot_check).
SHARED_SLACK_BYTES = 2048


def _pruner(kind, fp32_elements, limit, staged_elements, dropout_tiles=0):
    """early_config_prune: fp32 inputs get their config for the head dim; 16-bit inputs keep
    the candidates whose live fp32 tiles (accumulators + score tiles, fp32_elements(BLOCK_M,
    BLOCK_N, HEAD_DIM)) take at most `limit` registers per thread (beyond, ptxas spills) and
    whose 16-bit tiles in shared memory (staged_elements(BLOCK_M, BLOCK_N, HEAD_DIM, num_stages))
    fit in MAX_SHARED_BYTES. Under DROPOUT the Philox state counts as dropout_tiles more score
    tiles (fitted to the sm_90 compiles: the survivors do not spill), and the dropout-only
    configs (DKDV_CONFIGS_DROPOUT) are candidates; without it they are not."""
    def prune(configs, named_args, **kwargs):
        def arg(name, default):
            return kwargs.get(name, named_args.get(name, default))
        d = arg("HEAD_DIM", 64)
        fp32 = _FP32[kind]
        if arg("DOT_PRECISION", "tf32") == "ieee":
            return [fp32[0 if d <= 64 else 1]]
        dropout = bool(arg("DROPOUT", False))

        def fits(c):
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            live = fp32_elements(m, n, d) + (dropout_tiles * m * n if dropout else 0)
            return (live <= limit * 32 * c.num_warps
                    and 2 * staged_elements(m, n, d, c.num_stages) + SHARED_SLACK_BYTES <= MAX_SHARED_BYTES)

        def candidate(c):
            return all(c is not f for f in fp32) and (dropout or all(c is not x for x in DKDV_CONFIGS_DROPOUT))
        # TMA configs only with descriptors (TMA_OK 1: beside the pointer ones, 2: instead of them)
        tma_ok = arg("TMA_OK", 0)
        kept = [c for c in configs if candidate(c) and fits(c) and tma_config_allowed(c, tma_ok)]
        return kept or [configs[0]]
    return {"early_config_prune": prune}


# fwd / dQ spill at 192 registers of live fp32 tiles per thread and not at 128; dK/dV at 192, not at 160.
# Shared memory: the tiles held for the whole loop, plus one copy per pipeline stage of the
# streamed ones (e.g. fwd, D=128, 128 x 128 tiles: 225 KB at 3 stages, 289 KB at 4, as compiled).
attn_fwd_autotuned = triton.autotune(  # registers: acc [M, D] + scores [M, N]; shared: Q + stages x (K, V)
    FWD_CONFIGS + FWD_CONFIGS_TMA + FWD_CONFIGS_FP32, key=_KEY,
    prune_configs_by=_pruner("fwd", lambda m, n, d: m * d + m * n, 128,
                             lambda m, n, d, s: m * d + s * 2 * n * d, dropout_tiles=2))(attn_fwd_kernel)
attn_bwd_dkdv_autotuned = triton.autotune(  # dK, dV [N, D] + sT, dpT [N, M]; K, V + stages x (Q, dO)
    DKDV_CONFIGS + DKDV_CONFIGS_TMA + DKDV_CONFIGS_FP32 + DKDV_CONFIGS_DROPOUT, key=_KEY,
    prune_configs_by=_pruner("dkdv", lambda m, n, d: 2 * n * d + 2 * n * m, 160,
                             lambda m, n, d, s: 2 * n * d + s * 2 * m * d, dropout_tiles=2))(attn_bwd_dkdv_kernel)
attn_bwd_dq_autotuned = triton.autotune(  # dQ [M, D] + p, dp [M, N]; Q, dO + stages x (K, V)
    DQ_CONFIGS + DQ_CONFIGS_TMA + DQ_CONFIGS_FP32, key=_KEY,
    prune_configs_by=_pruner("dq", lambda m, n, d: m * d + 2 * m * n, 128,
                             lambda m, n, d, s: 2 * m * d + s * 2 * n * d, dropout_tiles=1))(attn_bwd_dq_kernel)

# Under the interpreter: one fixed config each, BLOCK_M != BLOCK_N so the tests exercise
# full, diagonal and ragged-tail blocks with mismatched block sizes at small T.
INTERPRETER_FWD = {"BLOCK_M": 32, "BLOCK_N": 16}
INTERPRETER_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32}
INTERPRETER_DQ = {"BLOCK_M": 32, "BLOCK_N": 16}
PREPROCESS_BLOCK_M = 64
