"""Hugging Face GPT-2 config options gptfast used to refuse or ignore: scale_attn_by_inverse_layer_idx,
reorder_and_upcast_attn, initializer_range and a list eos_token_id. Checkpoints that use them load and
compute what transformers computes: logits, the KV-cache decode path, training-mode dropout."""
import json
import math

import pytest
import torch

import gptfast
from gptfast import GPT, GPTConfig
from gptfast.ops import _dispatch

from hf_utils import make_hf_gpt2

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=211, n_positions=41, n_embd=64, n_layer=3, n_head=4)  # head dim 16, 3 layers
# (scale_attn_weights, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn): stanford-crfm's
# GPT-2s set both of the last two
FLAGS = {"by-layer": (True, True, False), "unscaled-by-layer": (False, True, False), "upcast": (True, False, True),
         "by-layer-upcast": (True, True, True), "unscaled-by-layer-upcast": (False, True, True)}
# reorder_and_upcast_attn changes what transformers computes, not gptfast's code path: the
# interpreted kernels (slow on CPU) run the cases that differ in the scales they are given
KERNEL_FLAGS = ("by-layer", "unscaled-by-layer", "by-layer-upcast")


def _cases(names, kernel_names=KERNEL_FLAGS, extra=()):
    return [pytest.param(backend, FLAGS[name], *extra, id=f"{backend}-{name}" + "".join(f"-{e}" for e in extra))
            for backend in ("torch", "kernel") for name in names if backend == "torch" or name in kernel_names]


def _flags(scaled, by_layer, upcast):
    return dict(scale_attn_weights=scaled, scale_attn_by_inverse_layer_idx=by_layer, reorder_and_upcast_attn=upcast)


def _hf_pair(tmp_path, flags, seed=0, **kw):
    """transformers' GPT-2 with these flags (saved with save_pretrained, random init, perturbed) in
    eager attention, where reorder_and_upcast_attn takes effect, and gptfast's load of it."""
    hf = make_hf_gpt2(tmp_path, **SHAPE, seed=seed, **flags, **kw)
    hf.config._attn_implementation = "eager"
    return hf, GPT.from_pretrained(str(tmp_path))


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# "kernel": the Triton kernels (interpreted on CPU); "torch": the references
@pytest.fixture
def backend(request):
    if request.param == "kernel":
        pytest.importorskip("triton")
    with gptfast.use_backend(request.param):
        yield request.param


def _cached_logits(model, x, prefill: int, chunks=(1, 3, 1)):
    """Logits of every position of x past the first `prefill`-1, computed as generation does: a
    prefill through ops.attention, then steps over the KV cache through ops.decode_attention (one
    token at a time, and a chunk of 3 as speculative decoding verifies drafts)."""
    cache = model.setup_cache(x.shape[0], max_seq_len=x.shape[1])
    out = [model(x[:, :prefill], cache=cache)[:, -1:]]
    t, i = prefill, 0
    while t < x.shape[1]:
        n = min(chunks[i % len(chunks)], x.shape[1] - t)
        out.append(model(x[:, t:t + n], cache=cache))
        t, i = t + n, i + 1
    return torch.cat(out, dim=1)  # logits of positions prefill - 1 .. T - 1


@pytest.mark.parametrize("backend, flags", _cases(FLAGS), indirect=["backend"])
def test_fp32_logits_and_decode_equal_transformers(tmp_path, backend, flags):
    hf, model = _hf_pair(tmp_path, _flags(*flags))
    assert (model.config.scale_attn_weights, model.config.scale_attn_by_inverse_layer_idx,
            model.config.reorder_and_upcast_attn) == flags
    x = torch.randint(0, SHAPE["vocab_size"], (2, 19))
    with torch.no_grad():
        want = hf(x).logits
        assert _err(model(x), want) <= 1e-4
        assert _err(_cached_logits(model, x, prefill=9), want[:, 8:]) <= 1e-4
        if backend == "torch":  # a transformers model object converted in memory reads the flags too
            assert _err(GPT.from_pretrained(hf)(x), want) <= 1e-4
        if flags[1]:  # the flag matters at this size: without it the logits are far off
            plain = make_hf_gpt2(tmp_path / "plain", **SHAPE, **_flags(flags[0], False, flags[2])).eval()
            assert _err(plain(x).logits, want) > 1e-2


