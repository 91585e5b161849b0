"""GPT.from_pretrained on what users have: every transformers GPT-2 / GPT-1 class, task heads,
LM heads stored tied or untied, dtypes, shards, nanoGPT's layout, the hub cache. Logits are
compared against transformers itself."""
import json
import logging
import os
import re
import shutil

import pytest
import torch

from gptfast import GPT
from gptfast.checkpoint import CheckpointError

from hf_utils import _perturb, make_hf_gpt2

SHAPE = dict(vocab_size=997, n_positions=41, n_embd=48, n_layer=2, n_head=4)


def _ids(vocab=997):
    return torch.randint(0, vocab, (3, 29))


def _hf(cls_name, **kw):
    import transformers

    cls = getattr(transformers, cls_name)
    if cls_name.startswith("OpenAIGPT"):
        config = transformers.OpenAIGPTConfig(**SHAPE, **kw)
    else:
        config = transformers.GPT2Config(**SHAPE, bos_token_id=None, eos_token_id=None, **kw)
    model = cls(config).eval()
    _perturb(model)
    return model


def _base(hf):
    return getattr(hf, "transformer", hf)


CLASSES = [("GPT2LMHeadModel", None), ("GPT2Model", None), ("GPT2DoubleHeadsModel", "multiple_choice_head"),
           ("GPT2ForSequenceClassification", "score"), ("GPT2ForTokenClassification", "classifier"),
           ("GPT2ForQuestionAnswering", "qa_outputs"), ("OpenAIGPTLMHeadModel", None), ("OpenAIGPTModel", None),
           ("OpenAIGPTDoubleHeadsModel", "multiple_choice_head")]


@pytest.mark.parametrize("source", ["dir", "object"])
@pytest.mark.parametrize("cls_name,head", CLASSES, ids=[c for c, _ in CLASSES])
def test_every_transformers_class_loads_its_language_model(tmp_path, caplog, cls_name, head, source):
    """The body (and the tied LM head) of each class gives transformers' hidden states and LM
    logits; a task head is ignored with a warning naming it (it raised 'unexpected
    transformer.multiple_choice_head...', and OpenAIGPTDoubleHeadsModel's tied pair, which
    transformers 5 saves as lm_head.weight alone, 'missing transformer.wte.weight')."""
    kw = {"pad_token_id": 5} if cls_name.endswith("SequenceClassification") else {}
    hf = _hf(cls_name, **kw)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        model = GPT.from_pretrained(hf if source == "object" else str(tmp_path))
    notes = [r.getMessage() for r in caplog.records if "task head" in r.getMessage()]
    if head is None:
        assert notes == []
    else:
        assert len(notes) == 1 and f"ignoring the checkpoint's task head {head}.*" in notes[0], notes
        assert cls_name in notes[0] or source == "object"
    x = _ids()
    with torch.no_grad():
        want = _base(hf)(x).last_hidden_state
        torch.testing.assert_close(model.hidden_states(x), want, rtol=0, atol=1e-4)
        if hasattr(hf, "lm_head"):
            torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


def _write_bin(directory, config, state):
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    torch.save({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "pytorch_model.bin"))


