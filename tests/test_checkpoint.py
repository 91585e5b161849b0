"""Checkpoint formats and the errors a user sees for missing or corrupt files."""
import json
import logging
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


def _nanogpt_checkpoint(path, bias=True, dropout=0.0):
    """A checkpoint in nanoGPT's train.py format, built from a gptfast model's weights."""
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=211, n_positions=24, n_embd=32, n_layer=2, n_head=4, bias=bias, activation="gelu")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    state["_orig_mod.lm_head.weight"] = model.lm_head.weight
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, bias=bias, vocab_size=211, dropout=dropout)
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


def test_nanogpt_dropout_is_its_one_rate_everywhere(tmp_path):
    """nanoGPT's model_args["dropout"] drops out its embeddings, attention weights and residuals:
    `gptfast train --init ckpt.pt` trains with it, as nanoGPT's own resume does."""
    _nanogpt_checkpoint(tmp_path / "ckpt.pt", dropout=0.15)
    cfg = GPT.from_pretrained(str(tmp_path / "ckpt.pt")).config
    assert (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) == (0.15, 0.15, 0.15)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="not found"):
        GPT.from_pretrained("/nonexistent/dir/model")


def test_hub_name_without_network_says_so(monkeypatch, caplog):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="gptfast"), \
            pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*no network"):
        GPT.from_pretrained("gptfast-test/no-such-model")
    assert "looking it up on the Hub" not in caplog.text  # offline: no lookup to announce


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


# ---- saving: checks before writes, crash safety, models with no HF equivalent ---------------

def _logits(path_or_model, x):
    model = path_or_model if isinstance(path_or_model, GPT) else GPT.from_pretrained(str(path_or_model))
    with torch.no_grad():
        return model(x)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_save_pretrained_without_hf_equivalent_writes_nothing(tmp_path):
    """bias=False has no HF GPT-2: save_pretrained fails before it touches the directory."""
    make_hf_gpt2(tmp_path / "over")
    before = _snapshot(tmp_path / "over")
    x = _x()
    old = _logits(tmp_path / "over", x)
    _nanogpt_checkpoint(tmp_path / "nobias.pt", bias=False)
    model = GPT.from_pretrained(str(tmp_path / "nobias.pt"))
    for target in ("over", "fresh"):
        with pytest.raises(ValueError, match=r"bias=False .*no Hugging Face GPT-2 equivalent.*format=\"nanogpt\""):
            model.save_pretrained(str(tmp_path / target))
    assert _snapshot(tmp_path / "over") == before and torch.equal(_logits(tmp_path / "over", x), old)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("target", ["dir", "file", "auto"])
def test_nanogpt_format_round_trips_any_config(tmp_path, target):
    """save_pretrained(format="nanogpt") writes a ckpt.pt that from_pretrained loads to the same model:
    bias=False, and configs nanoGPT's model_args cannot express (kept whole in "gptfast_config")."""
    ref = _nanogpt_checkpoint(tmp_path / "nobias.pt", bias=False)
    gpt1 = GPT(GPTConfig.from_preset("openai-gpt", vocab_size=211, n_positions=24, n_embd=32, n_layer=2,
                                     n_head=4, scale_attn_weights=False, layer_norm_epsilon=1e-6)).eval()
    for i, model in enumerate((GPT.from_pretrained(str(tmp_path / "nobias.pt")), gpt1)):
        out = tmp_path / f"out{i}"
        path = {"dir": str(out), "file": str(out / "model.pt"), "auto": str(out)}[target]
        model.save_pretrained(path, **({"format": "auto"} if target == "auto" else {"format": "nanogpt"}))
        assert sorted(p.name for p in out.iterdir()) == (["model.pt"] if target == "file" else ["ckpt.pt"])
        again = GPT.from_pretrained(path)
        assert again.config == model.config
        x = torch.randint(0, 211, (2, 24))
        assert torch.equal(_logits(again, x), _logits(model, x))
        if i == 0:
            assert torch.allclose(_logits(again, x), _logits(ref, x), atol=1e-6)
            ckpt = torch.load(os.path.join(out, "model.pt" if target == "file" else "ckpt.pt"), weights_only=True)
            # what nanoGPT's own loader reads: its model_args and a state dict with the tied lm_head
            assert ckpt["model_args"] == dict(n_layer=2, n_head=4, n_embd=32, block_size=24, bias=False,
                                              vocab_size=211, dropout=0.0)
            assert "lm_head.weight" in ckpt["model"] and "transformer.h.0.attn.c_attn.weight" in ckpt["model"]


def test_nanogpt_format_refuses_a_directory_with_an_hf_checkpoint(tmp_path):
    """config.json wins over ckpt.pt on load: a ckpt.pt beside it would never be read."""
    make_hf_gpt2(tmp_path)
    before = _snapshot(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="holds a Hugging Face checkpoint .*config.json"):
        model.save_pretrained(str(tmp_path), format="nanogpt")
    assert _snapshot(tmp_path) == before


