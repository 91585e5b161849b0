"""Cases: add+LayerNorm and bias+GELU (fwd, bwd; byte-bound) and the MLP front
LN -> fc -> GELU (FLOP-bound).

Peers: eager and compiled F.layer_norm / F.gelu, and Liger-Kernel's LayerNorm when importable.
bwd cases time the backward alone: the forward runs once in setup, and each timed call is
torch.autograd.grad(..., retain_graph=True).
"""
from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

from gptfast import ops

from . import accounting
from .harness import Case, Provider, Skip, compiled, env_context, no_interpreter, optional_import

EPS = 1e-5


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _pass_thunk(fn, args: tuple, grad_args: tuple, dy, pass_: str):
    """fwd: fn(*args) under no graph; bwd: forward once now, time the backward."""
    if pass_ == "fwd":
        return lambda: fn(*args)
    y = fn(*args)
    return lambda: torch.autograd.grad(y, grad_args, dy, retain_graph=True)


# ---- add + LayerNorm -------------------------------------------------------------------


def _ln_inputs(M, N, pass_):
    def make(device):
        dt, grad = _dtype(device), pass_ != "fwd"
        t = lambda *s: torch.randn(*s, device=device, dtype=dt, requires_grad=grad)  # noqa: E731
        inputs = {"x": t(M, N), "residual": t(M, N), "weight": t(N), "bias": t(N)}
        if grad:
            inputs["dy"] = torch.randn(M, N, device=device, dtype=dt)
        return inputs
    return make


def _ln_kernel(x, r, w, b):
    return ops.layer_norm(x, w, b, EPS, residual=r, backend="kernel")[0]


def _ln_reference(x, r, w, b):
    return ops.layer_norm_reference(x, w, b, EPS, residual=r)[0]


def _ln_torch(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, EPS)


def _ln_setup(fn, pass_, kernel=False):
    def setup(i):
        if kernel:
            no_interpreter(i["x"])
        args = (i["x"], i["residual"], i["weight"], i["bias"])
        return _pass_thunk(fn, args, args, i.get("dy"), pass_)
    return setup


def _ln_liger_setup(pass_):
    def setup(i):
        mod, reason = optional_import("liger_kernel.ops.layer_norm")
        if mod is None:
            raise Skip(reason)
        no_interpreter(i["x"])

        def fn(x, r, w, b):  # Liger's LayerNorm has no fused residual add: add, then normalise
            return mod.LigerLayerNormFunction.apply(x + r, w, b, EPS)
        args = (i["x"], i["residual"], i["weight"], i["bias"])
        return _pass_thunk(fn, args, args, i.get("dy"), pass_)
    return setup


def layer_norm_cases(device_kind: str, quick: bool) -> list[Case]:
    M, N = (16384, 768) if device_kind == "cuda" else (1024 if not quick else 512, 768)
    elem = 2 if device_kind == "cuda" else 4
    cases = []
    for pass_ in ("fwd", "bwd"):
        providers = [
            Provider("gptfast", "gptfast", _ln_setup(_ln_kernel, pass_, kernel=True)),
            Provider("reference", "reference", _ln_setup(_ln_reference, pass_)),
            Provider("reference+compile", "peer", lambda i, p=pass_: _ln_setup(compiled(_ln_reference), p)(i),
                     compiled=True),
            Provider("torch", "peer", _ln_setup(_ln_torch, pass_)),
            Provider("torch+compile", "peer", lambda i, p=pass_: _ln_setup(compiled(_ln_torch), p)(i),
                     compiled=True),
            Provider("liger", "peer", _ln_liger_setup(pass_)),
        ]
        cases.append(Case(
            op="layer_norm", name=f"{pass_} add+LN M={M} N={N}", shape={"M": M, "N": N, "pass": pass_},
            dtype="bf16" if device_kind == "cuda" else "fp32", make_inputs=_ln_inputs(M, N, pass_),
            providers=providers, bytes=accounting.layer_norm_bytes(M, N, elem, residual=True, pass_=pass_)))
    return cases


# ---- bias + GELU -----------------------------------------------------------------------


def _gelu_inputs(M, N, pass_):
    def make(device):
        dt, grad = _dtype(device), pass_ != "fwd"
        inputs = {"x": torch.randn(M, N, device=device, dtype=dt, requires_grad=grad),
                  "bias": torch.randn(N, device=device, dtype=dt, requires_grad=grad)}
        if grad:
            inputs["dy"] = torch.randn(M, N, device=device, dtype=dt)
        return inputs
    return make


def _gelu_kernel(x, b):
    return ops.bias_gelu(x, b, "tanh", backend="kernel")


def _gelu_reference(x, b):
    return ops.bias_gelu_reference(x, b, "tanh")


def _gelu_torch(x, b):
    return F.gelu(x + b, approximate="tanh")


