"""Speculative decoding contracts the other tests left open (found by mutation testing): stopped
rows keep their caches, prompt lookup reads each row's own tokens, the stats count active rows,
a kept graph round is not reused with another draft model, the draft's context and device
checks, and greedy output with left padding and per-row sampling beside greedy rows."""
import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast import speculative
from gptfast.speculative import PromptLookup, SpecRound

from test_generation import ROWS, _EagerGraph, packed_rows

VOCAB = 263


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(11)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=80, n_embd=32, n_layer=2, n_head=2)).eval()
    draft = GPT(GPTConfig(vocab_size=VOCAB, n_positions=80, n_embd=16, n_layer=1, n_head=2)).eval()
    return model, draft


@pytest.mark.parametrize("lookup", [False, True], ids=["draft-model", "prompt-lookup"])
def test_stopped_rows_keep_their_caches(pair, lookup):
    """SpecRound's contract: a row marked inactive keeps its cache lengths (its scratch writes
    past them are not committed), while the other rows go on as if it were active."""
    model, draft = pair
    draft = PromptLookup() if lookup else model  # self-draft: every draft accepted, rows move g + 1
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (7, 3, 12)]
    g, kw = 3, dict(temperature=0.9, top_k=50)
    ids, lens, sampling = packed_rows(rows, kw)

    def rounds(stop_row):
        rnd = SpecRound(model, draft, len(rows), 64, g, cuda_graph=False, greedy_only=False)
        with torch.inference_mode():
            rnd.prefill(model, draft, ids, lens, torch.tensor([5, 6, 7]), sampling)
            out = []
            for r in range(4):
                if r == 1 and stop_row is not None:
                    rnd.active[stop_row] = False
                    frozen = (rnd.cache.seqlens[stop_row].item(),
                              None if lookup else rnd.dcache.seqlens[stop_row].item())
                if lookup:
                    rnd.proposed.copy_(torch.randint(0, VOCAB, (len(rows), g)))
                rnd(model, draft)
                out.append([rnd.tokens[b, :rnd.counts[b]].tolist() for b in range(len(rows))])
                if stop_row is not None and r >= 1:
                    assert (rnd.cache.seqlens[stop_row].item(),
                            None if lookup else rnd.dcache.seqlens[stop_row].item()) == frozen, r
        return out

    torch.manual_seed(1)
    free = rounds(None)
    torch.manual_seed(1)  # the same proposals for prompt lookup
    stopped = rounds(1)
    for a, b in zip(free, stopped):
        assert [a[0], a[2]] == [b[0], b[2]]  # the other rows do not notice


def test_prompt_lookup_reads_each_rows_tokens(pair, monkeypatch):
    """Each round a row's n-gram index holds exactly its prompt and the tokens it has committed,
    and proposes what a scan of them proposes."""
    model, _ = pair
    seen = []
    propose = speculative.NgramIndex.propose

    def recording(self, count):
        out = propose(self, count)
        seen.append((list(self.tokens), out))
        return out
    monkeypatch.setattr(speculative.NgramIndex, "propose", recording)
    unit = torch.randint(0, VOCAB, (5,)).tolist()
    rows = [unit * 4 + [unit[0]], torch.randint(0, VOCAB, (9,)).tolist(), unit[:3] * 3]
    look = PromptLookup(max_ngram=2)
    out = model.generate(rows, max_new_tokens=17, temperature=0, ignore_eos=True, draft_model=look,
                         num_draft_tokens=3)
    assert seen
    for tokens, proposal in seen:
        owner = [o for o in out if o[:len(tokens)] == tokens]
        assert owner, f"an index held tokens no row has: {tokens}"
        assert proposal == look.propose(tokens, 3)
    # every committed token was seen by the next round's index (no token skipped or doubled)
    for o, p in zip(out, rows):
        lengths = sorted({len(t) for t, _ in seen if o[:len(t)] == t and len(t) >= len(p)})
        assert lengths[0] == len(p) + 1  # after the prefill's token


def test_stats_count_active_rows_only(pair):
    """stats: drafts and acceptances of rows that already stopped are not counted; with the
    model as its own draft every counted draft is accepted, also when rows stop early."""
    model, _ = pair
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9, 6)]
    free = model.generate(rows, max_new_tokens=20, temperature=0, ignore_eos=True)
    new = [f[len(r):] for f, r in zip(free, rows)]
    stop = next(t for t in new[0][:4] if t not in new[1] + new[2])  # row 0 stops early, the others never
    stats = {}
    out = model.generate(rows, max_new_tokens=20, temperature=0, eos_token_id=stop, draft_model=model,
                         num_draft_tokens=3, stats=stats)
    assert out == model.generate(rows, max_new_tokens=20, temperature=0, eos_token_id=stop)
    assert len(out[0]) <= len(rows[0]) + 4 and out[1:] == free[1:]
    assert stats["acceptance_rate"] == 1.0 and stats["accepted"] == stats["drafted"], stats


