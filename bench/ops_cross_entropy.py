"""Case: the LM head + cross-entropy, forward and backward in one call (FLOP-bound: three
matmuls of N x C x V), with the memory each call allocates beyond its inputs (CUDA).

Providers: gptfast's op (chunked, the chunk step in Triton on a GPU), the same chunking with
the chunk step in PyTorch (the kernel's fallback, so the row shows what the Triton step buys),
the reference; peers: the unfused head in PyTorch (F.linear, then F.cross_entropy on the
logits; eager and compiled) and Liger-Kernel's fused linear cross-entropy when importable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops import cross_entropy as _ce

from . import accounting
from .harness import Case, Provider, Skip, compiled, optional_import


def _inputs(N, C, V):
    def make(device):
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"x": torch.randn(N, C, device=device, dtype=dt, requires_grad=True),
                "w": (torch.randn(V, C, device=device, dtype=dt) / C ** 0.5).requires_grad_(),
                "t": torch.randint(0, V, (N,), device=device)}
    return make


def _fused(x, w, t):
    # the chunk step "auto": Triton on a GPU, never the interpreter (TRITON_INTERPRET=1 on CPU)
    return _ce._linear_cross_entropy(x, w, t, backend="kernel", chunk_step="auto")


def _fused_torch_step(x, w, t):
    return _ce._linear_cross_entropy(x, w, t, backend="kernel", chunk_step="torch")


def _torch(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def _step(fn):
    return lambda i: lambda: torch.autograd.grad(fn(i["x"], i["w"], i["t"]), (i["x"], i["w"]))


def _liger(i):
    mod, reason = optional_import("liger_kernel.transformers.fused_linear_cross_entropy")
    if mod is None:
        raise Skip(reason)
    if i["x"].device.type != "cuda":
        raise Skip("Liger-Kernel's Triton kernels need a CUDA device")
    loss = mod.LigerFusedLinearCrossEntropyLoss()
    return lambda: torch.autograd.grad(loss(i["w"], i["x"], i["t"]), (i["x"], i["w"]))


def linear_cross_entropy_cases(device_kind: str, quick: bool) -> list[Case]:
    if device_kind == "cuda":
        shapes = [(8192, 768, 50257)] if quick else [(8192, 768, 50257), (16384, 768, 50257), (8192, 1600, 50257)]
    else:
        shapes = [(512, 64, 4096)]
    cases = []
    for N, C, V in shapes:
        providers = [
            Provider("gptfast", "gptfast", _step(_fused)),
            Provider("gptfast-torch-step", "gptfast", _step(_fused_torch_step)),
            Provider("reference", "reference", _step(ops.linear_cross_entropy_reference)),
            Provider("reference+compile", "peer", _step(compiled(ops.linear_cross_entropy_reference)), compiled=True),
            Provider("torch", "peer", _step(_torch)),
            Provider("torch+compile", "peer", _step(compiled(_torch)), compiled=True),
            Provider("liger", "peer", _liger),
        ]
        cases.append(Case(op="linear_cross_entropy", name=f"fwd+bwd N={N} C={C} V={V}",
                          shape={"N": N, "C": C, "V": V}, dtype="bf16" if device_kind == "cuda" else "fp32",
                          make_inputs=_inputs(N, C, V), providers=providers,
                          flops=3 * accounting.matmul_flops(N, V, C)))
    return cases