def _gelu_setup(fn, pass_, kernel=False):
    def setup(i):
        if kernel:
            no_interpreter(i["x"])
        args = (i["x"], i["bias"])
        return _pass_thunk(fn, args, args, i.get("dy"), pass_)
    return setup


def _no_liger_gelu(_inputs):
    raise Skip("Liger-Kernel has no bias+GELU op (its GELU kernels are the gated GEGLU/SwiGLU)")


def bias_gelu_cases(device_kind: str, quick: bool) -> list[Case]:
    M, N = (16384, 3072) if device_kind == "cuda" else (1024 if not quick else 512, 3072)
    elem = 2 if device_kind == "cuda" else 4
    cases = []
    for pass_ in ("fwd", "bwd"):
        providers = [
            Provider("gptfast", "gptfast", _gelu_setup(_gelu_kernel, pass_, kernel=True)),
            Provider("reference", "reference", _gelu_setup(_gelu_reference, pass_)),
            Provider("reference+compile", "peer",
                     lambda i, p=pass_: _gelu_setup(compiled(_gelu_reference), p)(i), compiled=True),
            Provider("torch", "peer", _gelu_setup(_gelu_torch, pass_)),
            Provider("torch+compile", "peer", lambda i, p=pass_: _gelu_setup(compiled(_gelu_torch), p)(i),
                     compiled=True),
            Provider("liger", "peer", _no_liger_gelu),
        ]
        cases.append(Case(
            op="bias_gelu", name=f"{pass_} bias+GELU(tanh) M={M} N={N}", shape={"M": M, "N": N, "pass": pass_},
            dtype="bf16" if device_kind == "cuda" else "fp32", make_inputs=_gelu_inputs(M, N, pass_),
            providers=providers, bytes=accounting.bias_gelu_bytes(M, N, elem, pass_=pass_)))
    return cases


# ---- MLP front: LN -> fc -> GELU -----------------------------------------------------------


def _mlp_inputs(M, K, N):
    def make(device):
        dt = _dtype(device)
        return {"x": torch.randn(M, K, device=device, dtype=dt),
                "ln_w": torch.randn(K, device=device, dtype=dt), "ln_b": torch.randn(K, device=device, dtype=dt),
                "fc_w": torch.randn(N, K, device=device, dtype=dt) * K ** -0.5,
                "fc_b": torch.randn(N, device=device, dtype=dt)}
    return make


def _mlp(backend):
    def fn(x, ln_w, ln_b, fc_w, fc_b):
        h = ops.layer_norm(x, ln_w, ln_b, EPS, backend=backend)
        return ops.linear_bias_gelu(h, fc_w, fc_b, "tanh", backend=backend)
    return fn


_mlp_kernel, _mlp_reference = _mlp("kernel"), _mlp("torch")


def _mlp_torch(x, ln_w, ln_b, fc_w, fc_b):
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, EPS)
    return F.gelu(F.linear(h, fc_w, fc_b), approximate="tanh")


def _mlp_setup(fn, kernel=False):
    def setup(i):
        if kernel:
            no_interpreter(i["x"])
        args = (i["x"], i["ln_w"], i["ln_b"], i["fc_w"], i["fc_b"])
        return lambda: fn(*args)
    return setup


def _split_path():
    """The MLP front as torch.mm (cuBLAS) + the fused bias+GELU kernel instead of the epilogue."""
    from gptfast.ops import _norm_triton
    return mock.patch.object(_norm_triton, "MLP_FRONT", "split")


def mlp_cases(device_kind: str, quick: bool) -> list[Case]:
    M, K, N = (16384, 768, 3072) if device_kind == "cuda" else (256, 768, 3072)
    ours = _mlp_setup(_mlp_kernel, kernel=True)
    providers = [Provider("gptfast", "gptfast", ours)]
    if not quick:  # the epilogue's matmul with TMA only / pointers only, and the other split
        providers += [Provider("gptfast-tma", "gptfast", ours, context=env_context(GPTFAST_TMA="1")),
                      Provider("gptfast-ptr", "gptfast", ours, context=env_context(GPTFAST_TMA="0")),
                      Provider("gptfast-split", "gptfast", ours, context=_split_path)]
    providers += [
        Provider("reference", "reference", _mlp_setup(_mlp_reference)),
        Provider("reference+compile", "peer", lambda i: _mlp_setup(compiled(_mlp_reference))(i), compiled=True),
        Provider("torch", "peer", _mlp_setup(_mlp_torch)),
        Provider("torch+compile", "peer", lambda i: _mlp_setup(compiled(_mlp_torch))(i), compiled=True),
    ]
    return [Case(op="mlp", name=f"fwd LN->fc->GELU M={M} {K}->{N}", shape={"M": M, "K": K, "N": N},
                 dtype="bf16" if device_kind == "cuda" else "fp32", make_inputs=_mlp_inputs(M, K, N),
                 providers=providers, flops=accounting.matmul_flops(M, N, K))]
