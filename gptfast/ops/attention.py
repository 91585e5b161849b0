"""Causal attention (prefill/training) and attention over a static KV cache.

Public ops: ``attention`` and ``decode_attention``. The references below are the
fallback, the CPU path and the test oracle; the Triton kernels live in
kernels/attention.py and kernels/decode_attention.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _dispatch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(q, k, v, name_q="q", name_k="k", name_v="v"):
    for name, t in ((name_q, q), (name_k, k), (name_v, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch and head dims of q {tuple(q.shape)}, {name_k} {tuple(k.shape)}, "
                         f"{name_v} {tuple(v.shape)} must match")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dim of q ({q.shape[-1]}) and {name_k} ({k.shape[-1]}) must match")


def _check_scale(scale):
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _check_window(name, t, q):
    """kv_start / kv_end: None or an int tensor [B] on q's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != q.shape[0]:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be None or an int tensor of shape [B]=[{q.shape[0]}], got {shape}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _window_softmax(s, allowed, windowed: bool):
    """softmax over the allowed keys. windowed: a query with no allowed key gets all-zero weights
    (SDPA's rule for a fully masked row) instead of NaN, and a NaN-free gradient."""
    if not windowed:
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    seen = allowed.any(dim=-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0)
    return torch.softmax(s, dim=-1) * seen


def _key_window(q, tk, kv_start, kv_end):
    """bool [B, 1, 1, Tk]: key j of row b inside kv_start[b] <= j < kv_end[b] (a missing bound: no limit)."""
    kpos = torch.arange(tk, device=q.device).view(1, 1, 1, -1)
    keep = torch.ones(q.shape[0], 1, 1, tk, dtype=torch.bool, device=q.device)
    if kv_start is not None:
        keep = keep & (kpos >= kv_start.to(torch.long).view(-1, 1, 1, 1))
    if kv_end is not None:
        keep = keep & (kpos < kv_end.to(torch.long).view(-1, 1, 1, 1))
    return keep


def attention_reference(q, k, v, causal: bool = True, scale: Optional[float] = None, kv_start=None, kv_end=None,
                        dropout_p: float = 0.0):
    """softmax(q k^T * scale + causal mask [+ key window]) v, accumulated in fp32 (fp64 for fp64).

    causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as flash-attention).
    kv_start, kv_end (optional [B] ints): row b's queries see only keys kv_start[b] <= j <
    kv_end[b] as well: a padding mask (left padding sets the start, right padding the end).
    With a window, a query that sees no key gets 0, as SDPA gives for a fully masked row.
    dropout_p > 0: torch.dropout on the weights (each dropped with probability dropout_p, the
    kept ones scaled by 1 / (1 - dropout_p)), drawn from torch's generator as transformers'
    eager attention draws it (the same masks for the same RNG state, fp32 weights).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=tk - tq)
    windowed = kv_start is not None or kv_end is not None
    if windowed:
        allowed = allowed & _key_window(q, tk, kv_start, kv_end)
    p = _window_softmax(s, allowed, windowed)
    if dropout_p > 0:
        p = torch.dropout(p, dropout_p, True)
    return torch.matmul(p, v.to(acc)).to(q.dtype)  # (B, H, Tq, Dv)


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens, kv_start=None, scale: Optional[float] = None,
                               dropout_p: float = 0.0):
    """Attention of q [B, H, Tq, D] over the first cache_seqlens[b] entries of row b, scores
    q.k times scale (default 1/sqrt(D)).

    cache_seqlens counts the valid entries including the Tq new ones (already
    written to the cache): query i of row b sits at position L_b - Tq + i and
    attends to cache positions 0 .. L_b - Tq + i. kv_start (optional [B] ints, a left
    padding) moves the first visible position to kv_start[b]; with it, a query that sees
    no key gets 0. dropout_p > 0: torch.dropout on the weights, as attention_reference's.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    tq, tmax = q.shape[-2], k_cache.shape[-2]
    s = torch.matmul(q.to(acc), k_cache.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, Tmax)
    lens = cache_seqlens.to(device=q.device, dtype=torch.long).view(-1, 1, 1)  # (B, 1, 1)
    qpos = lens - tq + torch.arange(tq, device=q.device).view(1, -1, 1)  # (B, Tq, 1)
    kpos = torch.arange(tmax, device=q.device).view(1, 1, -1)  # (1, 1, Tmax)
    allowed = (kpos <= qpos).unsqueeze(1)  # (B, 1, Tq, Tmax)
    if kv_start is not None:
        allowed = allowed & _key_window(q, tmax, kv_start, None)
    p = _window_softmax(s, allowed, kv_start is not None)
    if dropout_p > 0:
        p = torch.dropout(p, dropout_p, True)
    return torch.matmul(p, v_cache.to(acc)).to(q.dtype)


