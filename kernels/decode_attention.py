"""Flash-decoding: a few new queries per row against a static KV cache, split over the cache.

q [B, H, Tq, D] (Tq small: 1 for a decode step, a few for speculative / chunked steps),
caches [B, H, Tmax, D], cache_seqlens [B] (valid entries per row, including the Tq new ones,
read on the device only). Query i of row b sits at position L_b - Tq + i and attends to
cache positions 0 .. L_b - Tq + i. With WINDOW, KV_START [B] moves the first visible position
to S_b (left padding): query i then sees S_b .. L_b - Tq + i, and a query that sees no key gets 0.

Two kernels: decode_split_kernel gives each (split, b, h) program a contiguous chunk of the
row's valid entries (its length over the splits, in whole key blocks), so even a batch-1
step spreads over every SM; decode_reduce_kernel merges the splits'
partial results by their log-sum-exp. Grids depend on shapes only (never on the lengths'
values), so a CUDA graph can capture the pair. With one split the first kernel writes the
final output itself and the reduce is skipped.

Kernels only; the launcher (split count, block sizes) is in gptfast/ops/_attention_triton.py.
"""
import triton
import triton.language as tl

from .attention import _dot_operand


@triton.jit
def decode_split_kernel(
    Q,        # [B, H, Tq, D] any strides
    KC, VC,   # [B, H, Tmax, D] any strides
    LENS,     # [B] int32 / int64: valid cache entries per row
    KV_START,  # [B] int32 / int64: first visible cache entry per row (WINDOW only; else None)
    O_PART,   # [B, H, NUM_SPLITS, Tq, D] fp32 contiguous: softmax-normalized partial outputs
              #   (or, when NUM_SPLITS == 1, the final output [B, H, Tq, D] in q's dtype, any strides)
    LSE_PART,  # [B, H, NUM_SPLITS, Tq] fp32 contiguous: log2-sum-exp2 of each split (unused with 1 split)
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,  # of the final output (NUM_SPLITS == 1 only)
    H, Tq, Tmax,
    NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # >= Tq and >= 16 (tl.dot's minimum); the padding rows are masked
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.load(LENS + b).to(tl.int32)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_mask = offs_q[:, None] < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    # the last position each query may see (padding rows see what the last real one does)
    q_last = length - Tq + tl.minimum(offs_q, Tq - 1)

    # The row's own span of entries (first .. length), not Tmax, is divided among the splits
    # (whole BLOCK_N blocks each), so a short row in a long static cache still spreads over
    # every split that can get a block; splits past the length do no loads at all. Read on the
    # device: no host sync. Every load is at or past `first`, so the window needs no mask.
    if WINDOW:
        first = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    else:
        first = 0
    split_len = tl.cdiv(tl.cdiv(tl.maximum(length - first, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * split_len
    hi = tl.minimum(tl.minimum(lo + split_len, Tmax), length)
    k_ptrs = KC + b * stride_kb + h * stride_kh + offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = VC + b * stride_vb + h * stride_vh + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        in_range = offs_n < hi
        k = tl.load(k_ptrs + start_n * stride_kn, mask=in_range[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=in_range[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_Q, BLOCK_N]
        s = tl.where(in_range[None, :] & (offs_n[None, :] <= q_last[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A query may see no key of this block (or of the whole split) yet: keep the
        # exponent finite so a fully masked row stays at l = 0, acc = 0 instead of NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(_dot_operand(p, v_ptrs, UPCAST_DOT), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        # l_i == 0 only for a query that sees no key: without a window one placed before
        # position 0 (L_b < Tq): 0/0 = NaN, as the reference; with one, 0.
        if WINDOW:
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        else:
            o = acc / l_i[:, None]
        tl.store(O_PART + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_om + offs_d[None, :] * stride_od,
                 o.to(O_PART.dtype.element_ty), mask=q_mask)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        row = (bh * NUM_SPLITS + split) * Tq + offs_q
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=q_mask)
        # an empty split has lse = -inf and weighs nothing in the reduce
        tl.store(LSE_PART + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)),
                 mask=offs_q < Tq)


@triton.jit
def decode_reduce_kernel(
    O_PART,    # [B, H, NUM_SPLITS, Tq, D] fp32 contiguous
    LSE_PART,  # [B, H, NUM_SPLITS, Tq] fp32 contiguous
    O,         # [B, H, Tq, D] in q's dtype, any strides
    stride_ob, stride_oh, stride_om, stride_od,
    H, Tq,
    NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
):
    # one program per (b, h, query): weights exp2(lse_s - max) over the splits
    pid = tl.program_id(0)
    bh = pid // Tq
    i = pid % Tq
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    rows = (bh * NUM_SPLITS + offs_s) * Tq + i
    lse = tl.load(LSE_PART + rows, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)  # -inf only when no split saw a key: NaN, as the reference (0 with a window)
    if WINDOW:
        m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    part = tl.load(O_PART + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    w_sum = tl.sum(w, 0)
    if WINDOW:
        w_sum = tl.where(w_sum == 0.0, 1.0, w_sum)
    o = tl.sum(part * w[:, None], 0) / w_sum
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_om + offs_d * stride_od, o.to(O.dtype.element_ty))


# Block sizes (not autotuned: the decode step runs inside CUDA-graph capture, where the
# autotuner must not benchmark). 64 keys x D=128 x 2 bytes = 16 KB of K per iteration.
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
REDUCE_NUM_WARPS = 4
INTERPRETER_BLOCK_N = 16  # small, so the CPU tests see several blocks and splits per row
# fp32 (exact dots on FMA units, tiles in registers) with 32 or more queries a row (chunked
# prefill), or with D = 128: 16-key blocks and 8 warps. With the 16-bit tile, fp32 builds
# spilled up to 7.4 KB a thread at Tq=64, D=128, and 728 bytes at Tq=1, D=128 on Triton 3.6
# (kernels/aot_check.py); with this one none spills more than 8 bytes.
FP32_WIDE_BLOCK_N, FP32_WIDE_NUM_WARPS = 16, 8


def decode_tile(fp32: bool, block_q: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the split kernel on a GPU for this dtype, query block and D."""
    if fp32 and (block_q >= 32 or head_dim >= 128):
        return FP32_WIDE_BLOCK_N, FP32_WIDE_NUM_WARPS
    return DECODE_BLOCK_N, DECODE_NUM_WARPS
