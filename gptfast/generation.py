"""Generation over a static KV cache: ragged batches, streaming, stop tokens and strings, seeds.

Ragged prompts are packed to the right inside the cache (row b's tokens at positions
0..len_b-1), so every row has its natural positions and the result equals running each
prompt alone. Left-padded input with an attention_mask (as HF tokenizers produce) is
unpacked to that layout, and the output is returned in the caller's layout.

Per-row randomness: row b draws step s from the key ``seed_b + (s << 32)`` (see
gptfast.ops.sampling), so a row's tokens depend on its own seed only, never on its
batch-mates or batch position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from . import ops
from .ops.sampling import check_sample_args

Prompt = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


@dataclass
class _Prompts:
    rows: list[list[int]]
    layout: str  # "list", "tensor" (no padding), "left" / "right" (padded tensor with mask)
    width: int  # padded width of the input tensor
    pad_id: int


def _unpack(input_ids: Prompt, attention_mask) -> _Prompts:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64 tensor, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with B, T >= 1, got {tuple(input_ids.shape)}")
        ids = input_ids.tolist()
        if attention_mask is None:
            return _Prompts(ids, "tensor", input_ids.shape[1], 0)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.tolist()
        rows, layout = [], "right"
        for b, (r, m) in enumerate(zip(ids, mask)):
            kept = [i for i, mi in zip(r, m) if mi]
            first = m.index(1) if 1 in m else None
            if first is None:
                raise ValueError(f"attention_mask row {b} is all zeros: prompt {b} is empty")
            if not all(m[first:first + len(kept)]):
                raise ValueError(f"attention_mask row {b} is not one contiguous run of ones")
            if first > 0:
                layout = "left"
            rows.append(kept)
        pad = next((r[i] for r, m in zip(ids, mask) for i, mi in enumerate(m) if not mi), 0)
        return _Prompts(rows, layout, input_ids.shape[1], pad)
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a tensor input_ids")
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(i, int) for i in input_ids):
        return _Prompts([list(input_ids)], "single", len(input_ids), 0)
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple)) for r in input_ids):
        rows = [list(r) for r in input_ids]
        for b, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {b} is empty")
            if not all(isinstance(i, int) for i in r):
                raise TypeError(f"prompt {b} must hold ints")
        return _Prompts(rows, "list", 0, 0)
    raise TypeError("input_ids must be a LongTensor [B, T], a list of token ids, or a list of such lists; "
                    f"got {type(input_ids).__name__}")


def _row_seeds(seed, batch: int) -> torch.Tensor:
    if seed is None:
        return torch.randint(0, 2**31 - 1, (batch,), dtype=torch.int64)
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed + torch.arange(batch, dtype=torch.int64)
    if isinstance(seed, (list, tuple)) and len(seed) == batch and all(isinstance(s, int) for s in seed):
        return torch.tensor(seed, dtype=torch.int64)
    raise ValueError(f"seed must be None, an int, or a list of {batch} ints (one per row), got {seed!r}")


def _eos_ids(model, eos_token_id, ignore_eos: bool) -> list[int]:
    if ignore_eos:
        return []
    if eos_token_id is None:
        eos = model.config.eos_token_id
        return [eos] if eos is not None and eos < model.config.vocab_size else []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < model.config.vocab_size:
            raise ValueError(f"eos_token_id must be token ids in [0, {model.config.vocab_size}), got {i!r}")
    return ids


@torch.inference_mode()
def generate_stream(model, input_ids: Prompt, max_new_tokens: int = 32, *, temperature=1.0, top_k=0,
                    top_p=1.0, min_p=0.0, eos_token_id=None, ignore_eos: bool = False,
                    stop_strings: Optional[Sequence[str]] = None, tokenizer=None, seed=None,
                    attention_mask=None) -> Iterator[list[Optional[int]]]:
    """Yield, per step, one new token per row (None for rows that already stopped).

    A row stops after emitting an eos token (the eos token is yielded) or once the text of
    its new tokens contains one of stop_strings (needs tokenizer).
    """
    prompts = _unpack(input_ids, attention_mask)
    yield from _stream(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                       _eos_ids(model, eos_token_id, ignore_eos), stop_strings, tokenizer, seed)


def _stream(model, prompts: _Prompts, max_new_tokens, temperature, top_k, top_p, min_p, eos, stop_strings,
            tokenizer, seed):
    cfg, device = model.config, model.device
    rows = prompts.rows
    B, lens = len(rows), [len(r) for r in rows]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = max(lens) + max_new_tokens
    if total > cfg.n_positions:
        raise ValueError(f"prompt of {max(lens)} tokens + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"the model's context of {cfg.n_positions} positions")
    for b, r in enumerate(rows):
        bad = [i for i in r if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {b} holds token id {bad[0]}, outside the vocabulary [0, {cfg.vocab_size})")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer= to decode the generated text")
    # validate sampling parameters once, on a dummy row set (scalars: no device work)
    check_sample_args(torch.zeros(B, 1), temperature, top_k, top_p, min_p)
    if max_new_tokens == 0:
        return
    ids = torch.zeros(B, max(lens), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    ids, lens_t = ids.to(device), torch.tensor(lens, device=device)
    seeds = _row_seeds(seed, B).to(device)
    eos_set = set(eos)
    finished = [False] * B  # host state: the loop reads every token on the host anyway (streaming)
    texts = [[] for _ in range(B)] if stop_strings else None

    cache = model.setup_cache(B, total)
    logits = model(ids, cache=cache, input_lengths=lens_t, logits_index=lens_t - 1, validate=False)  # (B, V)
    last = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        tok = ops.sample(logits, temperature, top_k, top_p, min_p, generator=seeds + (step << 32))  # (B,)
        out = [None if done else t for done, t in zip(finished, tok.tolist())]  # the step's one sync
        for b, t in enumerate(out):
            if t is None:
                continue
            finished[b] = t in eos_set
            if texts is not None:
                texts[b].append(t)
                finished[b] = finished[b] or any(s in tokenizer.decode(texts[b]) for s in stop_strings)
        yield out
        if all(finished) or step == max_new_tokens - 1:
            return
        logits = model(tok.view(B, 1), cache=cache, logits_index=last, validate=False)


def generate(model, input_ids: Prompt, max_new_tokens: int = 32, *, pad_token_id: Optional[int] = None,
             progress=None, **kwargs):
    """Generate up to max_new_tokens per row; returns the prompts with their continuations.

    input_ids: LongTensor [B, T] (with attention_mask for padded batches, left or right
      padding), a list of ids, or a list of lists (ragged). The result has the same form:
      a tensor [B, T + new] (rows that stopped early padded with pad_token_id, default the
      first eos id or 0), a list, or a list of lists.
    Sampling: temperature (0 = greedy), top_k, top_p, min_p: scalars or per-row [B] tensors.
    Stopping: eos_token_id (int or list; default config.eos_token_id), ignore_eos,
      stop_strings with tokenizer=. seed: int (row b uses seed + b), per-row list, or None.
    progress: a callable(step, tokens_of_step) called after every step (used by the CLI).
    """
    prompts = _unpack(input_ids, kwargs.get("attention_mask"))
    kwargs.pop("attention_mask", None)
    eos = _eos_ids(model, kwargs.pop("eos_token_id", None), kwargs.pop("ignore_eos", False))
    names = ("temperature", "top_k", "top_p", "min_p", "stop_strings", "tokenizer", "seed")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
    opts = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, stop_strings=None, tokenizer=None, seed=None)
    opts.update(kwargs)
    new = [[] for _ in prompts.rows]
    with torch.inference_mode():
        for step, toks in enumerate(_stream(model, prompts, max_new_tokens, opts["temperature"], opts["top_k"],
                                            opts["top_p"], opts["min_p"], eos, opts["stop_strings"],
                                            opts["tokenizer"], opts["seed"])):
            for b, t in enumerate(toks):
                if t is not None:
                    new[b].append(t)
            if progress is not None:
                progress(step, toks)
    full = [p + n for p, n in zip(prompts.rows, new)]
    if prompts.layout == "single":
        return full[0]
    if prompts.layout == "list":
        return full
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else prompts.pad_id)
    width = max(len(r) for r in full) if prompts.layout == "tensor" else prompts.width + max(map(len, new))
    out = torch.full((len(full), width), pad, dtype=torch.long)
    for b, r in enumerate(full):
        if prompts.layout == "left":  # keep the caller's left padding: prompt ends at the same column
            start = prompts.width - len(prompts.rows[b])
            out[b, start:start + len(r)] = torch.tensor(r)
        else:
            out[b, :len(r)] = torch.tensor(r)
    return out.to(input_ids.device)
