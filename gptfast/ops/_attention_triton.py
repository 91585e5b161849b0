"""Triton fast paths of ops.attention (flash-attention fwd + bwd) and ops.decode_attention.

Layers, bottom up: kernels (kernels/attention.py, kernels/decode_attention.py) -> launchers
here (layouts, grids, split counts) -> torch.library custom ops ``gptfast::flash_attn_fwd``,
``gptfast::flash_attn_bwd`` and ``gptfast::decode_attention`` with fake (meta)
implementations and registered autograd, so torch.compile(fullgraph=True) traces each as one
node and CUDA graphs capture them -> the four entry points at the bottom, called by
gptfast/ops/attention.py (inputs there are already validated: 4-D, one dtype, one device).

Imported lazily; nothing touches CUDA at import. No host syncs: grids and split counts
depend on shapes only, cache_seqlens is read by the kernels on the device.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton

from . import _tma as _tma_mod
from ._dispatch import env_switch, import_source_package, triton_interpret


import_source_package("kernels", "kernels")
from gptfast.kernels import attention as _attn_k  # noqa: E402
from gptfast.kernels import decode_attention as _dec_k  # noqa: E402
from gptfast.kernels import LAUNCH_OPTIONS  # noqa: E402

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128)
DECODE_MAX_TQ = 64  # all Tq queries of a row share one program's registers
DECODE_PROGRAMS_PER_SM = 2  # split-K target: enough programs for every SM, few partials to reduce
DECODE_MAX_SPLITS = 128
INTERPRETER_DECODE_SPLITS = 3  # > 1 so the CPU tests exercise the log-sum-exp reduce
_INT32_MAX = 2**31 - 1


def _new_empty(shape, dtype, device):
    """Every output and scratch buffer comes from here (the tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _bhtd_like_bthd(B, H, T, D, dtype, device):
    """[B, H, T, D] whose memory is [B, T, H, D]: the model's y.transpose(1, 2).reshape(B, T, C)
    after attention is then a free view instead of a copy."""
    return _new_empty((B, T, H, D), dtype, device).transpose(1, 2)


def _span(t: torch.Tensor) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1


def _common_reason(names, tensors) -> Optional[str]:
    for name, t in zip(names, tensors):
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not supported by the Triton kernel (float16, bfloat16, float32)"
        if t.numel() == 0:
            return f"{name} is empty (shape {tuple(t.shape)})"
        if _span(t) > _INT32_MAX:
            return f"{name} spans more than 2**31 elements (32-bit offsets in the kernel)"
    d = tensors[0].shape[-1]
    if d not in _HEAD_DIMS:
        return f"head dim {d} is not supported by the Triton kernel (one of {_HEAD_DIMS})"
    if tensors[2].shape[-1] != d:
        return f"{names[2]} head dim {tensors[2].shape[-1]} differs from {names[0]}'s {d}"
    return None


def attention_unsupported_reason(q, k, v, causal, scale, dropout_p: float = 0.0) -> Optional[str]:
    """Why the flash-attention kernel cannot run on these inputs (device already checked), or None."""
    reason = _common_reason(("q", "k", "v"), (q, k, v))
    if reason:
        return reason
    if causal and q.shape[2] > k.shape[2]:
        return (f"causal attention with more queries ({q.shape[2]}) than keys ({k.shape[2]}): "
                "the first rows would see no key")
    if q.shape[0] * q.shape[1] > 65535:
        return f"B * H = {q.shape[0] * q.shape[1]} exceeds the grid's 65535 limit"
    if dropout_p > 0 and q.shape[2] * k.shape[2] > _INT32_MAX:
        return (f"dropout over Tq * Tk = {q.shape[2] * k.shape[2]} weights per head: the mask's "
                "random counter (query * Tk + key) is 32-bit")
    return None


def decode_unsupported_reason(q, k_cache, v_cache, cache_seqlens) -> Optional[str]:
    """Why the flash-decoding kernel cannot run on these inputs (device already checked), or None."""
    reason = _common_reason(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    if reason:
        return reason
    if q.shape[2] > DECODE_MAX_TQ:
        return f"q has Tq = {q.shape[2]} new queries per row; the decode kernel takes at most {DECODE_MAX_TQ}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        return "the decode kernel has no backward (inputs require grad; the reference is differentiable)"
    if cache_seqlens.device != q.device:
        return f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}"
    if q.shape[0] * q.shape[1] > 65535:
        return f"B * H = {q.shape[0] * q.shape[1]} exceeds the grid's 65535 limit"
    return None


def _dot_flags(dtype):
    # fp32: exact fp32 products, as the reference (no silent TF32). The interpreter's tl.dot
    # multiplies bf16 as raw bits, so there bf16 operands are upcast first.
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST_DOT=triton_interpret() and dtype == torch.bfloat16)


