"""Loading and saving weights: Hugging Face GPT-2 / GPT-1 directories and nanoGPT checkpoints.

- HF: config.json + model.safetensors | pytorch_model.bin, sharded (*.index.json) too, of any
  transformers GPT-2 / GPT-1 class (task heads ignored, saying so). Conv1D weights ([in, out]) are
  transposed into nn.Linear ([out, in]); the LM head is tied (a stored head that differs is refused).
- nanoGPT: a ckpt.pt with "model_args" and "model" (nn.Linear layout, maybe "_orig_mod." prefixes).
- Pickled files load with weights_only=True; safetensors is preferred.
- Saving checks the config first, then writes every file to a temporary name and renames it
  (config.json last, an old differing one removed first): an interrupted save never leaves a
  half-written file, nor new weights under an old config.
- save_nanogpt writes a nanoGPT-style ckpt.pt that holds any config (bias=False and others that
  have no Hugging Face equivalent) whole under "gptfast_config".
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Optional

import torch

from .config import GPTConfig, read_json_object

logger = logging.getLogger("gptfast")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, PT_WEIGHTS, PT_INDEX)  # the order read_hf_state_dict looks in
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT1_RENAMES = {"tokens_embed.": "wte.", "positions_embed.": "wpe."}
# Task heads of transformers' GPT-2 / GPT-1 classes, beside the body: *ForSequenceClassification,
# *DoubleHeadsModel, *ForTokenClassification, *ForQuestionAnswering
HF_HEADS = ("score.", "multiple_choice_head.", "classifier.", "qa_outputs.")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


# ---- reading tensors ---------------------------------------------------------------

def _load_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise CheckpointError(f"cannot read weights file {path} (corrupt or not a checkpoint): {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return obj


def _load_sharded(directory: str, index_name: str) -> dict[str, torch.Tensor]:
    index_path = os.path.join(directory, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError(f"weight_map must map tensor names to shard file names, got {weight_map!r:.80}")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index: {type(exc).__name__}: {exc}") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"shard {shard} listed in {index_path} is missing: {shard_path} does not exist "
                                  "(an incomplete download or copy?)")
        state.update(_load_file(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"shards of {index_path} lack tensors it lists: {missing[:5]}")
    return state


def read_hf_state_dict(directory: str) -> dict[str, torch.Tensor]:
    for name, loader in ((SAFE_WEIGHTS, _load_file), (SAFE_INDEX, None), (PT_WEIGHTS, _load_file), (PT_INDEX, None)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return loader(path) if loader else _load_sharded(directory, name)
    raise CheckpointError(f"no weights in {directory}: expected one of {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                          f"{PT_WEIGHTS}, {PT_INDEX}")


# ---- key mapping ---------------------------------------------------------------------

def hf_to_gptfast(state: dict[str, torch.Tensor], config: GPTConfig,
                  source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel / GPT2Model / OpenAIGPT* keys -> gptfast keys (Conv1D transposed). The
    task heads of other transformers classes (HF_HEADS) keep their names; an LM head is checked
    to be the token embedding (check_tied_head)."""
    out = {}
    head = None
    for key, t in state.items():
        k = key
        for prefix in ("transformer.", ""):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if key == "lm_head.weight":
            head = t
            continue
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "position_ids":
            continue  # causal-mask buffers of older transformers
        if key.startswith(HF_HEADS):  # score.: *ForSequenceClassification's head (gptfast.finetune)
            out[key] = t
            continue
        for old, new in _GPT1_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        if k.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out["transformer." + k] = t
    check_tied_head(out, head, source)
    return out


WTE = "transformer.wte.weight"