# ---- fast paths (filled in by the Triton attention work; see kernels/) ----

_KERNELS = "_attention_triton"  # gptfast/ops/_attention_triton.py: launchers, autograd, custom ops


def _attention_kernel_reason(q, k, v, causal, scale, dropout_p=0.0) -> Optional[str]:
    reason = _dispatch.triton_device_reason(q, k, v) or _dispatch.module_missing_reason(_KERNELS)
    if reason:
        return reason
    return _dispatch.kernel_module(_KERNELS).attention_unsupported_reason(q, k, v, causal, scale, dropout_p)


def _decode_kernel_reason(q, k_cache, v_cache, cache_seqlens) -> Optional[str]:
    reason = _dispatch.triton_device_reason(q, k_cache, v_cache) or _dispatch.module_missing_reason(_KERNELS)
    if reason:
        return reason
    return _dispatch.kernel_module(_KERNELS).decode_unsupported_reason(q, k_cache, v_cache, cache_seqlens)


def attention(q, k, v, causal: bool = True, scale: Optional[float] = None, backend: Optional[str] = None, *,
              kv_start: Optional[torch.Tensor] = None, kv_end: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0):
    """Scaled dot-product attention, q/k/v [B, H, T, D]; causal by default. kv_start / kv_end:
    an optional key window per row (a padding mask); see attention_reference.

    dropout_p (in [0, 1)): dropout on the attention weights, the kept ones scaled by
    1 / (1 - dropout_p), as SDPA's dropout_p (applied whenever it is > 0: pass 0 in eval). The
    kernel draws its mask from a counter-based generator (Philox) seeded per call from torch's
    default generator of q's device, so torch.manual_seed(s) makes a call repeat exactly and its
    backward sees the forward's mask. The PyTorch reference (the fallback) draws torch.dropout's
    mask instead: the same distribution, not the same mask as the kernel for a seed."""
    _check_qkv(q, k, v)
    _check_scale(scale)
    _check_dropout(dropout_p)
    _check_window("kv_start", kv_start, q)
    _check_window("kv_end", kv_end, q)
    reason = _attention_kernel_reason(q, k, v, causal, scale, dropout_p)
    if _dispatch.use_kernel("attention", backend, reason, interpreted=q.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).attention(q, k, v, causal, scale, kv_start, kv_end, dropout_p)
    if dropout_p > 0 and _dispatch.current_backend(backend) != "torch":
        _dispatch.log_once("attention:dropout", "gptfast: ops.attention's attention dropout p=%s runs torch.dropout "
                           "in the PyTorch reference (the kernel's distribution, not its masks)", dropout_p)
    return attention_reference(q, k, v, causal, scale, kv_start, kv_end, dropout_p)


def decode_attention(q, k_cache, v_cache, cache_seqlens, backend: Optional[str] = None, *,
                     kv_start: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0):
    """Attention of new queries over a static cache; see decode_attention_reference. scale: as
    ops.attention's (None: 1/sqrt(D)). dropout_p > 0 (a model generating in training mode, as
    transformers' attention drops weights then): the PyTorch reference with torch.dropout, since
    the split-K kernel has no dropout (a fallback: "auto" says so, "kernel" raises)."""
    _check_qkv(q, k_cache, v_cache, "q", "k_cache", "v_cache")
    _check_scale(scale)
    _check_dropout(dropout_p)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1 \
            or cache_seqlens.shape[0] != q.shape[0]:
        shape = tuple(cache_seqlens.shape) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens)
        raise ValueError(f"cache_seqlens must be an int tensor of shape [B]=[{q.shape[0]}], got {shape}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    _check_window("kv_start", kv_start, q)
    if dropout_p > 0:
        reason = f"attention dropout p={dropout_p} (the split-K kernel has none; the reference applies torch.dropout)"
    else:
        reason = _decode_kernel_reason(q, k_cache, v_cache, cache_seqlens)
    if _dispatch.use_kernel("decode_attention", backend, reason, interpreted=q.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).decode_attention(q, k_cache, v_cache, cache_seqlens, kv_start,
                                                                  scale)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, kv_start, scale, dropout_p)


def _probe() -> Optional[str]:
    return _dispatch.triton_probe(_KERNELS)


_dispatch.register("attention", "Triton flash-attention fwd+bwd", _probe)
_dispatch.register("decode_attention", "Triton split-K flash-decoding", _probe)
