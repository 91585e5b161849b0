"""Generation: greedy parity with transformers, ragged batches, the KV cache, seeds, stops, streaming."""
import copy

import pytest
import torch

from gptfast import GPT, GPTConfig, Tokenizer

from hf_utils import make_gpt2_tokenizer_files, make_hf_gpt1, make_hf_gpt2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    hf = make_hf_gpt2(path, vocab_size=1001, n_positions=96, n_embd=64, n_layer=2, n_head=4)
    return hf, GPT.from_pretrained(str(path))


@pytest.mark.parametrize("prompt_len", [1, 7, 30])
def test_greedy_equals_transformers(pair, prompt_len):
    hf, model = pair
    x = torch.randint(0, 1001, (1, prompt_len))
    expected = hf.generate(x, max_new_tokens=25, do_sample=False, pad_token_id=0)
    got = model.generate(x, max_new_tokens=25, temperature=0)
    assert torch.equal(got, expected)


def test_greedy_equals_transformers_gpt1(tmp_path):
    hf = make_hf_gpt1(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    x = torch.randint(0, 1003, (1, 9))
    expected = hf.generate(x, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, max_new_tokens=20, temperature=0), expected)


def test_cached_decoding_matches_full_forward(pair):
    _, model = pair
    x = torch.randint(0, 1001, (3, 40))
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = model.setup_cache(3, 64)
        steps = [model(x[:, :25], cache=cache)]  # prefill
        steps.append(model(x[:, 25:29], cache=cache))  # a chunk of 4 over the cache
        for t in range(29, 40):
            steps.append(model(x[:, t:t + 1], cache=cache))  # one token at a time
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.seqlens.tolist() == [40, 40, 40]


ROWS = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def test_ragged_batch_equals_one_at_a_time(pair):
    _, model = pair
    alone = [model.generate(r, max_new_tokens=12, temperature=0) for r in ROWS]
    assert model.generate(ROWS, max_new_tokens=12, temperature=0) == alone


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_with_attention_mask(pair, side):
    _, model = pair
    width = max(map(len, ROWS))
    ids = torch.full((len(ROWS), width), 0)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(ROWS):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r), 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, temperature=0)
    for b, r in enumerate(ROWS):
        alone = model.generate(r, max_new_tokens=6, temperature=0)
        if side == "left":
            assert out[b, width - len(r):].tolist() == alone
        else:
            assert out[b, :len(alone)].tolist() == alone


def test_left_padded_batch_matches_transformers(pair):
    hf, model = pair
    width = max(map(len, ROWS))
    ids = torch.zeros((len(ROWS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(ROWS):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, temperature=0), expected)


def _left_padded(rows, pad_id):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    return ids, mask


def test_left_padded_stops_and_logits_match_transformers(pair, monkeypatch):
    """Prompts of odd lengths, left-padded with an id of their own; an eos that rows reach at
    different steps, a pad_token_id of its own after it: the very tensor transformers returns
    (the caller's pad columns kept), and each decode step's logits equal transformers' scores."""
    import gptfast.ops as ops
    hf, model = pair
    rows = [torch.randint(0, 1001, (n,)).tolist() for n in (3, 11, 1, 7, 17)]
    ids, mask = _left_padded(rows, pad_id=77)
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    new = free[:, ids.shape[1]:].tolist()

    def stop_steps(t):  # the step at which each row would emit t first (20: never)
        return [r.index(t) if t in r else 20 for r in new]
    eos = max({t for r in new for t in r}, key=lambda t: (len(set(stop_steps(t))), -min(stop_steps(t))))
    assert len(set(stop_steps(eos))) >= 2, "no token stops the rows at different steps"
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                           pad_token_id=5, output_logits=True, return_dict_in_generate=True)
    seen, sample = [], ops.sample

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return sample(logits, *args, **kwargs)
    monkeypatch.setattr(ops, "sample", recording)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, temperature=0, eos_token_id=eos,
                         pad_token_id=5)
    assert torch.equal(got, expected.sequences)
    assert (got[:, :ids.shape[1]] == ids).all()  # the pads are the caller's 77, not pad_token_id
    for step, (mine, theirs) in enumerate(zip(seen, expected.logits)):
        live = ~(expected.sequences[:, ids.shape[1]:ids.shape[1] + step] == eos).any(dim=1)  # rows not stopped
        assert torch.allclose(mine[live], theirs[live], atol=1e-4, rtol=1e-4), step


