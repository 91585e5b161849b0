"""Cases: causal attention (fwd, fwd+bwd; padded; with attention dropout) and decode attention over a KV cache.

Peers: PyTorch SDPA with each backend forced through torch.nn.attention.sdpa_kernel
(flash, efficient, cudnn, math) and FlashAttention (flash_attn) when importable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast import ops

from . import accounting
from .harness import Case, Provider, Skip, compiled, env_context, left_pads, no_interpreter, optional_import

D = 64
H = 12


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _dtype(device) -> torch.dtype:
    # bf16 is the GPU case; on CPU fp32 is what a CPU user would run (bf16 CPU matmuls are emulated).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---- prefill / training attention ------------------------------------------------------


def _attention_inputs(B, T, pass_):
    def make(device):
        dt, grad = _dtype(device), pass_ != "fwd"
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dt, requires_grad=grad) for _ in range(3))
        inputs = {"q": q, "k": k, "v": v}
        if grad:
            inputs["dout"] = torch.randn(B, H, T, D, device=device, dtype=dt)
        return inputs
    return make


def _thunk(fn, q, k, v, dout=None):
    """fwd: fn(q, k, v); fwd+bwd: forward then torch.autograd.grad (no .grad accumulation)."""
    if dout is None:
        return lambda: fn(q, k, v)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def _kernel(q, k, v):
    return ops.attention(q, k, v, causal=True, backend="kernel")


def _reference(q, k, v):
    return ops.attention_reference(q, k, v, causal=True)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_context(backend_name):
    """The harness enters this around the timed loop: SDPA restricted to one backend."""
    def context():
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(_sdpa_backends()[backend_name])
    return context


def _flash_attn_setup(inputs, dropout_p=0.0):
    fa, reason = optional_import("flash_attn")
    if fa is None:
        raise Skip(reason)
    # flash_attn takes [B, T, H, D]: transpose once here, outside the timed call.
    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)
               for t in (inputs["q"], inputs["k"], inputs["v"]))
    dout = inputs.get("dout")
    dout = None if dout is None else dout.transpose(1, 2).contiguous()
    return _thunk(lambda q, k, v: fa.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True), q, k, v, dout)


def _setup(fn, check_kernel=False):
    def setup(inputs):
        if check_kernel:
            no_interpreter(inputs["q"])
        return _thunk(fn, inputs["q"], inputs["k"], inputs["v"], inputs.get("dout"))
    return setup


def _kernel_providers(setup):
    """gptfast, then each half of the autotuner's choice on its own (TMA configs only, pointer only)."""
    return [Provider("gptfast", "gptfast", setup)] + \
        [Provider(f"gptfast-{name}", "gptfast", setup, context=env_context(GPTFAST_TMA=mode))
         for name, mode in (("tma", "1"), ("ptr", "0"))]


def attention_providers(variants=False):
    kernel = _setup(_kernel, check_kernel=True)  # with variants, each mode tunes apart
    providers = _kernel_providers(kernel) if variants else [Provider("gptfast", "gptfast", kernel)]
    providers += [
        Provider("reference", "reference", _setup(_reference)),
        Provider("reference+compile", "peer", lambda i: _setup(compiled(_reference))(i), compiled=True),
    ]
    providers += [Provider(f"sdpa-{name}", "peer", _setup(_sdpa), context=_sdpa_context(name))
                  for name in ("flash", "efficient", "cudnn", "math")]
    providers.append(Provider("flash_attn", "peer", _flash_attn_setup))
    return providers


# ---- a padded batch (transformers' left-padded generate, right-padded training) ----------


def _padded_inputs(B, T, pass_):
    """Row b left-padded by harness.left_pads: kv_start for gptfast, the equivalent boolean
    mask [B, 1, T, T] (causal & key >= start) for SDPA, built outside the timed call."""
    base = _attention_inputs(B, T, pass_)

    def make(device):
        inputs = base(device)
        start = left_pads(B, T, device)
        keys = torch.arange(T, device=device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        inputs["kv_start"] = start.to(torch.int32)
        inputs["mask"] = (causal & (keys[None, :] >= start[:, None])[:, None, :])[:, None]
        return inputs
    return make


def _padded_setup(fn, padding="kv_start", check_kernel=False):
    """fn(q, k, v, inputs[padding]): the padding as that provider takes it (kv_start, or SDPA's mask)."""
    def setup(inputs):
        if check_kernel:
            no_interpreter(inputs["q"])
        pad = inputs[padding]
        return _thunk(lambda q, k, v: fn(q, k, v, pad), inputs["q"], inputs["k"], inputs["v"], inputs.get("dout"))
    return setup


def _padded_kernel(q, k, v, kv_start):
    return ops.attention(q, k, v, causal=True, backend="kernel", kv_start=kv_start)


def _padded_reference(q, k, v, kv_start):
    return ops.attention_reference(q, k, v, True, None, kv_start)


def _padded_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _padded_providers():
    return _kernel_providers(_padded_setup(_padded_kernel, check_kernel=True)) + \
        [Provider("reference", "reference", _padded_setup(_padded_reference))] + \
        [Provider(f"sdpa-{name}", "peer", _padded_setup(_padded_sdpa, "mask"), context=_sdpa_context(name))
         for name in ("efficient", "cudnn", "math")]  # SDPA's flash backend takes no mask


# ---- attention dropout in training (transformers' GPT-2 default: attn_pdrop 0.1) -------------

DROPOUT = 0.1


def _dropout_kernel(q, k, v):
    return ops.attention(q, k, v, causal=True, backend="kernel", dropout_p=DROPOUT)


def _dropout_reference(q, k, v):
    return ops.attention_reference(q, k, v, causal=True, dropout_p=DROPOUT)


def _dropout_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=DROPOUT)


