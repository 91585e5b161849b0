"""Helpers that build real Hugging Face checkpoints from a random init (no downloads)."""
import torch


def make_hf_gpt2(path, vocab_size=1001, n_positions=77, n_embd=64, n_layer=2, n_head=8, seed=0,
                 safe_serialization=True, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=None, eos_token_id=None, **kw)
    model = GPT2LMHeadModel(cfg).eval()
    _perturb(model)
    save_hf(model, path, safe_serialization)
    return model


def make_hf_gpt1(path, vocab_size=1003, n_positions=50, n_embd=48, n_layer=2, n_head=4, seed=0,
                 safe_serialization=True):
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(seed)
    cfg = OpenAIGPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head)
    model = OpenAIGPTLMHeadModel(cfg).eval()
    _perturb(model)
    save_hf(model, path, safe_serialization)
    return model


def save_hf(model, path, safe_serialization=True, max_shard_size=None):
    """save_pretrained, plus the legacy pytorch_model.bin layout (transformers >= 5 only
    writes safetensors; older versions and many hub checkpoints use .bin, sharded or not)."""
    import json
    import os

    if safe_serialization:
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kw)
        return
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if max_shard_size is None:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
        return
    keys = sorted(state)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: state[k] for k in names}, os.path.join(path, fname))
        weight_map.update({k: fname for k in names})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _perturb(model):
    """HF inits LayerNorm to (1, 0) and biases to 0: randomize them so a transposed or
    swapped tensor cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(3.0)


def make_gpt2_tokenizer_files(directory, text, vocab_size=300):
    """A real GPT-2-format tokenizer (vocab.json + merges.txt), trained on `text`."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator([text], vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(directory))


def make_hf_classifier(path, gpt1=False, num_labels=3, pad_token_id=1000, seed=0, **shape):
    """A transformers GPT2ForSequenceClassification (or OpenAIGPTForSequenceClassification) from
    a random init, LayerNorms and biases perturbed, saved with save_pretrained."""
    from transformers import (GPT2Config, GPT2ForSequenceClassification, OpenAIGPTConfig,
                              OpenAIGPTForSequenceClassification)

    torch.manual_seed(seed)
    dims = dict(vocab_size=1001, n_positions=77, n_embd=64, n_layer=2, n_head=8, **shape)
    labels = {"id2label": {i: f"class-{i}" for i in range(num_labels)},
              "label2id": {f"class-{i}": i for i in range(num_labels)}}
    if gpt1:
        model = OpenAIGPTForSequenceClassification(OpenAIGPTConfig(pad_token_id=pad_token_id, **labels, **dims))
    else:
        model = GPT2ForSequenceClassification(GPT2Config(pad_token_id=pad_token_id, bos_token_id=None,
                                                         eos_token_id=None, **labels, **dims))
    model.eval()
    _perturb(model)
    model.save_pretrained(path)
    return model


def assert_same_weights(got: dict, want: dict, what: str = "", rtol: float = 1e-5, atol: float = 1e-6,
                        key_bias_atol: float = 1e-5):
    """Two state dicts trained on the same rows in other micro-batchings: equal up to the order of
    the float sums. The attention's key bias adds a constant to each row of scores, so its gradient
    is zero up to rounding, which AdamW scales into steps of up to lr: that slice is held only to
    key_bias_atol (about lr x steps)."""
    for k in want:
        a, b = got[k], want[k]
        if k.endswith("attn.c_attn.bias"):
            n = a.numel() // 3
            torch.testing.assert_close(a[n:2 * n], b[n:2 * n], rtol=0, atol=key_bias_atol, msg=f"{k} {what}")
            a, b = torch.cat([a[:n], a[2 * n:]]), torch.cat([b[:n], b[2 * n:]])
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{k} {what}")
