"""Generation: greedy parity with transformers, ragged batches, the KV cache, seeds, stops, streaming."""
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