def _dropout_providers():
    return _kernel_providers(_setup(_dropout_kernel, check_kernel=True)) + \
        [Provider("reference", "reference", _setup(_dropout_reference))] + \
        [Provider(f"sdpa-{name}", "peer", _setup(_dropout_sdpa), context=_sdpa_context(name))
         for name in ("flash", "efficient", "math")] + \
        [Provider("flash_attn", "peer", lambda inputs: _flash_attn_setup(inputs, DROPOUT))]


def attention_cases(device_kind: str, quick: bool) -> list[Case]:
    if device_kind == "cuda":
        shapes = [(16, 1024)] if quick else [(16, 1024), (4, 4096), (1, 16384)]
    else:
        shapes = [(1, 128)] if quick else [(1, 256), (2, 512)]
    cases = []
    for pass_ in ("fwd", "fwd+bwd"):
        for B, T in shapes:
            cases.append(Case(
                op="attention", name=f"{pass_} B={B} H={H} T={T} D={D} causal",
                shape={"B": B, "H": H, "T": T, "D": D, "causal": True, "pass": pass_},
                dtype="bf16" if device_kind == "cuda" else "fp32",
                make_inputs=_attention_inputs(B, T, pass_), providers=attention_providers(variants=not quick),
                flops=accounting.attention_flops(B, H, T, D, causal=True, pass_=pass_)))
    if not quick:  # a padded batch at the first shape; FLOPs counted as unpadded (the same for every provider)
        B, T = shapes[0]
        B = max(B, 4)  # every padding offset
        for pass_ in ("fwd", "fwd+bwd"):
            cases.append(Case(
                op="attention", name=f"{pass_} B={B} H={H} T={T} D={D} causal left-padded",
                shape={"B": B, "H": H, "T": T, "D": D, "causal": True, "pass": pass_, "padding": "left, 0-3/8 of T"},
                dtype="bf16" if device_kind == "cuda" else "fp32",
                make_inputs=_padded_inputs(B, T, pass_), providers=_padded_providers(),
                flops=accounting.attention_flops(B, H, T, D, causal=True, pass_=pass_)))
        B, T = shapes[0]  # training with attention dropout at the first shape (FLOPs as without it)
        cases.append(Case(
            op="attention", name=f"fwd+bwd B={B} H={H} T={T} D={D} causal dropout {DROPOUT}",
            shape={"B": B, "H": H, "T": T, "D": D, "causal": True, "pass": "fwd+bwd", "dropout_p": DROPOUT},
            dtype="bf16" if device_kind == "cuda" else "fp32",
            make_inputs=_attention_inputs(B, T, "fwd+bwd"), providers=_dropout_providers(),
            flops=accounting.attention_flops(B, H, T, D, causal=True, pass_="fwd+bwd")))
    return cases


# ---- decode attention ------------------------------------------------------------------


def _decode_inputs(B, L):
    def make(device):
        dt = _dtype(device)
        return {"q": torch.randn(B, H, 1, D, device=device, dtype=dt),
                "k_cache": torch.randn(B, H, L, D, device=device, dtype=dt),
                "v_cache": torch.randn(B, H, L, D, device=device, dtype=dt),
                "seqlens": torch.full((B,), L, device=device, dtype=torch.int32)}
    return make


def _decode_kernel(q, k, v, lens):
    return ops.decode_attention(q, k, v, lens, backend="kernel")


def _decode_setup(fn, check_kernel=False):
    def setup(i):
        if check_kernel:
            no_interpreter(i["q"])
        return lambda: fn(i["q"], i["k_cache"], i["v_cache"], i["seqlens"])
    return setup


def _decode_sdpa(q, k, v, lens):
    # Every cache entry is valid (seqlens == L), so no mask is needed: the plain SDPA call.
    return F.scaled_dot_product_attention(q, k, v)


def _decode_flash_attn_setup(i):
    fa, reason = optional_import("flash_attn")
    if fa is None:
        raise Skip(reason)
    q, k, v = (i[n].transpose(1, 2).contiguous() for n in ("q", "k_cache", "v_cache"))  # [B, T, H, D]
    return lambda: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=i["seqlens"])


def decode_cases(device_kind: str, quick: bool) -> list[Case]:
    L = 1024 if device_kind == "cuda" else (128 if quick else 256)
    batches = (1, 32) if device_kind == "cuda" else ((1,) if quick else (1, 8))
    cases = []
    for B in batches:
        providers = [
            Provider("gptfast", "gptfast", _decode_setup(_decode_kernel, check_kernel=True)),
            Provider("reference", "reference", _decode_setup(ops.decode_attention_reference)),
            Provider("reference+compile", "peer",
                     lambda i: _decode_setup(compiled(ops.decode_attention_reference))(i), compiled=True),
        ]
        providers += [Provider(f"sdpa-{n}", "peer", _decode_setup(_decode_sdpa), context=_sdpa_context(n))
                      for n in ("flash", "efficient", "cudnn", "math")]
        providers.append(Provider("flash_attn", "peer", _decode_flash_attn_setup))
        elem = 2 if device_kind == "cuda" else 4
        cases.append(Case(
            op="decode_attention", name=f"B={B} H={H} L={L} D={D}",
            shape={"B": B, "H": H, "L": L, "D": D, "Tq": 1}, dtype="bf16" if device_kind == "cuda" else "fp32",
            make_inputs=_decode_inputs(B, L), providers=providers,
            bytes=accounting.decode_attention_bytes(B, H, L, D, elem)))
    return cases
