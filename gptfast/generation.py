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

import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from . import ops
from .model import autocast_dtype
from .ops.sampling import check_sample_args

Prompt = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


@dataclass
class _Prompts:
    rows: list[list[int]]
    layout: str  # "list", "tensor" (no padding), "left" / "right" (padded tensor with mask)
    width: int  # padded width of the input tensor
    pad_id: int
    pads: Optional[list[list[int]]] = None  # "left": each row's masked-out ids, kept in the output


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
        rows, pads, layout = [], [], "right"
        for b, (r, m) in enumerate(zip(ids, mask)):
            kept = [i for i, mi in zip(r, m) if mi]
            pads.append([i for i, mi in zip(r, m) if not mi])
            first = m.index(1) if 1 in m else None
            if first is None:
                raise ValueError(f"attention_mask row {b} is all zeros: prompt {b} is empty")
            if not all(m[first:first + len(kept)]):
                raise ValueError(f"attention_mask row {b} is not one contiguous run of ones")
            if first > 0:
                layout = "left"
            rows.append(kept)
        pad = next((p[0] for p in pads if p), 0)  # the first masked-out id
        return _Prompts(rows, layout, input_ids.shape[1], pad, pads)
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a tensor input_ids")
    if isinstance(input_ids, (list, tuple)) and not input_ids:
        raise ValueError("input_ids is empty: a prompt needs at least one token")
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
        seeds = [seed + b for b in range(batch)]
    elif isinstance(seed, (list, tuple)) and len(seed) == batch and all(isinstance(s, int) for s in seed):
        seeds = list(seed)
    else:
        raise ValueError(f"seed must be None, an int, or a list of {batch} ints (one per row), got {seed!r}")
    # a key is seed + (step << 32): a seed outside [0, 2**32) would share its draws with another seed's
    bad = next((s for s in seeds if not 0 <= s < 2**32), None)
    if bad is not None:
        raise ValueError(f"seed must be in [0, 2**32) for every row (an int seed gives row b seed + b), got {bad}")
    return torch.tensor(seeds, dtype=torch.int64)


def _eos_ids(model, eos_token_id, ignore_eos: bool) -> list[int]:
    if ignore_eos:
        return []
    if eos_token_id is None:  # the config's: None, an id or a list of ids (ids past the vocabulary never come)
        eos = model.config.eos_token_id
        return [i for i in ([eos] if isinstance(eos, int) else eos or []) if i < model.config.vocab_size]
    if isinstance(eos_token_id, torch.Tensor):  # as transformers takes it: a 0-d or 1-d tensor
        eos_token_id = eos_token_id.tolist()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < model.config.vocab_size:
            raise ValueError(f"eos_token_id must be token ids in [0, {model.config.vocab_size}), got {i!r}")
    return ids


@torch.inference_mode()
def generate_stream(model, input_ids: Prompt, max_new_tokens: int = 32, *, temperature=1.0, top_k=0,
                    top_p=1.0, min_p=0.0, eos_token_id=None, ignore_eos: bool = False,
                    stop_strings: Optional[Sequence[str]] = None, tokenizer=None, seed=None,
                    attention_mask=None, cuda_graph: Optional[bool] = None, draft_model=None,
                    num_draft_tokens: int = 4, stats: Optional[dict] = None) -> Iterator[list[Optional[int]]]:
    """Yield, per step, one new token per row (None for rows that already stopped).

    A row stops after emitting an eos token (the eos token is yielded) or once the text of
    its new tokens contains one of stop_strings (needs tokenizer).
    cuda_graph: replay the decode step as a CUDA graph (None: on CUDA when max_new_tokens >=
    GRAPH_MIN_NEW_TOKENS); the tokens are the same either way.
    draft_model: a smaller GPT with the same vocabulary, or gptfast.PromptLookup(), for
    speculative decoding (gptfast.speculative): it proposes num_draft_tokens tokens a round, the
    model verifies them in one pass. Greedy output is unchanged (up to rounding near-ties);
    sampled tokens keep the model's distribution.
    stats: a dict that receives the rounds, drafted and accepted counts and the acceptance rate.
    """
    prompts = _unpack(input_ids, attention_mask)
    yield from _stream(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                       _eos_ids(model, eos_token_id, ignore_eos), stop_strings, tokenizer, seed, cuda_graph,
                       draft_model, num_draft_tokens, stats)


