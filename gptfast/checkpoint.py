"""Loading and saving weights: Hugging Face GPT-2 / GPT-1 directories and nanoGPT checkpoints.

- HF: config.json + model.safetensors | pytorch_model.bin, sharded (*.index.json) too.
  Conv1D weights ([in, out]) are transposed into nn.Linear ([out, in]); the LM head is tied.
- nanoGPT: a ckpt.pt with "model_args" and "model" (nn.Linear layout, maybe "_orig_mod." prefixes).
- Pickled files load with weights_only=True; safetensors is preferred.
- Saving writes every file to a temporary name and renames it: an interrupted save never
  leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Optional

import torch

from .config import GPTConfig, read_json_object

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT1_RENAMES = {"tokens_embed.": "wte.", "positions_embed.": "wpe."}


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
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index: {exc}") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_file(os.path.join(directory, shard)))
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

def hf_to_gptfast(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel / OpenAIGPTLMHeadModel keys -> gptfast keys (Conv1D transposed)."""
    out = {}
    for key, t in state.items():
        k = key
        for prefix in ("transformer.", ""):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if k.startswith("lm_head.") or k.endswith((".attn.bias", ".attn.masked_bias")) or k == "position_ids":
            continue  # tied head; causal-mask buffers of older transformers
        if key.startswith("score."):  # the head of *ForSequenceClassification (gptfast.finetune)
            out[key] = t
            continue
        for old, new in _GPT1_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        if k.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out["transformer." + k] = t
    return out


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
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(t.shape)}, "
                                  f"config expects {tuple(expected[k].shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: {k} has dtype {t.dtype}, expected a floating tensor")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, t in state.items():
            params[k].copy_(t)


# ---- public entry points -----------------------------------------------------------

def resolve_path(path: str) -> str:
    """A local directory/file, or a hub name found in the local Hugging Face cache."""
    if os.path.exists(path):
        return path
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is None:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"checkpoint not found: no local path {path!r}, and huggingface_hub is not "
                                "installed to look it up in the Hugging Face cache") from None
    patterns = ["config.json", "*.safetensors", "*.json", "*.txt", "*.bin"]
    try:
        return snapshot_download(path, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not in the cache: try the network once
        pass
    try:
        return snapshot_download(path, allow_patterns=patterns)
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
    path = resolve_path(os.fspath(path))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        raw = read_json_object(os.path.join(path, "config.json"))
        config = GPTConfig.from_hf_dict(raw)
        return config, hf_to_gptfast(read_hf_state_dict(path), config), raw
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        return (*read_nanogpt(os.path.join(path, "ckpt.pt")), {})
    if os.path.isfile(path) and path.endswith((".pt", ".pth", ".ckpt")):
        return (*read_nanogpt(path), {})
    if os.path.isdir(path):
        raise CheckpointError(f"{path} has neither config.json (Hugging Face) nor ckpt.pt (nanoGPT)")
    raise CheckpointError(f"{path} is not a checkpoint directory or a nanoGPT .pt file")


def _read_transformers_model(hf_model) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    name = type(hf_model).__name__
    config_obj = getattr(hf_model, "config", None)
    if config_obj is None or not hasattr(config_obj, "to_diff_dict"):
        raise TypeError(f"expected a transformers GPT-2 / GPT-1 model, got a {name} without a transformers config")
    raw = {**config_obj.to_diff_dict(), "model_type": getattr(config_obj, "model_type", None)}
    config = GPTConfig.from_hf_dict(raw, source=f"{name}.config")
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}  # build_model copies them
    return config, hf_to_gptfast(state, config), raw


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
    """A GPT language model. Fine-tuning heads in the checkpoint (score.*) are not part of it."""
    from .model import GPT

    config, state, _ = read_checkpoint(path)
    state = {k: v for k, v in state.items() if not k.startswith("score.")}
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
    config = GPTConfig(vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
                       n_layer=args["n_layer"], n_head=args["n_head"], bias=args.get("bias", True),
                       activation="gelu")  # nanoGPT's MLP uses nn.GELU(): the exact erf form
    state = {}
    for k, t in ckpt["model"].items():
        k = k.removeprefix("_orig_mod.")
        if k.endswith(".attn.bias") or k.startswith("lm_head."):
            continue
        state[k] = t
    return config, state


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


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(path, write)


def atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_model(model, path: str, safe_serialization: bool = True) -> None:
    os.makedirs(path, exist_ok=True)
    config = model.config
    state = gptfast_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)
    if safe_serialization:
        from safetensors.torch import save_file
        _atomic_write(os.path.join(path, SAFE_WEIGHTS), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        stale = os.path.join(path, PT_WEIGHTS)
    else:
        atomic_torch_save(state, os.path.join(path, PT_WEIGHTS))
        stale = os.path.join(path, SAFE_WEIGHTS)
    if os.path.exists(stale):  # a weights file of the other format would shadow or contradict this one
        os.unlink(stale)
    hf_config = {**config.to_hf_dict(), **getattr(model, "hf_config_overrides", dict)()}
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(hf_config, indent=2) + "\n")


def describe(path: str) -> dict:
    """What `gptfast info` prints: config and parameter count, without building the model."""
    from .model import GPT

    path = resolve_path(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        config = GPTConfig.from_json_file(os.path.join(path, "config.json"))
        files = sorted(f for f in os.listdir(path) if not f.startswith("."))
    else:
        config, _ = read_nanogpt(path if os.path.isfile(path) else os.path.join(path, "ckpt.pt"))
        files = [os.path.basename(path)]
    with torch.device("meta"):
        n = GPT(config).num_parameters()
    return {"path": path, "config": config.to_dict(), "parameters": n, "files": files}


def default_model_path() -> Optional[str]:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default")
    return here if os.path.isfile(os.path.join(here, "config.json")) else None