def test_generation_under_autocast(pair, fake_graphs):
    """torch.autocast around generate (a bf16 model run from fp32 weights): the KV cache takes
    the keys' dtype; each token is the greedy one of the model's full forward under autocast
    (up to a bf16 near-tie), with a draft too; a graph step kept from an autocast call is not
    reused without it."""
    _, model = pair
    prompt, n = torch.randint(0, 1001, (9,)).tolist(), 10
    kw = dict(max_new_tokens=n, temperature=0, ignore_eos=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, **kw)
        assert model.generate(prompt, draft_model=model, **kw)[:len(prompt) + 1] == out[:len(prompt) + 1]
        graphed = model.generate(prompt, cuda_graph=True, **kw)
        with torch.no_grad():
            logits = model(torch.tensor([out]))[0, len(prompt) - 1:-1].float()  # [n, V]
    assert fake_graphs._graphs[model].cache.k[0].dtype == torch.bfloat16
    picked = logits.gather(1, torch.tensor(out[len(prompt):]).view(n, 1)).squeeze(1)
    assert (picked >= logits.max(dim=1).values - 0.1).all(), (picked, logits.max(dim=1).values)
    assert graphed == out
    plain = model.generate(prompt, cuda_graph=True, **kw)  # fp32 again: a new step and cache
    assert fake_graphs._graphs[model].cache.k[0].dtype == torch.float32
    assert plain == model.generate(prompt, **kw)


def test_seeded_sampling_is_reproducible(pair):
    _, model = pair
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    a, b = model.generate(ROWS, **kw), model.generate(ROWS, **kw)
    assert a == b
    assert model.generate(ROWS, **{**kw, "seed": 99}) != a


def test_seeded_row_does_not_depend_on_batch(pair):
    _, model = pair
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
    batch = model.generate(ROWS, seed=[11, 12, 13, 14], **kw)
    for b, r in enumerate(ROWS):
        assert model.generate(r, seed=11 + b, **kw) == batch[b]
    reordered = model.generate(ROWS[::-1], seed=[14, 13, 12, 11], **kw)
    assert reordered == batch[::-1]


def test_sampling_stays_in_top_k(pair):
    _, model = pair
    x = [3, 4, 5]
    with torch.no_grad():
        logits = model(torch.tensor([x]))[0, -1]
    allowed = set(logits.topk(2).indices.tolist())
    firsts = {model.generate(x, max_new_tokens=1, temperature=1.5, top_k=2, seed=s)[-1] for s in range(40)}
    assert firsts <= allowed and len(firsts) == 2


def test_stream_matches_generate(pair):
    _, model = pair
    steps = list(model.generate_stream(ROWS, max_new_tokens=7, temperature=0))
    assert len(steps) == 7
    full = model.generate(ROWS, max_new_tokens=7, temperature=0)
    for b, r in enumerate(ROWS):
        assert [s[b] for s in steps] == full[b][len(r):]


def test_stop_tokens_per_row(pair):
    _, model = pair
    free = model.generate(ROWS, max_new_tokens=10, temperature=0, ignore_eos=True)
    stop = free[0][len(ROWS[0]) + 2]  # row 0's third new token
    out = model.generate(ROWS, max_new_tokens=10, temperature=0, eos_token_id=stop)
    for b, r in enumerate(ROWS):
        new = free[b][len(r):]
        expect = new[:new.index(stop) + 1] if stop in new else new
        assert out[b][len(r):] == expect
    assert out[0][-1] == stop and len(out[0]) == len(ROWS[0]) + 3
    for as_tensor in (torch.tensor(stop), torch.tensor([stop])):  # tensors, as transformers takes them
        assert model.generate(ROWS, max_new_tokens=10, temperature=0, eos_token_id=as_tensor) == out