class _Stops:
    """Whether a row stops after a token: an eos id, or a stop string in the text of its new tokens.

    The text grows by a stream decoder per row: a stop string new after a token ends past the
    text returned before it, so it lies in that text's last len(s) - 1 characters (kept in
    tails), the token's piece and what the decoder holds back (decode of every id is the
    pieces and the held text). A decoder that decodes every id (`whole`) is checked so too."""

    def __init__(self, batch: int, eos, stop_strings, tokenizer):
        self.eos, self.strings, self.tokenizer = set(eos), stop_strings, tokenizer
        self.texts = [tokenizer.stream_decoder() for _ in range(batch)] if stop_strings else None
        self.tails = [""] * batch
        self.keep = max(map(len, stop_strings)) - 1 if stop_strings else 0

    def push(self, row: int, token: int) -> bool:
        if token in self.eos:
            return True
        if self.texts is None or token >= self.tokenizer.vocab_size:  # a padded vocabulary's extra ids have no text
            return False
        stream = self.texts[row]
        piece = stream.push(token)
        if stream.whole:  # its text of every id, decoded once by the push
            return any(s in stream.text for s in self.strings)
        text = self.tails[row] + piece
        self.tails[row] = text[len(text) - self.keep:] if len(text) > self.keep else text
        text += stream.held
        return any(s in text for s in self.strings)


