"""Wiring of the C++/CUDA sampling extension gptfast._C behind ``ops.sample``.

The extension registers one op, ``torch.ops.gptfast.sample`` (schema in
csrc/sampling.cpp), with a CPU kernel and, in CUDA builds, a CUDA kernel. This
module loads it lazily (never at import, never touching CUDA), registers its fake
implementation for torch.compile, validates arguments and derives the row keys.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from .sampling import check_logits_rows, check_sample_args, host_checks_allowed, row_keys

_OP = "gptfast::sample"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def extension_missing_reason() -> Optional[str]:
    """None when torch.ops.gptfast.sample is usable here, else why not."""
    try:
        importlib.import_module("gptfast._C")
    except ModuleNotFoundError:
        return ("the sampling extension gptfast._C is not built "
                "(pip install --no-build-isolation -e . with a C++ compiler; GPTFAST_BUILD_EXT=0 skips it)")
    except Exception as exc:  # noqa: BLE001 - e.g. built against another torch (undefined symbol)
        return f"the sampling extension gptfast._C failed to import: {exc} (rebuild it against this torch)"
    if not hasattr(torch.ops.gptfast, "sample"):
        return "gptfast._C imported but did not register torch.ops.gptfast.sample"
    _register_fake()
    return None


def _register_fake() -> None:
    @torch.library.register_fake(_OP)
    def _sample_fake(logits, temperature, top_k, top_p, min_p, keys, return_probs):
        batch, vocab = logits.shape
        tokens = logits.new_empty((batch,), dtype=torch.int64)
        probs = logits.new_empty((batch, vocab) if return_probs else (0,), dtype=torch.float32)
        return tokens, probs


def _has_kernel_for(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)


def unsupported_reason(logits) -> Optional[str]:
    """Why the extension cannot sample from these logits, or None if it can.

    Malformed inputs (wrong rank, integer dtype) are not reasons: the call then
    raises the argument error, whichever backend runs.
    """
    reason = extension_missing_reason()
    if reason:
        return reason
    if logits.dtype == torch.float64:
        return "logits dtype float64 (the extension takes float32, float16 or bfloat16)"
    if not _has_kernel_for(logits.device.type):
        built = "CPU and CUDA" if _has_kernel_for("cuda") else "CPU only"
        return f"logits on {logits.device.type}, but gptfast._C has no kernel for it (built for {built})"
    return None


def sample(logits, temperature, top_k, top_p, min_p, generator, return_probs):
    """ops.sample on the extension; same arguments and results as sample_reference."""
    check_values = host_checks_allowed(logits)
    t, k, p, m = check_sample_args(logits, temperature, top_k, top_p, min_p, check_values=check_values)
    if check_values:
        check_logits_rows(logits)
    reason = unsupported_reason(logits)
    if reason:
        raise RuntimeError(f"ops.sample: the extension cannot run: {reason}")
    keys = row_keys(logits.shape[0], generator, logits.device)
    tokens, probs = torch.ops.gptfast.sample(logits, t, k, p, m, keys, bool(return_probs))
    return (tokens, probs) if return_probs else tokens