def test_stop_tokens_pad_tensor_output(pair):
    _, model = pair
    x = torch.tensor([ROWS[0], ROWS[0][::-1]])
    free = model.generate(x, max_new_tokens=8, temperature=0, ignore_eos=True)
    stop = int(free[0, 5 + 1])
    end = 5 + free[0, 5:].tolist().index(stop) + 1  # just after the first occurrence of the stop token
    out = model.generate(x, max_new_tokens=8, temperature=0, eos_token_id=stop, pad_token_id=-1)
    assert out[0, :end].tolist() == free[0, :end].tolist()
    assert (out[0, end:] == -1).all()


def test_stop_strings(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    make_gpt2_tokenizer_files(tmp_path, text)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    prompt = tok.encode("the quick")
    free = model.generate(prompt, max_new_tokens=20, temperature=0)
    new_text = tok.decode(free[len(prompt):])
    assert len(new_text) > 3
    stop = new_text[1:3]
    out = model.generate(prompt, max_new_tokens=20, temperature=0, stop_strings=[stop], tokenizer=tok)
    produced = tok.decode(out[len(prompt):])
    assert stop in produced and len(out) < len(free)
    assert stop not in tok.decode(out[len(prompt):-1])  # it stopped at the first token completing it


@pytest.mark.parametrize("draft", [None, "self"])
def test_sampled_stream_with_stops_equals_generate(tmp_path, draft):
    """Seeded sampling, an eos and a stop string, rows ending at different steps: the stream
    gives each row's tokens once and in order, None after its last, and the tokens (so the text)
    of generate."""
    make_gpt2_tokenizer_files(tmp_path, "a small text about foxes, dogs and the letters they jump over. " * 10)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    prompts = [tok.encode(t) for t in ("a small", "dogs", "the letters they")]
    kw = dict(max_new_tokens=25, temperature=1.0, top_k=40, seed=[3, 8, 1],
              draft_model=model if draft else None, num_draft_tokens=3)
    free = model.generate(prompts, ignore_eos=True, **kw)
    eos = free[0][len(prompts[0]) + 4]
    stop = tok.decode(free[1][len(prompts[1]) + 2:len(prompts[1]) + 4])
    out = model.generate(prompts, eos_token_id=eos, stop_strings=[stop], tokenizer=tok, **kw)
    steps = list(model.generate_stream(prompts, eos_token_id=eos, stop_strings=[stop], tokenizer=tok, **kw))
    assert len(steps) == max(len(o) - len(p) for o, p in zip(out, prompts))
    for b, (o, p) in enumerate(zip(out, prompts)):
        column = [s[b] for s in steps]
        n = len(o) - len(p)
        assert column[:n] == o[len(p):] and all(t is None for t in column[n:])
        assert o[len(p):] == free[b][len(p):len(o)]  # the free run's tokens, cut at the stop
    assert out[0][-1] == eos and len(out[0]) <= len(prompts[0]) + 5
    assert stop in tok.decode(out[1][len(prompts[1]):]) and len(out[1]) <= len(prompts[1]) + 4
    assert len({len(o) - len(p) for o, p in zip(out, prompts)}) > 1


def test_prompt_too_long(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"prompt of 90 tokens \+ max_new_tokens 10 = 100 exceeds .* 96"):
        model.generate([1] * 90, max_new_tokens=10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    (dict(seed="abc"), "seed must be None, an int"),
    (dict(eos_token_id=5000), r"eos_token_id must be token ids in \[0, 1001\)"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(beams=3), r"unexpected keyword argument\(s\) \['beams'\]"),
    (dict(cuda_graph="yes"), "cuda_graph must be None"),
])
def test_bad_generation_arguments(pair, kwargs, match):
    _, model = pair
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate([1, 2, 3], **kwargs)


