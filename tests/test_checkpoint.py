"""Checkpoint formats and the errors a user sees for missing or corrupt files."""
import json
import os

import pytest
import torch

from gptfast import GPT, GPTConfig
from gptfast.checkpoint import CheckpointError, atomic_torch_save

from hf_utils import make_hf_gpt2, save_hf


def _x(vocab=1001):
    return torch.randint(0, vocab, (2, 21))


def test_sharded_safetensors(tmp_path):
    hf = make_hf_gpt2(tmp_path / "full")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    names = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    model = GPT.from_pretrained(str(tmp_path / "sharded"))
    x = _x()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4


def test_sharded_bin(tmp_path):
    hf = make_hf_gpt2(tmp_path / "full")
    os.makedirs(tmp_path / "sharded")
    save_hf(hf, str(tmp_path / "sharded"), safe_serialization=False, max_shard_size="100KB")
    assert "pytorch_model.bin.index.json" in os.listdir(tmp_path / "sharded")
    model = GPT.from_pretrained(str(tmp_path / "sharded"))
    x = _x()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4


def _nanogpt_checkpoint(path, bias=True):
    """A checkpoint in nanoGPT's train.py format, built from a gptfast model's weights."""
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=211, n_positions=24, n_embd=32, n_layer=2, n_head=4, bias=bias, activation="gelu")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    state["_orig_mod.lm_head.weight"] = model.lm_head.weight
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, bias=bias, vocab_size=211, dropout=0.0)
    torch.save({"model": state, "model_args": args, "iter_num": 5, "best_val_loss": torch.tensor(2.5),
                "config": {"dataset": "shakespeare"}}, path)
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint(tmp_path, bias):
    ref = _nanogpt_checkpoint(tmp_path / "ckpt.pt", bias=bias)
    for target in (tmp_path, tmp_path / "ckpt.pt"):
        model = GPT.from_pretrained(str(target))
        assert model.config.activation == "gelu" and model.config.bias == bias
        x = torch.randint(0, 211, (2, 24))
        with torch.no_grad():
            assert torch.allclose(model(x), ref(x), atol=1e-6)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT.from_pretrained("/nonexistent/dir/model")


def test_hub_name_without_network_says_so(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*no network"):
        GPT.from_pretrained("gptfast-test/no-such-model")


def test_missing_weights_file(tmp_path):
    make_hf_gpt2(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights in .*expected one of model.safetensors"):
        GPT.from_pretrained(str(tmp_path))


def test_missing_config(tmp_path):
    make_hf_gpt2(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither config.json"):
        GPT.from_pretrained(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    make_hf_gpt2(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="corrupt"):
        GPT.from_pretrained(str(tmp_path))


def test_corrupt_bin(tmp_path):
    make_hf_gpt2(tmp_path, safe_serialization=False)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        f.write(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        GPT.from_pretrained(str(tmp_path))


def test_corrupt_config(tmp_path):
    make_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        GPT.from_pretrained(str(tmp_path))


def test_weights_do_not_match_config(tmp_path):
    make_hf_gpt2(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing \['transformer.h.2"):
        GPT.from_pretrained(str(tmp_path))
    cfg["n_layer"], cfg["n_embd"], cfg["n_head"] = 2, 32, 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"transformer\.\S+ has shape \(\d+(, \d+)?,?\), config expects"):
        GPT.from_pretrained(str(tmp_path))


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""
    make_hf_gpt2(tmp_path, safe_serialization=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"transformer.wte.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="corrupt"):
        GPT.from_pretrained(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, str(target))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"a": Unpicklable()}, str(target))
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["state.pt"]  # no temporary file left behind


def test_transformers_model_objects_convert_in_memory(tmp_path):
    """A model already loaded with transformers converts without files: same logits."""
    from transformers import GPT2Model

    from hf_utils import make_hf_gpt1

    gpt2 = make_hf_gpt2(tmp_path / "a")
    gpt1 = make_hf_gpt1(tmp_path / "b")
    x = _x(1001)
    with torch.no_grad():
        assert (GPT.from_pretrained(gpt2)(x) - gpt2(x).logits).abs().max() <= 1e-4
        assert (GPT.from_pretrained(gpt1)(x) - gpt1(x).logits).abs().max() <= 1e-5
        body = GPT2Model.from_pretrained(str(tmp_path / "a")).eval()  # no LM head: keys without "transformer."
        assert (GPT.from_pretrained(body).hidden_states(x) - body(x).last_hidden_state).abs().max() <= 1e-4
    converted = GPT.from_pretrained(gpt2)
    gpt2.transformer.h[0].mlp.c_fc.weight.data.zero_()  # a copy, not shared storage
    assert converted.transformer.h[0].mlp.c_fc.weight.abs().sum() > 0
    with pytest.raises(TypeError, match="expected a transformers GPT-2 / GPT-1 model, got a Linear"):
        GPT.from_pretrained(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a checkpoint path or a transformers model, got int"):
        GPT.from_pretrained(3)
