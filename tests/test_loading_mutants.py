"""Loading, saving and the cached forward against bugs a loader author makes and the other tests
let through (mutation testing): config fields dropped on save, a transposition that a square
weight's shape check cannot see, the last position of the context in decode, a ragged cache row
past the context, and a save interrupted by Ctrl-C."""
import os

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.checkpoint import atomic_torch_save

from hf_utils import make_hf_gpt2

transformers = pytest.importorskip("transformers")


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_save_pretrained_keeps_shapes_and_epsilon(tmp_path, family):
    """A config whose every field is off its default (n_inner, epsilon, n_positions > 1024, odd
    vocab) saves as the transformers model that computes the same function, and loads back equal.
    Dropping layer_norm_epsilon or n_inner from config.json, or capping n_positions, fails here."""
    shape = dict(vocab_size=333, n_positions=1029, n_embd=40, n_layer=2, n_head=5, layer_norm_epsilon=3e-2)
    if family == "gpt2":
        cfg, cls = GPTConfig(**shape, n_inner=72), transformers.GPT2LMHeadModel
    else:  # tanh GELU: what transformers' OpenAIGPT runs
        cfg = GPTConfig.from_preset("openai-gpt", **shape, activation="gelu_tanh")
        cls = transformers.OpenAIGPTLMHeadModel
    torch.manual_seed(5)
    model = GPT(cfg).eval()
    with torch.no_grad():  # LayerNorms off (1, 0), so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(tmp_path))
    hf = cls.from_pretrained(str(tmp_path)).eval()
    assert hf.config.layer_norm_epsilon == 3e-2 and hf.config.n_positions == 1029
    if family == "gpt2":
        assert hf.config.n_inner == 72
    x = torch.randint(0, 333, (2, 17))
    again = GPT.from_pretrained(str(tmp_path))
    assert again.config == cfg
    with torch.no_grad():
        want = model(x)
        assert _err(hf(x).logits, want) <= 1e-5
        assert torch.equal(again(x), want)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_square_mlp_weights_are_transposed(tmp_path, safe):
    """n_inner == n_embd: every Conv1D weight but c_attn is square, so the shape check cannot
    tell a missed transposition; the logits must."""
    hf = make_hf_gpt2(tmp_path, vocab_size=301, n_positions=29, n_embd=48, n_layer=2, n_head=6, n_inner=48,
                      layer_norm_epsilon=1e-3, seed=11, safe_serialization=safe)
    model = GPT.from_pretrained(str(tmp_path))
    assert model.config.n_inner == 48 and model.config.layer_norm_epsilon == 1e-3
    x = torch.randint(0, 301, (3, 29))
    with torch.no_grad():
        assert _err(model(x), hf(x).logits) <= 1e-4


def test_cached_forward_reaches_the_last_position(tmp_path):
    """Prefill and decode up to position n_positions - 1 itself, with the cache as long as the
    context (setup_cache's default): the last token reads the last position embedding."""
    L = 23
    hf = make_hf_gpt2(tmp_path, vocab_size=211, n_positions=L, n_embd=48, n_layer=2, n_head=4, seed=3)
    model = GPT.from_pretrained(str(tmp_path))
    x = torch.randint(0, 211, (2, L))
    with torch.no_grad():
        want = hf(x).logits
        cache = model.setup_cache(2)
        assert cache.max_seq_len == L
        assert _err(model(x, cache=cache), want) <= 1e-4  # a prefill of the whole context
        cache.reset()
        steps = [model(x[:, :L - 3], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(L - 3, L)]
    assert _err(torch.cat(steps, dim=1), want) <= 1e-4
    assert cache.seqlens.tolist() == [L, L]


def test_a_ragged_cache_row_past_the_context_is_refused():
    """Rows of a cache hold different lengths: the longest decides whether a chunk fits. Else the
    long row's token would silently take a clamped position and a key slot past the cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    cache = model.setup_cache(2)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 15)), cache=cache, input_lengths=torch.tensor([15, 3]))
        with pytest.raises(ValueError, match=r"sequence of 17 tokens exceeds the context of 16 positions"):
            model(torch.randint(0, 50, (2, 2)), cache=cache)
        assert cache.seqlens.tolist() == [15, 3]  # the refused chunk left the cache as it was
        model(torch.randint(0, 50, (2, 1)), cache=cache)  # one more token fits both rows
    assert cache.seqlens.tolist() == [16, 4]


def test_ctrl_c_during_a_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    """KeyboardInterrupt (not an Exception) while the weights are written: the old checkpoint
    stays whole and no multi-GB tmp-*.part file is left behind."""
    import safetensors.torch

    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    old, new = GPT(cfg).eval(), GPT(cfg).eval()
    old.save_pretrained(str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    real = safetensors.torch.save_file

    def interrupted(state, filename, *args, **kwargs):
        real(state, filename, *args, **kwargs)  # the whole temporary file is there, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before
    x = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(str(tmp_path))(x), old(x))

    target = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, str(target))
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (open(f, "wb").write(b"part"), _raise()))
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"a": torch.zeros(3)}, str(target))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["state.pt"])
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))


def _raise():
    raise KeyboardInterrupt


@pytest.mark.parametrize("kw,why", [
    (dict(n_inner=72), r"OpenAIGPT has no n_inner: it must be 4 \* n_embd = 160, got 72"),
    (dict(scale_attn_weights=False), r"OpenAIGPT always scales attention"),
    (dict(scale_attn_by_inverse_layer_idx=True), r"OpenAIGPT scales every layer's attention alike"),
], ids=["n_inner", "unscaled", "by-layer"])
def test_gpt1_without_an_hf_equivalent_is_refused_before_writing(tmp_path, kw, why):
    """A GPT-1 config that transformers' OpenAIGPT cannot hold: save_pretrained refuses it before
    writing (else a checkpoint that neither transformers nor gptfast loads, or loads as another
    function); format="auto" writes the nanoGPT-style ckpt.pt, which loads back the same model."""
    torch.manual_seed(2)
    model = GPT(GPTConfig.from_preset("openai-gpt", vocab_size=89, n_positions=20, n_embd=40, n_layer=2,
                                      n_head=4, **kw)).eval()
    with pytest.raises(ValueError, match=why):
        model.save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    model.save_pretrained(str(tmp_path / "auto"), format="auto")
    assert sorted(os.listdir(tmp_path / "auto")) == ["ckpt.pt"]
    again = GPT.from_pretrained(str(tmp_path / "auto"))
    x = torch.randint(0, 89, (2, 20))
    with torch.no_grad():
        assert again.config == model.config and torch.equal(again(x), model(x))