def _t_bucket(*ts: int) -> int:
    return triton.next_power_of_2(max(ts))


def _autotune() -> bool:
    """GPU only. GPTFAST_ATTN_AUTOTUNE=0 launches kernels/attention.py's FIXED_CONFIGS instead:
    no tuning runs (fast start-up, and quick test sweeps over many shapes)."""
    return env_switch("GPTFAST_ATTN_AUTOTUNE")


def _tma(kind: str, tensors: dict):
    """(TMA_OK, descriptors) for attention kernel `kind` ("fwd", "dkdv", "dq"): gptfast/ops/_tma.py.
    tensors: descriptor argument name -> its [B, H, T, D] tensor. fp32 inputs keep to pointers
    (their FMA configs gain nothing from TMA)."""
    names = {"O_desc": "out", "DO_desc": "dout"}
    named = {names.get(n, n[:-len("_desc")].lower()): t for n, t in tensors.items()}
    ok, descs = _tma_mod.descriptors(f"flash-attention {kind} kernel", named,
                                     eligible=tensors["Q_desc"].dtype != torch.float32)
    return ok, dict(zip(tensors, descs.values()))


def _launch(kind, autotuned, plain, grid, args, flags, head_dim, dtype, tma_tensors):
    """Run one attention kernel: autotuned on a GPU, else with a fixed config (or, under the
    interpreter, its small one). grid(meta) -> the launch grid for meta-parameters BLOCK_M /
    BLOCK_N. tma_tensors: descriptor name -> tensor, in the kernel's order (kernels/attention.py
    TMA_DESCRIPTORS); the fixed and interpreter configs take TMA only when it is forced."""
    assert list(tma_tensors) == list(_attn_k.TMA_DESCRIPTORS[kind]), (kind, list(tma_tensors))
    tma_ok, descs = _tma(kind, tma_tensors)
    args = (*args, tma_ok, *descs.values())
    if _autotune() and not triton_interpret():
        autotuned[grid](*args, **flags, **LAUNCH_OPTIONS)
        return
    if triton_interpret():
        cfg = {"fwd": _attn_k.INTERPRETER_FWD, "dkdv": _attn_k.INTERPRETER_DKDV, "dq": _attn_k.INTERPRETER_DQ}[kind]
        options = {}
    else:
        cfg, launch = _attn_k.fixed_config(kind, head_dim, dtype == torch.float32, flags["DROPOUT"])
        options = {**launch, **LAUNCH_OPTIONS}
    cfg = {**cfg, "TMA": tma_ok == 2}
    if cfg["TMA"]:
        _attn_k.set_tma_block_shapes(kind, {**descs, **flags, **cfg})
    plain[grid(cfg)](*args, **flags, **cfg, **options)


# ---- flash-attention launchers ------------------------------------------------------------

