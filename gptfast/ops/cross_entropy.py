"""The LM head and its cross-entropy in one op, without the [N, V] logits.

``linear_cross_entropy(x, weight, targets)`` is ``F.cross_entropy(x @ weight^T, targets)``
(mean over the targets that are not ignore_index). For GPT-2 training the logits dominate the
activation memory: B=16, T=1024 and V=50257 make 3.3 GB of fp32 logits, and as much again for
their gradient. The fused implementation walks the rows in chunks; for each chunk it computes
the logits, the loss terms, and (when a gradient is wanted) the gradient of the loss with
respect to the logits, which it turns at once into the chunk's share of dx and dweight. So
the forward pass also does the backward matmuls, and the backward pass only scales the saved
gradients by the incoming one. Memory: one chunk of logits (about 256 MB in fp32) and the
gradients, dx [N, C] and dweight [V, C] in fp32, instead of [N, V] logits and their gradient.
The idea is Liger-Kernel's fused linear cross-entropy; here each chunk is plain PyTorch, so it
runs on every device (and under torch.compile).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 64M (256 MB in fp32)
_empty_like = torch.empty_like  # the tests poison it


def linear_cross_entropy_reference(x, weight, targets, bias=None, ignore_index: int = -100):
    """F.cross_entropy(F.linear(x, weight, bias), targets), the logits in fp32 (fp64 for fp64);
    x [N, C], weight [V, C], targets [N] int; the mean over targets != ignore_index."""
    return F.cross_entropy(F.linear(x, weight, bias).to(_acc(x)), targets, ignore_index=ignore_index)


def _acc(x) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x, weight, targets, bias, chunk_size):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [N, C] and weight [V, C] with the same C, got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32) \
            or tuple(targets.shape) != (x.shape[0],):
        raise ValueError(f"targets must be an int64/int32 tensor of shape ({x.shape[0]},), got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}"
                         f"{' ' + str(targets.dtype) if isinstance(targets, torch.Tensor) else ''}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _chunks(n: int, vocab: int, chunk_size: Optional[int]) -> tuple[range, int]:
    rows = chunk_size or max(1, CHUNK_ELEMENTS // max(1, vocab))
    return range(0, n, rows), rows


def _chunk_terms(x, weight, bias, targets, ignore_index, want_grad):
    """(the chunk's summed loss, its rows' validity, and when want_grad the gradient of the
    summed loss with respect to the logits of the valid rows: softmax - one-hot). The rows of
    ignored targets hold a softmax: the caller masks them on the [c, C] side, which is cheaper
    than a pass over the [c, V] gradient."""
    logits = F.linear(x, weight, bias).to(_acc(x))  # (c, V)
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0).long()[:, None]
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe)[:, 0]) * valid).sum()
    if not want_grad:
        return loss, valid, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, safe, -valid[:, None].to(grad.dtype))  # - one-hot of the (valid) target
    return loss, valid, grad


def _fused(x, weight, bias, targets, ignore_index, chunk_size, need_x, need_w, need_b):
    """(summed loss, dx, dweight, dbias) of the summed loss, chunk by chunk; a gradient only
    where asked for. Under autocast the matmuls run in its dtype, as the unfused head's would."""
    dx = _empty_like(x) if need_x else None  # every row is written, chunk by chunk
    acc = _acc(x)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    loss = torch.zeros((), dtype=acc, device=x.device)
    starts, rows = _chunks(x.shape[0], weight.shape[0], chunk_size)
    for s in starts:
        xc = x[s:s + rows]
        part, valid, g = _chunk_terms(xc, weight, bias, targets[s:s + rows], ignore_index,
                                      need_x or need_w or need_b)
        loss = loss + part
        if g is None:
            continue
        if need_b:
            db += valid.to(g.dtype) @ g
        g, keep = g.to(x.dtype), valid[:, None].to(x.dtype)
        if need_x:
            dx[s:s + rows] = (g @ weight) * keep
        if need_w:
            dw += (g.t() @ (xc * keep)).to(acc)
    return loss, dx, dw, db


def _mean_scale(targets, ignore_index, dtype):
    """1 / the number of scored targets (0 of them: nan, as F.cross_entropy gives)."""
    return 1.0 / (targets != ignore_index).sum().to(dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, chunk_size):
        loss, dx, dw, db = _fused(x, weight, bias, targets, ignore_index, chunk_size, *ctx.needs_input_grad[:3])
        scale = _mean_scale(targets, ignore_index, loss.dtype)
        ctx.save_for_backward(dx, dw, db, scale)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db, scale = ctx.saved_tensors
        g = grad_loss * scale
        w_dtype, b_dtype = ctx.param_dtypes
        return (None if dx is None else dx * g.to(dx.dtype),
                None if dw is None else (dw * g).to(w_dtype),
                None if db is None else (db * g).to(b_dtype), None, None, None)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100, chunk_size: Optional[int] = None,
                         backend: Optional[str] = None):
    """Mean cross-entropy of the logits x @ weight^T (+ bias) against targets, without holding
    the [N, V] logits; x [N, C], weight [V, C], targets [N] int (ignore_index skipped). The
    reference (backend="torch") computes the whole logits; see the module docstring."""
    _check(x, weight, targets, bias, chunk_size)
    if not _dispatch.use_kernel("linear_cross_entropy", backend, None):
        return linear_cross_entropy_reference(x, weight, targets, bias, ignore_index)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _FusedLinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, chunk_size)
    loss = _fused(x, weight, bias, targets, ignore_index, chunk_size, False, False, False)[0]
    return loss * _mean_scale(targets, ignore_index, loss.dtype)


_dispatch.register("linear_cross_entropy", "chunked LM head + cross-entropy (no [N, V] logits)", lambda: None)