@pytest.mark.parametrize("backend, flags, dtype", [
    *_cases(["upcast", "by-layer-upcast", "unscaled-by-layer"], ["by-layer-upcast", "unscaled-by-layer"],
            extra=("bfloat16",)),
    *_cases(["by-layer-upcast"], extra=("float16",))], indirect=["backend"])
def test_half_precision_within_dtype_error_of_transformers(tmp_path, backend, flags, dtype):
    """In bf16 / fp16 the model (forward and decode over the cache, scores and softmax in fp32) is
    at most 2x as far from transformers' fp32 logits as transformers itself in that dtype (with
    reorder_and_upcast_attn, its eager attention upcasts q.k and the softmax too)."""
    dtype = getattr(torch, dtype)
    hf, model = _hf_pair(tmp_path, _flags(*flags), seed=1)
    x = torch.randint(0, SHAPE["vocab_size"], (2, 19))
    with torch.no_grad():
        want = hf(x).logits
        hf_err = _err(hf.to(dtype)(x).logits, want)
        model = model.to(dtype)
        got = model(x)
        assert got.dtype == dtype
        assert _err(got, want) <= 2 * hf_err + 1e-2, (_err(got, want), hf_err)
        assert _err(_cached_logits(model, x, prefill=6), want[:, 5:]) <= 2 * hf_err + 1e-2


