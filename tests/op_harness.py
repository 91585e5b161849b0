"""The tests an op of gptfast.ops gets from one declaration: its OpSpec in SPECS below.

A kernel developer who adds an op (registered with `_dispatch.register`) adds an OpSpec here:
how to draw its inputs at a shape and dtype, the shapes (small and odd ones for the CPU
interpreter, full ones for a GPU), which inputs get gradients, and where its launcher allocates
outputs (made NaN, so an element the kernel never writes cannot pass). tests/test_op_contract.py
then checks, for every spec, with fresh random inputs:

- the kernel (backend="kernel") against the float64 reference, outputs and every gradient,
  within 2x the error of the reference computed in the inputs' dtype (PyTorch's own error),
  plus an atol by dtype as a fraction of the largest reference value; no NaN, same shape/dtype;
- backend="torch" is the reference, bit for bit;
- every tensor argument as a strided view (stride 2 in its last dim, poison between) gives what
  contiguous inputs give, outputs and gradients;
- torch.compile(fullgraph=True) traces the op (custom ops, no graph break) to the same result;
- where the kernel cannot run (float64 inputs, for the Triton ops), "auto" falls back to the
  reference and logs why, once;
- and that every registered op has a spec, so none goes without these checks.

An optional argument that sends the kernel down another path (attention's key window) gets a
spec of its own, `op=` naming the op and `name` the variant ("attention[kv_window]"), so every
check above runs with that argument too.

The op's own test file keeps what is particular to it (masks, ragged caches, distributions).
Benchmarks come from bench/ the same way (bench/README.md, "Adding a case").
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# atol as a fraction of the reference's largest magnitude (at least 1): about an ulp of the dtype
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2.0 ** -8}


@dataclass(frozen=True)
class OpSpec:
    name: str  # ops.<name> (or, with `op`, this variant's name); its reference is ops.<name>_reference
    inputs: Callable[[tuple, torch.dtype, torch.device], dict]  # keyword arguments, freshly drawn
    shapes: tuple  # run everywhere (the CPU interpreter): small, odd
    gpu_shapes: tuple = ()  # run on a GPU only: full sizes
    dtypes: tuple = FLOATS
    grads: tuple = ()  # names of the inputs to differentiate
    poison: Optional[Callable] = None  # poison(monkeypatch): the launcher's allocations start as NaN
    numeric: bool = True  # False: a random op (sampling), checked by its own statistical tests
    fallback_dtype: Optional[torch.dtype] = torch.float64  # inputs the kernel refuses (None: none)
    kernel_kwargs: dict = field(default_factory=dict)  # arguments of the op that its reference has not
    atol: dict = field(default_factory=lambda: dict(ATOL))
    op: str = ""  # the op, where this spec is a variant of it (other arguments): `name` is then a label

    @property
    def op_name(self) -> str:
        return self.op or self.name


def nan_allocations(module: str, attr: str = "_new_empty"):
    """poison(monkeypatch): module.attr(shape, dtype, device) hands out NaN-filled floating buffers."""
    def poison(monkeypatch):
        def nan_empty(shape, dtype, device):
            t = torch.empty(shape, dtype=dtype, device=device)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        monkeypatch.setattr(importlib.import_module(module), attr, nan_empty)
    return poison


def nan_like(module: str, attr: str):
    """poison(monkeypatch): module.attr(t) hands out NaN-filled buffers like t."""
    def poison(monkeypatch):
        monkeypatch.setattr(importlib.import_module(module), attr, lambda t: torch.full_like(t, float("nan")))
    return poison


def poison_all(*poisons):
    """poison(monkeypatch) applying each of several."""
    def poison(monkeypatch):
        for p in poisons:
            p(monkeypatch)
    return poison


def rand(shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64, device=device) * scale + shift).to(dtype)


def _attention(shape, dtype, device):
    B, H, T, D = shape
    qkv = rand((B, T, 3, H, D), dtype, device)  # strided views, as the model makes them
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return {"q": q, "k": k, "v": v, "causal": True, "scale": None}


def _key_window(B, T, device):
    """kv_start / kv_end [B] of a padded batch: row 0 left-padded, the last row right-padded, the
    rest random (a start past some queries' causal limit: rows that see no key)."""
    start = torch.randint(0, T, (B,), device=device)
    end = torch.minimum(start + torch.randint(1, T + 1, (B,), device=device), torch.tensor(T, device=device))
    start[0], end[0] = T // 3, T
    start[-1], end[-1] = 0, max(1, T // 2)
    return start, end


def _attention_window(shape, dtype, device):
    kwargs = _attention(shape, dtype, device)
    kwargs["kv_start"], kwargs["kv_end"] = _key_window(shape[0], shape[2], device)
    return kwargs


def _decode(shape, dtype, device):
    B, H, Tq, Tmax, D = shape
    lens = torch.randint(Tq, Tmax + 1, (B,), device=device)
    lens[0] = Tmax
    return {"q": rand((B, H, Tq, D), dtype, device), "k_cache": rand((B, H, Tmax, D), dtype, device),
            "v_cache": rand((B, H, Tmax, D), dtype, device), "cache_seqlens": lens}


def _decode_window(shape, dtype, device):
    kwargs = _decode(shape, dtype, device)
    lens = kwargs["cache_seqlens"]
    kwargs["kv_start"] = (torch.rand(lens.shape, device=device) * lens).long()  # left padding < the length
    return kwargs


def _layer_norm(shape, dtype, device):
    n = shape[-1]
    return {"x": rand(shape, dtype, device, 2.0, 0.5), "weight": rand((n,), dtype, device, 0.5, 1.0),
            "bias": rand((n,), dtype, device, 0.5), "eps": 1e-5, "residual": rand(shape, dtype, device)}


def _bias_gelu(shape, dtype, device):
    return {"x": rand(shape, dtype, device, 2.0), "bias": rand((shape[-1],), dtype, device), "approximate": "tanh"}


def _linear_bias_gelu(shape, dtype, device):
    M, K, N = shape
    return {"x": rand((M, K), dtype, device), "weight": rand((N, K), dtype, device, K ** -0.5),
            "bias": rand((N,), dtype, device, 0.5), "approximate": "tanh"}


def _linear_cross_entropy(shape, dtype, device):
    N, C, V = shape
    targets = torch.randint(0, V, (N,), device=device)
    targets[::3] = -100
    return {"x": rand((N, C), dtype, device), "weight": rand((V, C), dtype, device, C ** -0.5),
            "targets": targets}


def _sample(shape, dtype, device):
    B, V = shape
    return {"logits": rand((B, V), dtype, device, 3.0), "temperature": 0.8, "top_k": 20, "top_p": 0.9,
            "generator": torch.Generator(device=device).manual_seed(0)}


SPECS = {s.name: s for s in [
    OpSpec("attention", _attention, shapes=((1, 2, 7, 16), (2, 3, 77, 32)),
           gpu_shapes=((4, 12, 1024, 64), (1, 4, 2049, 128)), grads=("q", "k", "v"),
           poison=nan_allocations("gptfast.ops._attention_triton")),
    OpSpec("attention[kv_window]", _attention_window, shapes=((3, 2, 9, 16), (2, 3, 77, 32)),
           gpu_shapes=((4, 12, 1024, 64),), grads=("q", "k", "v"),
           poison=nan_allocations("gptfast.ops._attention_triton"), op="attention"),
    OpSpec("decode_attention", _decode, shapes=((3, 2, 1, 37, 16), (2, 3, 4, 70, 64)),
           gpu_shapes=((32, 12, 1, 1024, 64), (1, 12, 4, 4096, 64)),
           poison=nan_allocations("gptfast.ops._attention_triton")),
    OpSpec("decode_attention[kv_start]", _decode_window, shapes=((3, 2, 1, 37, 16), (2, 3, 4, 70, 64)),
           gpu_shapes=((32, 12, 1, 1024, 64),), poison=nan_allocations("gptfast.ops._attention_triton"),
           op="decode_attention"),
    OpSpec("layer_norm", _layer_norm, shapes=((7, 1000), (3, 5, 64)), gpu_shapes=((16384, 768), (4097, 1600)),
           grads=("x", "weight", "bias", "residual"), poison=nan_allocations("gptfast.ops._norm_triton")),
    OpSpec("bias_gelu", _bias_gelu, shapes=((7, 1000), (2, 3, 96)), gpu_shapes=((16384, 3072),),
           grads=("x", "bias"), poison=nan_allocations("gptfast.ops._norm_triton")),
    OpSpec("linear_bias_gelu", _linear_bias_gelu, shapes=((7, 48, 100), (33, 64, 130)),
           gpu_shapes=((4096, 768, 3072), (1000, 1600, 6400)), grads=("x", "weight", "bias"),
           poison=nan_allocations("gptfast.ops._norm_triton")),
    OpSpec("linear_cross_entropy", _linear_cross_entropy, shapes=((7, 16, 101), (40, 24, 257)),
           gpu_shapes=((8192, 768, 50257),), grads=("x", "weight"),
           poison=poison_all(nan_like("gptfast.ops.cross_entropy", "_empty_like"),
                             nan_allocations("gptfast.ops._cross_entropy_triton")), fallback_dtype=None,
           kernel_kwargs={"chunk_size": 5}),
    OpSpec("sample", _sample, shapes=((3, 1000),), numeric=False, fallback_dtype=None),
]}
