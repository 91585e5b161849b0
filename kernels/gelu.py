"""Triton kernels: fused bias + GELU, forward and backward, computed in fp32.

Launchers, autograd and torch.library registration: gptfast/ops/_norm_triton.py.

GELU forms:
  "tanh" (GPT-2): 0.5 u (1 + tanh(z)), z = sqrt(2/pi) (u + 0.044715 u^3). Written as
    u * sigmoid(2z), since 0.5 (1 + tanh(z)) = sigmoid(2z): only exp is needed (Triton 3.6
    and 3.9 have no common tanh in tl.math), and 1 / (1 + exp(-2z)) saturates cleanly to
    0 or 1 at large |z| (exp overflow to inf gives 0, never NaN).
  "none" (erf, GPT-1): 0.5 u (1 + erf(u / sqrt(2))), tl.math.erf (in 3.6, 3.9, interpreter).

Kernels tile [BLOCK_M, BLOCK_N] so the bias tile is loaded once per program and rows
stay contiguous for vectorised loads. The backward also reduces dbias: each program
walks a run of row tiles, sums dU over them in fp32, writes one partial row; the
launcher reduces the partials with layer_norm.sum_partials_kernel.
"""
import triton
import triton.language as tl

# constexpr: Triton kernels may only read globals declared as compile-time constants.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _two_z(u):
    # 2z of the tanh form, floored at -80 so exp(-2z) stays finite (5.5e34): gelu there is
    # below 1e-33 either way, and no inf reaches the arithmetic.
    return tl.maximum(2.0 * _SQRT_2_OVER_PI * (u + _GELU_C * u * u * u), -80.0)


@triton.jit
def gelu_fp32(u, APPROX_TANH: tl.constexpr):
    """gelu(u) for fp32 u; also the epilogue of kernels/matmul_gelu.py."""
    if APPROX_TANH:
        return u / (1.0 + tl.exp(-_two_z(u)))
    else:
        return 0.5 * u * (1.0 + tl.math.erf(u * _INV_SQRT_2))


@triton.jit
def gelu_grad_fp32(u, APPROX_TANH: tl.constexpr):
    """d gelu(u) / du for fp32 u."""
    if APPROX_TANH:
        s = 1.0 / (1.0 + tl.exp(-_two_z(u)))  # sigmoid(2z) = 0.5 (1 + tanh z)
        # d/du [u s] = s + u * 2 s (1 - s) * dz/du, and 0.5 (1 - tanh^2 z) = 2 s (1 - s)
        dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * u * u)
        return s + 2.0 * u * s * (1.0 - s) * dz
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(u * _INV_SQRT_2))
        return cdf + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u)


@triton.jit
def bias_gelu_fwd_kernel(
    X,  # [M, N] pre-activation without the bias, row stride stride_x
    B,  # [N] bias, any float dtype (read only if HAS_BIAS)
    Y,  # [M, N] out: gelu(x + bias) in Y's dtype, row stride stride_y
    M, N, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows[:, None] < M) & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    u = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = gelu_fp32(u, APPROX_TANH)
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bias_gelu_bwd_kernel(
    DY,  # [M, N] gradient of y, row stride stride_dy
    X,  # [M, N] the forward's input (without the bias), row stride stride_x
    B,  # [N] bias (read only if HAS_BIAS: added to x before gelu')
    DX,  # [M, N] out: dy * gelu'(x + bias), DX's dtype, row stride stride_dx
    DB_PARTIAL,  # [G, N] out, fp32: column sums of DX over this program's rows (if COMPUTE_DB)
    M, N, stride_dy, stride_x, stride_dx, rows_per_program,
    HAS_BIAS: tl.constexpr, COMPUTE_DB: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # COMPUTE_DB is separate from HAS_BIAS so that a bias that needs no gradient costs
    # no partial sums (and no reduce launch).
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        bias = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    for r0 in range(row_start, tl.minimum(row_start + rows_per_program, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_mask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        u = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += bias[None, :]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        du = dy * gelu_grad_fp32(u, APPROX_TANH)  # masked lanes: dy = 0, so du = 0
        tl.store(DX + rows64 * stride_dx + cols[None, :], du.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            db_acc += tl.sum(du, axis=0)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid_m * N + cols, db_acc, mask=col_mask)