def test_greedy_generation_equals_transformers(tmp_path):
    hf, model = _hf_pair(tmp_path, _flags(True, True, True), seed=2)
    x = torch.randint(0, SHAPE["vocab_size"], (2, 7))
    want = hf.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    got = model.generate(x, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert torch.equal(got, want)


def test_training_dropout_path_uses_the_layer_scale(tmp_path, caplog):
    """Attention dropout in training with each layer's scale: on CPU ops.attention's reference
    (said once) draws the masks transformers' SDPA path draws: the same logits and gradients."""
    hf = make_hf_gpt2(tmp_path, **SHAPE, **_flags(False, True, True), attn_pdrop=0.3, resid_pdrop=0.0,
                      embd_pdrop=0.0)
    hf.config._attn_implementation = "sdpa"
    model = GPT.from_pretrained(str(tmp_path))
    hf.train()
    model.train()
    x = torch.randint(0, SHAPE["vocab_size"], (3, 17))
    torch.manual_seed(5)
    want = hf(x, labels=x)
    want.loss.backward()
    torch.manual_seed(5)
    with caplog.at_level("WARNING", logger="gptfast"), _dispatch.fallbacks_logged() as lines:
        logits, loss = model(x, labels=x)
    loss.backward()
    assert any("attention dropout p=0.3" in line for line in lines), lines
    assert _err(logits, want.logits) <= 1e-4
    g_hf = hf.transformer.h[2].attn.c_attn.weight.grad.t()
    torch.testing.assert_close(model.transformer.h[2].attn.c_attn.weight.grad, g_hf, rtol=1e-4, atol=1e-5)


def test_attention_scale_per_layer():
    cfg = GPTConfig(n_embd=64, n_head=4, n_layer=4, scale_attn_by_inverse_layer_idx=True)
    model = GPT(GPTConfig(vocab_size=11, n_positions=8, n_embd=64, n_head=4, n_layer=4,
                          scale_attn_by_inverse_layer_idx=True))
    for i, block in enumerate(model.transformer.h):
        assert cfg.layer_attn_scale(i) == pytest.approx(0.25 / (i + 1))
        assert block.attn.scale == (None if i == 0 else pytest.approx(0.25 / (i + 1)))
    cfg = GPTConfig(n_embd=64, n_head=4, scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    assert cfg.layer_attn_scale(0) == 1.0 and cfg.layer_attn_scale(3) == 0.25
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx must be a bool, got 1"):
        GPTConfig(scale_attn_by_inverse_layer_idx=1)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn must be a bool, got 'yes'"):
        GPTConfig(reorder_and_upcast_attn="yes")
    with pytest.raises(ValueError, match="config.json: scale_attn_by_inverse_layer_idx must be true or false"):
        GPTConfig.from_hf_dict({"scale_attn_by_inverse_layer_idx": "true"})


def test_patch_transformers_unaffected(tmp_path):
    """gptfast.patch_transformers on a GPT-2 with these flags computes what transformers' eager
    attention (upcast, scaled by layer) computes."""
    hf, _ = _hf_pair(tmp_path, _flags(True, True, True), seed=3)
    x = torch.randint(0, SHAPE["vocab_size"], (2, 13))
    with torch.no_grad():
        want = hf(x).logits
        gptfast.patch_transformers(hf)
        assert _err(hf(x).logits, want) <= 1e-4
        gptfast.unpatch_transformers(hf)


# ---- GPT-1 --------------------------------------------------------------------------------------

def test_gpt1_has_no_such_flags():
    """transformers' OpenAIGPT has none of GPT-2's attention flags: it ignores them in a config,
    and so does gptfast; a gptfast post-LN model scaled by layer has no OpenAIGPT equivalent."""
    cfg = GPTConfig.from_hf_dict({"model_type": "openai-gpt", "n_embd": 32, "n_head": 4, "n_layer": 2,
                                  "scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True})
    assert not cfg.scale_attn_by_inverse_layer_idx and not cfg.reorder_and_upcast_attn
    torch.manual_seed(0)
    shape = dict(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    plain = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**shape)).eval()
    flagged = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        **shape, scale_attn_by_inverse_layer_idx=True)).eval()
    flagged.load_state_dict(plain.state_dict())
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(plain(x).logits, flagged(x).logits)
    gpt1 = GPTConfig.from_preset("openai-gpt", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True has no GPT-1 equivalent"):
        gpt1.to_hf_dict()


# ---- initializer_range --------------------------------------------------------------------------

def _weight_stds(model):
    return {name: p.std().item() for name, p in model.named_parameters() if p.dim() == 2}


@pytest.mark.parametrize("gpt2", [True, False], ids=["gpt2", "gpt1"])
def test_init_std_follows_initializer_range(gpt2):
    """Every weight ~ N(0, initializer_range); GPT-2's residual projections (c_proj) / sqrt(2 n_layer),
    as transformers' GPT2 / OpenAIGPT init. 16k+ draws per matrix: the estimate is within 1%."""
    torch.manual_seed(0)
    r, n_layer = 0.07, 8
    shape = dict(vocab_size=301, n_positions=130, n_embd=128, n_layer=n_layer, n_head=4, initializer_range=r)
    cfg = GPTConfig(**shape) if gpt2 else GPTConfig.from_preset("openai-gpt", **shape)
    model = GPT(cfg)
    stds = _weight_stds(model)
    assert len(stds) == 2 + 4 * n_layer
    for name, std in stds.items():
        want = r / math.sqrt(2 * n_layer) if gpt2 and name.endswith("c_proj.weight") else r
        assert abs(std - want) < 0.05 * want, (name, std, want)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert not p.any(), name
    model.resize_token_embeddings(2301)  # new rows drawn as at init
    new = model.transformer.wte.weight[301:]
    assert abs(new.std().item() - r) < 0.05 * r
    # transformers draws from the same distributions. (transformers 5.x's OpenAIGPT leaves its Conv1D
    # weights at Conv1D's own N(0, 0.02) whatever initializer_range says; 4.x drew them from
    # initializer_range, as gptfast does: only GPT-1's embeddings are compared.)
    hf_cls, hf_cfg = ((transformers.GPT2LMHeadModel, transformers.GPT2Config) if gpt2 else
                      (transformers.OpenAIGPTLMHeadModel, transformers.OpenAIGPTConfig))
    hf_stds = {name.replace("tokens_embed", "wte").replace("positions_embed", "wpe"): std
               for name, std in _weight_stds(hf_cls(hf_cfg(**shape))).items()}
    assert hf_stds.keys() == stds.keys()
    for name, std in stds.items():
        if gpt2 or name.endswith(("wte.weight", "wpe.weight")):
            assert abs(hf_stds[name] - std) < 0.05 * std, (name, hf_stds[name], std)


def test_initializer_range_read_and_written(tmp_path):
    make_hf_gpt2(tmp_path / "hf", **SHAPE, initializer_range=0.05)
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    assert model.config.initializer_range == 0.05
    model.save_pretrained(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["initializer_range"] == 0.05
    assert transformers.GPT2Config.from_pretrained(str(tmp_path / "out")).initializer_range == 0.05
    for bad in (0, -0.02, float("inf"), True, "0.02"):
        with pytest.raises(ValueError, match="initializer_range must be a finite number > 0"):
            GPTConfig(initializer_range=bad)


# ---- eos_token_id --------------------------------------------------------------------------------

def test_eos_list_loaded_and_saved(tmp_path):
    """A config.json eos_token_id list (transformers allows one) was dropped to None on load."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**SHAPE, bos_token_id=7, eos_token_id=[7, 9])
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "hf"))
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    assert model.config.eos_token_id == [7, 9]
    model.save_pretrained(str(tmp_path / "out"))
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (raw["eos_token_id"], raw["bos_token_id"]) == ([7, 9], 7)
    again = transformers.GPT2Config.from_pretrained(str(tmp_path / "out"))
    assert (again.eos_token_id, again.bos_token_id) == ([7, 9], 7)
    assert GPT.from_pretrained(str(tmp_path / "out")).config.eos_token_id == [7, 9]
    nano = tmp_path / "nano.pt"  # gptfast's own format keeps it too
    model.save_pretrained(str(nano), format="nanogpt")
    assert GPT.from_pretrained(str(nano)).config.eos_token_id == [7, 9]


def test_generation_stops_at_any_config_eos():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, n_positions=32, n_embd=32, n_layer=1, n_head=2, eos_token_id=[3, 5])).eval()
    new = model.generate(torch.tensor([[1, 2]]), max_new_tokens=30, temperature=1.0, seed=0)[0, 2:].tolist()
    assert not {3, 5} & set(new[:-1]), new  # it stops at the first of either
    assert new[-1] in (3, 5) and len(new) < 30, new


def test_eos_token_id_values():
    for good in (None, 0, 50256, [], [1], [50256, 3]):
        assert GPTConfig(eos_token_id=good).eos_token_id == good
    assert GPTConfig(eos_token_id=(4, 2)).eos_token_id == [4, 2]
    for bad in (-1, 1.0, "50256", True, [1, -2], [1, None], [False], {"a": 1}):
        with pytest.raises(ValueError, match=r"GPTConfig.eos_token_id must be None, a token id \(an int >= 0\) "
                                             r"or a list of them, got"):
            GPTConfig(eos_token_id=bad)
    with pytest.raises(ValueError, match=r"config.json: eos_token_id must be .* got '</s>'"):
        GPTConfig.from_hf_dict({"eos_token_id": "</s>"})
    assert GPTConfig.from_hf_dict({}).eos_token_id == 50256  # GPT2Config's default
    assert GPTConfig.from_hf_dict({"eos_token_id": None}).eos_token_id is None
    assert GPTConfig(eos_token_id=[]).to_hf_dict()["bos_token_id"] is None
    for eos in ([3, 4], 3):  # GPT-1 (no default EOS in OpenAIGPTConfig) keeps one it was given
        gpt1 = GPTConfig.from_hf_dict({"model_type": "openai-gpt", "eos_token_id": eos})
        assert gpt1.eos_token_id == eos
        assert GPTConfig.from_hf_dict(gpt1.to_hf_dict()) == gpt1
    assert "eos_token_id" not in GPTConfig.from_preset("openai-gpt").to_hf_dict()


# ---- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, initializer_range=0.01,
         eos_token_id=[5, 50256]),
    dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, eos_token_id=None),
    dict(reorder_and_upcast_attn=True, eos_token_id=17, initializer_range=0.2),
], ids=["all", "unscaled", "upcast"])
def test_config_round_trips(kw):
    cfg = GPTConfig(**kw)
    hf_dict = cfg.to_hf_dict()
    assert GPTConfig.from_hf_dict(json.loads(json.dumps(hf_dict))) == cfg
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    hf = transformers.GPT2Config(**hf_dict)  # transformers reads the same options
    for key, value in kw.items():
        assert getattr(hf, key) == value, key
    assert GPTConfig.from_hf_dict(hf.to_dict()) == cfg


def test_transformers_classifier_with_an_eos_list_takes_its_first_id_as_delimiter(tmp_path):
    """A transformers classifier's config.json with an eos_token_id list: the delimiter (the task
    format's separator, transformers' eos) is its first id, not silently none."""
    import json

    from gptfast.finetune import GPTClassifier
    from hf_utils import make_hf_classifier

    make_hf_classifier(tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["eos_token_id"] = [17, 5]
    path.write_text(json.dumps(raw))
    assert GPTClassifier.from_pretrained(str(tmp_path)).spec.delimiter == 17