def check_tied_head(state: dict[str, torch.Tensor], head: Optional[torch.Tensor], source: str) -> None:
    """gptfast's LM head is the token embedding. A stored head must be a copy of it, or its only
    copy (transformers 5 saves OpenAIGPTDoubleHeadsModel's tied pair as lm_head.weight alone): then
    it fills the embedding. A head that differs is refused: tying it would change the model
    (transformers keeps such a head untied, whatever tie_word_embeddings says)."""
    if head is None:
        return
    wte = state.get(WTE)
    if wte is None:
        state[WTE] = head
        return
    if tuple(head.shape) != tuple(wte.shape):
        raise CheckpointError(f"{source}: lm_head.weight has shape {tuple(head.shape)}, but the LM head is tied to "
                              f"the token embedding {WTE} of shape {tuple(wte.shape)}")
    if not torch.equal(head.to(wte.dtype), wte):
        diff = (head.double() - wte.double()).abs().max().item()
        raise CheckpointError(f"{source}: lm_head.weight differs from the token embedding {WTE} (max abs "
                              f"difference {diff:.3g}): an untied LM head, which gptfast cannot hold (its LM head "
                              "is the embedding); tying it would change the model's outputs")


def gptfast_to_hf(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith("score."):
            out[key] = t.contiguous()
            continue
        k = key[len("transformer."):]
        if k.endswith(CONV1D_SUFFIXES):
            t = t.t()
        if not config.pre_ln:  # GPT-1 names, no "transformer." prefix in OpenAIGPTLMHeadModel's base
            for old, new in _GPT1_RENAMES.items():
                if k.startswith(new):
                    k = old + k[len(new):]
        out["transformer." + k] = t.contiguous()
    return out


def load_state_into(model, state: dict[str, torch.Tensor], source: str, optional: tuple[str, ...] = ()) -> None:
    """Copy tensors key by key, asserting every key (but those in `optional`) and shape."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.") and k not in optional}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config: missing {_some(missing)}, "
                              f"unexpected {_some(unexpected)}")
    for k, t in state.items():
        shape, want = tuple(t.shape), tuple(expected[k].shape)
        if shape != want:
            hint = (" (its transpose: a weight stored in the other layout, nn.Linear's (out, in) against "
                    "Hugging Face Conv1D's (in, out)?)" if len(shape) == 2 and shape[::-1] == want else "")
            raise CheckpointError(f"{source}: {k} has shape {shape}, config expects {want}{hint}")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: {k} has dtype {t.dtype}, expected a floating tensor")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, t in state.items():
            params[k].copy_(t)


def _some(keys: list[str], n: int = 6) -> str:
    return f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---- public entry points -----------------------------------------------------------

def resolve_path(path: str) -> str:
    """A local directory/file, or a hub name found in the local Hugging Face cache."""
    if os.path.exists(path):
        return path
    if re.fullmatch(r"(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?", path) is None:  # ./x, ../x: paths, never hub names
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"checkpoint not found: no local path {path!r}, and huggingface_hub is not "
                                "installed to look it up in the Hugging Face cache") from None
    patterns = ["*.json", "*.txt", "*.safetensors", "*.bin"]
    try:
        return snapshot_download(path, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not in the cache: try the network once
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        # without a network the Hub client retries for about 25 s: say what the wait is
        logger.warning("gptfast: %r is not a local path and not in the Hugging Face cache: looking it up on the "
                       "Hub (HF_HUB_OFFLINE=1 skips this)", path)
    try:
        from huggingface_hub import list_repo_files

        # one copy of the weights: safetensors where the repo has them (as transformers loads),
        # not pytorch_model.bin beside them (gpt2-xl holds 6 GB of each)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in list_repo_files(path)) else "*.bin"
        return snapshot_download(path, allow_patterns=["*.json", "*.txt", weights])
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(
            f"checkpoint not found: {path!r} is not a local path, not in the local Hugging Face cache, and "
            f"downloading it from the Hub failed (no network access?): {type(exc).__name__}: {exc}") from None


def read_checkpoint(path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict in gptfast names, the raw HF config dict or {} for nanoGPT).

    path: a checkpoint directory or file, a hub name, or a transformers model object
    (GPT2LMHeadModel, GPT2Model, OpenAIGPT*, *ForSequenceClassification) converted in memory."""
    if isinstance(path, torch.nn.Module):
        return _read_transformers_model(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a checkpoint path or a transformers model, got {type(path).__name__}")
    kind, path = locate_checkpoint(resolve_path(os.fspath(path)))
    if kind == "hf":
        raw = read_json_object(os.path.join(path, "config.json"))
        config = GPTConfig.from_hf_dict(raw)
        return config, hf_to_gptfast(read_hf_state_dict(path), config, path), raw
    return (*read_nanogpt(path), {})


NANOGPT_CKPT = "ckpt.pt"
_NANOGPT_SUFFIXES = (".pt", ".pth", ".ckpt")
_CHECKPOINT_NEEDS = ("a checkpoint directory holds config.json with model.safetensors or pytorch_model.bin "
                     "(Hugging Face; sharded: *.index.json), or a ckpt.pt (nanoGPT)")


def locate_checkpoint(path: str) -> tuple[str, str]:
    """("hf", the directory) or ("nanogpt", the .pt file) for a local path; otherwise a
    CheckpointError that says what the path holds and what a checkpoint must hold. Loading
    (read_checkpoint: every command's --model) and describe (gptfast info) both go through here."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        if os.path.isfile(os.path.join(path, NANOGPT_CKPT)):
            return "nanogpt", os.path.join(path, NANOGPT_CKPT)
        raise CheckpointError(f"{path} has neither config.json (Hugging Face) nor ckpt.pt (nanoGPT): "
                              f"{_holds(path)}; {_CHECKPOINT_NEEDS}")
    if os.path.isfile(path):
        if path.endswith(_NANOGPT_SUFFIXES):
            return "nanogpt", path
        name = os.path.basename(path)
        if name in _WEIGHT_FILES or name == "config.json" or name.endswith(".safetensors"):
            what = "one file of a Hugging Face checkpoint: pass the directory that holds it"
        elif name.endswith(".bin") and not os.path.isfile(os.path.join(os.path.dirname(path), "config.json")):
            what = "not a model: a .bin without a config.json beside it (prepared token ids, as gptfast prepare writes?)"
        else:
            what = "not a checkpoint"
        raise CheckpointError(f"{path} is a file, {what}; {_CHECKPOINT_NEEDS}, or pass a nanoGPT "
                              f"{'/'.join(_NANOGPT_SUFFIXES)} file")
    raise CheckpointError(f"{path} is neither a file nor a directory (a broken link?): {_CHECKPOINT_NEEDS}")


def _holds(directory: str) -> str:
    """What a directory that is not a checkpoint holds, in words."""
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    if not names:
        return "the directory is empty"
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    weights = [n for n in names if n in _WEIGHT_FILES]
    if weights:
        return f"it holds {shown}: weights without their config.json (an interrupted save?)"
    if {"train.bin", "val.bin"} & set(names):
        return (f"it holds {shown}: prepared token files (as gptfast prepare writes them), not a model "
                "(pass it as --data)")
    return f"it holds {shown}"


def _read_transformers_model(hf_model) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    name = type(hf_model).__name__
    config_obj = getattr(hf_model, "config", None)
    if config_obj is None or not hasattr(config_obj, "to_diff_dict"):
        raise TypeError(f"expected a transformers GPT-2 / GPT-1 model, got a {name} without a transformers config")
    raw = {**config_obj.to_diff_dict(), "model_type": getattr(config_obj, "model_type", None)}
    config = GPTConfig.from_hf_dict(raw, source=f"{name}.config")
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}  # build_model copies them
    return config, hf_to_gptfast(state, config, name), raw


def build_model(cls, config: GPTConfig, state: dict[str, torch.Tensor], source: str, device=None, dtype=None,
                fresh: tuple[str, ...] = (), **kwargs):
    """cls(config, **kwargs) holding `state`, built without a throwaway random init. Parameters
    whose names start with a prefix in `fresh` may be absent from state: those keep a fresh init."""
    with torch.device("meta"):
        model = cls(config, **kwargs)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after to_empty
    missing_fresh = [k for k, _ in model.named_parameters() if k.startswith(fresh) and k not in state] if fresh else []
    for name in missing_fresh:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        model._init_weights(module)
    load_state_into(model, state, source, optional=tuple(missing_fresh))
    return model.to(device=device, dtype=dtype).eval()


def load_model(path: str, device=None, dtype=None):
    """A GPT language model. Task heads in the checkpoint (HF_HEADS: a fine-tuned classifier's
    score.*, GPT2DoubleHeadsModel's multiple_choice_head.*...) are not part of it: ignored, saying so.
    Parameters are float32 unless dtype is given, whatever the checkpoint's dtype (an fp16 or
    bf16 checkpoint is upcast exactly; its config's torch_dtype is not read)."""
    from .model import GPT

    config, state, raw = read_checkpoint(path)
    heads = sorted({k.split(".", 1)[0] for k in state if k.startswith(HF_HEADS)})
    if heads:
        arch = ", ".join(raw.get("architectures") or []) if isinstance(raw.get("architectures"), list) else ""
        logger.warning("gptfast: %s: ignoring the checkpoint's task head%s %s%s: GPT.from_pretrained loads the "
                       "language model (body and tied LM head)", _source(path), "s" if len(heads) > 1 else "",
                       ", ".join(h + ".*" for h in heads), f" ({arch})" if arch else "")
        state = {k: v for k, v in state.items() if not k.startswith(HF_HEADS)}
    return build_model(GPT, config, state, _source(path), device=device, dtype=dtype)


def _source(path) -> str:
    """How error messages name a checkpoint."""
    return type(path).__name__ if isinstance(path, torch.nn.Module) else os.fspath(path)


def read_nanogpt(path: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    ckpt = _load_file(path)
    if "model_args" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint: expected keys 'model_args' and 'model', "
                              f"got {sorted(ckpt)[:8]}")
    args = dict(ckpt["model_args"])
    known = {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown nanoGPT model_args {unknown}")
    try:
        config = GPTConfig(vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
                           n_layer=args["n_layer"], n_head=args["n_head"], bias=args.get("bias", True),
                           activation="gelu",  # nanoGPT's MLP uses nn.GELU(): the exact erf form
                           # nanoGPT's one dropout rate: on the embeddings, the attention weights and the residuals
                           **dict.fromkeys(("embd_pdrop", "attn_pdrop", "resid_pdrop"), args.get("dropout", 0.0)))
        if GPTFAST_CONFIG_KEY in ckpt:  # written by save_nanogpt: the whole config
            full = GPTConfig.from_dict(dict(ckpt[GPTFAST_CONFIG_KEY]))
            differ = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bias")
                      if getattr(full, k) != getattr(config, k)]
            if differ:
                raise ValueError(f"its {GPTFAST_CONFIG_KEY} and model_args disagree on {differ}")
            config = full
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model config: {type(exc).__name__}: {exc}") from None
    state = {}
    head = None
    for k, t in ckpt["model"].items():
        k = k.removeprefix("_orig_mod.")
        if k == "lm_head.weight":
            head = t
            continue
        if k.endswith(".attn.bias"):
            continue
        state[k] = t
    check_tied_head(state, head, path)
    return config, state


def _fsync_dir(directory: str) -> None:
    """Make renames and unlinks in directory durable (best effort: not every OS opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".part", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _unlink(path: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(path, write)


def atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _remove_weights(directory: str, name: str, keep: str) -> None:
    """Remove a weights file of a previous save (an index with the shards it lists)."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return
    if name.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        _unlink(path)  # the index first: without it no stale shard is ever read
        for shard in shards:
            if isinstance(shard, str) and shard == os.path.basename(shard) and shard not in (keep, "config.json"):
                _unlink(os.path.join(directory, shard))
    else:
        _unlink(path)


def remove_model_files(directory: str, keep: str) -> None:
    """Remove the model files of the other format from a directory that will hold a `keep`
    ("hf" or "nanogpt") checkpoint: a config.json would shadow a ckpt.pt on load, and a stale
    ckpt.pt would contradict the new Hugging Face files (for a run directory the project owns;
    save_pretrained itself never removes another format's checkpoint)."""
    if keep == "hf":
        _unlink(os.path.join(directory, NANOGPT_CKPT))
        return
    _unlink(os.path.join(directory, "config.json"))  # first: without it the weights are never read
    for name in _WEIGHT_FILES:
        _remove_weights(directory, name, keep="")


def _save_dir(path: str, what: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what}: path {path} is a file; expected a directory to write the checkpoint in")
    os.makedirs(path, exist_ok=True)


def save_model(model, path: str, safe_serialization: bool = True) -> None:
    """A Hugging Face directory (config.json + model.safetensors | pytorch_model.bin).

    Every check runs before anything is written (a config with no HF equivalent raises
    ValueError and leaves path as it was). Each file is written to a temporary name, fsynced and
    renamed. An old config.json that differs from the new one is removed before the weights are
    replaced and the new one is written last, so a crash part way leaves either the old pair, or
    weights without a config.json (refused on load), never new weights under an old config."""
    config = model.config
    reason = config.hf_incompatibility()
    if reason:
        raise ValueError(f"save_pretrained({path!r}): {reason}; save it as a nanoGPT-style ckpt.pt with "
                         "save_pretrained(path, format=\"nanogpt\") (GPT.from_pretrained loads it)")
    hf_config = {**config.to_hf_dict(), **getattr(model, "hf_config_overrides", dict)()}
    text = json.dumps(hf_config, indent=2) + "\n"
    state = gptfast_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)
    _save_dir(path, "save_pretrained")
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8", errors="replace") as f:
            same = f.read() == text
        if not same:
            _unlink(config_path)
    target = SAFE_WEIGHTS if safe_serialization else PT_WEIGHTS
    at = _WEIGHT_FILES.index(target)
    for name in _WEIGHT_FILES[:at]:  # files read before target would shadow it: gone first
        _remove_weights(path, name, keep=target)
    if safe_serialization:
        from safetensors.torch import save_file
        _atomic_write(os.path.join(path, target), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        atomic_torch_save(state, os.path.join(path, target))
    for name in _WEIGHT_FILES[at + 1:]:  # stale weights of an earlier save in another layout
        _remove_weights(path, name, keep=target)
    atomic_write_text(config_path, text)


GPTFAST_CONFIG_KEY = "gptfast_config"


def save_nanogpt(model, path: str) -> str:
    """Write a nanoGPT-style ckpt.pt ("model" in nn.Linear layout with lm_head.weight, "model_args")
    plus the whole GPTConfig under "gptfast_config", so any config round-trips, bias=False and
    others with no Hugging Face equivalent included. path: a directory (ckpt.pt inside it) or a
    .pt/.pth/.ckpt file. GPT.from_pretrained loads it; nanoGPT itself reads it right for configs
    it can express (pre-LN, exact GELU, 4 * n_embd MLP, eps 1e-5, scaled attention). Returns the file."""
    config = model.config
    if path.endswith(_NANOGPT_SUFFIXES) and not os.path.isdir(path):
        file = path
        directory = os.path.dirname(os.path.abspath(path))
    else:
        file, directory = os.path.join(path, NANOGPT_CKPT), path
        if os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"save_pretrained({path!r}, format='nanogpt'): {path} holds a Hugging Face "
                             "checkpoint (config.json), which GPT.from_pretrained would load instead of the "
                             "new ckpt.pt; save to another directory, or remove that checkpoint first")
    obj = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                           block_size=config.n_positions, bias=config.bias, vocab_size=config.vocab_size,
                           dropout=config.resid_pdrop),
        GPTFAST_CONFIG_KEY: config.to_dict(),
    }
    _save_dir(directory, "save_pretrained")
    atomic_torch_save(obj, file)
    return file


def describe(path: str) -> dict:
    """What `gptfast info` prints: config and parameter count, without building the model."""
    from .model import GPT

    path = resolve_path(path)
    kind, found = locate_checkpoint(path)
    if kind == "hf":
        config = GPTConfig.from_json_file(os.path.join(found, "config.json"))
        files = sorted(f for f in os.listdir(found) if not f.startswith("."))
    else:
        config, _ = read_nanogpt(found)
        files = [os.path.basename(found)]
    with torch.device("meta"):
        n = GPT(config).num_parameters()
    return {"path": path, "config": config.to_dict(), "parameters": n, "files": files}


def default_model_path() -> Optional[str]:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default")
    return here if os.path.isfile(os.path.join(here, "config.json")) else None
