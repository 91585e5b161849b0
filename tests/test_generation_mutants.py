"""Generation contracts the other tests left open (found by mutation testing): the per-row key
schedule of plain and speculative sampling, an int seed's seed + b, and a list of eos ids."""
import pytest
import torch

import gptfast.ops as ops
from gptfast import GPT, GPTConfig

from test_generation import ROWS


@pytest.fixture(scope="module")
def model():
    return GPT(GPTConfig(vocab_size=211, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


class _KeyRecorder:
    """Every int64 key tensor passed to ops.sample (and, for speculative rounds, to
    uniform_from_key), flattened, in call order."""

    def __init__(self, monkeypatch):
        from gptfast import speculative
        self.calls = []
        sample, uniform = ops.sample, speculative.uniform_from_key

        def recording_sample(logits, *args, generator=None, **kwargs):
            if isinstance(generator, torch.Tensor):
                self.calls.append(generator.reshape(-1).tolist())
            return sample(logits, *args, generator=generator, **kwargs)

        def recording_uniform(keys, vocab):
            self.calls.append(keys.reshape(-1).tolist())
            return uniform(keys, vocab)
        monkeypatch.setattr(ops, "sample", recording_sample)
        monkeypatch.setattr(speculative, "uniform_from_key", recording_uniform)


def test_plain_sampling_key_schedule(model, monkeypatch):
    """Row b draws step s from the key seed_b + (s << 32) (generation's docstring): step 0 from
    the prefill, then one new key per step; never a key twice."""
    seeds = torch.randint(0, 2**30, (len(ROWS),)).tolist()
    rec = _KeyRecorder(monkeypatch)
    n = 9
    model.generate(ROWS, max_new_tokens=n, temperature=0.9, top_k=40, seed=seeds, ignore_eos=True)
    assert rec.calls == [[s + (step << 32) for s in seeds] for step in range(n)]


@pytest.mark.parametrize("lookup", [False, True], ids=["draft-model", "prompt-lookup"])
def test_speculative_keys_never_repeat(model, monkeypatch, lookup):
    """A speculative row's draws (the draft's, the model's, the acceptance uniforms, the residual)
    each take a key of their own, disjoint from the prefill's and across rounds: a reused key
    would correlate two draws of one row."""
    from gptfast import PromptLookup
    draft = PromptLookup() if lookup else GPT(GPTConfig(vocab_size=211, n_positions=64, n_embd=16, n_layer=1,
                                                        n_head=2)).eval()
    seeds = [7 + 1000 * b for b in range(len(ROWS))]
    rec = _KeyRecorder(monkeypatch)
    stats, g = {}, 3
    model.generate(ROWS, max_new_tokens=13, temperature=1.0, seed=seeds, ignore_eos=True, draft_model=draft,
                   num_draft_tokens=g, stats=stats)
    keys = [k for call in rec.calls for k in call]
    assert len(keys) == len(set(keys)), "a key was used twice"
    assert {k & 0xFFFFFFFF for k in keys} == set(seeds)  # every key is one of the rows' own seeds
    per_round = (0 if lookup else g) + (g + 1) + 2  # draft draws, model draws, uniforms, residual
    assert len(keys) == len(ROWS) * (1 + stats["rounds"] * per_round)


def test_int_seed_gives_row_b_seed_plus_b(model):
    """seed=int: row b uses seed + b (generate's docstring), so equal prompts get distinct samples."""
    prompt = torch.randint(0, 211, (6,)).tolist()
    seed = int(torch.randint(0, 2**20, ()))
    kw = dict(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    batch = model.generate([prompt] * 3, seed=seed, **kw)
    assert batch == [model.generate(prompt, seed=seed + b, **kw) for b in range(3)]
    assert len({tuple(r) for r in batch}) == 3


@pytest.mark.parametrize("draft", [None, "self"])
def test_any_eos_id_of_a_list_stops(model, draft):
    """eos_token_id=[a, b]: a row stops at whichever it emits first, b as well as a."""
    spec = dict(draft_model=model, num_draft_tokens=3) if draft else {}
    kw = dict(max_new_tokens=12, temperature=0)
    free = model.generate(ROWS, ignore_eos=True, **kw)
    stop = free[1][len(ROWS[1]) + 3]
    unused = next(t for t in range(211) if all(t not in f[len(r):] for f, r in zip(free, ROWS)))
    out = model.generate(ROWS, eos_token_id=[unused, stop], **spec, **kw)
    for b, r in enumerate(ROWS):
        new = free[b][len(r):]
        assert out[b][len(r):] == (new[:new.index(stop) + 1] if stop in new else new)
    assert out[1][-1] == stop and len(out[1]) <= len(ROWS[1]) + 4


@pytest.mark.parametrize("draft", [None, "self"])
def test_stream_ends_when_every_row_stopped(model, draft):
    """Once every row has stopped the stream ends (no steps of Nones up to max_new_tokens)."""
    spec = dict(draft_model=model, num_draft_tokens=2) if draft else {}
    kw = dict(max_new_tokens=15, temperature=0)
    free = model.generate(ROWS, ignore_eos=True, **kw)
    eos = [f[len(r) + 1] for f, r in zip(free, ROWS)]  # every row emits one of them by its second step
    ends = [next(i for i, t in enumerate(f[len(r):]) if t in eos) + 1 for f, r in zip(free, ROWS)]
    steps = list(model.generate_stream(ROWS, eos_token_id=eos, **spec, **kw))
    assert len(steps) == max(ends) <= 2
    assert [[s[b] for s in steps if s[b] is not None] for b in range(len(ROWS))] == \
        [f[len(r):len(r) + e] for f, r, e in zip(free, ROWS, ends)]


@pytest.mark.parametrize("slack", [0, 5])
def test_cache_length_is_checked_without_its_slack(model, slack):
    """A cache of max_seq_len L takes L tokens; its slack (speculative scratch) is no extra room."""
    L = int(torch.randint(5, 20, ()))
    cache = model.setup_cache(2, L, slack=slack)
    assert cache.max_seq_len == L and cache.k[0].shape[2] == L + slack
    with torch.no_grad():
        model(torch.randint(0, 211, (2, L - 1)), cache=cache)
        model(torch.randint(0, 211, (2, 1)), cache=cache)
        with pytest.raises(ValueError, match=rf"sequence of {L + 1} tokens exceeds the context of {L} positions "
                                             rf"\(the KV cache's max_seq_len={L}\)"):
            model(torch.randint(0, 211, (2, 1)), cache=cache)


@pytest.mark.parametrize("lookup", [False, True], ids=["draft-model", "prompt-lookup"])
def test_stopped_row_keeps_its_caches(model, monkeypatch, lookup):
    """A row that stopped (here at its first token) is left alone by the later rounds: its
    caches do not advance (they would run past their end while the other rows go on)."""
    from gptfast import PromptLookup
    from gptfast.speculative import SpecRound
    draft = PromptLookup() if lookup else GPT(GPTConfig(vocab_size=211, n_positions=64, n_embd=16, n_layer=1,
                                                        n_head=2)).eval()
    firsts = [f[len(r)] for f, r in zip(model.generate(ROWS, max_new_tokens=1, temperature=0), ROWS)]
    stop = firsts[0]
    assert any(t != stop for t in firsts), "every row stops at once: no round runs"
    seen, call = [], SpecRound.__call__

    def recording(self, *args):
        call(self, *args)
        seen.append((self.cache.seqlens.tolist(), None if self.dcache is None else self.dcache.seqlens.tolist()))
    monkeypatch.setattr(SpecRound, "__call__", recording)
    out = model.generate(ROWS, max_new_tokens=10, temperature=0, eos_token_id=stop, draft_model=draft,
                         num_draft_tokens=3)
    assert out[0] == ROWS[0] + [stop] and seen
    stopped = [b for b, t in enumerate(firsts) if t == stop]
    for lens, dlens in seen:
        assert [lens[b] for b in stopped] == [len(ROWS[b]) for b in stopped], seen
        assert dlens is None or [dlens[b] for b in stopped] == [len(ROWS[b]) for b in stopped], seen


def test_acceptance_rule_and_residual_exactly(model, monkeypatch):
    """SpecRound._accept on random p, q: draft i is accepted iff u_i < p_i(d_i) / q_i(d_i) while
    every draft before it was, and at the first rejection the redraw is from max(0, p_n - q_n)
    renormalised (checked exactly, not statistically: a small leak of mass escapes a chi-square)."""
    from gptfast import PromptLookup
    from gptfast.ops.sampling import uniform_from_key
    from gptfast.speculative import SpecRound
    B, g, V = 6, 3, 211
    rnd = SpecRound(model, PromptLookup(), B, 32, g, cuda_graph=False, greedy_only=False)
    rnd.seeds.copy_(torch.randint(0, 2**30, (B,)))
    q = torch.softmax(torch.randn(B, g, V) * 3, -1)
    d = torch.multinomial(q.reshape(-1, V), 1).view(B, g)
    probs = torch.softmax(torch.randn(B, g + 1, V) * 3, -1)
    probs[:2, :, :] = torch.cat([q, q[:, -1:]], 1)[:2]  # rows 0-1: p == q, every draft accepted
    probs[2, 0] = 0.0  # row 2: p(d_1) = 0 (the model's filters drop it), rejected at once
    probs[2, 0, (int(d[2, 0]) + 1) % V] = 1.0
    drawn = torch.randint(0, V, (B, g + 1))
    seen, sample = [], ops.sample

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample(logits, *args, **kwargs)
    monkeypatch.setattr(ops, "sample", recording)
    n, nxt = rnd._accept(d, q, drawn, probs, greedy=torch.zeros(B, dtype=torch.bool))
    u = uniform_from_key(rnd._keys(2 * g + 1), g)
    pd = probs[:, :g].gather(2, d.unsqueeze(-1)).squeeze(-1)
    qd = q.gather(2, d.unsqueeze(-1)).squeeze(-1)
    expect_n = [next((i for i in range(g) if not u[b, i] < pd[b, i] / qd[b, i]), g) for b in range(B)]
    assert n.tolist() == expect_n
    assert n[:2].tolist() == [g, g] and n[2] == 0
    assert len(seen) == 1
    for b in range(B):
        if n[b] == g:  # the bonus: the model's own draw after the last draft
            assert nxt[b] == drawn[b, g]
            continue
        residual = (probs[b, n[b]] - q[b, n[b]]).clamp_min(0)
        assert torch.allclose(torch.softmax(seen[0][b].double(), -1), (residual / residual.sum()).double(),
                              atol=1e-6), b
        assert residual[nxt[b]] > 0


def test_seed_out_of_range(model):
    """A row key is seed + (step << 32): seed 2**32 would replay seed 0's draws one step later
    (and a negative seed those of a seed near 2**32), so such seeds are refused."""
    assert model.generate([1, 2], max_new_tokens=2, seed=2**32 - 1) == \
        model.generate([1, 2], max_new_tokens=2, seed=[2**32 - 1])
    for seed, bad in ((2**32, 2**32), (-1, -1), ([5, 2**32 + 5], 2**32 + 5), (2**32 - 2, 2**32)):
        rows = [[1, 2]] * (len(seed) if isinstance(seed, list) else 3)
        with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\) for every row .* got {bad}$"):
            model.generate(rows, max_new_tokens=2, seed=seed)
