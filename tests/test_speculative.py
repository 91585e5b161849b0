"""Speculative decoding: greedy output unchanged, the model's distribution kept (chi-square over
whole continuations), seeds, stops, the context end, graph-mode bookkeeping, bad drafts."""
import copy
import itertools

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.ops.sampling import filter_logits, check_sample_args
from gptfast.speculative import PromptLookup, SpecRound

from hf_utils import make_hf_gpt1, make_hf_gpt2
from test_generation import ROWS, _EagerGraph, packed_rows
from test_sampling import chi2_pvalue


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """transformers' GPT-2, gptfast's copy of it, and an unrelated smaller draft."""
    path = tmp_path_factory.mktemp("gpt2")
    hf = make_hf_gpt2(path, vocab_size=1001, n_positions=96, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(5)
    draft = GPT(GPTConfig(vocab_size=1001, n_positions=96, n_embd=32, n_layer=1, n_head=2)).eval()
    return hf, GPT.from_pretrained(str(path)), draft


@pytest.mark.parametrize("g", [1, 3, 5])
def test_greedy_equals_plain_and_transformers(trio, g):
    hf, model, draft = trio
    x = torch.randint(0, 1001, (1, 11))
    expected = hf.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0)
    stats = {}
    got = model.generate(x, max_new_tokens=30, temperature=0, draft_model=draft, num_draft_tokens=g, stats=stats)
    assert torch.equal(got, expected)
    assert stats["rounds"] >= 29 // (g + 1) and stats["drafted"] == g * stats["rounds"]
    plain = model.generate(ROWS, max_new_tokens=25, temperature=0, ignore_eos=True)
    assert model.generate(ROWS, max_new_tokens=25, temperature=0, ignore_eos=True, draft_model=draft,
                          num_draft_tokens=g) == plain


def test_gpt1_post_ln(tmp_path):
    """GPT-1 (post-LN, its own tokenizer's vocabulary): speculative greedy = plain greedy = transformers."""
    hf = make_hf_gpt1(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    torch.manual_seed(3)
    draft = GPT(GPTConfig(vocab_size=model.config.vocab_size, n_positions=model.config.n_positions, n_embd=32,
                          n_layer=1, n_head=2, pre_ln=False, final_ln=False)).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    expected = hf.generate(x, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for proposer in (draft, PromptLookup()):
        assert torch.equal(model.generate(x, max_new_tokens=16, temperature=0, draft_model=proposer), expected)


def test_self_draft_accepts_everything(trio):
    """The model as its own draft: p == q, so every draft is accepted, sampled or greedy."""
    _, model, _ = trio
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=30, top_p=0.9, seed=2)):
        stats = {}
        out = model.generate(ROWS, max_new_tokens=21, ignore_eos=True, draft_model=model, num_draft_tokens=4,
                             stats=stats, **kw)
        assert stats["acceptance_rate"] == 1.0 and stats["rounds"] == 4, stats  # 1 + 4 x 5 = 21 tokens
        assert [len(o) - len(r) for o, r in zip(out, ROWS)] == [21] * len(ROWS)


def _peaked_pair(vocab=5):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model, draft = GPT(cfg).eval(), GPT(cfg).eval()
    with torch.no_grad():  # larger weights: distinct, peaked distributions instead of near-uniform ones
        model.transformer.wte.weight.mul_(5.0)
        draft.transformer.wte.weight.mul_(3.0)
    return model, draft


def _sequence_probs(model, prompt, n_new, kw):
    """The model's own probability of every continuation of n_new tokens under the filters."""
    vocab = model.config.vocab_size
    seqs = list(itertools.product(range(vocab), repeat=n_new))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    with torch.no_grad():
        logits = model(ids).double()[:, len(prompt) - 1:-1]  # [S, n_new, V]: the logits for each new token
    flat = logits.reshape(-1, vocab)
    args = check_sample_args(flat, kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0),
                             kw.get("min_p", 0.0))
    probs = torch.softmax(filter_logits(flat, *args), dim=-1).view(len(seqs), n_new, vocab)
    picked = probs.gather(2, torch.tensor(seqs).unsqueeze(-1)).squeeze(-1)
    return seqs, picked.prod(dim=1)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=2), dict(top_p=0.8), dict(temperature=0.7, min_p=0.2)],
                         ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize("g,lookup", [(1, False), (2, False), (2, True)], ids=["g1", "g2", "lookup-g2"])
