"""Triton fast paths of ops.layer_norm, ops.bias_gelu and ops.linear_bias_gelu.

Layers, bottom up: kernels (kernels/layer_norm.py, gelu.py, matmul_gelu.py) ->
launchers here (shapes, grids, warps, partial-sum reduces) -> torch.library custom
ops ``gptfast::*`` with fake (meta) implementations and registered autograd, so
torch.compile(fullgraph=True) traces them as single nodes and CUDA graphs capture
them -> the three public entry points at the bottom, called by gptfast/ops/norm.py
after it has chosen the kernel backend (so inputs here are already validated).

Imported lazily (by gptfast.ops.norm, when a kernel may run); nothing touches CUDA
at import. No host syncs: grid sizes depend on shapes only.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from . import _tma
from ._dispatch import import_source_package

import_source_package("kernels", "kernels")
from gptfast.kernels import gelu as _gelu_k  # noqa: E402
from gptfast.kernels import layer_norm as _ln_k  # noqa: E402
from gptfast.kernels import matmul_gelu as _mm_k  # noqa: E402
from gptfast.kernels import LAUNCH_OPTIONS  # noqa: E402

from ._dispatch import env_switch, triton_interpret  # noqa: E402

# ---- tuning and dispatch constants (chosen by reasoning; to be measured on the H100: kernels/NORM_NOTES.md) ----

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LN_MAX_N = 16384  # the LN keeps a whole row in registers; wider rows fall back to the reference
# Backward programs per SM. Each program walks a run of rows and writes one fp32 partial row of
# dW / db: more programs keep more loads in flight, fewer leave less to reduce. LN rows are short
# (1.5 KB per tensor at 768 bf16), so it needs more programs than the 4096-element GELU tiles.
LN_BWD_PROGRAMS_PER_SM = 8
GELU_BWD_PROGRAMS_PER_SM = 4
INTERPRETER_BWD_PROGRAMS = 3  # > 1 so the CPU tests exercise the two-stage reduction
GELU_TILE = 4096  # elements per bias+GELU program: BLOCK_M x BLOCK_N, BLOCK_N <= 1024
GELU_WARPS = 4
# The MLP front (linear_bias_gelu): "epilogue" runs kernels/matmul_gelu.py (bias + GELU fused into
# the matmul's store, no pre-activation round trip through HBM); "split" runs torch.mm (cuBLAS)
# then the fused bias_gelu kernel. The epilogue is the default: at 16384 x 768 -> 3072 it saves
# ~200 MB of traffic per call, worth ~80 us against a ~110 us matmul, so it wins unless the
# Triton main loop is > ~1.7x slower than cuBLAS's (to be confirmed by bench on the H100).
MLP_FRONT = "epilogue"
# Below this many rows (decode steps, short prompts) the saved traffic is negligible, and the
# autotuner would tune once per row bucket, which must not happen inside CUDA-graph capture:
# those calls take the split path.
EPILOGUE_MIN_ROWS = 256


def _new_empty(shape, dtype, device):
    """Every output and scratch buffer comes from here (the tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, N] with unit column stride (a view when t's layout allows it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * per_sm
    return INTERPRETER_BWD_PROGRAMS


def _row_warps(block_n: int) -> int:
    # ~8 elements per thread: one 16-byte vector per load in 16-bit dtypes.
    return min(16, max(1, block_n // 256))


def _sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Second stage of a dW / db reduction: [G, N] fp32 -> [N] in the parameter's dtype."""
    G, N = partial.shape
    out = _new_empty((N,), dtype, partial.device)
    # Narrow column blocks: N = 768 still spreads over 24 programs (the sum over G is serial).
    BLOCK_N = min(triton.next_power_of_2(N), 32)
    _ln_k.sum_partials_kernel[(triton.cdiv(N, BLOCK_N),)](
        partial, out, G, N, BLOCK_G=64, BLOCK_N=BLOCK_N, num_warps=4, **LAUNCH_OPTIONS)
    return out


def unsupported_reason(kind: str, *tensors) -> Optional[str]:
    """Why the Triton path cannot run on these inputs (device already checked), or None."""
    names = {"layer_norm": ("x", "weight", "bias", "residual"), "bias_gelu": ("x", "bias"),
             "linear_bias_gelu": ("x", "weight", "bias")}
    if kind not in names:
        raise ValueError(f"kind must be one of {tuple(names)}, got {kind!r}")
    for name, t in zip(names[kind], tensors):
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not supported by the Triton kernel (float16, bfloat16, float32)"
    x = tensors[0]
    if x.shape[-1] == 0:
        return "x has an empty last dim"
    if kind == "layer_norm" and x.shape[-1] > LN_MAX_N:
        return f"hidden size {x.shape[-1]} exceeds the fused LayerNorm's limit of {LN_MAX_N}"
    if kind == "linear_bias_gelu":
        weight = tensors[1]
        if weight.dtype != x.dtype:
            return f"weight dtype {weight.dtype} differs from x dtype {x.dtype}"
        if weight.device != x.device:
            return f"weight is on {weight.device} but x is on {x.device}"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast is enabled (the reference's F.linear applies it)"
    return None


# ---- launchers ----------------------------------------------------------------------------

def _layer_norm_fwd_launch(x, weight, bias, residual, eps):
    x2 = _rows(x)
    M, N = x2.shape
    dev = x.device
    y = _new_empty((M, N), x.dtype, dev)
    h = _new_empty((M, N), x.dtype, dev) if residual is not None else _new_empty((0,), x.dtype, dev)
    mean = _new_empty((M,), torch.float32, dev)
    rstd = _new_empty((M,), torch.float32, dev)
    if M > 0:
        r2 = _rows(residual) if residual is not None else x2
        BLOCK_N = triton.next_power_of_2(N)
        _ln_k.layer_norm_fwd_kernel[(M,)](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, h if residual is not None else y, mean, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0) if residual is not None else 0,
            N, eps,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_N=BLOCK_N, num_warps=_row_warps(BLOCK_N), **LAUNCH_OPTIONS)
    lead = x.shape[:-1]
    return y.view(x.shape), (h.view(x.shape) if residual is not None else h), mean.view(lead), rstd.view(lead)


def _layer_norm_bwd_launch(dy, dh, h, weight, bias, mean, rstd):
    h2 = _rows(h)
    M, N = h2.shape
    dev = h.device
    dx = _new_empty((M, N), h.dtype, dev)

    def empty():  # a fresh one each time: custom-op outputs must not alias each other
        return _new_empty((0,), torch.float32, dev)

    if M == 0:
        dw = torch.zeros(N, dtype=weight.dtype, device=dev) if weight is not None else empty()
        db = torch.zeros(N, dtype=bias.dtype, device=dev) if bias is not None else empty()
        return dx.view(h.shape), dw, db
    dy2 = _rows(dy)
    dh2 = _rows(dh) if dh is not None else dy2
    rows_per_program = triton.cdiv(M, min(M, _target_programs(dev, LN_BWD_PROGRAMS_PER_SM)))
    G = triton.cdiv(M, rows_per_program)
    dw_part = _new_empty((G, N), torch.float32, dev) if weight is not None else empty()
    db_part = _new_empty((G, N), torch.float32, dev) if bias is not None else empty()
    BLOCK_N = triton.next_power_of_2(N)
    _ln_k.layer_norm_bwd_kernel[(G,)](
        dy2, dh2, h2, weight if weight is not None else h2, mean, rstd, dx, dw_part, db_part,
        dy2.stride(0), dh2.stride(0), h2.stride(0), dx.stride(0),
        M, N, rows_per_program,
        HAS_DH=dh is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=BLOCK_N, num_warps=_row_warps(BLOCK_N), **LAUNCH_OPTIONS)
    dw = _sum_partials(dw_part, weight.dtype) if weight is not None else empty()
    db = _sum_partials(db_part, bias.dtype) if bias is not None else empty()
    return dx.view(h.shape), dw, db


def _gelu_blocks(N):
    BLOCK_N = min(triton.next_power_of_2(N), 1024)
    return max(1, GELU_TILE // BLOCK_N), BLOCK_N


def _bias_gelu_fwd_launch(x, bias, approximate):
    x2 = _rows(x)
    M, N = x2.shape
    y = _new_empty((M, N), x.dtype, x.device)
    if M > 0:
        BLOCK_M, BLOCK_N = _gelu_blocks(N)
        _gelu_k.bias_gelu_fwd_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
            x2, bias if bias is not None else x2, y, M, N, x2.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=GELU_WARPS, **LAUNCH_OPTIONS)
    return y.view(x.shape)


def _bias_gelu_bwd_launch(dy, x, bias, approximate, compute_db):
    x2 = _rows(x)
    M, N = x2.shape
    dev = x.device
    dx = _new_empty((M, N), x.dtype, dev)
    empty = _new_empty((0,), torch.float32, dev)
    if M == 0:
        return dx.view(x.shape), (torch.zeros(N, dtype=bias.dtype, device=dev) if compute_db else empty)
    dy2 = _rows(dy)
    BLOCK_M, BLOCK_N = _gelu_blocks(N)
    row_tiles, col_tiles = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)
    # With db: a few programs per SM each walk a run of row tiles (fewer partial rows to
    # reduce); without: one tile per program.
    if compute_db:
        g = max(1, min(row_tiles, _target_programs(dev, GELU_BWD_PROGRAMS_PER_SM) // col_tiles))
    else:
        g = row_tiles
    rows_per_program = triton.cdiv(row_tiles, g) * BLOCK_M
    G = triton.cdiv(M, rows_per_program)
    db_part = _new_empty((G, N), torch.float32, dev) if compute_db else empty
    _gelu_k.bias_gelu_bwd_kernel[(G, col_tiles)](
        dy2, x2, bias if bias is not None else x2, dx, db_part,
        M, N, dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_program,
        HAS_BIAS=bias is not None, COMPUTE_DB=compute_db, APPROX_TANH=approximate == "tanh",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=GELU_WARPS, **LAUNCH_OPTIONS)
    db = _sum_partials(db_part, bias.dtype) if compute_db else empty
    return dx.view(x.shape), db


def _mlp_front_path(x2: torch.Tensor) -> str:
    if MLP_FRONT == "split" or x2.shape[0] < EPILOGUE_MIN_ROWS:
        return "split"
    if x2.is_cuda and x2.dtype == torch.float32:
        return "split"  # no tensor-core gain in fp32 (ieee dot): cuBLAS's fp32 GEMM is the better main loop
    return "epilogue"


def _linear_bias_gelu_fwd_launch(x, weight, bias, approximate, save_pre):
    x2 = _rows(x)
    M, K = x2.shape
    N = weight.shape[0]
    out_shape = (*x.shape[:-1], N)
    if _mlp_front_path(x2) == "split" or M == 0:
        t = torch.mm(x2, weight.t())
        y = _bias_gelu_fwd_launch(t, bias, approximate)
        return y.view(out_shape), (t.view(out_shape) if save_pre else _new_empty((0,), x.dtype, x.device))
    y = _new_empty((M, N), x.dtype, x.device)
    t = _new_empty((M, N), x.dtype, x.device) if save_pre else y
    # TMA descriptors (Hopper; fp32 keeps to pointers): gptfast/ops/_tma.py
    tma_ok, descs = _tma.descriptors("matmul+bias+GELU", dict(x=x2, weight=weight, out=y,
                                                               pre=t if save_pre else None),
                                     eligible=x.dtype != torch.float32)
    args = (x2, weight, bias if bias is not None else weight, y, t, M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
            min(triton.next_power_of_2(M), 1 << 16), tma_ok, *descs.values())
    flags = dict(HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", STORE_PRE=save_pre,
                 DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                 UPCAST_DOT=triton_interpret() and x.dtype == torch.bfloat16)
    # GPU: autotuned, unless GPTFAST_MATMUL_AUTOTUNE=0 (one fixed config: fast start-up, and
    # quick test sweeps); the interpreter: one small config (timing configs there takes minutes)
    if triton_interpret() or not env_switch("GPTFAST_MATMUL_AUTOTUNE"):
        cfg, options = ((dict(_mm_k.INTERPRETER_CONFIG), {}) if triton_interpret()
                        else _mm_k.fixed_config())
        cfg["TMA"] = tma_ok == 2
        if cfg["TMA"]:
            _mm_k.set_tma_block_shapes({**dict(zip(("A_desc", "W_desc", "C_desc", "T_desc"), descs.values())), **cfg})
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _mm_k.matmul_bias_gelu_kernel[grid](*args, **flags, **cfg, **options, **LAUNCH_OPTIONS)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _mm_k.matmul_bias_gelu_autotuned[grid](*args, **flags, **LAUNCH_OPTIONS)
    return y.view(out_shape), (t.view(out_shape) if save_pre else _new_empty((0,), x.dtype, x.device))


# ---- custom ops: layer norm -----------------------------------------------------------------

@torch.library.custom_op("gptfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h = x + residual, or an empty tensor when residual is None."""
    return _layer_norm_fwd_launch(x, weight, bias, residual, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    # Contiguous whatever x's layout, as the launcher's outputs are (empty_like would keep x's
    # strides, and compiled code reading the real outputs through them would be wrong).
    h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), h, stats, torch.empty_like(stats)


@torch.library.custom_op("gptfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx is the total gradient of h (also the residual's); bias is
    passed for its dtype only; dweight / dbias are empty when weight / bias is None."""
    return _layer_norm_bwd_launch(dy, dh, h, weight, bias, mean, rstd)


@_layer_norm_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd):
    n = h.shape[-1]
    dw = weight.new_empty((n,)) if weight is not None else h.new_empty((0,), dtype=torch.float32)
    db = bias.new_empty((n,)) if bias is not None else h.new_empty((0,), dtype=torch.float32)
    return h.new_empty(h.shape), dw, db  # contiguous, as the launcher's


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, _eps = inputs
    y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual else None
    dx, dw, db = torch.ops.gptfast.layer_norm_bwd(dy, dh, h, weight, bias, mean, rstd)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw if weight is not None and need[1] else None,
            db if bias is not None and need[2] else None, dx if ctx.has_residual and need[3] else None, None)


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ---- custom ops: bias + GELU ----------------------------------------------------------------

@torch.library.custom_op("gptfast::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    return _bias_gelu_fwd_launch(x, bias, approximate)


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)  # contiguous, as the launcher's


@torch.library.custom_op("gptfast::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
                   compute_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias): dx = dy * gelu'(x + bias); dbias (bias's dtype) is empty unless compute_db."""
    return _bias_gelu_bwd_launch(dy, x, bias, approximate, compute_db)


@_bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate, compute_db):
    db = bias.new_empty((x.shape[-1],)) if compute_db else x.new_empty((0,), dtype=torch.float32)
    return x.new_empty(x.shape), db  # contiguous, as the launcher's


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    compute_db = bias is not None and ctx.needs_input_grad[1]
    dx, db = torch.ops.gptfast.bias_gelu_bwd(dy, x, bias, ctx.approximate, compute_db)
    return dx, (db if compute_db else None), None


_bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


# ---- custom op: the MLP front ---------------------------------------------------------------

@torch.library.custom_op("gptfast::linear_bias_gelu_fwd", mutates_args=())
def _linear_bias_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          approximate: str, save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, t): y = gelu(x @ weight^T + bias); t = x @ weight^T (kept for the backward) when
    save_pre, else an empty tensor (inference writes no pre-activation)."""
    return _linear_bias_gelu_fwd_launch(x, weight, bias, approximate, save_pre)


@_linear_bias_gelu_fwd.register_fake
def _(x, weight, bias, approximate, save_pre):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, (torch.empty_like(y) if save_pre else x.new_empty((0,)))


def _linear_bias_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate, save_pre = inputs
    ctx.approximate = approximate
    ctx.save_pre = save_pre
    ctx.save_for_backward(x, weight, bias, output[1])


def _linear_bias_gelu_backward(ctx, dy, _dt):
    # dU = dy * gelu'(t + b) and db = sum(dU) in one fused kernel; dA = dU @ W and
    # dW = dU^T @ A are plain matmuls with nothing to fuse, left to cuBLAS.
    x, weight, bias, t = ctx.saved_tensors
    if not ctx.save_pre:  # forward ran without autograd wanting it: recompute the pre-activation
        t = F.linear(x, weight)
    need = ctx.needs_input_grad
    compute_db = bias is not None and need[2]
    du, db = torch.ops.gptfast.bias_gelu_bwd(dy, t, bias, ctx.approximate, compute_db)
    du2 = du.reshape(-1, du.shape[-1])
    dx = (du2 @ weight).view(x.shape) if need[0] else None
    dw = du2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    return dx, dw, (db if compute_db else None), None, None


_linear_bias_gelu_fwd.register_autograd(_linear_bias_gelu_backward, setup_context=_linear_bias_gelu_setup)


# ---- entry points (called by gptfast/ops/norm.py) -------------------------------------------

def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A [N] parameter as the kernels read it, at unit stride (a view like w[::2] is copied; a
    differentiable copy, so its gradient still reaches w)."""
    return None if t is None else t.contiguous()


def layer_norm(x, weight, bias, eps, residual):
    """LN(x + residual) -> y, or (y, h) with h = x + residual when residual is given."""
    y, h, _mean, _rstd = torch.ops.gptfast.layer_norm_fwd(x, _dense(weight), _dense(bias), residual, float(eps))
    return y if residual is None else (y, h)


def bias_gelu(x, bias, approximate):
    return torch.ops.gptfast.bias_gelu_fwd(x, _dense(bias), approximate)


def linear_bias_gelu(x, weight, bias, approximate):
    # Write the pre-activation only when autograd will need it (not in inference).
    save_pre = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    bias = _dense(bias)
    y, _t = torch.ops.gptfast.linear_bias_gelu_fwd(x, weight, bias, approximate, save_pre)
    return y