def _flash_fwd_launch(q, k, v, causal: bool, scale: float, kv_start=None, kv_end=None,
                      dropout_p: float = 0.0, seed=None):
    """seed: [1] int64 on q's device, given iff dropout_p > 0 (the mask is a function of it)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = _bhtd_like_bthd(B, H, Tq, D, q.dtype, q.device)
    lse = _new_empty((B, H, Tq), torch.float32, q.device)
    args = (q, k, v, out, lse, kv_start, kv_end, seed, dropout_p, scale * _attn_k.LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Tq, Tk, _t_bucket(Tq, Tk))
    flags = dict(CAUSAL=causal, WINDOW=kv_start is not None, DROPOUT=seed is not None, HEAD_DIM=D,
                 **_dot_flags(q.dtype))
    _launch("fwd", _attn_k.attn_fwd_autotuned, _attn_k.attn_fwd_kernel,
            lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H), args, flags, D, q.dtype,
            dict(Q_desc=q, K_desc=k, V_desc=v, O_desc=out))
    return out, lse


def _flash_bwd_launch(dout, q, k, v, out, lse, causal: bool, scale: float, kv_start=None, kv_end=None,
                      dropout_p: float = 0.0, seed=None):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dev = q.device
    delta = _new_empty((B, H, Tq), torch.float32, dev)
    bm = _attn_k.PREPROCESS_BLOCK_M
    _attn_k.attn_bwd_preprocess_kernel[(triton.cdiv(Tq, bm), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Tq, HEAD_DIM=D, BLOCK_M=bm, **LAUNCH_OPTIONS)

    dq = _bhtd_like_bthd(B, H, Tq, D, q.dtype, dev)
    dk = _bhtd_like_bthd(B, H, Tk, D, k.dtype, dev)
    dv = _bhtd_like_bthd(B, H, Tk, D, v.dtype, dev)
    common = (q, k, v, dout)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    scales = (scale * _attn_k.LOG2E, scale)
    tail = (H, Tq, Tk, _t_bucket(Tq, Tk))
    flags = dict(CAUSAL=causal, WINDOW=kv_start is not None, DROPOUT=seed is not None, HEAD_DIM=D,
                 **_dot_flags(q.dtype))
    inputs = dict(Q_desc=q, K_desc=k, V_desc=v, DO_desc=dout)
    window = (kv_start, kv_end, seed, dropout_p)
    dkdv_args = (*common, dk, dv, lse, delta, *window, *scales, *strides, *dk.stride(), *dv.stride(), *tail)
    dq_args = (*common, dq, lse, delta, *window, *scales, *strides, *dq.stride(), *tail)
    _launch("dkdv", _attn_k.attn_bwd_dkdv_autotuned, _attn_k.attn_bwd_dkdv_kernel,
            lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * H), dkdv_args, flags, D, q.dtype,
            dict(inputs, DK_desc=dk, DV_desc=dv))
    _launch("dq", _attn_k.attn_bwd_dq_autotuned, _attn_k.attn_bwd_dq_kernel,
            lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H), dq_args, flags, D, q.dtype,
            dict(inputs, DQ_desc=dq))
    return dq, dk, dv


def dropout_keep_mask(seed, B: int, H: int, Tq: int, Tk: int, dropout_p: float) -> torch.Tensor:
    """int8 [B, H, Tq, Tk], 1 where the attention kernels keep a weight under this seed ([1]
    int64) and dropout_p, else 0 (kernels/attention.py _dropout_keep). For tests and debugging."""
    z = _new_empty((B, H, Tq, Tk), torch.int8, seed.device)
    bm, bn = 32, 32
    _attn_k.attn_dropout_mask_kernel[(triton.cdiv(Tq, bm), triton.cdiv(Tk, bn), B * H)](
        seed, z, float(dropout_p), Tq, Tk, BLOCK_M=bm, BLOCK_N=bn)
    return z


def new_dropout_seed(device) -> torch.Tensor:
    """[1] int64 on device, drawn from torch's default generator there (torch.manual_seed sets it;
    gradient checkpointing restores it): no host sync, and traceable by torch.compile and
    captured by CUDA graphs, as torch's own dropout."""
    return torch.randint(0, torch.iinfo(torch.int64).max, (1,), dtype=torch.int64, device=device)


