"""Cases: sampling the next token from fp32 logits [B, V=50257].

Modes: top-k 40, top-p 0.9, both, greedy (temperature 1.0 when sampling).
Peers: the PyTorch chain as Hugging Face's logits warpers write it (topk / sort /
softmax / cumsum / multinomial), and the same filters followed by the exponential race
``(probs / torch.empty_like(probs).exponential_(1)).argmax(-1)`` (gpt-fast's sync-free draw),
each eager and compiled. The byte count is the logits read once.
"""
from __future__ import annotations

import torch

from gptfast import ops

from . import accounting
from .harness import Case, Provider, compiled

V = 50257
MODES = {  # name -> (temperature, top_k, top_p)
    "top-k 40": (1.0, 40, 1.0),
    "top-p 0.9": (1.0, 0, 0.9),
    "top-k 40 + top-p 0.9": (1.0, 40, 0.9),
    "greedy": (0.0, 0, 1.0),
}


def _filter(logits, temperature: float, top_k: int, top_p: float):
    """HF warper order: temperature -> top-k -> top-p; removed tokens at -inf."""
    x = logits / temperature
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]))[0][..., -1, None]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(x, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # the most likely token always survives
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return x


def torch_chain(logits, temperature: float, top_k: int, top_p: float):
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_filter(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def exponential_race(logits, temperature: float, top_k: int, top_p: float):
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_filter(logits, temperature, top_k, top_p), dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def _kernel(logits, temperature, top_k, top_p):
    return ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, backend="kernel")


def _reference(logits, temperature, top_k, top_p):
    return ops.sample_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _setup(fn, mode):
    t, k, p = MODES[mode]
    return lambda i: (lambda: fn(i["logits"], t, k, p))


def _compiled_setup(fn, mode):
    t, k, p = MODES[mode]

    def setup(i):
        c = compiled(fn)
        return lambda: c(i["logits"], t, k, p)
    return setup


def _logits(B):
    return lambda device: {"logits": torch.randn(B, V, device=device, dtype=torch.float32) * 3}


def sampling_cases(device_kind: str, quick: bool) -> list[Case]:
    if device_kind == "cuda":
        batches = (8,) if quick else (1, 8, 64)
    else:
        batches = (1,) if quick else (1, 8)
    cases = []
    for B in batches:
        for mode in MODES:
            providers = [
                Provider("gptfast", "gptfast", _setup(_kernel, mode)),
                Provider("reference", "reference", _setup(_reference, mode)),
                Provider("reference+compile", "peer", _compiled_setup(_reference, mode), compiled=True),
                Provider("torch-chain", "peer", _setup(torch_chain, mode)),
                Provider("torch-chain+compile", "peer", _compiled_setup(torch_chain, mode), compiled=True),
                Provider("exp-race", "peer", _setup(exponential_race, mode)),
                Provider("exp-race+compile", "peer", _compiled_setup(exponential_race, mode), compiled=True),
            ]
            cases.append(Case(op="sampling", name=f"{mode} B={B} V={V}", shape={"B": B, "V": V, "mode": mode},
                              dtype="fp32", make_inputs=_logits(B), providers=providers,
                              bytes=accounting.sampling_bytes(B, V, 4)))
    return cases
