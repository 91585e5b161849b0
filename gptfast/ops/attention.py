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


def attention_reference(q, k, v, causal: bool = True, scale: Optional[float] = None):
    """softmax(q k^T * scale + causal mask) v, accumulated in fp32 (fp64 for fp64)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        # query i sees keys j <= i + (Tk - Tq): bottom-right aligned, as flash-attention
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(acc)).to(q.dtype)  # (B, H, Tq, Dv)


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens):
    """Attention of q [B, H, Tq, D] over the first cache_seqlens[b] entries of row b.

    cache_seqlens counts the valid entries including the Tq new ones (already
    written to the cache): query i of row b sits at position L_b - Tq + i and
    attends to cache positions 0 .. L_b - Tq + i.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    tq, tmax = q.shape[-2], k_cache.shape[-2]
    s = torch.matmul(q.to(acc), k_cache.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, Tmax)
    lens = cache_seqlens.to(device=q.device, dtype=torch.long).view(-1, 1, 1)  # (B, 1, 1)
    qpos = lens - tq + torch.arange(tq, device=q.device).view(1, -1, 1)  # (B, Tq, 1)
    kpos = torch.arange(tmax, device=q.device).view(1, 1, -1)  # (1, 1, Tmax)
    allowed = (kpos <= qpos).unsqueeze(1)  # (B, 1, Tq, Tmax)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v_cache.to(acc)).to(q.dtype)


# ---- fast paths (filled in by the Triton attention work; see kernels/) ----

_KERNELS = "_attention_triton"  # gptfast/ops/_attention_triton.py: launchers, autograd, custom ops


def _attention_kernel_reason(q, k, v, causal, scale) -> Optional[str]:
    reason = _dispatch.triton_device_reason(q, k, v) or _dispatch.module_missing_reason(_KERNELS)
    if reason:
        return reason
    return _dispatch.kernel_module(_KERNELS).attention_unsupported_reason(q, k, v, causal, scale)


def _decode_kernel_reason(q, k_cache, v_cache, cache_seqlens) -> Optional[str]:
    reason = _dispatch.triton_device_reason(q, k_cache, v_cache) or _dispatch.module_missing_reason(_KERNELS)
    if reason:
        return reason
    return _dispatch.kernel_module(_KERNELS).decode_unsupported_reason(q, k_cache, v_cache, cache_seqlens)


def attention(q, k, v, causal: bool = True, scale: Optional[float] = None, backend: Optional[str] = None):
    """Scaled dot-product attention, q/k/v [B, H, T, D]; causal by default."""
    _check_qkv(q, k, v)
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    reason = _attention_kernel_reason(q, k, v, causal, scale)
    if _dispatch.use_kernel("attention", backend, reason, interpreted=q.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).attention(q, k, v, causal, scale)
    return attention_reference(q, k, v, causal, scale)


def decode_attention(q, k_cache, v_cache, cache_seqlens, backend: Optional[str] = None):
    """Attention of new queries over a static cache; see decode_attention_reference."""
    _check_qkv(q, k_cache, v_cache, "q", "k_cache", "v_cache")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1 \
            or cache_seqlens.shape[0] != q.shape[0]:
        shape = tuple(cache_seqlens.shape) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens)
        raise ValueError(f"cache_seqlens must be an int tensor of shape [B]=[{q.shape[0]}], got {shape}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    reason = _decode_kernel_reason(q, k_cache, v_cache, cache_seqlens)
    if _dispatch.use_kernel("decode_attention", backend, reason, interpreted=q.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).decode_attention(q, k_cache, v_cache, cache_seqlens)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens)


def _probe() -> Optional[str]:
    return _dispatch.triton_probe(_KERNELS)


_dispatch.register("attention", "Triton flash-attention fwd+bwd", _probe)
_dispatch.register("decode_attention", "Triton split-K flash-decoding", _probe)
