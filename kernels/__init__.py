"""Triton kernels of gptfast, installed as gptfast.kernels.

A kernel file holds kernels and their autotune configs only; launchers, autograd
and torch.library registration live in gptfast/ops/. Importing this package
imports nothing from Triton: each kernel module does, when it is used.
"""

# Compile options every launcher passes. FMA contraction on: Triton up to 3.8 defaults to it
# (the kernels were tuned and tested so); Triton 3.9 warns at each compile that leaves it
# unset, as its default turns to off in 3.10. The interpreter ignores it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def tma_placeholder_block(rank: int, element_size: int) -> list:
    """The block shape a host TMA descriptor carries where the config leaves it unused. Triton
    encodes every descriptor argument at each launch (cuTensorMapEncodeTiled), used or not, and
    that refuses boxes whose inner dim is not a multiple of 16 bytes: so ones, then 16 bytes."""
    return [1] * (rank - 1) + [max(1, 16 // element_size)]


def tma_config_allowed(config, tma_ok: int) -> bool:
    """Whether the autotuner may time this config (its "TMA" meta-parameter) for a launch whose
    TMA_OK is 0 (no descriptors: pointer configs only), 1 (both) or 2 (TMA configs only)."""
    tma = config.kwargs.get("TMA", False)
    return tma if tma_ok == 2 else tma_ok == 1 or not tma