def test_bad_prompts(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"prompt 1 holds token id 1001, outside the vocabulary"):
        model.generate([[1, 2], [3, 1001]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate([[], [1]], max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be an int64 tensor"):
        model.generate(torch.ones(1, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask row 0 is not one contiguous run"):
        model.generate(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1]]), max_new_tokens=2)


def test_cuda_graph_needs_cuda(pair):
    _, model = pair
    if model.device.type == "cuda":
        pytest.skip("the model is on CUDA")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, it is on cpu"):
        model.generate([1, 2, 3], max_new_tokens=4, cuda_graph=True)
    assert model.generate([1, 2, 3], max_new_tokens=4, temperature=0, cuda_graph=False) == \
        model.generate([1, 2, 3], max_new_tokens=4, temperature=0)


# ---- the graph-mode bookkeeping on CPU: a stand-in graph whose replay re-runs the step -------

def _baked_tensors(owner) -> dict:
    """The tensors a graph captured from owner's step would hold pointers to: its tensor
    attributes, tuples/lists of them, and its KV caches' buffers."""
    found = {}
    for name, value in vars(owner).items():
        items = value if isinstance(value, (tuple, list)) else [value]
        if hasattr(value, "seqlens"):  # a KVCache
            items = [value.seqlens, *value.k, *value.v]
        for i, t in enumerate(items):
            if isinstance(t, torch.Tensor):
                found[f"{name}[{i}]"] = t
    return found


class _EagerGraph:
    """A stand-in CUDA graph for CPU tests: replay re-runs the step, after checking that the
    step still uses the very tensors it had at capture (a real graph replays on those pointers,
    so a buffer replaced instead of refilled would be a stale input)."""

    def __init__(self, fn, owner=None):
        self.fn, self.replays, self.owner = fn, 0, owner
        self.baked = _baked_tensors(owner) if owner is not None else {}

    def replay(self):
        now = _baked_tensors(self.owner) if self.owner is not None else {}
        moved = [k for k, t in self.baked.items() if now.get(k) is not t]
        assert not moved, f"replaced after capture (the graph would read the old buffers): {moved}"
        self.replays += 1
        self.fn()


@pytest.fixture
def fake_graphs(monkeypatch):
    """cuda_graph=True on CPU, with _EagerGraph in place of capture: exercises the static
    buffers, the per-row parameter buffers, the reuse across calls and the busy flag."""
    from gptfast import generation as G

    def capture(self, model):
        self._run(model)
        self.graph = _EagerGraph(lambda: self._run(model), owner=self)
    monkeypatch.setattr(G.DecodeStep, "_capture", capture)
    monkeypatch.setattr(G, "_use_cuda_graph", lambda cuda_graph, device, n: bool(cuda_graph))
    G.release_cuda_graphs()
    yield G
    G.release_cuda_graphs()


GRAPH_CASES = [dict(temperature=0), dict(temperature=1.0, top_k=50, top_p=0.9, seed=3),
               dict(temperature=0.8, min_p=0.05, seed=[5, 6, 7, 8]),
               dict(temperature=torch.tensor([0.0, 1.0, 0.7, 1.3]), top_k=torch.tensor([0, 5, 1, 0]), seed=1)]


def test_graph_mode_bookkeeping(pair, fake_graphs):
    _, model = pair
    step = None
    for kw in GRAPH_CASES:
        eager = model.generate(ROWS, max_new_tokens=9, ignore_eos=True, **kw)
        graphed = model.generate(ROWS, max_new_tokens=9, ignore_eos=True, cuda_graph=True, **kw)
        assert graphed == eager, kw
        assert step is None or fake_graphs._graphs[model] is step  # one step, reused
        step = fake_graphs._graphs[model]
    assert step.graph.replays == 7 + 8 * (len(GRAPH_CASES) - 1)
    # another batch size replaces it; a suspended stream's step is not shared
    two = model.generate(ROWS[:2], max_new_tokens=5, temperature=0, cuda_graph=True, ignore_eos=True)
    assert fake_graphs._graphs[model] is not step
    stream = model.generate_stream(ROWS[:2], max_new_tokens=5, temperature=0, cuda_graph=True, ignore_eos=True)
    first = next(stream)
    assert model.generate(ROWS[:2], max_new_tokens=5, temperature=0.9, seed=4, cuda_graph=True) == \
        model.generate(ROWS[:2], max_new_tokens=5, temperature=0.9, seed=4)
    rest = list(stream)
    assert [[first[i]] + [s[i] for s in rest] for i in range(2)] == [r[len(p):] for r, p in zip(two, ROWS)]


def packed_rows(rows, kw):
    """Right-padded ids [B, T] and lengths [B] of ragged prompts, and kw's sampling parameters
    as a (temperature, top_k, top_p, min_p) tuple: the inputs of a step driven by hand."""
    lens = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    sampling = tuple(kw.get(name, default) for name, default in
                     (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)))
    return ids, lens, sampling


@pytest.mark.parametrize("kw", GRAPH_CASES[:3], ids=["greedy", "top-k-top-p", "min-p"])
def test_decode_step_reads_nothing_on_the_host(pair, forbid_host_reads, kw):
    """The decode step is what the CUDA graph captures: no value may travel to the host inside it."""
    from gptfast.generation import DecodeStep
    _, model = pair
    step = DecodeStep(model.setup_cache(len(ROWS), 64), cuda_graph=False)
    ids, lens, sampling = packed_rows(ROWS, kw)
    with torch.inference_mode():
        logits = model(ids, cache=step.cache, input_lengths=lens, logits_index=lens - 1)
        step.start(logits.argmax(-1), torch.arange(len(ROWS)), sampling)
        with forbid_host_reads():
            for _ in range(3):
                step(model)
    assert step.cache.seqlens.tolist() == [len(r) + 3 for r in ROWS]


# ---- GPU: the CUDA-graph decode step (skipped without CUDA) -------------------------------

@pytest.fixture(scope="module")
def cuda_model(pair):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return copy.deepcopy(pair[1]).cuda()


class _CountReplays:
    def __init__(self, monkeypatch):
        self.n, replay = 0, torch.cuda.CUDAGraph.replay

        def counting(graph):
            self.n += 1
            return replay(graph)
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_graph_decode_equals_eager(cuda_model, backend, monkeypatch):
    """The replayed graph computes the tokens the eager loop computes (kernels or references);
    one capture serves later calls with other sampling settings."""
    from gptfast import generation, use_backend

    generation.release_cuda_graphs()
    with use_backend(backend):
        graph = None
        for kw in GRAPH_CASES:
            eager = cuda_model.generate(ROWS, max_new_tokens=12, cuda_graph=False, ignore_eos=True, **kw)
            count = _CountReplays(monkeypatch)
            graphed = cuda_model.generate(ROWS, max_new_tokens=12, cuda_graph=True, ignore_eos=True, **kw)
            assert graphed == eager, kw
            step = generation._graphs[cuda_model]
            # the first call captures at step 1 and replays steps 2..11; later calls replay 1..11
            assert count.n == (10 if graph is None else 11)
            assert graph is None or step.graph is graph
            graph = step.graph
    generation.release_cuda_graphs(cuda_model)
    assert cuda_model not in generation._graphs


@pytest.mark.gpu
def test_cuda_graph_recaptures_when_shapes_change(cuda_model):
    from gptfast import generation

    a = cuda_model.generate(ROWS, max_new_tokens=6, temperature=0, ignore_eos=True)
    first = generation._graphs[cuda_model]
    b = cuda_model.generate(ROWS[:2], max_new_tokens=6, temperature=0, ignore_eos=True)  # another batch size
    assert generation._graphs[cuda_model] is not first
    assert b == a[:2]
    # a suspended stream keeps its step; a generation meanwhile gets its own
    stream = cuda_model.generate_stream(ROWS[:2], max_new_tokens=6, temperature=0, ignore_eos=True)
    firsts = next(stream)
    assert cuda_model.generate(ROWS[:2], max_new_tokens=6, temperature=0, ignore_eos=True) == b
    rest = list(stream)
    assert [[firsts[i]] + [s[i] for s in rest] for i in range(2)] == [r[len(p):] for r, p in zip(b, ROWS)]


@pytest.mark.gpu
def test_cuda_graph_stops_and_streams(cuda_model, monkeypatch):
    free = cuda_model.generate(ROWS, max_new_tokens=10, temperature=0, ignore_eos=True, cuda_graph=False)
    stop = free[0][len(ROWS[0]) + 4]
    count = _CountReplays(monkeypatch)
    out = cuda_model.generate(ROWS, max_new_tokens=10, temperature=0, eos_token_id=stop)  # auto: graph on CUDA
    assert count.n > 0
    assert out == cuda_model.generate(ROWS, max_new_tokens=10, temperature=0, eos_token_id=stop, cuda_graph=False)
    steps = list(cuda_model.generate_stream(ROWS, max_new_tokens=10, temperature=0, ignore_eos=True))
    assert [[s[b] for s in steps] for b in range(len(ROWS))] == [f[len(r):] for f, r in zip(free, ROWS)]