def test_distribution_is_the_models(kw, g, lookup):
    """Whole 3-token continuations drawn with a poor draft (a model, or prompt lookup's
    deterministic proposals) follow the model's own distribution."""
    model, draft = _peaked_pair()
    if lookup:
        draft = PromptLookup(max_ngram=2)
    prompt, n_new, draws = [1, 3, 0, 1, 3, 4, 1], 3, 12_000
    seqs, want = _sequence_probs(model, prompt, n_new, kw)
    stats = {}
    out = model.generate([prompt] * draws, max_new_tokens=n_new, ignore_eos=True, seed=list(range(draws)),
                         draft_model=draft, num_draft_tokens=g, stats=stats, **kw)
    index = {s: i for i, s in enumerate(seqs)}
    counts = torch.bincount(torch.tensor([index[tuple(o[len(prompt):])] for o in out]), minlength=len(seqs))
    assert int(counts[want == 0].sum()) == 0, "drew a continuation the filters remove"
    assert chi2_pvalue(counts, want) > 1e-3
    assert 0.05 < stats["acceptance_rate"] < 0.95, stats  # the test is about rejections too


def test_prompt_lookup_proposals():
    look = PromptLookup(max_ngram=3)
    assert look.propose([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # "1 2 3" seen before: what followed
    assert look.propose([5, 6, 7, 5, 6, 8, 4, 5, 6], 2) == [8, 4]  # the latest earlier match wins
    assert look.propose([1, 2, 3, 4, 3], 3) == [4, 3, 3]  # a 1-gram match, padded with its last token
    assert look.propose([1, 2, 3], 2) == [3, 3]  # no match: the last token again
    assert look.propose([7], 2) == [7, 7]
    with pytest.raises(ValueError, match="max_ngram must be an int >= 1, got 0"):
        PromptLookup(max_ngram=0)

    # the incremental index proposes what the scan proposes, at every length of a growing row
    g = torch.Generator().manual_seed(0)
    for max_ngram in (1, 2, 3):
        look = PromptLookup(max_ngram)
        tokens = torch.randint(0, 4, (300,), generator=g).tolist()  # a small alphabet: many matches
        ix = look.index(tokens[:1])
        for end in range(2, len(tokens) + 1, 3):
            ix.extend(tokens[len(ix.tokens):end])
            assert ix.propose(4) == look.propose(tokens[:end], 4), (max_ngram, end)


@pytest.mark.parametrize("g", [2, 5])
def test_prompt_lookup_greedy_equals_plain(trio, g):
    """Prompt lookup: plain greedy output; a repeating text is proposed and accepted."""
    _, model, _ = trio
    rows = ROWS + [[11, 12, 13, 14] * 6]
    plain = model.generate(rows, max_new_tokens=24, temperature=0, ignore_eos=True)
    stats = {}
    assert model.generate(rows, max_new_tokens=24, temperature=0, ignore_eos=True, draft_model=PromptLookup(),
                          num_draft_tokens=g, stats=stats) == plain
    assert stats["accepted"] > 0
    # the model as its own copier: a prompt of its own greedy text repeated is accepted whole
    echo = plain[0] * 2
    out = model.generate([echo], max_new_tokens=len(plain[0]), temperature=0, ignore_eos=True)
    stats = {}
    assert model.generate([echo], max_new_tokens=len(plain[0]), temperature=0, ignore_eos=True,
                          draft_model=PromptLookup(), num_draft_tokens=g, stats=stats) == out


def test_seeds_reproducible_and_batch_invariant(trio):
    _, model, draft = trio
    kw = dict(max_new_tokens=14, temperature=1.0, top_p=0.95, draft_model=draft, num_draft_tokens=3,
              ignore_eos=True)
    batch = model.generate(ROWS, seed=[11, 12, 13, 14], **kw)
    assert model.generate(ROWS, seed=[11, 12, 13, 14], **kw) == batch
    for b, r in enumerate(ROWS):
        assert model.generate(r, seed=11 + b, **kw) == batch[b]
    assert model.generate(ROWS[::-1], seed=[14, 13, 12, 11], **kw) == batch[::-1]
    assert model.generate(ROWS, seed=[1, 2, 3, 4], **kw) != batch


def test_mixed_rows_greedy_and_sampled(trio):
    """Per-row parameters: the greedy rows give plain greedy output beside sampled rows."""
    _, model, draft = trio
    t = torch.tensor([0.0, 1.0, 0.0, 0.8])
    out = model.generate(ROWS, max_new_tokens=12, temperature=t, top_k=torch.tensor([0, 40, 3, 0]), seed=7,
                         draft_model=draft, num_draft_tokens=2, ignore_eos=True)
    plain = model.generate(ROWS, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert out[0] == plain[0] and out[2] == plain[2]


def test_left_padded_tensor_input(trio):
    """A left-padded batch with its attention mask, as HF tokenizers make it: the same tensor out."""
    _, model, draft = trio
    width = max(map(len, ROWS))
    ids, mask = torch.zeros(len(ROWS), width, dtype=torch.long), torch.zeros(len(ROWS), width, dtype=torch.long)
    for b, r in enumerate(ROWS):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    kw = dict(attention_mask=mask, max_new_tokens=9, temperature=0, ignore_eos=True)
    assert torch.equal(model.generate(ids, draft_model=draft, num_draft_tokens=3, **kw), model.generate(ids, **kw))


def test_stops_and_stream(trio):
    _, model, draft = trio
    free = model.generate(ROWS, max_new_tokens=12, temperature=0, ignore_eos=True)
    stop = free[0][len(ROWS[0]) + 2]
    spec = dict(draft_model=draft, num_draft_tokens=4)
    out = model.generate(ROWS, max_new_tokens=12, temperature=0, eos_token_id=stop, **spec)
    assert out == model.generate(ROWS, max_new_tokens=12, temperature=0, eos_token_id=stop)
    assert out[0][-1] == stop and len(out[0]) == len(ROWS[0]) + 3
    steps = list(model.generate_stream(ROWS, max_new_tokens=12, temperature=0, eos_token_id=stop, **spec))
    plain = list(model.generate_stream(ROWS, max_new_tokens=12, temperature=0, eos_token_id=stop))
    assert steps == plain  # the same steps, None for stopped rows, the same end


def test_context_end(trio):
    """Rows that reach the context end mid-round: drafts past it are never accepted."""
    _, model, draft = trio
    rows = [[7] * 90, [8] * 60, [9] * 3]
    plain = model.generate(rows, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert len(plain[0]) == 96 == model.config.n_positions
    assert model.generate(rows, max_new_tokens=6, temperature=0, ignore_eos=True, draft_model=model,
                          num_draft_tokens=8) == plain
    sampled = model.generate(rows, max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True,
                             draft_model=draft, num_draft_tokens=8)
    assert [len(s) for s in sampled] == [96, 66, 9]


def test_caches_stay_in_bounds(trio, monkeypatch):
    """Rows that stop (eos or length) while others go on keep drafting into the cache slack: no
    attention may read past a cache's end (a GPU kernel would read out of bounds)."""
    import gptfast.ops as ops
    _, model, draft = trio
    reference = ops.decode_attention
    seen = []

    def checked(q, k_cache, v_cache, cache_seqlens, **kw):
        seen.append(int(cache_seqlens.max()) - k_cache.shape[2])
        return reference(q, k_cache, v_cache, cache_seqlens, **kw)
    monkeypatch.setattr(ops, "decode_attention", checked)
    rows = [[3 + b] * (86 - 7 * (b % 3)) for b in range(12)]
    model.generate(rows, max_new_tokens=10, temperature=1.0, seed=8, eos_token_id=[5, 9], draft_model=draft,
                   num_draft_tokens=6)
    model.generate(rows, max_new_tokens=10, temperature=0, draft_model=model, num_draft_tokens=16)
    assert seen and max(seen) <= 0


def test_smaller_draft_context(trio):
    _, model, _ = trio
    small = GPT(GPTConfig(vocab_size=1001, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    plain = model.generate([[4, 5, 6]], max_new_tokens=20, temperature=0, ignore_eos=True)
    assert model.generate([[4, 5, 6]], max_new_tokens=20, temperature=0, ignore_eos=True, draft_model=small) == plain
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens = 43 exceeds the draft model's context of 32"):
        model.generate([[4, 5, 6]], max_new_tokens=40, draft_model=small)


def test_graph_mode_bookkeeping(trio, monkeypatch):
    """cuda_graph=True on CPU with a stand-in graph whose replay re-runs the round: the static
    buffers, the per-row parameter buffers and the round kept across calls give the eager tokens."""
    from gptfast import generation as G
    _, model, draft = trio
    graphs = []

    def capture(run, device):
        run()
        owner = next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, SpecRound))
        graphs.append(_EagerGraph(run, owner=owner))
        return graphs[-1]
    monkeypatch.setattr(G, "capture_graph", capture)
    monkeypatch.setattr(G, "_use_cuda_graph", lambda cuda_graph, device, n: bool(cuda_graph))
    G.release_cuda_graphs()
    cases = [dict(temperature=0), dict(temperature=0.9, top_k=20, seed=[1, 2, 3, 4]),
             dict(temperature=torch.tensor([0.0, 1.0, 0.7, 1.3]), top_p=0.8, seed=5),
             dict(temperature=0.9, top_k=20, seed=[1, 2, 3, 4])]
    replays = 0
    for n, kw in enumerate(cases):
        eager = model.generate(ROWS, max_new_tokens=15, draft_model=draft, num_draft_tokens=3, **kw)
        stats = {}
        graphed = model.generate(ROWS, max_new_tokens=15, draft_model=draft, num_draft_tokens=3, cuda_graph=True,
                                 stats=stats, **kw)
        assert graphed == eager, kw
        # greedy-only rounds and sampling rounds are two graphs; later sampling calls replay the kept one
        assert len(graphs) == min(n + 1, 2)
        replays += stats["rounds"] - (1 if n < 2 else 0)  # the capturing call's first round ran at the capture
        assert sum(g.replays for g in graphs) == replays
    assert G._spec_graphs[model].graph is graphs[-1]
    # a suspended stream keeps its round; a generation meanwhile gets one of its own
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, seed=[1, 2, 3, 4], draft_model=draft,
              num_draft_tokens=3, cuda_graph=True)
    stream = model.generate_stream(ROWS, **kw)
    first = next(stream)
    assert model.generate(ROWS, **kw) == [r[:len(p) + 8] for r, p in zip(graphed, ROWS)]
    rest = list(stream)
    assert [[first[b]] + [s[b] for s in rest] for b in range(len(ROWS))] == \
        [r[len(p):len(p) + 8] for r, p in zip(graphed, ROWS)]
    # prompt lookup: its proposals buffer is refilled before each replay
    for kw in (dict(temperature=0), dict(temperature=0.9, top_k=20, seed=[1, 2, 3, 4])):
        eager = model.generate(ROWS, max_new_tokens=15, draft_model=PromptLookup(), **kw)
        assert model.generate(ROWS, max_new_tokens=15, draft_model=PromptLookup(), cuda_graph=True, **kw) == eager
    G.release_cuda_graphs(model)
    assert model not in G._spec_graphs


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("lookup", [False, True], ids=["draft-model", "prompt-lookup"])
def test_round_reads_nothing_on_the_host(trio, forbid_host_reads, kw, lookup):
    """A round is what the CUDA graph captures: no value may travel to the host inside it."""
    _, model, draft = trio
    draft = PromptLookup() if lookup else draft
    rnd = SpecRound(model, draft, len(ROWS), 64, 3, cuda_graph=False, greedy_only=kw["temperature"] == 0)
    ids, lens, sampling = packed_rows(ROWS, kw)
    with torch.inference_mode():
        rnd.prefill(model, draft, ids, lens, torch.arange(len(ROWS)), sampling)
        with forbid_host_reads():
            for _ in range(3):
                rnd(model, draft)
    assert rnd.counts.min() >= 1 and int(rnd.round) == 3


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(draft_model="gpt2"), TypeError, "draft_model must be a gptfast GPT or a PromptLookup, got str"),
    (dict(num_draft_tokens=0), ValueError, r"num_draft_tokens must be an int in \[1, 16\], got 0"),
    (dict(num_draft_tokens=True), ValueError, "num_draft_tokens must be an int"),
    (dict(num_draft_tokens=17), ValueError, "num_draft_tokens must be an int"),
])
def test_bad_arguments(trio, kwargs, exc, match):
    _, model, draft = trio
    kwargs = {"draft_model": draft, **kwargs}
    with pytest.raises(exc, match=match):
        model.generate([1, 2, 3], max_new_tokens=4, **kwargs)