def _stream(model, prompts: _Prompts, max_new_tokens, temperature, top_k, top_p, min_p, eos, stop_strings,
            tokenizer, seed, cuda_graph=None, draft=None, num_draft_tokens=4, stats=None):
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
    use_graph = _use_cuda_graph(cuda_graph, device, max_new_tokens)
    if stop_strings is not None:
        if isinstance(stop_strings, str) or not all(isinstance(t, str) for t in stop_strings):
            raise TypeError(f"stop_strings must be a list of strings, got {stop_strings!r}")
        if "" in stop_strings:
            raise ValueError(f"stop_strings must not hold an empty string (it would stop at once), got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer= to decode the generated text")
    if draft is not None:
        from .speculative import check_draft
        check_draft(model, draft, num_draft_tokens, total)
    # validate sampling parameters once, on a dummy row set (scalars: no device work)
    check_sample_args(torch.zeros(B, 1), temperature, top_k, top_p, min_p)
    if max_new_tokens == 0:
        return
    ids = torch.zeros(B, max(lens), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    ids, lens_t = ids.to(device), torch.tensor(lens, device=device)
    seeds = _row_seeds(seed, B).to(device)
    stops = _Stops(B, eos, stop_strings, tokenizer)
    if draft is not None:
        from .speculative import speculative_stream
        yield from speculative_stream(model, draft, rows, ids, lens_t, seeds, (temperature, top_k, top_p, min_p),
                                      stops, max_new_tokens, _cache_len(model, total), num_draft_tokens, use_graph,
                                      stats)
        return
    finished = [False] * B  # host state: the loop reads every token on the host anyway (streaming)

    decode = _decode_step(model, B, total, use_graph)
    decode.cache.reset()
    logits = model(ids, cache=decode.cache, input_lengths=lens_t, logits_index=lens_t - 1, validate=False)
    tok = ops.sample(logits, temperature, top_k, top_p, min_p, generator=seeds)  # step 0: the prefill's logits
    try:
        decode.start(tok, seeds, (temperature, top_k, top_p, min_p))  # marks the kept step busy
        for step in range(max_new_tokens):
            if step:
                decode(model)
            out = [None if done else t for done, t in zip(finished, decode.tokens.tolist())]  # the step's one sync
            for b, t in enumerate(out):
                if t is not None:
                    finished[b] = stops.push(b, t)
            yield out
            if all(finished):
                return
    finally:
        decode.busy = False


GRAPH_MIN_NEW_TOKENS = 4  # below this, capturing costs more than it saves


def _use_cuda_graph(cuda_graph: Optional[bool], device: torch.device, max_new_tokens: int) -> bool:
    if cuda_graph is None:
        return device.type == "cuda" and max_new_tokens >= GRAPH_MIN_NEW_TOKENS
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be None (auto), True or False, got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    return cuda_graph


CACHE_LEN_MULTIPLE = 128  # cache lengths are rounded up to this, so one captured graph serves many calls
_graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its last DecodeStep with a graph
_spec_graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its last SpecRound with a graph


def _cache_len(model, total: int) -> int:
    return min(model.config.n_positions, -(-total // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)


def _decode_step(model, batch: int, total: int, cuda_graph: bool) -> "DecodeStep":
    """A DecodeStep for this call: the model's captured one when it fits, else a new one."""
    max_len = _cache_len(model, total)
    if not cuda_graph:
        return DecodeStep(model.setup_cache(batch, max_len), cuda_graph=False)
    return kept_graph_step(_graphs, model, graph_key(model, batch, max_len),
                           lambda key: DecodeStep(model.setup_cache(batch, max_len), cuda_graph=True, key=key))


def graph_key(model, *shape) -> tuple:
    """What a captured graph bakes in besides its shapes: the mode, the backend, autocast (and
    its dtype), and the parameters' storage (model.to(...) reallocates them)."""
    return (*shape, model.training, ops.current_backend(), autocast_dtype(model.device),
            tuple(p.data_ptr() for p in model.parameters()))


def kept_graph_step(store, model, key, make):
    """The model's kept graph step (a DecodeStep or a speculative round) when its key matches,
    else a new one, make(key), kept in its place.

    One is kept per model and kind: its graph and KV cache stay allocated until
    release_cuda_graphs(model), or until a call with another key replaces them. While a
    suspended stream is using the kept one (busy), a call gets a step of its own, make(None).
    """
    step = store.get(model)
    if step is not None and step.busy:
        return make(None)
    if step is None or step.key != key:
        store.pop(model, None)  # free the old graph and cache before allocating new ones
        step = store[model] = make(key)
    return step


def release_cuda_graphs(model=None) -> None:
    """Free the captured decode steps and speculative rounds (graphs and KV caches) of a model,
    or of every model."""
    for store in (_graphs, _spec_graphs):
        if model is None:
            store.clear()
        else:
            store.pop(model, None)


class DecodeStep:
    """One decode step over a static KV cache: the model on one token per row, then sampling.

    Static buffers in, static buffers out: ``tokens`` [B] holds the last tokens and receives
    the new ones; ``step`` (a 0-d device tensor) numbers the step and advances, so the row
    keys ``seeds + (step << 32)`` change on the device. With cuda_graph=True the first call
    runs the step for real on a side stream (compiling and autotuning every kernel for these
    shapes), captures it into a CUDA graph, and every later call, in this generation and the
    next ones, replays that graph: one launch instead of a few hundred, no Python in the loop.
    The graph samples with per-row parameter buffers, so new sampling settings need no new
    capture. Without a graph (CPU, or cuda_graph=False) each call runs the same step eagerly
    with the caller's parameters; both modes compute the same tokens.
    """

    def __init__(self, cache, cuda_graph: bool, key=None):
        self.cache, self.cuda_graph, self.key = cache, cuda_graph, key
        B, device = cache.seqlens.shape[0], cache.seqlens.device
        self.tokens = torch.zeros(B, dtype=torch.int64, device=device)
        self.seeds = torch.zeros_like(self.tokens)
        self.step = torch.ones((), dtype=torch.int64, device=device)
        self._index = torch.zeros_like(self.tokens)  # logits at the one new position
        self._params = None  # graph mode: (temperature, top_k, top_p, min_p) as [B] device buffers
        self.sampling = None
        self.graph = None
        self.busy = False  # a generation is between start() and its end

    def start(self, tokens: torch.Tensor, seeds: torch.Tensor, sampling) -> None:
        """Begin a generation: the step-0 tokens, the row seeds and the sampling parameters
        (already validated by the caller's step-0 sample)."""
        self.busy = True
        self.tokens.copy_(tokens)
        self.seeds.copy_(seeds)
        self.step.fill_(1)
        if not self.cuda_graph:
            self.sampling = sampling
            return
        self._params = self.sampling = row_param_buffers(self._params, self.tokens, sampling)

    def _run(self, model) -> None:
        B = self.tokens.shape[0]
        logits = model(self.tokens.view(B, 1), cache=self.cache, logits_index=self._index, validate=False)
        keys = self.seeds + (self.step << 32)
        self.tokens.copy_(ops.sample(logits, *self.sampling, generator=keys))
        self.step += 1

    def __call__(self, model) -> torch.Tensor:
        if not self.cuda_graph:
            self._run(model)
        elif self.graph is not None:
            self.graph.replay()
        else:
            self._capture(model)
        return self.tokens

    def _capture(self, model) -> None:
        self.graph = capture_graph(lambda: self._run(model), self.tokens.device)


def row_param_buffers(buffers, tokens: torch.Tensor, sampling) -> tuple:
    """(temperature, top_k, top_p, min_p) as per-row [B] tensors on the device of tokens [B]: the
    given buffers refilled in place (a captured graph reads them by address), or new ones if None."""
    rows = check_sample_args(tokens.view(-1, 1).float(), *sampling, check_values=False)
    if buffers is None:
        return tuple(r.clone() for r in rows)
    for buf, r in zip(buffers, rows):
        buf.copy_(r)
    return buffers


def capture_graph(run, device) -> "torch.cuda.CUDAGraph":
    """Run ``run()`` once for real on a side stream (compiling and autotuning every kernel for
    these shapes), then record it into a CUDA graph; the recording itself runs nothing."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        run()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def generate(model, input_ids: Prompt, max_new_tokens: int = 32, *, pad_token_id: Optional[int] = None,
             progress=None, **kwargs):
    """Generate up to max_new_tokens per row; returns the prompts with their continuations.

    input_ids: LongTensor [B, T] (with attention_mask for padded batches, left or right
      padding), a list of ids, or a list of lists (ragged). The result has the same form:
      a tensor [B, T + new] (rows that stopped early padded with pad_token_id, default the
      first eos id, else the input's pad id or 0; a left-padded input keeps its pad columns as
      given), a list, or a list of lists.
    Sampling: temperature (0 = greedy), top_k, top_p, min_p: scalars or per-row [B] tensors.
    Stopping: eos_token_id (int or list; default config.eos_token_id), ignore_eos,
      stop_strings with tokenizer=. seed: int (row b uses seed + b), per-row list, or None.
    cuda_graph: None (auto), True or False; see generate_stream.
    draft_model, num_draft_tokens, stats: speculative decoding; see generate_stream.
    progress: a callable(step, tokens_of_step) called after every step (used by the CLI).
    """
    prompts = _unpack(input_ids, kwargs.get("attention_mask"))
    kwargs.pop("attention_mask", None)
    eos = _eos_ids(model, kwargs.pop("eos_token_id", None), kwargs.pop("ignore_eos", False))
    names = ("temperature", "top_k", "top_p", "min_p", "stop_strings", "tokenizer", "seed", "cuda_graph",
             "draft_model", "num_draft_tokens", "stats")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
    opts = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, stop_strings=None, tokenizer=None, seed=None,
                cuda_graph=None, draft_model=None, num_draft_tokens=4, stats=None)
    opts.update(kwargs)
    new = [[] for _ in prompts.rows]
    with torch.inference_mode():
        for step, toks in enumerate(_stream(model, prompts, max_new_tokens, opts["temperature"], opts["top_k"],
                                            opts["top_p"], opts["min_p"], eos, opts["stop_strings"],
                                            opts["tokenizer"], opts["seed"], opts["cuda_graph"],
                                            opts["draft_model"], opts["num_draft_tokens"], opts["stats"])):
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
        if prompts.layout == "left":  # keep the caller's left padding (its ids too, as transformers does):
            start = prompts.width - len(prompts.rows[b])  # the prompt ends at the same column
            out[b, :start] = torch.tensor(prompts.pads[b], dtype=torch.long)
            out[b, start:start + len(r)] = torch.tensor(r)
        else:
            out[b, :len(r)] = torch.tensor(r)
    return out.to(input_ids.device)
