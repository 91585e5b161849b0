"""Triton fast path of the chunk step of ops.linear_cross_entropy: the loss of a chunk of
logits and its gradient written over them (kernels/cross_entropy.py).

Launcher -> torch.library custom op ``gptfast::cross_entropy_rows`` (mutates the logits,
with a fake implementation, so torch.compile(fullgraph=True) traces it as one node) -> the
entry point ``cross_entropy_rows``, called by gptfast/ops/cross_entropy.py per chunk.

Imported lazily; nothing touches CUDA at import. No host sync: the grid is the row count.
"""
from __future__ import annotations

import torch

from ._dispatch import import_source_package, triton_interpret

import_source_package("kernels", "kernels")
from gptfast.kernels import cross_entropy as _ce_k  # noqa: E402
from gptfast.kernels import LAUNCH_OPTIONS  # noqa: E402

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the logits (cross_entropy.py reads it)
# On a GPU the kernel is autotuned (kernels/cross_entropy.py CONFIGS, keyed on V); under the
# interpreter one small block, so the CPU tests cross several blocks and a ragged last one.
INTERPRETER_BLOCK_V = 128


def _new_empty(shape, dtype, device):
    """The loss rows come from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(logits, targets, ignore_index: int, write_grad: bool) -> torch.Tensor:
    M, V = logits.shape
    loss = _new_empty((M,), torch.float32, logits.device)
    if M == 0:
        return loss
    args = (logits, targets, loss, M, V, logits.stride(0), ignore_index)
    if triton_interpret() and logits.device.type == "cpu":
        _ce_k.cross_entropy_fwd_grad_kernel[(M,)](*args, WRITE_GRAD=write_grad, BLOCK_V=INTERPRETER_BLOCK_V)
    else:
        _ce_k.cross_entropy_fwd_grad_autotuned[(M,)](*args, WRITE_GRAD=write_grad, **LAUNCH_OPTIONS)
    return loss


@torch.library.custom_op("gptfast::cross_entropy_rows", mutates_args=("logits",))
def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                        write_grad: bool) -> torch.Tensor:
    """The rows' losses [N] fp32; with write_grad, logits hold softmax - one-hot afterwards."""
    return _launch(logits, targets, ignore_index, write_grad)


@_cross_entropy_rows.register_fake
def _(logits, targets, ignore_index, write_grad):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


def cross_entropy_rows(logits, targets, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Per-row loss of logits [N, V] against targets [N] (0 for ignore_index, NaN out of range);
    with write_grad the logits are overwritten by d(sum of the losses)/d(logits), in their dtype."""
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16 or float32 for the Triton kernel, got {logits.dtype}")
    if logits.dim() != 2 or logits.stride(-1) != 1 or tuple(targets.shape) != (logits.shape[0],):
        raise ValueError(f"logits must be [N, V] with unit column stride and targets [N], got logits "
                         f"{tuple(logits.shape)} stride {logits.stride()} and targets {tuple(targets.shape)}")
    # the kernel reads targets[row] at offset row: a strided view (targets[::2]) is made contiguous
    return torch.ops.gptfast.cross_entropy_rows(logits, targets.contiguous(), int(ignore_index), bool(write_grad))
