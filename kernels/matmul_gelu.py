"""Triton kernel: the MLP up-projection with its bias + GELU in the epilogue.

    C = gelu(A @ W^T + b),  A [M, K], W [N, K] (nn.Linear layout), b [N]

Why an epilogue: for GPT-2 small training (M = 16384, K = 768, N = 3072, bf16) the
pre-activation is 100 MB; cuBLAS + a separate bias_gelu kernel writes it, reads it
back and writes C (300 MB of traffic, ~120 us at 2.5 TB/s), the epilogue writes C
only (plus the pre-activation once when autograd needs it). Whether that beats
cuBLAS's faster main loop is measured on the H100, and the launcher's dispatch
constants (gptfast/ops/_norm_triton.py: MLP_FRONT, EPILOGUE_MIN_ROWS) record the choice.

Backward (in the launcher): dU = dC * gelu'(U) with the fused kernels/gelu.py
backward (it also reduces db), then dA = dU @ W and dW = dU^T @ A with torch (cuBLAS):
they have no elementwise epilogue to fuse, and cuBLAS is the faster plain matmul.

TMA (Hopper): with TMA on, A, W, C (and T) move through 2-D host tensor descriptors
(gptfast/ops/_tma.py): no address arithmetic in the K loop, and rows / columns past M, N, K
are zero-filled on load and clipped on store by the descriptors. The autotuner times the TMA
configs beside the pointer ones where the launcher gives descriptors (TMA_OK).

Only APIs present in Triton 3.6 and 3.9 (and the interpreter) are used.
"""
import triton
import triton.language as tl

from . import tma_config_allowed, tma_placeholder_block
from .gelu import gelu_fp32


# M_BUCKET and TMA_OK are never read in the body (autotune keys): not specialized, so their
# values do not multiply the compiled variants.
@triton.jit(do_not_specialize=["M_BUCKET", "TMA_OK"])
def matmul_bias_gelu_kernel(
    A,  # [M, K] activations, strides (stride_am, stride_ak)
    W,  # [N, K] weight (nn.Linear layout), strides (stride_wn, stride_wk)
    Bias,  # [N] bias, any float dtype (read only if HAS_BIAS)
    C,  # [M, N] out: gelu(A @ W^T + b), C's dtype, strides (stride_cm, 1)
    T,  # [M, N] out: A @ W^T without the bias, in C's dtype, same strides as C (if STORE_PRE)
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm,
    M_BUCKET,  # unused in the body: an autotune key, so a new row count within a bucket reuses the tuned config
    TMA_OK,    # unused in the body: an autotune key (0: no descriptors, 1: TMA configs timed too, 2: TMA only)
    A_desc, W_desc, C_desc, T_desc,  # TMA descriptors of A, W, C, T (blocks [BLOCK_M|N, BLOCK_K|N]) or None
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, STORE_PRE: tl.constexpr,
    # "ieee" for fp32 inputs (as torch's default fp32 matmul), "tf32" otherwise (ignored for 16-bit)
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 as raw uint16 bits, so feed it fp32
    TMA: tl.constexpr,  # move the tiles with TMA through the descriptors
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep the column tiles together, so their A rows and
    # the W tiles stay in L2 across consecutive programs.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols wrap to valid ones for the loads (no mask in the main loop);
    # the store masks them away.
    rows_a = (rows % M).to(tl.int64)
    cols_w = (cols % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows_a[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + ks[:, None] * stride_wk + cols_w[None, :] * stride_wn  # [BLOCK_K, BLOCK_N] tile of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if TMA:
            a = A_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = tl.trans(W_desc.load([pid_n * BLOCK_N, k * BLOCK_K]))
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = (rows[:, None] < M) & (cols[None, :] < N)
    c_offs = rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    if STORE_PRE:
        # Saved for the backward's gelu'(t + b), rounded as the unfused path's matmul output is.
        if TMA:
            T_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(T.dtype.element_ty))
        else:
            tl.store(T + c_offs, acc.to(T.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    c = gelu_fp32(acc, APPROX_TANH).to(C.dtype.element_ty)
    if TMA:  # rows / columns past M, N are clipped by the descriptor
        C_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c)
    else:
        tl.store(C + c_offs, c, mask=mask)


def set_tma_block_shapes(nargs):
    """pre_hook of every config (the launcher calls it for a forced TMA launch too): a host
    descriptor's block shape is part of the kernel's signature. Under a TMA config it follows
    the tile; under a pointer config (descriptors given but unused) it goes back to the
    launcher's placeholder (tma_placeholder_block), so that config compiles once whatever ran
    before it."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    for name, shape in (("A_desc", [bm, bk]), ("W_desc", [bn, bk]), ("C_desc", [bm, bn]), ("T_desc", [bm, bn])):
        d = nargs[name]
        if d is not None:
            d.block_shape = shape if nargs["TMA"] else tma_placeholder_block(2, d.base.element_size())


# H100 bf16/fp16: 128-wide tiles feed wgmma (BLOCK_M multiple of 64, 4 or 8 warps);
# 3-4 stages of (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes fit in 228 KB of shared memory.
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
HOPPER_TILES = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4), (256, 128, 64, 3, 8),
                (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]


def _configs(tiles, tma):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "TMA": tma},
                          num_stages=stages, num_warps=warps, pre_hook=set_tma_block_shapes)
            for bm, bn, bk, stages, warps in tiles]


def _prune(configs, named_args, **kwargs):
    """TMA configs only where the launcher gave descriptors (TMA_OK 1: beside the pointer ones,
    2: instead of them)."""
    tma_ok = kwargs.get("TMA_OK", named_args.get("TMA_OK", 0))
    kept = [c for c in configs if tma_config_allowed(c, tma_ok)]
    return kept or configs[:1]


# The GPU entry point; the interpreter calls matmul_bias_gelu_kernel with one small fixed
# config instead (benchmarking configs on the interpreter would take minutes).
matmul_bias_gelu_autotuned = triton.autotune(
    configs=_configs(HOPPER_TILES, False) + _configs(HOPPER_TILES, True), key=["M_BUCKET", "N", "K", "TMA_OK"],
    prune_configs_by={"early_config_prune": _prune})(matmul_bias_gelu_kernel)

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
# GPTFAST_MATMUL_AUTOTUNE=0 on a GPU: one of HOPPER_TILES (so the AOT check compiles it), whose
# 4 stages of 128 x 64 tiles (128 KB in 16 bits) fit an A100's shared memory too
FIXED_TILE = (128, 128, 64, 4, 8)


def fixed_config():
    """(meta-parameters, launch options) of the untuned config (TMA is the launcher's choice)."""
    bm, bn, bk, stages, warps = FIXED_TILE
    assert FIXED_TILE in HOPPER_TILES
    return ({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            {"num_stages": stages, "num_warps": warps})
