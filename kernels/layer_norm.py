"""Triton kernels: fused residual-add + LayerNorm, forward and backward.

Launchers, autograd and torch.library registration: gptfast/ops/_norm_triton.py.

Forward: one row per program, the whole row in registers (BLOCK_N = next_pow2(N)),
so x and the residual are read once, and y and h = x + residual written once; the
statistics are exact two-pass (mean, then sum of squared deviations) in fp32.

Backward: a fixed number of programs (a few per SM), each walking a contiguous run
of rows. Each row's dx needs only that row; dweight/dbias are sums over all rows,
so each program accumulates its rows in fp32 registers and writes one partial row
to a [G, N] buffer, and ``sum_partials_kernel`` reduces the G partials: two stages,
no atomics, deterministic.

Only APIs present in Triton 3.6 and 3.9 (and the interpreter) are used.
"""
import triton
import triton.language as tl


@triton.jit
def layer_norm_fwd_kernel(
    X,  # [M, N] input, row stride stride_x, x's dtype
    R,  # [M, N] residual, x's dtype, row stride stride_r (read only if HAS_RESIDUAL)
    W,  # [N] weight, any float dtype (read only if HAS_WEIGHT)
    B,  # [N] bias, any float dtype (read only if HAS_BIAS)
    Y,  # [M, N] out: LN(h), x's dtype, row stride stride_y
    H,  # [M, N] out: h = x + residual, x's dtype, row stride stride_h (written only if HAS_RESIDUAL)
    Mean,  # [M] out, fp32: per-row mean of h, saved for the backward
    Rstd,  # [M] out, fp32: per-row 1/sqrt(var + eps), saved for the backward
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to x's dtype before the statistics, as the eager model's `x + residual`
        # does: h is the residual stream the model carries on, and y must be LN of that h.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean = tl.sum(h, axis=0) / N
    d = tl.where(mask, h - mean, 0.0)  # masked lanes must not add (0 - mean)^2 to the variance
    var = tl.sum(d * d, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = d * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def layer_norm_bwd_kernel(
    DY,  # [M, N] gradient of y, row stride stride_dy
    DH,  # [M, N] gradient of the returned h, row stride stride_dh (read only if HAS_DH)
    H,  # [M, N] the normalised input h (x itself when there was no residual), row stride stride_h
    W,  # [N] weight (read only if HAS_WEIGHT)
    Mean,  # [M] fp32, from the forward
    Rstd,  # [M] fp32, from the forward
    DX,  # [M, N] out: total gradient of h = dx = dresidual, x's dtype, row stride stride_dx
    DW_PARTIAL,  # [G, N] out, fp32: this program's sum of dy * xhat over its rows (if HAS_WEIGHT)
    DB_PARTIAL,  # [G, N] out, fp32: this program's sum of dy over its rows (if HAS_BIAS)
    stride_dy, stride_dh, stride_h, stride_dx,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 bounds make the loop index int64: row * stride overflows int32 past 2^31 elements.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
        else:
            wdy = dy
        # d/dh of LN: rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat)); masked lanes are 0.
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            # The model reuses h downstream (the residual stream): its gradient joins here.
            dx = dx + tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=mask)


@triton.jit
def sum_partials_kernel(
    P,  # [G, N] fp32 partial column sums, contiguous
    OUT,  # [N] out: sum over G, in OUT's dtype (the parameter's dtype)
    G, N,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Second stage of the dweight / dbias reductions (also used by the GELU backward's dbias).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        m = (rows[:, None] < G) & col_mask[None, :]
        acc += tl.load(P + rows[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)