# ---- flash-decoding launcher --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_num_splits(device: torch.device, batch_heads: int, tmax: int, block_n: int) -> int:
    """Splits of the cache per (b, h), from shapes only (a CUDA graph replays it unchanged)."""
    max_splits = min(triton.cdiv(tmax, block_n), DECODE_MAX_SPLITS)
    if device.type != "cuda":
        return min(INTERPRETER_DECODE_SPLITS, max_splits)
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(_sm_count(index) * DECODE_PROGRAMS_PER_SM, batch_heads)
    return max(1, min(want, max_splits))


def _decode_launch(q, k_cache, v_cache, cache_seqlens, kv_start=None, num_splits: Optional[int] = None,
                   scale: Optional[float] = None):
    B, H, Tq, D = q.shape
    qk_scale = _attn_k.LOG2E / math.sqrt(D) if scale is None else _attn_k.LOG2E * scale
    Tmax = k_cache.shape[2]
    dev = q.device
    block_q = max(16, triton.next_power_of_2(Tq))
    if triton_interpret():
        block_n, num_warps = _dec_k.INTERPRETER_BLOCK_N, None
    else:
        block_n, num_warps = _dec_k.decode_tile(q.dtype == torch.float32, block_q, D)
    if num_splits is None:
        num_splits = _decode_num_splits(dev, B * H, Tmax, block_n)
    num_splits = max(1, min(num_splits, triton.cdiv(Tmax, block_n)))  # each split can get a key block
    out = _bhtd_like_bthd(B, H, Tq, D, q.dtype, dev)
    if num_splits == 1:
        o_part, lse_part = out, _new_empty((0,), torch.float32, dev)
    else:
        o_part = _new_empty((B, H, num_splits, Tq, D), torch.float32, dev)
        lse_part = _new_empty((B, H, num_splits, Tq), torch.float32, dev)
    launch = {} if triton_interpret() else dict(num_warps=num_warps, num_stages=_dec_k.DECODE_NUM_STAGES,
                                                   **LAUNCH_OPTIONS)
    _dec_k.decode_split_kernel[(num_splits, B * H)](
        q, k_cache, v_cache, cache_seqlens, kv_start, o_part, lse_part, qk_scale,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        H, Tq, Tmax,
        NUM_SPLITS=num_splits, WINDOW=kv_start is not None, HEAD_DIM=D, **_dot_flags(q.dtype),
        BLOCK_Q=block_q, BLOCK_N=block_n, **launch)
    if num_splits > 1:
        _dec_k.decode_reduce_kernel[(B * H * Tq,)](
            o_part, lse_part, out, *out.stride(), H, Tq,
            NUM_SPLITS=num_splits, WINDOW=kv_start is not None, HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits),
            **({} if triton_interpret() else dict(num_warps=_dec_k.REDUCE_NUM_WARPS, **LAUNCH_OPTIONS)))
    return out


# ---- custom ops ---------------------------------------------------------------------------

