"""The LM head and its cross-entropy in one op, without the [N, V] logits.

``linear_cross_entropy(x, weight, targets)`` is ``F.cross_entropy(x @ weight^T, targets)``
(mean over the targets that are not ignore_index). For GPT-2 training the logits dominate the
activation memory: B=16, T=1024 and V=50257 make 3.3 GB of fp32 logits, and as much again for
their gradient. The fused implementation walks the rows in chunks; for each chunk it computes
the logits, the loss terms, and (when a gradient is wanted) the gradient of the loss with
respect to the logits, which it turns at once into the chunk's share of dx and dweight. So
the forward pass also does the backward matmuls, and the backward pass only scales the saved
gradients by the incoming one. Memory: one chunk of logits (64M of them: 128 MB in bf16 with the
Triton step below, 256 MB more for PyTorch's fp32 copy) and the
gradients, dx [N, C] and dweight [V, C] in fp32, instead of [N, V] logits and their gradient.
The idea is Liger-Kernel's fused linear cross-entropy.

The chunk step (logits -> loss terms and their gradient) is one Triton kernel where Triton
runs (kernels/cross_entropy.py: it reads the chunk's logits twice and writes the gradient over
them once, in the matmul's dtype), and PyTorch elsewhere (fp32 logits, about six passes over
them; the first such fallback logs why). The matmuls are torch's (cuBLAS) either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 64M (256 MB in fp32)
_empty_like = torch.empty_like  # the tests poison it
_KERNELS = "_cross_entropy_triton"  # gptfast/ops/_cross_entropy_triton.py: launcher, custom op
_CHUNK_MODES = ("auto", "kernel", "torch")


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


def _logits_dtype(x, weight) -> torch.dtype:
    """The dtype F.linear(x, weight) returns here (autocast's, when it is on)."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _chunk_kernel(x, weight, mode: str) -> bool:
    """Whether the chunk step runs the Triton kernel; mode "auto" (CUDA only: never the
    interpreter), "kernel" (wherever Triton runs, the interpreter included) or "torch"."""
    if mode == "torch":
        return False
    reason = _dispatch.triton_device_reason(x, weight) or _dispatch.module_missing_reason(_KERNELS)
    dtype = _logits_dtype(x, weight)
    if reason is None and dtype not in _dispatch.kernel_module(_KERNELS).SUPPORTED_DTYPES:
        reason = f"logits dtype {dtype} is not supported by the Triton kernel (float16, bfloat16, float32)"
    if reason is None and mode == "auto" and x.device.type == "cpu":
        reason = _dispatch.INTERPRETER_REASON
    if reason is None:
        return True
    _dispatch.log_once("linear_cross_entropy:chunk", "gptfast: ops.linear_cross_entropy computes each chunk's "
                       "loss in PyTorch instead of the Triton kernel: %s", reason)
    return False


def _chunk_terms(x, weight, bias, targets, ignore_index, want_grad, kernel: bool):
    """(the chunk's summed loss, its rows' validity, and when want_grad the gradient of the
    summed loss with respect to the logits of the valid rows: softmax - one-hot). In PyTorch
    the rows of ignored targets hold a softmax: the caller masks them on the [c, C] side,
    which is cheaper than a pass over the [c, V] gradient; the kernel writes them as zeros."""
    logits = F.linear(x, weight, bias)  # (c, V)
    valid = targets != ignore_index
    if kernel:
        rows = _dispatch.kernel_module(_KERNELS).cross_entropy_rows(logits, targets, ignore_index, want_grad)
        return rows.to(_acc(x)).sum(), valid, logits if want_grad else None
    logits = logits.to(_acc(x))
    safe = targets.masked_fill(~valid, 0).long()[:, None]
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, safe)[:, 0]) * valid).sum()
    if not want_grad:
        return loss, valid, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, safe, -valid[:, None].to(grad.dtype))  # - one-hot of the (valid) target
    return loss, valid, grad


