"""TMA (Hopper's tensor memory accelerator) for the Triton kernels: when to use it, and the
host-side tensor descriptors the kernels' TMA variants take.

GPTFAST_TMA: "auto" (default): on a CUDA device of compute capability 9.0 or newer the
autotuners time TMA configs beside the pointer ones and keep the faster; "1": TMA wherever the
layout allows (every config, the fixed and interpreter ones too; the interpreter emulates
descriptors on CPU); "0": never. Imported lazily with the kernel launchers.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._dispatch import logger

ENV = "GPTFAST_TMA"
_logged: set[tuple[str, str]] = set()


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{ENV} must be one of auto, 0, 1; got {value!r}")
    return value


def capable(device: torch.device) -> bool:
    """TMA exists here: a CUDA device of compute capability 9.0 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def layout_reason(tensors: dict) -> Optional[str]:
    """Why these tensors (name -> tensor) cannot be TMA descriptors (TMA's rules), or None."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            return f"{name}'s last dim is not contiguous (stride {t.stride(-1)})"
        if t.data_ptr() % 16:
            return f"{name}'s data is not 16-byte aligned"
        if any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return f"{name}'s strides {tuple(t.stride())} are not multiples of 16 bytes"
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):  # expanded (broadcast) dims
            return f"{name} has a zero stride (strides {tuple(t.stride())}, shape {tuple(t.shape)})"
    return None


def descriptors(what: str, tensors: dict, eligible: bool = True):
    """(TMA_OK, {argument name: descriptor or None}) for one kernel launch.

    what: names the kernel in the log line; tensors: one entry per descriptor argument, in the
    kernel's order, a name for the log line -> its tensor (None: an unused argument, passed as
    None); the result keeps those keys and that order; eligible:
    False where the caller keeps to pointers (e.g. fp32 inputs). TMA_OK: 0 no descriptors;
    1 descriptors, the autotuner weighs TMA configs against pointer ones; 2 descriptors, TMA
    always. Block shapes are placeholders (gptfast.kernels.tma_placeholder_block, valid for
    TMA though unused): the kernels' config pre_hooks set the real ones.
    """
    m = mode()
    present = {n: t for n, t in tensors.items() if t is not None}
    first = next(iter(present.values()))
    none = (0, dict.fromkeys(tensors))
    if m == "0" or not eligible or (m == "auto" and not capable(first.device)):
        return none
    if first.is_cuda and not capable(first.device):
        cc = torch.cuda.get_device_capability(first.device)
        reason = f"TMA needs compute capability 9.0 or newer (this GPU has {cc[0]}.{cc[1]})"
    else:
        reason = layout_reason(present)
    if reason is not None:
        if m == "1" and (what, reason) not in _logged:  # asked for and not given: say why, once
            _logged.add((what, reason))
            logger.warning("gptfast: %s uses pointer loads, not TMA: %s", what, reason)
        return none
    from triton.tools.tensor_descriptor import TensorDescriptor

    from gptfast.kernels import tma_placeholder_block
    descs = {n: None if t is None else TensorDescriptor(t, list(t.shape), list(t.stride()),
                                                         tma_placeholder_block(t.dim(), t.element_size()))
             for n, t in tensors.items()}
    return (2 if m == "1" else 1), descs
