"""gptfast.ops: the public ops of DESIGN.md and their pure-PyTorch references.

Every op takes ``backend=None | "auto" | "kernel" | "torch"``; see _dispatch.
"""
from ._dispatch import KernelUnavailable, backends, current_backend, use_backend
from .attention import attention, attention_reference, decode_attention, decode_attention_reference
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .norm import (bias_gelu, bias_gelu_reference, layer_norm, layer_norm_reference, linear_bias_gelu,
                   linear_bias_gelu_reference)
from .sampling import sample, sample_reference

__all__ = [
    "attention", "decode_attention", "layer_norm", "bias_gelu", "sample",
    "attention_reference", "decode_attention_reference", "layer_norm_reference",
    "bias_gelu_reference", "sample_reference", "linear_bias_gelu", "linear_bias_gelu_reference",
    "linear_cross_entropy", "linear_cross_entropy_reference",
    "use_backend", "backends", "current_backend", "KernelUnavailable",
]