def _fused(x, weight, bias, targets, ignore_index, chunk_size, need_x, need_w, need_b, kernel: bool):
    """(summed loss, dx, dweight, dbias) of the summed loss, chunk by chunk; a gradient only
    where asked for; the chunk step in Triton when `kernel`. Under autocast the matmuls run in
    its dtype, as the unfused head's would."""
    dx = _empty_like(x) if need_x else None  # every row is written, chunk by chunk
    acc = _acc(x)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    loss = torch.zeros((), dtype=acc, device=x.device)
    starts, rows = _chunks(x.shape[0], weight.shape[0], chunk_size)
    for s in starts:
        xc = x[s:s + rows]
        part, valid, g = _chunk_terms(xc, weight, bias, targets[s:s + rows], ignore_index,
                                      need_x or need_w or need_b, kernel)
        loss = loss + part
        if g is None:
            continue
        if need_b:  # the kernel's ignored rows are zeros; PyTorch's hold a softmax
            db += g.sum(0, dtype=acc) if kernel else valid.to(g.dtype) @ g
        # The kernel's g is in the logits' dtype (autocast's under autocast, whose matmuls take
        # it as it is) with ignored rows zero; PyTorch's is fp32, its ignored rows masked here.
        keep = None if kernel else valid[:, None].to(x.dtype)
        if not kernel:
            g = g.to(x.dtype)
        if need_x:
            dx[s:s + rows] = g @ weight if keep is None else (g @ weight) * keep
        if need_w:
            dw += (g.t() @ (xc if keep is None else xc * keep)).to(acc)
    return loss, dx, dw, db


def _mean_scale(targets, ignore_index, dtype):
    """1 / the number of scored targets (0 of them: nan, as F.cross_entropy gives)."""
    return 1.0 / (targets != ignore_index).sum().to(dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, chunk_size, kernel):
        loss, dx, dw, db = _fused(x, weight, bias, targets, ignore_index, chunk_size, *ctx.needs_input_grad[:3],
                                  kernel)
        scale = _mean_scale(targets, ignore_index, loss.dtype)
        # No scored target: the loss is nan and the gradients zero, as F.cross_entropy's (a
        # micro-batch of prompt tokens only must not put nan into the weights)
        ctx.save_for_backward(dx, dw, db, torch.where(scale.isinf(), 0.0, scale))
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db, scale = ctx.saved_tensors
        g = grad_loss * scale
        w_dtype, b_dtype = ctx.param_dtypes
        return (None if dx is None else dx * g.to(dx.dtype),
                None if dw is None else (dw * g).to(w_dtype),
                None if db is None else (db * g).to(b_dtype), None, None, None, None)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100, chunk_size: Optional[int] = None,
                         backend: Optional[str] = None):
    """Mean cross-entropy of the logits x @ weight^T (+ bias) against targets, without holding
    the [N, V] logits; x [N, C], weight [V, C], targets [N] int (ignore_index skipped). The
    reference (backend="torch") computes the whole logits; see the module docstring."""
    return _linear_cross_entropy(x, weight, targets, bias, ignore_index, chunk_size, backend)


def _linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100, chunk_size=None,
                          backend=None, chunk_step: Optional[str] = None):
    """linear_cross_entropy, and chunk_step ("auto", "kernel", "torch"; default: the backend's
    mode) chooses the chunk step apart from the chunking (bench times the two fused variants)."""
    _check(x, weight, targets, bias, chunk_size)
    if chunk_step is not None and chunk_step not in _CHUNK_MODES:
        raise ValueError(f"chunk_step must be one of {_CHUNK_MODES}, got {chunk_step!r}")
    mode = _dispatch.current_backend(backend)
    if not _dispatch.use_kernel("linear_cross_entropy", backend, None):
        return linear_cross_entropy_reference(x, weight, targets, bias, ignore_index)
    kernel = _chunk_kernel(x, weight, chunk_step or mode)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _FusedLinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, chunk_size, kernel)
    loss = _fused(x, weight, bias, targets, ignore_index, chunk_size, False, False, False, kernel)[0]
    return loss * _mean_scale(targets, ignore_index, loss.dtype)


def _ready() -> str:
    reason = _dispatch.triton_probe(_KERNELS)
    if reason is None and torch.cuda.is_available():
        return "ready (chunk step: Triton on CUDA tensors)"
    if reason is None:  # TRITON_INTERPRET=1 on a CPU machine
        return "ready (chunk step: PyTorch under auto; the Triton interpreter with backend='kernel')"
    return f"ready (chunk step in PyTorch here: {reason})"


_dispatch.register("linear_cross_entropy", "chunked LM head + cross-entropy (no [N, V] logits); "
                   "the chunk step in Triton where it runs, else PyTorch", lambda: None, _ready)
