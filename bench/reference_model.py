"""A small nanoGPT-style GPT-2 in plain PyTorch: the peer of the end-to-end benchmarks.

Training: the model nanoGPT users compile (SDPA attention, F.layer_norm, tanh GELU, tied
head). Generation: gpt-fast's recipe, a static KV cache written at input positions so
every decode step has the same shapes, and the step compiled (with CUDA graphs on a GPU,
mode="reduce-overhead"). Kept here rather than in gptfast so the peer shares no code with
what it is compared against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        # Buffers (set by setup_caches), not plain attributes: CUDA graphs treat buffers as static
        # addresses, so the compiled decode step may update them in place and still be captured.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, input_pos: Optional[torch.Tensor] = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # static cache: write at input_pos, attend to every position <= the query's
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
            tmax = self.k_cache.shape[2]
            mask = torch.arange(tmax, device=x.device).view(1, -1) <= input_pos.view(-1, 1)  # (T, Tmax)
            y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x, input_pos=None):
        x = x + self.attn(self.ln_1(x), input_pos)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int):
        super().__init__()
        self.n_head, self.n_positions = n_head, n_positions
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    @classmethod
    def from_gptfast_config(cls, config) -> "NanoGPT":
        return cls(config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head)

    def forward(self, idx, targets=None, input_pos: Optional[torch.Tensor] = None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x, input_pos)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1))
        return logits, loss

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate the caches once per shape: keeping the same tensors lets a compiled step
        (and its CUDA graph) be reused across calls. Stale entries need no zeroing: every
        position is written before the mask lets a query see it."""
        w = self.wte.weight
        C = w.shape[1]
        shape = (batch_size, self.n_head, max_seq_len, C // self.n_head)
        cache = self.h[0].attn.k_cache
        if cache is not None and tuple(cache.shape) == shape and cache.dtype == w.dtype:
            return
        for block in self.h:
            block.attn.k_cache = torch.zeros(shape, device=w.device, dtype=w.dtype)
            block.attn.v_cache = torch.zeros(shape, device=w.device, dtype=w.dtype)


def decode_one(model: NanoGPT, tok: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One greedy decode step: tok [B, 1] at position input_pos [1] -> next tok [B, 1]."""
    logits = model(tok, input_pos=input_pos)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.inference_mode()
def generate_static(model: NanoGPT, idx: torch.Tensor, max_new_tokens: int, step=decode_one,
                    max_seq_len: Optional[int] = None) -> torch.Tensor:
    """Greedy generation with the static cache; step is decode_one or a compiled copy of it.

    max_seq_len: the cache length (default T + max_new_tokens); pass the same value to calls
    of different lengths so they share one cache and one compiled step.
    """
    B, T = idx.shape
    model.setup_caches(B, max_seq_len or T + max_new_tokens)
    logits = model(idx, input_pos=torch.arange(T, device=idx.device))  # prefill, eager
    tok = logits[:, -1].argmax(dim=-1, keepdim=True)
    out = [tok]
    pos = torch.tensor([T], device=idx.device)
    for _ in range(max_new_tokens - 1):
        tok = step(model, tok, pos).clone()  # clone: a CUDA-graph output is overwritten by the next replay
        out.append(tok)
        pos += 1
    return torch.cat([idx, *out], dim=1)
