"""The model layer against transformers on odd configs: training-mode dropout, config fields
transformers honours or ignores, the loss arguments, init, and the errors a user meets."""
import json
import math

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.ops import _dispatch

from hf_utils import make_hf_gpt1, make_hf_gpt2

ODD = dict(vocab_size=37, n_positions=19, n_embd=48, n_layer=3, n_head=3)  # head dim 16, 3 heads


def _hf_grads(hf, model):
    """transformers' gradient of each gptfast parameter, in gptfast's layout (Conv1D transposed)."""
    hf_params = dict(hf.named_parameters())
    out = {}
    for name, _ in model.named_parameters():
        hf_name = name
        if type(hf).__name__.startswith("OpenAI"):
            hf_name = name.replace(".wte.", ".tokens_embed.").replace(".wpe.", ".positions_embed.")
        g = hf_params[hf_name].grad
        out[name] = g.t() if g.dim() == 2 and ".wte." not in name and ".wpe." not in name else g
    return out


def _assert_same_training_step(hf, model, x, labels, seed):
    """Logits, loss and every gradient equal transformers', both drawing from the same RNG state."""
    torch.manual_seed(seed)
    want = hf(x, labels=labels)
    want.loss.backward()
    torch.manual_seed(seed)
    logits, loss = model(x, labels=labels)
    loss.backward()
    assert (logits - want.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - want.loss.item()) <= 1e-5
    for name, g_hf in _hf_grads(hf, model).items():
        g = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(g, g_hf, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_training_mode_dropout_matches_transformers(tmp_path, family, caplog):
    """attn_pdrop was read and then ignored: a transformers checkpoint (attn_pdrop 0.1 in every hub
    GPT-2 / GPT-1) trained without dropout on its attention weights. Same RNG state, same masks now."""
    if family == "gpt2":
        hf = make_hf_gpt2(tmp_path, **ODD, resid_pdrop=0.2, embd_pdrop=0.15, attn_pdrop=0.3)
    else:
        hf = make_hf_gpt1(tmp_path, **ODD)  # OpenAIGPTConfig's dropouts: 0.1 each
    model = GPT.from_pretrained(str(tmp_path))
    assert model.config.attn_pdrop == hf.config.attn_pdrop > 0
    hf.train()
    model.train()
    x = torch.randint(0, ODD["vocab_size"], (3, ODD["n_positions"]))
    labels = x.clone()
    labels[0, :5] = -100
    with caplog.at_level("WARNING", logger="gptfast"), _dispatch.fallbacks_logged() as lines:
        _assert_same_training_step(hf, model, x, labels, seed=7)
    assert any(f"attention dropout p={hf.config.attn_pdrop}" in line for line in lines), lines
    # with the attention dropout off the same draw gives other logits: the masks above are that dropout's
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.0
    torch.manual_seed(7)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() > 1e-2


def test_eval_mode_parity_every_gradient_odd_config(tmp_path):
    """Eval mode, GPT-2 with a custom n_inner, epsilon and unscaled scores, and GPT-1: logits, loss
    (labels and targets) and every parameter's gradient equal transformers'."""
    for i, (make, kw) in enumerate([(make_hf_gpt2, dict(n_inner=70, layer_norm_epsilon=1e-3)),
                                    (make_hf_gpt2, dict(scale_attn_weights=False, activation_function="gelu")),
                                    (make_hf_gpt1, {})]):
        path = tmp_path / str(i)
        hf = make(path, **ODD, **kw, seed=i)
        model = GPT.from_pretrained(str(path))
        x = torch.randint(0, ODD["vocab_size"], (2, ODD["n_positions"]))
        labels = x.clone()
        labels[1, 3:9] = -100
        _assert_same_training_step(hf, model, x, labels, seed=0)
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
        with torch.no_grad():
            assert abs(model(x, targets=targets).item() - hf(x, labels=labels).loss.item()) <= 1e-5


def test_gradient_checkpointing_replays_attention_dropout():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ODD, attn_pdrop=0.3)).train()
    x, y = torch.randint(0, 37, (2, 19)), torch.randint(0, 37, (2, 19))
    results = []
    for enable in (False, True):
        model.gradient_checkpointing_enable(enable)
        torch.manual_seed(3)
        loss = model(x, targets=y)
        results.append([loss] + list(torch.autograd.grad(loss, list(model.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_legacy_transformers_config_keys_load(tmp_path):
    """distilgpt2's "_num_labels", transformers 4.x's "gradient_checkpointing" and "output_past" and
    PretrainedConfig's generation settings: transformers loads such a config.json unchanged, and so
    must gptfast (they were refused as unknown fields)."""
    from transformers import GPT2LMHeadModel

    hf = make_hf_gpt2(tmp_path, **ODD)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update({"_num_labels": 1, "gradient_checkpointing": False, "output_past": True, "torchscript": False,
                "use_bfloat16": False, "num_beams": 1, "bad_words_ids": None, "repetition_penalty": 1.0,
                "pruned_heads": {}})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    model = GPT.from_pretrained(str(tmp_path))
    x = torch.randint(0, 37, (2, 19))
    with torch.no_grad():
        assert torch.equal(again(x).logits, hf(x).logits)
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match=r"pruned_heads=\{'0': \[1\]\} is not supported"):
        GPTConfig.from_hf_dict({**raw, "pruned_heads": {"0": [1]}})
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_experts'\]"):
        GPTConfig.from_hf_dict({**raw, "n_experts": 4})  # still strict on fields nobody knows


def test_missing_dropout_keys_take_transformers_defaults():
    """A config.json without the dropout keys trains with transformers' defaults (0.1), not none."""
    from transformers import GPT2Config, OpenAIGPTConfig

    for model_type, cls in (("gpt2", GPT2Config), ("openai-gpt", OpenAIGPTConfig)):
        cfg = GPTConfig.from_hf_dict({"model_type": model_type, "n_embd": 48, "n_head": 3})
        want = cls()
        assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == \
            (want.resid_pdrop, want.embd_pdrop, want.attn_pdrop), model_type


@pytest.mark.parametrize("act", ["gelu_accurate", "gelu_python"])
def test_more_transformers_gelu_names(tmp_path, act):
    """transformers' other names of the two GELUs (were refused as unsupported activations)."""
    hf = make_hf_gpt2(tmp_path, **ODD, activation_function=act)
    model = GPT.from_pretrained(str(tmp_path))
    assert model.config.activation == ("gelu_tanh" if act == "gelu_accurate" else "gelu")
    x = torch.randint(0, 37, (2, 19))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    # OpenAIGPT's afn table knows "gelu" alone (transformers cannot build the model with another GELU name)
    with pytest.raises(ValueError, match=rf"activation '{act}' is not supported; expected one of \['gelu'\]"):
        GPTConfig.from_hf_dict({"model_type": "openai-gpt", "afn": act})


def test_gpt1_init_is_plain_normal():
    """GPT-1 (post-LN) draws every weight from N(0, 0.02), as transformers' OpenAIGPT does; only
    GPT-2 scales its residual projections by 1/sqrt(2 * n_layer)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=301, n_positions=23, n_embd=96, n_layer=8, n_head=3)
    gpt1 = GPT(GPTConfig.from_preset("openai-gpt", **shape))
    gpt2 = GPT(GPTConfig(**shape))
    for model, std in ((gpt1, 0.02), (gpt2, 0.02 / math.sqrt(16))):
        for block in model.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                assert abs(w.std().item() - std) < 0.1 * std, (model.config.pre_ln, w.std().item())
        assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_conflicting_loss_arguments_are_refused():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ODD)).eval()
    x = torch.randint(0, 37, (2, 11))
    with pytest.raises(ValueError, match="pass labels .* or targets .*, not both"):
        model(x, labels=x, targets=x)  # targets won and labels were dropped
    with pytest.raises(ValueError, match="logits_index cannot be combined with labels or targets"):
        model(x, labels=x, logits_index=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="logits_index cannot be combined with labels or targets"):
        model(x, targets=x, logits_index=torch.tensor([3, 4]))


def test_int32_labels_as_int64():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ODD)).eval()
    x = torch.randint(0, 37, (2, 11))
    labels = x.clone()
    labels[0, 2] = -100
    with torch.no_grad():
        assert torch.equal(model(x, labels=labels.int())[1], model(x, labels=labels)[1])


@pytest.mark.parametrize("field,value", [("n_inner", 0), ("n_inner", -3), ("n_inner", 10.5), ("bias", "no"),
                                         ("pre_ln", 0), ("final_ln", None), ("layer_norm_epsilon", "1e-5"),
                                         ("resid_pdrop", "0.1")])
def test_config_field_types(field, value):
    """Each was accepted (n_inner=0: an MLP of width 0; bias="no": biases) or failed deep in torch."""
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be .*, got {value!r}".replace("(", r"\(")):
        GPTConfig(**ODD, **{field: value})


def test_context_errors_name_their_limit():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ODD)).eval()
    with pytest.raises(ValueError, match=r"20 tokens exceeds the context of 19 positions \(n_positions=19\)"):
        model(torch.zeros(1, 20, dtype=torch.long))
    cache = model.setup_cache(1, 8)
    with pytest.raises(ValueError, match=r"9 tokens exceeds the context of 8 positions \(the KV cache's "
                                         r"max_seq_len=8\)"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