def test_kept_graph_round_not_reused_with_another_draft(pair, monkeypatch):
    """cuda_graph=True (a stand-in graph on CPU): a second draft model gets a round of its own,
    whose sampled tokens are the eager ones of that draft, not a replay of the first draft."""
    from gptfast import generation as G
    model, draft = pair
    torch.manual_seed(4)
    other = GPT(GPTConfig(vocab_size=VOCAB, n_positions=80, n_embd=16, n_layer=1, n_head=2)).eval()

    def capture(run, device):
        run()
        return _EagerGraph(run)
    monkeypatch.setattr(G, "capture_graph", capture)
    monkeypatch.setattr(G, "_use_cuda_graph", lambda cuda_graph, device, n: bool(cuda_graph))
    G.release_cuda_graphs()
    try:
        kw = dict(max_new_tokens=12, temperature=1.0, seed=[3, 4, 5, 6], num_draft_tokens=3, ignore_eos=True)
        for d in (draft, other):
            eager = model.generate(ROWS, draft_model=d, **kw)
            assert model.generate(ROWS, draft_model=d, cuda_graph=True, **kw) == eager
    finally:
        G.release_cuda_graphs()


def test_draft_context_boundary(pair):
    """prompt + max_new_tokens may fill the draft's context exactly; one more is an error."""
    model, _ = pair
    small = GPT(GPTConfig(vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=1, n_head=2)).eval()
    prompt = torch.randint(0, VOCAB, (5,)).tolist()
    plain = model.generate(prompt, max_new_tokens=19, temperature=0, ignore_eos=True)
    assert model.generate(prompt, max_new_tokens=19, temperature=0, ignore_eos=True, draft_model=small,
                          num_draft_tokens=5) == plain
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens = 25 exceeds the draft model's context of 24"):
        model.generate(prompt, max_new_tokens=20, draft_model=small)


def test_draft_on_another_device(pair):
    model, _ = pair
    with torch.device("meta"):
        elsewhere = GPT(GPTConfig(vocab_size=VOCAB, n_positions=80, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="draft_model must be on the model's device cpu, got meta"):
        model.generate([1, 2, 3], max_new_tokens=4, draft_model=elsewhere)


@pytest.mark.parametrize("lookup", [False, True], ids=["draft-model", "prompt-lookup"])
def test_left_padded_greedy_equals_plain(pair, lookup):
    """Greedy speculative decoding of a left-padded batch of unequal prompts (with repeats, so
    prompt lookup's proposals are accepted too) gives plain greedy decoding's tensor."""
    model, draft = pair
    draft = PromptLookup() if lookup else draft
    unit = torch.randint(0, VOCAB, (4,)).tolist()
    rows = [unit * 3, torch.randint(0, VOCAB, (2,)).tolist(), unit[1:] * 4 + unit[:1], [unit[2]]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), 7, dtype=torch.long)  # pad ids that are real tokens
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    kw = dict(attention_mask=mask, max_new_tokens=15, temperature=0, ignore_eos=True)
    stats = {}
    got = model.generate(ids, draft_model=draft, num_draft_tokens=4, stats=stats, **kw)
    assert torch.equal(got, model.generate(ids, **kw))
    assert stats["rounds"] > 0


def test_sampled_rows_beside_greedy_rows_are_their_own(pair):
    """Per-row temperatures: a sampled row of a batch that also holds greedy rows is sampled
    (it is the row's own seeded speculative sample, as alone), not decoded greedily."""
    model, draft = pair
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (6, 3, 8)]
    kw = dict(max_new_tokens=10, draft_model=draft, num_draft_tokens=3, ignore_eos=True)
    t = torch.tensor([0.0, 1.0, 0.0])
    out = model.generate(rows, temperature=t, seed=[1, 2, 3], **kw)
    alone = model.generate(rows[1], temperature=1.0, seed=2, **kw)
    assert out[1] == alone
    greedy = model.generate(rows, temperature=0, ignore_eos=True, max_new_tokens=10)
    assert out[0] == greedy[0] and out[2] == greedy[2] and out[1] != greedy[1]