def test_nanogpt_checkpoint_with_conflicting_gptfast_config(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bias=False)).save_pretrained(
        str(tmp_path), format="nanogpt")
    obj = torch.load(ckpt, weights_only=True)
    obj["model_args"]["n_layer"] = 3
    torch.save(obj, ckpt)
    with pytest.raises(CheckpointError, match=r"gptfast_config and model_args disagree on \['n_layer'\]"):
        GPT.from_pretrained(str(tmp_path))


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_interrupted_save_never_loads_new_weights_under_the_old_config(tmp_path, monkeypatch, safe):
    """A save killed before any of its file operations leaves a directory that loads the old model,
    the new one, or not at all (CheckpointError): never the new weights under the old config.json.
    The new model has the old shapes but another function (scale_attn_weights flips), so a
    mismatched pair would load without complaint."""
    import shutil

    from gptfast import checkpoint

    make_hf_gpt2(tmp_path / "orig")
    x = _x()
    old = _logits(tmp_path / "orig", x)
    new_model = GPT(GPTConfig(**{**GPT.from_pretrained(str(tmp_path / "orig")).config.to_dict(),
                                 "scale_attn_weights": False})).eval()
    new = _logits(new_model, x)
    real_write, real_unlink = checkpoint._atomic_write, checkpoint._unlink
    step = 0
    while True:
        target = tmp_path / f"crash{step}"
        shutil.copytree(tmp_path / "orig", target)
        calls = [0]

        def crash_at(real, calls=calls, step=step):
            def op(*args, **kwargs):
                if calls[0] == step:
                    raise _Crash()
                calls[0] += 1
                return real(*args, **kwargs)
            return op

        monkeypatch.setattr(checkpoint, "_atomic_write", crash_at(real_write))
        monkeypatch.setattr(checkpoint, "_unlink", crash_at(real_unlink))
        try:
            new_model.save_pretrained(str(target), safe_serialization=safe)
            finished = True
        except _Crash:
            finished = False
        monkeypatch.setattr(checkpoint, "_atomic_write", real_write)
        monkeypatch.setattr(checkpoint, "_unlink", real_unlink)
        try:
            got = _logits(target, x)
        except CheckpointError as exc:
            assert not finished and "has neither config.json" in str(exc)
        else:
            assert torch.equal(got, new) if finished else (torch.equal(got, old) or torch.equal(got, new)), step
        if finished:
            break
        step += 1
    assert step >= 3  # config.json removed, weights written, config.json written (+ stale files removed)


def test_save_pretrained_removes_stale_weights_that_would_shadow_it(tmp_path):
    """A sharded safetensors checkpoint (index + shards) is read before pytorch_model.bin: saving
    .bin over it must remove them, or the old weights load under the new config."""
    hf = make_hf_gpt2(tmp_path / "full")
    hf.save_pretrained(tmp_path / "dir", max_shard_size="100KB")
    torch.manual_seed(5)
    model = GPT(GPT.from_pretrained(str(tmp_path / "dir")).config).eval()
    model.save_pretrained(str(tmp_path / "dir"), safe_serialization=False)
    names = sorted(p.name for p in (tmp_path / "dir").iterdir())
    assert not [n for n in names if n.endswith(".safetensors") or n.endswith(".index.json")], names
    x = _x()
    assert torch.equal(_logits(tmp_path / "dir", x), _logits(model, x))
    model.save_pretrained(str(tmp_path / "dir"))  # and back: the .bin goes
    assert "pytorch_model.bin" not in os.listdir(tmp_path / "dir")
    assert torch.equal(_logits(tmp_path / "dir", x), _logits(model, x))


def test_save_pretrained_into_a_file_path(tmp_path):
    (tmp_path / "f").write_text("x")
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(NotADirectoryError, match="path .*f is a file; expected a directory"):
        model.save_pretrained(str(tmp_path / "f"))


# ---- paths that are not checkpoints: one message for every command ------------------------

def _not_a_checkpoint(path):
    """The messages of loading (generate, finetune, ...) and of describe (gptfast info): the same."""
    from gptfast.checkpoint import describe

    messages = []
    for load in (GPT.from_pretrained, describe):
        with pytest.raises(CheckpointError) as info:
            load(str(path))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "a checkpoint directory holds config.json with model.safetensors or pytorch_model.bin" in messages[0]
    return messages[0]


def test_empty_directory_is_not_a_checkpoint(tmp_path):
    msg = _not_a_checkpoint(tmp_path)
    assert "neither config.json (Hugging Face) nor ckpt.pt (nanoGPT): the directory is empty" in msg
    assert "weights file not found" not in msg


def test_prepared_token_folder_is_not_a_checkpoint(tmp_path):
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        (tmp_path / name).write_bytes(b"\0\0")
    msg = _not_a_checkpoint(tmp_path)
    assert "it holds meta.json, tokenizer.json, train.bin, val.bin: prepared token files" in msg
    assert "not a model" in msg
    assert "prepared token ids" in _not_a_checkpoint(tmp_path / "train.bin")


def test_weights_without_config_say_so(tmp_path):
    make_hf_gpt2(tmp_path)
    os.remove(tmp_path / "config.json")
    msg = _not_a_checkpoint(tmp_path)
    assert "it holds generation_config.json, model.safetensors: weights without their config.json" in msg
    assert "pass the directory that holds it" in _not_a_checkpoint(tmp_path / "model.safetensors")


def test_describe_nanogpt_directory(tmp_path):
    from gptfast.checkpoint import describe

    _nanogpt_checkpoint(tmp_path / "ckpt.pt", bias=False)
    info = describe(str(tmp_path))
    assert info["path"] == str(tmp_path) and info["files"] == ["ckpt.pt"] and info["config"]["bias"] is False
