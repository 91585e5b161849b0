"""Speculative decoding: a draft proposes tokens, the model verifies them in one pass. The draft
is a small model with the same vocabulary, or PromptLookup (tokens copied from the context).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), one round per row:
- the draft samples g tokens d_1..d_g one at a time from its filtered distributions q_i (the
  caller's temperature / top-k / top-p / min-p applied to the draft's logits);
- the model runs once on the chunk [last token, d_1..d_g] over its KV cache and gives its own
  filtered distributions p_1..p_{g+1};
- d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) while every draft before it was;
  at the first rejection the row draws from the residual max(0, p_i - q_i) renormalised, and
  when all of them were accepted it draws a bonus token from p_{g+1}.
The tokens are distributed exactly as the model's own sampling would give them, whatever the
draft. With temperature 0 a draft is accepted when it is the model's argmax, so the output is
plain greedy decoding's. A round gives each row 1 to g + 1 tokens.

A round keeps everything on the device in static buffers: rows advance by different counts
through their caches' per-row lengths, and the draft's cache catches up on the next round
(a 2-token chunk for rows that accepted every draft). On CUDA a round is captured once and
replayed as a CUDA graph, in this generation and later ones with the same shapes and models
(kept like the plain decode step; generation.release_cuda_graphs frees it); the host reads
a round's tokens and counts once.

Randomness: row b's draws in round r use the keys seed_b + (slot << 32) with slots of their own
per round, disjoint from the prefill's slot 0, so a row's tokens depend only on its own seed
(never on its batch-mates). They differ from plain decoding's draws, so a seeded speculative
sample is reproducible but is not the plain sample of the same seed.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import generation  # the graph keeping and capture it shares with the plain decode step
from . import ops
from .model import GPT
from .ops.sampling import uniform_from_key

MAX_DRAFT_TOKENS = 16


class PromptLookup:
    """A draft without a model (prompt lookup decoding, as transformers' prompt_lookup_num_tokens):
    each round a row proposes the tokens that followed the latest earlier occurrence of its last
    n tokens (n from max_ngram down to 1) in its prompt and output so far. Pays off where the
    output copies from the input (summaries, code edits, extraction). The proposals are
    deterministic (q is one-hot), so the acceptance rule keeps the model's distribution as it
    does for a draft model; a row with no match proposes its last token again.
    """

    def __init__(self, max_ngram: int = 3):
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"max_ngram must be an int >= 1, got {max_ngram!r}")
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], count: int) -> list[int]:
        """count tokens to follow ``tokens`` (padded with the last proposed one), by a scan."""
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the latest earlier match first
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + count]
                    return follow + [follow[-1]] * (count - len(follow))
        return [tokens[-1]] * count

    def index(self, tokens: list[int]) -> "NgramIndex":
        """An index of tokens that grows with a row's output and proposes as propose() does, in
        O(max_ngram) a round instead of a scan of the whole row (what generation uses)."""
        return NgramIndex(self.max_ngram, tokens)

    def __repr__(self) -> str:
        return f"PromptLookup(max_ngram={self.max_ngram})"


class NgramIndex:
    """The end positions of the latest occurrence of every n-gram (n <= max_ngram) of a growing
    token list, and of the occurrence before it: the tail's earlier match is then a dict lookup."""

    def __init__(self, max_ngram: int, tokens: list[int]):
        self.max_ngram, self.tokens, self.last, self.before = max_ngram, [], {}, {}
        self.extend(tokens)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                key = tuple(self.tokens[end - n + 1:])
                if key in self.last:
                    self.before[key] = self.last[key]
                self.last[key] = end

    def propose(self, count: int) -> list[int]:
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            end = self.before.get(tuple(tokens[-n:]))  # the tail itself is the latest occurrence
            if end is not None:
                follow = tokens[end + 1:end + 1 + count]
                return follow + [follow[-1]] * (count - len(follow))
        return [tokens[-1]] * count


def check_draft(model, draft, num_draft_tokens, total: int) -> None:
    """Validate a draft (a GPT or a PromptLookup) against the model and the generation's length."""
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) \
            or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got {num_draft_tokens!r}")
    if isinstance(draft, PromptLookup):
        return
    if not isinstance(draft, GPT):
        raise TypeError(f"draft_model must be a gptfast GPT or a PromptLookup, got {type(draft).__name__}")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model must share the model's vocabulary: vocab_size {model.config.vocab_size} "
                         f"expected, got {draft.config.vocab_size}")
    if draft.device != model.device:
        raise ValueError(f"draft_model must be on the model's device {model.device}, got {draft.device}")
    if total > draft.config.n_positions:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds the draft model's context of "
                         f"{draft.config.n_positions} positions")