def test_vocabulary_mismatch(trio):
    _, model, _ = trio
    other = GPT(GPTConfig(vocab_size=1000, n_positions=96, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="draft_model must share the model's vocabulary: vocab_size 1001 "
                                         "expected, got 1000"):
        model.generate([1, 2, 3], max_new_tokens=4, draft_model=other)


def test_kernels_give_the_reference_tokens():
    """The Triton kernels (the interpreter on CPU, compiled on a GPU) on a round's chunks: the
    draft's ragged 2-token catch-up and the model's g + 1 verification over the cache."""
    from gptfast import use_backend
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU machine has no interpreter
    model = GPT(GPTConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval().to(dev)
    draft = GPT(GPTConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval().to(dev)
    rows = [[5, 6, 7, 8, 9], [3] * 11]
    kw = dict(max_new_tokens=6, ignore_eos=True, num_draft_tokens=3)
    # sampled tokens are compared on CPU only, where the C++ sampler and the reference draw alike;
    # the CUDA sampler is checked against the reference in test_sampling
    calls = [dict(temperature=0, draft_model=draft)] + (
        [dict(temperature=0.9, seed=1, draft_model=model)] if dev == "cpu" else [])
    with use_backend("torch"):
        ref = [model.generate(rows, **c, **kw) for c in calls]
    with use_backend("kernel"):
        assert [model.generate(rows, **c, **kw) for c in calls] == ref


# ---- GPU: kernels and the captured round (skipped without CUDA) ----------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_speculative_graph_equals_eager(trio, backend, dtype):
    from gptfast import use_backend

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, model, draft = trio
    model, draft = copy.deepcopy(model).to("cuda", dtype), copy.deepcopy(draft).to("cuda", dtype)
    with use_backend(backend):
        plain = model.generate(ROWS, max_new_tokens=20, temperature=0, ignore_eos=True, cuda_graph=False)
        settings = (dict(temperature=0), dict(temperature=1.0, top_k=50, top_p=0.9, seed=[3, 4, 5, 6]))
        for proposer, kw in itertools.product((draft, PromptLookup()), settings):
            eager = model.generate(ROWS, max_new_tokens=20, ignore_eos=True, draft_model=proposer,
                                   num_draft_tokens=4, cuda_graph=False, **kw)
            graphed = model.generate(ROWS, max_new_tokens=20, ignore_eos=True, draft_model=proposer,
                                     num_draft_tokens=4, cuda_graph=True, **kw)
            assert graphed == eager, (proposer, kw)
            if not kw.get("temperature", 1) and dtype == torch.float32:  # bf16: chunk vs step rounding
                assert eager == plain
