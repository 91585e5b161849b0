"""The model against transformers itself: logits, loss, gradients, config presets."""
import pytest
import torch


from gptfast import GPT, GPTConfig

from hf_utils import make_hf_gpt1, make_hf_gpt2

GPT2_SHAPES = [
    # (vocab, n_positions, n_embd, n_layer, n_head): head dims 8, 64 and 16; odd vocabs
    dict(vocab_size=1001, n_positions=77, n_embd=64, n_layer=2, n_head=8),
    dict(vocab_size=517, n_positions=128, n_embd=128, n_layer=1, n_head=2),
    dict(vocab_size=2053, n_positions=1024, n_embd=48, n_layer=3, n_head=3),
]


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("shape", GPT2_SHAPES, ids=lambda s: f"V{s['vocab_size']}-D{s['n_embd'] // s['n_head']}")
def test_gpt2_logits_match_transformers(tmp_path, shape, safe):
    hf = make_hf_gpt2(tmp_path, safe_serialization=safe, **shape)
    model = GPT.from_pretrained(str(tmp_path))
    x = torch.randint(0, shape["vocab_size"], (3, min(shape["n_positions"], 61)))
    with torch.no_grad():
        expected = hf(x).logits
        got = model(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_gpt1_logits_match_transformers(tmp_path, safe):
    hf = make_hf_gpt1(tmp_path, safe_serialization=safe)
    model = GPT.from_pretrained(str(tmp_path))
    # transformers' OpenAIGPT runs afn "gelu" as the tanh form (gelu_new), as OpenAI's GPT-1 did
    assert not model.config.pre_ln and not model.config.final_ln and model.config.activation == "gelu_tanh"
    x = torch.randint(0, 1003, (2, 50))
    with torch.no_grad():
        # the erf form was 9.6e-5 away here: 1e-5 tells the two apart
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_loss_and_gradients_match_transformers(tmp_path):
    hf = make_hf_gpt2(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    x = torch.randint(0, 1001, (2, 40))
    labels = x.clone()
    labels[0, :5] = -100
    hf_loss = hf(x, labels=labels).loss
    _, loss = model(x, labels=labels)
    assert abs(loss.item() - hf_loss.item()) < 1e-5
    hf_loss.backward()
    loss.backward()
    g_hf = hf.transformer.h[1].mlp.c_fc.weight.grad.t()  # Conv1D [in, out] -> Linear [out, in]
    g = model.transformer.h[1].mlp.c_fc.weight.grad
    assert torch.allclose(g, g_hf, atol=1e-5, rtol=1e-4)
    assert torch.allclose(model.transformer.wte.weight.grad, hf.transformer.wte.weight.grad, atol=1e-5, rtol=1e-4)


def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel, OpenAIGPTLMHeadModel

    torch.manual_seed(1)
    for cfg, cls in ((GPTConfig(vocab_size=333, n_positions=40, n_embd=32, n_layer=2, n_head=4), GPT2LMHeadModel),
                     (GPTConfig.from_preset("openai-gpt", vocab_size=333, n_positions=40, n_embd=32, n_layer=2,
                                            n_head=4), OpenAIGPTLMHeadModel)):
        model = GPT(cfg).eval()
        out = tmp_path / cls.__name__
        model.save_pretrained(str(out))
        hf = cls.from_pretrained(str(out)).eval()
        x = torch.randint(0, 333, (2, 17))
        with torch.no_grad():
            assert (model(x) - hf(x).logits).abs().max().item() <= 1e-5
        again = GPT.from_pretrained(str(out))
        with torch.no_grad():
            assert torch.equal(again(x), model(x))


def test_lm_head_is_tied():
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name,layers,width", [("gpt2", 12, 768), ("gpt2-medium", 24, 1024),
                                                ("gpt2-large", 36, 1280), ("gpt2-xl", 48, 1600),
                                                ("openai-gpt", 12, 768)])
def test_presets(name, layers, width):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.n_layer, cfg.n_embd) == (layers, width)
    if name == "openai-gpt":
        assert (cfg.n_positions, cfg.vocab_size, cfg.pre_ln, cfg.final_ln, cfg.activation) == \
            (512, 40478, False, False, "gelu")
    else:
        assert (cfg.n_positions, cfg.vocab_size, cfg.activation) == (1024, 50257, "gelu_tanh")


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_parameters() == 124_439_808  # the published GPT-2 small count (tied head)


# ---- bad input --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=4)).eval()


def test_input_ids_wrong_dtype(tiny):
    with pytest.raises(TypeError, match="input_ids must be int64.*float32"):
        tiny(torch.zeros(1, 4))