def test_untied_lm_head_is_refused_never_tied(tmp_path):
    """A file whose lm_head.weight differs from wte under a config that does not say
    tie_word_embeddings=False: transformers 5 keeps that head untied; gptfast loaded it tied (other
    logits, silently). The same for a model object whose head was untied, and a nanoGPT ckpt.pt."""
    hf = _hf("GPT2LMHeadModel", tie_word_embeddings=False)
    state = dict(hf.state_dict())
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    config = hf.config
    config.tie_word_embeddings = True
    _write_bin(tmp_path / "bin", config, state)
    with pytest.raises(CheckpointError, match=r"bin: lm_head.weight differs from the token embedding "
                                              r"transformer.wte.weight \(max abs difference .*untied LM head"):
        GPT.from_pretrained(str(tmp_path / "bin"))

    tied = _hf("GPT2LMHeadModel")
    tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach() * 1.5)
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel: lm_head.weight differs"):
        GPT.from_pretrained(tied)

    model = GPT.from_pretrained(_hf("GPT2LMHeadModel"))
    model.save_pretrained(str(tmp_path / "nano"), format="nanogpt")
    ckpt = torch.load(tmp_path / "nano" / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"] = ckpt["model"]["lm_head.weight"] + 0.25
    torch.save(ckpt, tmp_path / "nano" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="ckpt.pt: lm_head.weight differs"):
        GPT.from_pretrained(str(tmp_path / "nano"))

    state["lm_head.weight"] = state["lm_head.weight"][:-1]
    _write_bin(tmp_path / "shape", config, state)
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \(996, 48\), but the LM head is tied"):
        GPT.from_pretrained(str(tmp_path / "shape"))


def test_tied_pair_stored_once_under_either_name(tmp_path):
    """A tied checkpoint may hold the pair as wte only (safetensors), both (.bin), or lm_head.weight
    alone: each loads to transformers' logits."""
    hf = _hf("GPT2LMHeadModel")
    state = dict(hf.state_dict())
    x = _ids()
    with torch.no_grad():
        want = hf(x).logits
    for name, drop in (("both", None), ("head_only", "transformer.wte.weight"), ("wte_only", "lm_head.weight")):
        kept = {k: v.clone() for k, v in state.items() if k != drop}
        _write_bin(tmp_path / name, hf.config, kept)
        with torch.no_grad():
            torch.testing.assert_close(GPT.from_pretrained(str(tmp_path / name))(x), want, rtol=0, atol=1e-4)


def test_missing_shard_is_named_with_its_index(tmp_path):
    hf = make_hf_gpt2(tmp_path / "full", **{k: v for k, v in SHAPE.items()})
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors"))
    assert len(shards) > 2
    os.remove(tmp_path / "sharded" / shards[1])
    with pytest.raises(CheckpointError, match=rf"shard {shards[1]} listed in .*model.safetensors.index.json "
                                              r"is missing"):
        GPT.from_pretrained(str(tmp_path / "sharded"))
    from safetensors.torch import load_file, save_file
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    kept = load_file(str(tmp_path / "sharded" / shards[1]))  # a shard rewritten without one tensor it held
    dropped = sorted(kept)[0]
    save_file({k: v for k, v in kept.items() if k != dropped}, str(tmp_path / "sharded" / shards[1]))
    with pytest.raises(CheckpointError, match=rf"shards of .*model.safetensors.index.json lack tensors it lists: "
                                              rf"\['{re.escape(dropped)}'\]"):
        GPT.from_pretrained(str(tmp_path / "sharded"))
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001.safetensors"]}))
    with pytest.raises(CheckpointError, match="is not a valid shard index: TypeError: weight_map must map tensor "
                                              "names to shard file names"):
        GPT.from_pretrained(str(tmp_path / "sharded"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoints_load_as_float32_unless_asked(tmp_path, dtype):
    """An fp16 / bf16 checkpoint (config.json's dtype says so) loads as float32 by default, the
    upcast exact, with transformers' float32 logits; dtype= keeps the checkpoint's tensors bit for bit."""
    import transformers

    hf = _hf("GPT2LMHeadModel").to(dtype)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("dtype", "") in (str(dtype)[6:], "")
    model = GPT.from_pretrained(str(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=0, atol=1e-4)
    half = GPT.from_pretrained(str(tmp_path), dtype=dtype)
    assert torch.equal(half.transformer.h[1].attn.c_attn.weight, hf.transformer.h[1].attn.c_attn.weight.t())
    assert half.transformer.wte.weight.dtype == dtype


def test_nanogpt_checkpoint_in_nanogpts_own_layout(tmp_path):
    """A ckpt.pt as nanoGPT's train.py writes it after GPT.from_pretrained('gpt2'): Conv1D weights
    transposed into nn.Linear, "_orig_mod." prefixes of torch.compile, the attn.bias mask buffers of
    a torch without flash attention, the tied lm_head. Same logits as transformers (exact GELU:
    nanoGPT's nn.GELU())."""
    hf = _hf("GPT2LMHeadModel", activation_function="gelu")
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            v = v.t()  # as nanoGPT's from_pretrained copies them
        sd["_orig_mod." + k] = v.contiguous()
    sd["_orig_mod.lm_head.weight"] = sd["_orig_mod.transformer.wte.weight"]
    T = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    args = dict(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], block_size=T, bias=True,
                vocab_size=SHAPE["vocab_size"], dropout=0.0)
    torch.save({"model": sd, "model_args": args, "iter_num": 0, "best_val_loss": torch.tensor(9.0),
                "config": {"init_from": "gpt2"}}, tmp_path / "ckpt.pt")
    model = GPT.from_pretrained(str(tmp_path))
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


def test_safetensors_wins_over_bin_as_in_transformers(tmp_path):
    import transformers

    a, b = _hf("GPT2LMHeadModel"), _hf("GPT2LMHeadModel")
    a.save_pretrained(tmp_path)
    torch.save(b.state_dict(), tmp_path / "pytorch_model.bin")
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = _ids()
    with torch.no_grad():
        want = a(x).logits
        torch.testing.assert_close(ref(x).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(GPT.from_pretrained(str(tmp_path))(x), want, rtol=0, atol=1e-4)


def test_hub_name_found_in_the_local_cache_offline(tmp_path, monkeypatch):
    """models--openai-community--gpt2/snapshots/<hash>/ (files as links to blobs/), found with no network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hf = _hf("GPT2LMHeadModel")
    hf.save_pretrained(tmp_path / "src")
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, name in enumerate(sorted(os.listdir(tmp_path / "src"))):
        shutil.copy(tmp_path / "src" / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", repo / "snapshots" / commit / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained("openai-community/gpt2")(x), hf(x).logits, rtol=0, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        GPT.from_pretrained("openai-community/gpt2-medium")


def test_key_and_shape_errors_name_what_is_wrong(tmp_path):
    """Missing keys say how many there are beyond the first six; a Conv1D weight saved in
    nn.Linear's layout (a hand conversion that forgot the transpose) is called a transpose."""
    hf = _hf("GPT2LMHeadModel")
    state = dict(hf.state_dict())
    _write_bin(tmp_path / "few", hf.config, {k: v for k, v in state.items() if ".h.1." not in k})
    with pytest.raises(CheckpointError, match=r"missing \['transformer.h.1.attn.c_attn.bias', .*\] and 6 more, "
                                              r"unexpected \[\]"):
        GPT.from_pretrained(str(tmp_path / "few"))
    linear = dict(state)
    linear["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"].t()
    _write_bin(tmp_path / "linear", hf.config, linear)
    with pytest.raises(CheckpointError, match=r"transformer.h.0.mlp.c_fc.weight has shape \(48, 192\), config "
                                              r"expects \(192, 48\) \(its transpose: a weight stored in the other"):
        GPT.from_pretrained(str(tmp_path / "linear"))


def test_a_relative_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("./no-such-model", "../no-such-model", ".hidden/model"):
        with pytest.raises(FileNotFoundError) as info:
            GPT.from_pretrained(path)
        assert str(info.value) == f"checkpoint not found: {path}"


@pytest.mark.parametrize("repo_files, weights", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt"], "*.safetensors"),
    (["config.json", "pytorch_model.bin", "tokenizer.json"], "*.bin"),
])
def test_a_hub_download_fetches_one_copy_of_the_weights(tmp_path, monkeypatch, caplog, repo_files, weights):
    """Not in the cache: the download takes safetensors where the repo has them, not also the
    pytorch_model.bin beside them (twice the bytes), and the .bin where it has nothing else."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from gptfast.checkpoint import resolve_path

    calls = []

    def snapshot_download(repo, local_files_only=False, allow_patterns=None):
        calls.append((repo, local_files_only, allow_patterns))
        if local_files_only:
            raise FileNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: repo_files)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        assert resolve_path("someone/gpt2-like") == str(tmp_path)
    # the Hub client retries for about 25 s without a network: the wait is announced first
    assert [r.getMessage() for r in caplog.records] == [
        "gptfast: 'someone/gpt2-like' is not a local path and not in the Hugging Face cache: looking it up on the "
        "Hub (HF_HUB_OFFLINE=1 skips this)"]
    (_, offline, _), (_, online, patterns) = calls
    assert offline and not online
    assert weights in patterns and not {"*.safetensors", "*.bin"} - {weights} & set(patterns)


def test_causal_mask_buffers_of_older_transformers_are_skipped(tmp_path):
    """A .bin saved by transformers 2.x-4.x holds each layer's attn.bias (the causal mask) and
    attn.masked_bias buffers beside the weights: not weights, skipped, the logits transformers' own."""
    hf = _hf("GPT2LMHeadModel")
    state = dict(hf.state_dict())
    for i in range(SHAPE["n_layer"]):
        n = SHAPE["n_positions"]
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _write_bin(tmp_path, hf.config, state)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(str(tmp_path))(x), hf(x).logits, rtol=0, atol=1e-4)
