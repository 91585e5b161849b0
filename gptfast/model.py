"""The GPT model: GPT-2 (pre-LN) and GPT-1 (post-LN) decoders in one module.

Parameter names match Hugging Face GPT-2 keys (transformer.wte, transformer.h.0.attn.c_attn, ...),
so loading is a key-by-key copy with asserted shapes (Conv1D weights transposed, gptfast uses
nn.Linear). Attention, LayerNorm, GELU and sampling go through gptfast.ops only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import ops
from .config import GPTConfig


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast computes in on device's type, or None where it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


@dataclass
class KVCache:
    """A static KV cache: k/v [n_layer] x [B, H, Tmax, D], seqlens [B] (valid entries per row).

    Shapes never change, so a decode step can be captured in a CUDA graph. ``empty`` is host
    state telling the model it may run the prefill with the flash kernel on the chunk alone.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: torch.Tensor
    empty: bool = True
    slack: int = 0  # scratch slots past max_seq_len (see allocate)

    @classmethod
    def allocate(cls, config: GPTConfig, batch_size: int, max_seq_len: int, device, dtype,
                 slack: int = 0) -> "KVCache":
        """slack: extra slots past max_seq_len for the scratch keys/values of tokens that are
        computed and thrown away (speculative decoding's drafts past a row's context end)."""
        if max_seq_len > config.n_positions:
            raise ValueError(f"max_seq_len must be <= n_positions ({config.n_positions}), got {max_seq_len}")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be an int >= 0, got {slack!r}")
        shape = (batch_size, config.n_head, max_seq_len + slack, config.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(k, v, torch.zeros(batch_size, dtype=torch.long, device=device), slack=slack)

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2] - self.slack

    def reset(self) -> None:
        self.seqlens.zero_()
        self.empty = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head = config.n_head
        # HF GPT-2's flags scale_attn_weights=False (scores q.k unscaled) and
        # scale_attn_by_inverse_layer_idx (layer i's scores divided by i + 1 as well), passed to
        # ops.attention and ops.decode_attention. None keeps the ops' default 1/sqrt(head_dim).
        default = config.scale_attn_weights and not (config.scale_attn_by_inverse_layer_idx and layer_idx > 0)
        self.scale = None if default else config.layer_attn_scale(layer_idx)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # its p, on the attention weights in training
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, layer: int = 0, cache: Optional[KVCache] = None, positions=None, attend_lens=None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs), strided views
        # training mode applies attn_pdrop to the weights (the flash kernel's own masks), over a
        # KV cache too (generation in training mode, as transformers does)
        drop = self.attn_dropout.p if self.training else 0.0
        if cache is None:
            y = ops.attention(q, k, v, causal=True, scale=self.scale, dropout_p=drop)
        else:
            idx = positions.view(B, 1, T, 1).expand(B, self.n_head, T, C // self.n_head)
            cache.k[layer].scatter_(2, idx, k.to(cache.k[layer].dtype))
            cache.v[layer].scatter_(2, idx, v.to(cache.v[layer].dtype))
            if cache.empty:  # prefill: the chunk alone is the whole context
                y = ops.attention(q, k, v, causal=True, scale=self.scale, dropout_p=drop)
            else:
                y = ops.decode_attention(q, cache.k[layer], cache.v[layer], attend_lens, scale=self.scale,
                                         dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        h = ops.linear_bias_gelu(x, self.c_fc.weight, self.c_fc.bias, self.approximate)  # (B, T, 4C)
        return self.dropout(self.c_proj(h))


class LayerNorm(nn.Module):
    """LayerNorm through ops.layer_norm; with bias=False (nanoGPT option) the bias is None."""

    def __init__(self, n: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x, residual=None):
        if residual is not None and x.dtype != residual.dtype:
            x = x.to(residual.dtype)  # under autocast a sublayer returns bf16; the residual stream stays fp32
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)  # layer_idx: scale_attn_by_inverse_layer_idx
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pending, layer, cache, positions, attend_lens):
        """x: the residual stream; pending: a sublayer output not yet added to it (pre-LN).

        Pre-LN (GPT-2) folds each residual add into the next LayerNorm (ops.layer_norm with
        residual=), so the block returns (x, mlp_out) and the caller adds mlp_out later.
        Post-LN (GPT-1): x = ln_1(x + attn(x)); x = ln_2(x + mlp(x)).
        """
        if self.pre_ln:
            if pending is None:
                h = self.ln_1(x)
            else:
                h, x = self.ln_1(pending, residual=x)
            a = self.attn(h, layer, cache, positions, attend_lens)
            h, x = self.ln_2(a, residual=x)
            return x, self.mlp(h)
        a = self.attn(x, layer, cache, positions, attend_lens)
        x, _ = self.ln_1(a, residual=x)
        m = self.mlp(x)
        x, _ = self.ln_2(m, residual=x)
        return x, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        if config.final_ln:
            self.transformer["ln_f"] = LayerNorm(config.n_embd, config.layer_norm_epsilon, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        std = config.initializer_range
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if config.pre_ln and name.endswith("c_proj.weight"):  # GPT-1 (post-LN): N(0, std) throughout
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        """N(0, config.initializer_range) weights and zero biases, as transformers' GPT-2 / GPT-1."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None) -> "GPT":
        """Load a Hugging Face GPT-2/GPT-1 directory, a nanoGPT checkpoint, a hub name, or convert a
        transformers model object in memory (GPT2LMHeadModel, GPT2Model, OpenAIGPTLMHeadModel...)."""
        from .checkpoint import load_model
        return load_model(path, device=device, dtype=dtype)

    def save_pretrained(self, path: str, safe_serialization: bool = True, format: str = "hf") -> None:
        """format="hf": write a directory that transformers' GPT2LMHeadModel / OpenAIGPTLMHeadModel can
        load (ValueError, before anything is written, for a config with no HF equivalent such as
        bias=False). format="nanogpt": a nanoGPT-style ckpt.pt in directory path (or path itself when
        it ends in .pt) holding the whole config: any model. format="auto": "hf" where the config has
        an HF equivalent, else "nanogpt". GPT.from_pretrained(path) loads each."""
        from .checkpoint import save_model, save_nanogpt

        formats = ("hf", "nanogpt", "auto")
        if format not in formats:
            raise ValueError(f"format must be one of {formats}, got {format!r}")
        if format == "auto":
            format = "hf" if self.config.hf_incompatibility() is None else "nanogpt"
        if format == "nanogpt":
            save_nanogpt(self, path)
        else:
            save_model(self, path, safe_serialization=safe_serialization)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Activation checkpointing in training: each block keeps only its inputs for the backward
        pass and runs its forward again there (about a third more compute for a fraction of the
        activation memory). The name is transformers'."""
        self.gradient_checkpointing = bool(enable)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the vocabulary to vocab_size (new rows drawn as at init; the LM head stays
        tied), e.g. after adding fine-tuning tokens to the tokenizer."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        old = self.transformer.wte
        if vocab_size == old.num_embeddings:
            return
        new = nn.Embedding(vocab_size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.normal_(new.weight, mean=0.0, std=self.config.initializer_range)
        keep = min(vocab_size, old.num_embeddings)
        with torch.no_grad():
            new.weight[:keep].copy_(old.weight[:keep])
        self.transformer.wte = new
        self.lm_head = nn.Linear(old.embedding_dim, vocab_size, bias=False, device="meta")
        self.lm_head.weight = new.weight
        self.config.vocab_size = vocab_size

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None,
                    slack: int = 0) -> KVCache:
        """A KV cache in dtype; by default the dtype keys and values come in: the autocast dtype
        under autocast on the model's device, else the weights' (attention needs q, k, v alike)."""
        max_seq_len = self.config.n_positions if max_seq_len is None else max_seq_len
        if dtype is None:
            dtype = autocast_dtype(self.device) or self.transformer.wte.weight.dtype
        return KVCache.allocate(self.config, batch_size, max_seq_len, self.device, dtype, slack=slack)

    # ---- forward -------------------------------------------------------------
    def _check_input_ids(self, input_ids):
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a LongTensor [B, T], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")

    def forward(self, input_ids, labels=None, *, cache: Optional[KVCache] = None, input_lengths=None,
                logits_index=None, validate: bool = True, targets=None):
        """Logits [B, T, V]; with labels, (logits, loss) (labels shifted inside, -100 ignored).

        targets [B, T]: the token each position is to predict (-100 ignored); returns the mean
            loss alone, through ops.linear_cross_entropy, which never holds the [B, T, V]
            logits (training's largest activation).
        cache: write this chunk's keys/values at positions cache.seqlens[b] + t and attend
            over the cache; input_lengths [B] (default T) says how many tokens of each row
            are real, so right-padded ragged prompts prefill in one call.
        logits_index [B]: compute logits only at that position of each row -> [B, V].
        validate: check token ids and positions on the host (one sync); the generation loop
            validates once up front and then passes False.
        """
        if targets is not None and labels is not None:
            raise ValueError("pass labels (shifted inside) or targets (not shifted), not both")
        if logits_index is not None and (labels is not None or targets is not None):
            raise ValueError("logits_index cannot be combined with labels or targets: the loss reads every position")
        x = self.hidden_states(input_ids, cache=cache, input_lengths=input_lengths, validate=validate)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != input_ids.shape:
                raise ValueError(f"targets must have shape {tuple(input_ids.shape)}, got "
                                 f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else targets!r}")
            return ops.linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        if logits_index is not None:
            B = x.shape[0]
            x = x.gather(1, logits_index.view(B, 1, 1).expand(B, 1, x.shape[-1])).squeeze(1)  # (B, C)
        logits = self.lm_head(x)
        if labels is None:
            return logits
        return logits, self.loss(logits, labels)

    def hidden_states(self, input_ids, *, cache: Optional[KVCache] = None, input_lengths=None,
                      validate: bool = True):
        """The last block's output after the final LayerNorm (GPT-2) or the last post-LN (GPT-1),
        [B, T, C]: what the LM head and fine-tuning heads read. Arguments as in forward."""
        self._check_input_ids(input_ids)
        B, T = input_ids.shape
        if validate:
            self._validate_ids(input_ids, cache, T)
        positions = attend_lens = None
        if cache is None:
            pos = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        else:
            positions = cache.seqlens.view(B, 1) + torch.arange(T, device=input_ids.device)  # (B, T)
            attend_lens = cache.seqlens + T
            # scratch tokens past the context (speculative drafts, in the cache's slack) take the
            # last position embedding; their outputs are discarded. Real tokens are checked above.
            pos = positions.clamp(max=self.config.n_positions - 1)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))  # (B, T, C)
        pending = None
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:  # keep only each block's inputs; its activations are recomputed in backward
                x, pending = torch.utils.checkpoint.checkpoint(block, x, pending, i, None, None, None,
                                                               use_reentrant=False)
            else:
                x, pending = block(x, pending, i, cache, positions, attend_lens)
        if self.config.final_ln:
            x = self.transformer.ln_f(pending, residual=x)[0] if pending is not None else self.transformer.ln_f(x)
        elif pending is not None:
            x = x + pending
        if cache is not None:
            cache.seqlens += T if input_lengths is None else input_lengths.to(cache.seqlens.dtype)
            cache.empty = False
        return x

    def _validate_ids(self, input_ids, cache, T):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
        start = 0 if cache is None else int(cache.seqlens.max())
        limit = self.config.n_positions if cache is None else min(self.config.n_positions, cache.max_seq_len)
        if start + T > limit:
            what = (f"n_positions={self.config.n_positions}" if limit == self.config.n_positions
                    else f"the KV cache's max_seq_len={cache.max_seq_len}")
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {limit} positions ({what})")

    @staticmethod
    def loss(logits, labels):
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).long(), ignore_index=-100)

    # ---- generation ----------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """See gptfast.generation.generate."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def generate_stream(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """See gptfast.generation.generate_stream."""
        from .generation import generate_stream
        return generate_stream(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