def test_input_ids_wrong_shape(tiny):
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\].*\(4,\)"):
        tiny(torch.zeros(4, dtype=torch.long))


def test_token_id_out_of_vocab(tiny):
    with pytest.raises(ValueError, match=r"token id 97, outside the vocabulary \[0, 97\)"):
        tiny(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        tiny(torch.tensor([[-1, 2]]))


def test_sequence_longer_than_context(tiny):
    with pytest.raises(ValueError, match="33 tokens exceeds the context of 32"):
        tiny(torch.zeros(1, 33, dtype=torch.long))


def test_unknown_config_field():
    with pytest.raises(TypeError, match="n_layers"):
        GPTConfig(n_layers=3)
    with pytest.raises(ValueError, match=r"unknown GPTConfig field\(s\) \['depth'\]"):
        GPTConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_experts'\]"):
        GPTConfig.from_hf_dict({"model_type": "gpt2", "n_experts": 8})


def test_bad_config_values():
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(3\)"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        GPTConfig(activation="relu")
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="add_cross_attention=True is not supported"):
        GPTConfig.from_hf_dict({"model_type": "gpt2", "add_cross_attention": True})
    with pytest.raises(ValueError, match="model_type must be 'gpt2' or 'openai-gpt', got 'llama'"):
        GPTConfig.from_hf_dict({"model_type": "llama"})


def test_bin_fixture_really_writes_bin(tmp_path):
    """Guard: the 'bin' parametrization above must load pytorch_model.bin, not safetensors."""
    import os
    make_hf_gpt2(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]


def test_model_compiles_fullgraph():
    """The dispatch layer must not break a torch.compile graph (reference ops on CPU)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=4)).eval()
    x = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(lambda ids: model(ids, validate=False), fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_training_step_under_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, labels=x)
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad is not None


def test_cached_forward_under_bf16_autocast():
    # the default cache is in the dtype keys and values come in (bf16 here), so a decode step
    # after a prefill runs, and its logits are those of the full forward under autocast
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, n_positions=40, n_embd=32, n_layer=2, n_head=2)).eval()
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.setup_cache(2, 40)
        assert cache.k[0].dtype == torch.bfloat16
        model(x[:, :8], cache=cache)
        step = model(x[:, 8:], cache=cache)[:, -1].float()
        full = model(x)[:, -1].float()
    assert model.setup_cache(2, 40).k[0].dtype == torch.float32  # outside autocast: the weights' dtype
    assert torch.allclose(step, full, atol=0.1, rtol=0.05), (step - full).abs().max()


def test_resize_token_embeddings_keeps_rows_and_tie():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    before = model.transformer.wte.weight.detach().clone()
    model.resize_token_embeddings(53)
    w = model.transformer.wte.weight
    assert model.config.vocab_size == 53 and w.shape == (53, 16) and model.lm_head.weight is w
    assert torch.equal(w[:50], before) and 0.005 < w[50:].std() < 0.05  # new rows drawn as at init
    assert model(torch.tensor([[52, 1]])).shape == (1, 2, 53)
    model.resize_token_embeddings(40)
    assert torch.equal(model.transformer.wte.weight, before[:40]) and model.lm_head.weight.shape == (40, 16)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        model.resize_token_embeddings(0)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_gradient_checkpointing_same_gradients_fewer_saved_activations(pre_ln):
    """Checkpointed blocks give the same loss and gradients (dropout masks included: the RNG
    state is replayed) while autograd keeps far fewer bytes for the backward pass."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, n_positions=64, n_embd=64, n_layer=4, n_head=4, pre_ln=pre_ln,
                       resid_pdrop=0.1, embd_pdrop=0.1)
    model = GPT(config).train()
    x, y = torch.randint(0, 101, (2, 48)), torch.randint(0, 101, (2, 48))
    results, saved = [], []
    for enable in (False, True):
        model.gradient_checkpointing_enable(enable)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, targets=y)
        results.append([loss] + list(torch.autograd.grad(loss, list(model.parameters()))))
        saved.append(total[0])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert saved[1] < saved[0] / 2, saved
    model.eval()
    with torch.no_grad():  # generation and evaluation never recompute
        assert model(x).shape == (2, 48, 101)


