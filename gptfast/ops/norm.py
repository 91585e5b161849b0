"""LayerNorm (optionally fused with the residual add) and bias + GELU.

Public ops: ``layer_norm`` and ``bias_gelu``. References below; the Triton
kernels live in kernels/layer_norm.py and kernels/gelu.py, wired in
gptfast/ops/_norm_triton.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch

_GELU_MODES = ("tanh", "none")


def layer_norm_reference(x, weight, bias, eps: float = 1e-5, residual=None):
    """As F.layer_norm over the last dim, statistics in fp32.

    With ``residual``: h = x + residual (in x's dtype, as the eager model does),
    returns (layer_norm(h), h).
    """
    h = x if residual is None else x + residual
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.layer_norm(h.to(acc), (h.shape[-1],), w, b, eps).to(x.dtype)
    return y if residual is None else (y, h)


def bias_gelu_reference(x, bias, approximate: str = "tanh"):
    """gelu(x + bias), computed in fp32 (fp64 for fp64); "tanh" (GPT-2) or "none" (erf, GPT-1)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    return F.gelu(h, approximate=approximate).to(x.dtype)


def linear_bias_gelu_reference(x, weight, bias, approximate: str = "tanh"):
    """gelu(x @ weight^T + bias): the MLP up-projection with its GELU (weight [N, K] as nn.Linear)."""
    return bias_gelu_reference(F.linear(x, weight), bias, approximate)


def _check_float(name, t, ndim_min=1):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dims, got shape {tuple(t.shape)}")


def _check_vector(name, t, n, x):
    if t is None:
        return
    _check_float(name, t)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the last dim of x, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


_KERNELS = "_norm_triton"  # gptfast/ops/_norm_triton.py: launchers, autograd, custom ops


def _kernel_reason(kind: str, *tensors) -> Optional[str]:
    reason = _dispatch.triton_device_reason(*tensors) or _dispatch.module_missing_reason(_KERNELS)
    if reason:
        return reason
    return _dispatch.kernel_module(_KERNELS).unsupported_reason(kind, *tensors)


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None, backend: Optional[str] = None):
    """LayerNorm over the last dim; with residual, returns (y, x + residual)."""
    _check_float("x", x)
    n = x.shape[-1]
    _check_vector("weight", weight, n, x)
    _check_vector("bias", bias, n, x)
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x (shape {tuple(x.shape)}, {x.dtype}), "
                             f"got {tuple(residual.shape)}, {residual.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    reason = _kernel_reason("layer_norm", x, weight, bias, residual)
    if _dispatch.use_kernel("layer_norm", backend, reason, interpreted=x.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).layer_norm(x, weight, bias, eps, residual)
    return layer_norm_reference(x, weight, bias, eps, residual)


def bias_gelu(x, bias, approximate: str = "tanh", backend: Optional[str] = None):
    """gelu(x + bias); approximate "tanh" for GPT-2, "none" (erf) for GPT-1."""
    _check_float("x", x)
    _check_vector("bias", bias, x.shape[-1], x)
    if approximate not in _GELU_MODES:
        raise ValueError(f"approximate must be one of {_GELU_MODES}, got {approximate!r}")
    reason = _kernel_reason("bias_gelu", x, bias)
    if _dispatch.use_kernel("bias_gelu", backend, reason, interpreted=x.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).bias_gelu(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)


def linear_bias_gelu(x, weight, bias, approximate: str = "tanh", backend: Optional[str] = None):
    """The MLP front: gelu(x @ weight^T + bias), weight [N, K] (nn.Linear layout).

    The fast path applies bias + GELU in the matmul epilogue (or, where that is
    slower, a cuBLAS matmul followed by the fused bias_gelu kernel).
    """
    _check_float("x", x)
    _check_float("weight", weight, 2)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape [N, {x.shape[-1]}] to match the last dim of x, "
                         f"got {tuple(weight.shape)}")
    _check_vector("bias", bias, weight.shape[0], x)
    if approximate not in _GELU_MODES:
        raise ValueError(f"approximate must be one of {_GELU_MODES}, got {approximate!r}")
    reason = _kernel_reason("linear_bias_gelu", x, weight, bias)
    if _dispatch.use_kernel("linear_bias_gelu", backend, reason, interpreted=x.device.type == "cpu"):
        return _dispatch.kernel_module(_KERNELS).linear_bias_gelu(x, weight, bias, approximate)
    return bias_gelu(F.linear(x, weight), bias, approximate, backend="torch")


def _probe() -> Optional[str]:
    return _dispatch.triton_probe(_KERNELS)


_dispatch.register("layer_norm", "Triton fused add+LayerNorm fwd+bwd", _probe)
_dispatch.register("bias_gelu", "Triton fused bias+GELU fwd+bwd", _probe)
_dispatch.register("linear_bias_gelu", "Triton matmul with bias+GELU epilogue", _probe)