@torch.library.custom_op("gptfast::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                    kv_start: Optional[torch.Tensor] = None, kv_end: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Tq, D] in q's dtype, lse [B, H, Tq] fp32 in log2 units, for the backward).
    kv_start, kv_end: both or neither, [B] int, contiguous: each row's key window.
    dropout_p > 0 with seed ([1] int64): dropout on the weights, the mask a function of seed
    (so the op is a function of its inputs); lse stays the undropped weights'."""
    return _flash_fwd_launch(q, k, v, causal, scale, kv_start, kv_end, *_dropout_args(dropout_p, seed))


def _dropout_args(dropout_p, seed):
    """(dropout_p, seed) as the launchers take them: seed None (DROPOUT off) unless dropout_p > 0."""
    if dropout_p > 0 and seed is None:
        raise ValueError(f"dropout_p = {dropout_p} needs a seed ([1] int64 tensor), got None")
    return (float(dropout_p), seed) if dropout_p > 0 else (0.0, None)


@_flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, kv_start=None, kv_end=None, dropout_p=0.0, seed=None):
    B, H, Tq, D = q.shape
    return q.new_empty((B, Tq, H, D)).transpose(1, 2), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("gptfast::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, causal: bool, scale: float,
                    kv_start: Optional[torch.Tensor] = None, kv_end: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype; dropout_p, seed: the forward's (the same mask)."""
    return _flash_bwd_launch(dout, q, k, v, out, lse, causal, scale, kv_start, kv_end,
                             *_dropout_args(dropout_p, seed))


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, kv_start=None, kv_end=None, dropout_p=0.0, seed=None):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    return (q.new_empty((B, Tq, H, D)).transpose(1, 2), k.new_empty((B, Tk, H, D)).transpose(1, 2),
            v.new_empty((B, Tk, H, D)).transpose(1, 2))


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, causal, scale, kv_start, kv_end, dropout_p, seed = inputs
    out, lse = output
    ctx.causal = causal
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.save_for_backward(q, k, v, out, lse, kv_start, kv_end, seed)


def _flash_attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse, kv_start, kv_end, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.gptfast.flash_attn_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale, kv_start, kv_end,
                                                  ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attn_fwd.register_autograd(_flash_attn_backward, setup_context=_flash_attn_setup)


@torch.library.custom_op("gptfast::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: torch.Tensor, kv_start: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None) -> torch.Tensor:
    """out [B, H, Tq, D] in q's dtype; see kernels/decode_attention.py for the semantics."""
    return _decode_launch(q, k_cache, v_cache, cache_seqlens, kv_start, scale=scale)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, kv_start=None, scale=None):
    B, H, Tq, D = q.shape
    return q.new_empty((B, Tq, H, D)).transpose(1, 2)


# ---- entry points (called by gptfast/ops/attention.py) ------------------------------------

def _dense_window(q, tk, kv_start, kv_end):
    """Both window bounds, dense ([B] tensors read at unit stride), or (None, None) without a
    window; a missing bound is the whole range (0 or Tk)."""
    if kv_start is None and kv_end is None:
        return None, None
    B = q.shape[0]
    if kv_start is None:
        kv_start = torch.zeros(B, dtype=torch.int32, device=q.device)
    if kv_end is None:
        kv_end = torch.full((B,), tk, dtype=torch.int32, device=q.device)
    return kv_start.contiguous(), kv_end.contiguous()


def attention(q, k, v, causal, scale, kv_start=None, kv_end=None, dropout_p: float = 0.0):
    """softmax(q k^T * scale + causal mask [+ key window]) [dropped out] v; differentiable w.r.t.
    q, k, v. dropout_p > 0: a fresh seed per call from the device's default generator."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kv_start, kv_end = _dense_window(q, k.shape[2], kv_start, kv_end)
    if dropout_p > 0:
        out, _lse = torch.ops.gptfast.flash_attn_fwd(q, k, v, bool(causal), scale, kv_start, kv_end,
                                                     float(dropout_p), new_dropout_seed(q.device))
    else:  # the op exactly as without dropout
        out, _lse = torch.ops.gptfast.flash_attn_fwd(q, k, v, bool(causal), scale, kv_start, kv_end)
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, kv_start=None, scale=None):
    """Attention of q [B, H, Tq, D] over cache entries kv_start[b] (default 0) .. cache_seqlens[b]
    of row b (both read at unit stride: a strided view is copied), scores times scale (None:
    1/sqrt(D))."""
    if kv_start is not None:
        kv_start = kv_start.contiguous()
    return torch.ops.gptfast.decode_attention(q, k_cache, v_cache, cache_seqlens.contiguous(), kv_start,
                                              None if scale is None else float(scale))