@pytest.mark.gpu
def test_gradient_checkpointing_through_the_kernels_on_cuda():
    """Recomputed blocks run the Triton kernels again in the backward pass: the same gradients."""
    import gptfast

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, n_positions=256, n_embd=256, n_layer=4, n_head=4)).cuda().train()
    x, y = torch.randint(0, 1000, (4, 200), device="cuda"), torch.randint(0, 1000, (4, 200), device="cuda")
    grads = []
    with gptfast.use_backend("kernel"), torch.autocast("cuda", dtype=torch.bfloat16):
        for enable in (False, True):
            model.gradient_checkpointing_enable(enable)
            loss = model(x, targets=y)
            grads.append([loss] + list(torch.autograd.grad(loss, list(model.parameters()))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


# ---- scale_attn_weights=False (HF GPT-2: unscaled attention scores) -----------------------

@pytest.fixture
def unscaled(tmp_path):
    """A transformers GPT-2 with scale_attn_weights=False (weights x3: the scale matters) and gptfast's copy."""
    hf = make_hf_gpt2(tmp_path, vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                      scale_attn_weights=False)
    return hf, GPT.from_pretrained(str(tmp_path)), tmp_path


def test_scale_attn_weights_false_logits_match_transformers(unscaled):
    hf, model, path = unscaled
    assert model.config.scale_attn_weights is False and model.config.attn_scale == 1.0
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        expected = hf(x).logits
        assert (model(x) - expected).abs().max().item() <= 1e-4
        assert (GPT.from_pretrained(hf)(x) - expected).abs().max().item() <= 1e-4  # the in-memory conversion too
        scaled = GPT(GPTConfig(**{**model.config.to_dict(), "scale_attn_weights": True}))
        scaled.load_state_dict(model.state_dict())
        assert (scaled(x) - expected).abs().max().item() > 0.1  # the flag is what makes them agree


def test_scale_attn_weights_false_greedy_generation_matches_transformers(unscaled):
    """Prefill and decode over the KV cache (and the speculative verify pass) all leave the scores unscaled."""
    from gptfast import PromptLookup

    hf, model, _ = unscaled
    x = torch.randint(0, 512, (1, 9))
    expected = hf.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, max_new_tokens=30, temperature=0), expected)
    assert torch.equal(model.generate(x, max_new_tokens=30, temperature=0, draft_model=PromptLookup()), expected)
    draft = GPT.from_pretrained(hf)
    assert torch.equal(model.generate(x, max_new_tokens=30, temperature=0, draft_model=draft), expected)


def test_scale_attn_weights_false_survives_save_pretrained(unscaled, tmp_path):
    import json

    from transformers import GPT2LMHeadModel

    hf, model, _ = unscaled
    out = tmp_path / "saved"
    model.save_pretrained(str(out))
    assert json.loads((out / "config.json").read_text())["scale_attn_weights"] is False
    again = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    assert again.config.scale_attn_weights is False
    x = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max().item() <= 1e-4
        assert torch.equal(GPT.from_pretrained(str(out))(x), model(x))


def test_gpt1_always_scales_attention():
    # transformers' OpenAIGPT scales its scores whatever the config says
    cfg = GPTConfig.from_hf_dict({"model_type": "openai-gpt", "scale_attn_weights": False, "n_embd": 32,
                                  "n_head": 4, "n_inner": 100})
    assert cfg.scale_attn_weights is True and cfg.n_inner == 128  # OpenAIGPT has no n_inner either
    gpt1 = GPTConfig.from_preset("openai-gpt", scale_attn_weights=False)
    with pytest.raises(ValueError, match="OpenAIGPT always scales attention"):
        gpt1.to_hf_dict()
    with pytest.raises(ValueError, match="scale_attn_weights must be a bool, got 0"):
        GPTConfig(scale_attn_weights=0)
    with pytest.raises(ValueError, match="scale_attn_weights must be true or false, got 'no'"):
        GPTConfig.from_hf_dict({"model_type": "gpt2", "scale_attn_weights": "no"})


def test_each_model_type_reads_its_own_activation_key(tmp_path):
    """GPT2 ignores "afn" (OpenAIGPT's key) and OpenAIGPT ignores "activation_function": a stray key
    must not switch gptfast to another GELU than transformers runs."""
    hf = make_hf_gpt2(tmp_path, afn="gelu")  # transformers still runs gelu_new
    model = GPT.from_pretrained(str(tmp_path))
    assert model.config.activation == "gelu_tanh"
    x = torch.randint(0, 1001, (2, 30))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        GPTConfig.from_hf_dict({"model_type": "openai-gpt", "afn": "relu", "activation_function": "gelu"})


def test_save_pretrained_format_argument(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"format must be one of \('hf', 'nanogpt', 'auto'\), got 'onnx'"):
        model.save_pretrained(str(tmp_path / "x"), format="onnx")
    assert not (tmp_path / "x").exists()
    model.save_pretrained(str(tmp_path / "auto"), format="auto")  # an HF equivalent exists: HF files
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["config.json", "model.safetensors"]