class SpecRound:
    """One round of speculative decoding over static buffers (see the module docstring).

    In: ``active`` [B] (rows still generating; stopped rows keep their caches as they are).
    Out: ``tokens`` [B, g + 1] and ``counts`` [B]: row b's new tokens are tokens[b, :counts[b]].
    State: the model's cache holds every committed token but the last; the draft's cache lags
    by ``pend`` [B] (1 or 2) tokens, kept in ``tail`` [B, 2] (prompt lookup has no draft cache:
    the host fills ``proposed`` [B, g] before each round). The cache slack of 2g slots
    takes the scratch keys/values of drafts past a row's context end and of stopped rows. Such
    drafts need no guard: a row's last token (prompt + max_new_tokens <= the context) comes
    before them, so whatever the round makes of them is cut off with the row's surplus.
    """

    def __init__(self, model, draft, batch: int, max_len: int, num_draft_tokens: int, cuda_graph: bool,
                 greedy_only: bool, key=None):
        g = self.g = num_draft_tokens
        self.greedy_only = greedy_only  # every row greedy: a round takes argmaxes, no distributions
        self.key, self.busy = key, False
        self.cache = model.setup_cache(batch, max_len, slack=2 * g)
        self.cuda_graph = cuda_graph
        device = self.cache.seqlens.device
        long = dict(dtype=torch.int64, device=device)
        self.lookup = isinstance(draft, PromptLookup)
        self.vocab = model.config.vocab_size
        if self.lookup:  # the host fills ``proposed`` [B, g] before each round
            self.dcache = None
            self.proposed = torch.zeros(batch, g, **long)
        else:
            self.dcache = draft.setup_cache(batch, min(max_len, draft.config.n_positions), slack=2 * g)
        self.tail = torch.zeros(batch, 2, **long)
        self.pend = torch.ones(batch, **long)
        self.seeds = torch.zeros(batch, **long)
        self.round = torch.zeros((), **long)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, g + 1, **long)
        self.counts = torch.zeros(batch, **long)
        self._zero = torch.zeros(batch, **long)
        self._slots = torch.arange(g + 1, **long)
        self.sampling = None
        self.graph = None

    def prefill(self, model, draft, ids, lens, seeds, sampling) -> torch.Tensor:
        """Both models read the prompts; returns the first new token per row (drawn as plain
        generation draws it) and readies the first round."""
        self.busy = True
        self.cache.reset()
        logits = model(ids, cache=self.cache, input_lengths=lens, logits_index=lens - 1, validate=False)
        if not self.lookup:
            self.dcache.reset()
            draft(ids, cache=self.dcache, input_lengths=lens, logits_index=lens - 1, validate=False)
        first = ops.sample(logits, *sampling, generator=seeds)
        self.tail.copy_(first.view(-1, 1).expand(-1, 2))
        self.pend.fill_(1)
        self.seeds.copy_(seeds)
        self.round.zero_()
        # per-row parameter tensors in both modes (a graph bakes buffers in, not Python scalars)
        self.sampling = generation.row_param_buffers(self.sampling, first, sampling)
        return first

    def _keys(self, slot) -> torch.Tensor:
        """Row keys of a slot of this round (slot: an int, or a [S] tensor for [B, S] keys)."""
        base = 1 + self.round * (2 * self.g + 3)  # 2g + 3 slots a round; slot 0 of round "-1" is the prefill
        if isinstance(slot, torch.Tensor):
            return self.seeds.view(-1, 1) + ((base + slot.view(1, -1)) << 32)
        return self.seeds + ((base + slot) << 32)

    def _draw(self, logits, params, keys):
        """Tokens [N] and the filtered distributions [N, V] (None when every row is greedy)."""
        if self.greedy_only:
            return logits.argmax(dim=-1), None  # ops.sample's greedy: the lowest index on ties
        return ops.sample(logits, *params, generator=keys, return_probs=True)

    def _run(self, model, draft) -> None:
        g, B = self.g, self.tokens.shape[0]
        model_start = self.cache.seqlens.clone()

        # 1. the draft proposes g tokens d [B, g], drawn from q [B, g, V] (None: all rows greedy)
        if self.lookup:
            d = self.proposed
            q = None  # one-hot [B, g, V] (scatter, not F.one_hot, which reads values on the host on CPU)
            if not self.greedy_only:
                q = torch.zeros(*d.shape, self.vocab, device=d.device).scatter_(2, d.unsqueeze(-1), 1.0)
        else:
            draft_start = self.dcache.seqlens.clone()
            d, q = self._draft(draft)

        # 2. the model on [last, d_1..d_g]: its distributions p_1..p_{g+1} and a draw from each
        last = self.tail.gather(1, (self.pend - 1).view(B, 1))
        logits = model(torch.cat([last, d], 1), cache=self.cache, validate=False)  # [B, g + 1, V]
        V = logits.shape[-1]
        per_position = [x.view(B, 1).expand(B, g + 1).reshape(-1) for x in self.sampling]
        drawn, probs = self._draw(logits.reshape(B * (g + 1), V), per_position,
                                  self._keys(g + self._slots).reshape(-1))
        drawn = drawn.view(B, g + 1)

        # 3. accept the longest prefix; then the residual draw, or the model's own draw after it
        if probs is None:
            n = (d == drawn[:, :g]).to(torch.int64).cumprod(1).sum(1)  # accepted drafts per row
            nxt = drawn.gather(1, n.view(B, 1)).squeeze(1)
        else:
            n, nxt = self._accept(d, q, drawn, probs.view(B, g + 1, V), greedy=self.sampling[0] == 0)
        out = torch.cat([d, d[:, :1]], 1).scatter_(1, n.view(B, 1), nxt.view(B, 1))
        self.tokens.copy_(out)
        self.counts.copy_(n + 1)

        # 4. the caches keep what was accepted (stopped rows: what they had)
        on = self.active
        self.cache.seqlens.copy_(torch.where(on, model_start + n + 1, model_start))
        if self.lookup:
            self.tail.copy_(torch.where(on.view(B, 1), nxt.view(B, 1).expand(B, 2), self.tail))
        else:
            kept = model_start + 1 + torch.clamp(n, max=g - 1)  # committed tokens, less d_g if it was accepted
            self.dcache.seqlens.copy_(torch.where(on, kept, draft_start))
            pend = n + 1 - torch.clamp(n, max=g - 1)  # 2 when every draft was accepted (d_g never went in)
            first = torch.where(pend == 2, d[:, g - 1], nxt)
            self.tail.copy_(torch.where(on.view(B, 1), torch.stack([first, nxt], 1), self.tail))
            self.pend.copy_(torch.where(on, pend, self.pend))
        self.round += 1

    def _draft(self, draft):
        """The draft model's g tokens [B, g] and distributions [B, g, V] (None: all greedy); its
        first call also reads the tokens its cache lags by."""
        B = self.tokens.shape[0]
        logits = draft(self.tail, cache=self.dcache, input_lengths=self.pend, logits_index=self.pend - 1,
                       validate=False)
        drafts, qs = [], []
        for i in range(self.g):
            if i:
                logits = draft(drafts[-1].view(B, 1), cache=self.dcache, logits_index=self._zero, validate=False)
            d, q = self._draw(logits, self.sampling, self._keys(i))
            drafts.append(d)
            qs.append(q)
        return torch.stack(drafts, 1), None if self.greedy_only else torch.stack(qs, 1)

    def _accept(self, d, q, drawn, probs, greedy):
        """Accepted drafts n [B] and the token after them [B], from the drafts d [B, g], their
        distributions q [B, g, V], the model's draws [B, g + 1] and distributions [B, g + 1, V]."""
        (B, g), V = d.shape, q.shape[-1]
        p_d = probs[:, :g].gather(2, d.unsqueeze(-1)).squeeze(-1)
        q_d = q.gather(2, d.unsqueeze(-1)).squeeze(-1)
        u = uniform_from_key(self._keys(2 * g + 1), g)  # [B, g]
        ok = torch.where(greedy.view(B, 1), d == drawn[:, :g], u * q_d < p_d)  # u * q < p: u < p / q
        n = ok.to(torch.int64).cumprod(1).sum(1)
        p_n = probs.gather(1, n.view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        q_n = q.gather(1, n.clamp(max=g - 1).view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        residual = (p_n - q_n).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # rounding left no mass
        redrawn = ops.sample(residual.log(), 1.0, 0, 1.0, 0.0, generator=self._keys(2 * g + 2))
        after = drawn.gather(1, n.view(B, 1)).squeeze(1)  # greedy rows, and the bonus when all were accepted
        return n, torch.where((n < g) & ~greedy, redrawn, after)

    def __call__(self, model, draft) -> None:
        if not self.cuda_graph:
            self._run(model, draft)
        elif self.graph is not None:
            self.graph.replay()
        else:
            self.graph = generation.capture_graph(lambda: self._run(model, draft), self.tokens.device)


def _all_greedy(temperature) -> bool:
    if isinstance(temperature, torch.Tensor):
        return bool((temperature == 0).all())
    return temperature == 0


def _spec_round(model, draft, batch, max_len, g, cuda_graph, greedy_only) -> SpecRound:
    """A SpecRound for this call; with graphs, the model's kept one when everything it baked in
    (both models included) is unchanged (see generation.kept_graph_step)."""
    if not cuda_graph:
        return SpecRound(model, draft, batch, max_len, g, False, greedy_only)
    drafted_by = ("lookup",) if isinstance(draft, PromptLookup) else generation.graph_key(draft)
    key = generation.graph_key(model, batch, max_len, g, greedy_only, drafted_by)
    return generation.kept_graph_step(generation._spec_graphs, model, key,
                                      lambda k: SpecRound(model, draft, batch, max_len, g, True, greedy_only, key=k))


def speculative_stream(model, draft, prompts, ids, lens, seeds, sampling, stops, max_new_tokens: int,
                       max_len: int, num_draft_tokens: int, cuda_graph: bool, stats: Optional[dict]):
    """The rounds of a generation, yielded one step at a time as generation's stream does: per
    step one token per row (None for rows that stopped). A row that ran ahead waits in a buffer."""
    B = ids.shape[0]
    rnd = _spec_round(model, draft, B, max_len, num_draft_tokens, cuda_graph, _all_greedy(sampling[0]))
    new, done = [[] for _ in range(B)], [False] * B
    rounds = drafted = accepted = 0
    indexes = [draft.index(p) for p in prompts] if rnd.lookup else None

    def take(rows_tokens):
        for b, toks in enumerate(rows_tokens):
            for tok in toks:
                if done[b]:
                    break
                new[b].append(tok)
                done[b] = stops.push(b, tok) or len(new[b]) == max_new_tokens

    step = 0
    try:
        take([[tok] for tok in rnd.prefill(model, draft, ids, lens, seeds, sampling).tolist()])
        while True:
            while step < max(map(len, new)) and all(d or len(r) > step for d, r in zip(done, new)):
                yield [r[step] if len(r) > step else None for r in new]
                step += 1
            if all(done):
                return
            active = [not d for d in done]
            rnd.active.copy_(torch.tensor(active))
            if rnd.lookup:  # each row's index takes its new tokens, then proposes
                for ix, p, r in zip(indexes, prompts, new):
                    ix.extend(r[len(ix.tokens) - len(p):])
                rnd.proposed.copy_(torch.tensor([ix.propose(num_draft_tokens) for ix in indexes]))
            rnd(model, draft)
            toks, counts = rnd.tokens.tolist(), rnd.counts.tolist()  # the round's one sync
            rounds += 1
            drafted += num_draft_tokens * sum(active)
            accepted += sum(c - 1 for c, a in zip(counts, active) if a)
            take([t[:c] if a else [] for t, c, a in zip(toks, counts, active)])
    finally:
        rnd.busy = False
        if stats is not None:
            stats.update(rounds=rounds, drafted=drafted, accepted=accepted,
                         acceptance_rate=accepted / drafted if drafted else 0.0)
