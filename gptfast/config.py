"""GPTConfig: one dataclass for GPT-1 (post-LN) and GPT-2 (pre-LN) shapes."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

_ACTIVATIONS = ("gelu_tanh", "gelu")  # tanh approximation (GPT-2) / exact erf (GPT-1, nanoGPT)

# Hugging Face config keys that do not change the forward pass; accepted and ignored. (Read, not
# ignored: scale_attn_weights, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,
# initializer_range, eos_token_id, afn / activation_function, n_inner, layer_norm_epsilon and the shapes.)
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "task_specific_params",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "bos_token_id", "pad_token_id", "use_cache",
    "predict_special_tokens", "id2label", "label2id", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "tie_word_embeddings",
    "is_decoder", "add_cross_attention", "n_ctx", "problem_type",
    "tokenizer_class", "prefix", "decoder_start_token_id", "chunk_size_feed_forward",
    "_attn_implementation_autoset", "_attn_implementation", "sep_token_id", "cls_token_id",
    "unk_token_id", "finetuning_task", "max_length", "num_labels", "do_sample",
    "temperature", "top_k", "top_p", "n_special", "afn_kwargs",
    # PretrainedConfig's generic fields (generation settings, export flags) and keys that older
    # transformers versions wrote into GPT-2 configs (distilgpt2's "_num_labels", 4.x's
    # "gradient_checkpointing", "output_past"): transformers loads such configs unchanged.
    "_num_labels", "gradient_checkpointing", "output_past", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "is_encoder_decoder", "tie_encoder_decoder", "cross_attention_hidden_size", "xla_device",
    "_commit_hash", "_attn_implementation_internal", "min_length", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}
# HF keys whose non-default values change the model in ways gptfast does not implement.
_HF_UNSUPPORTED = {
    "add_cross_attention": False,
    "pruned_heads": {},  # transformers 4.x removes these heads from each layer
}


@dataclass
class GPTConfig:
    """Shape and flavour of a GPT decoder.

    pre_ln=True is GPT-2 (x + sublayer(ln(x)), final LayerNorm); pre_ln=False is
    GPT-1 (ln(x + sublayer(x)), no final LayerNorm).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; default 4 * n_embd
    activation: str = "gelu_tanh"
    pre_ln: bool = True
    final_ln: bool = True
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0  # dropout on the attention weights in training (inside the attention kernel)
    eos_token_id: Optional[Union[int, list[int]]] = 50256  # None, an id, or a list of ids (HF allows each)
    scale_attn_weights: bool = True  # attention scores scaled by 1/sqrt(head_dim) (HF GPT-2's flag)
    # HF GPT-2's flag: layer i's scores (0-based) divided by i + 1 as well (stanford-crfm's models)
    scale_attn_by_inverse_layer_idx: bool = False
    # HF GPT-2's flag for q.k and softmax in fp32 in its eager attention. It changes nothing here:
    # every gptfast attention path already does that (the Triton kernels' tl.dot accumulates in
    # fp32 and their softmax runs in fp32; the torch references upcast q, k, v to fp32), as SDPA
    # does in transformers, whose SDPA path ignores the flag. Kept so a config round-trips.
    reorder_and_upcast_attn: bool = False
    initializer_range: float = 0.02  # std of the normal init (GPT-2's residual projections: / sqrt(2 n_layer))
    extra: dict = field(default_factory=dict, repr=False)  # free-form metadata (provenance...)

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int) or self.n_inner <= 0:
            raise ValueError(f"GPTConfig.n_inner must be a positive int (or None: 4 * n_embd), got {self.n_inner!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"GPTConfig.{name} must be a number, got {value!r}")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "pre_ln", "final_ln", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        r = self.initializer_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
            raise ValueError(f"GPTConfig.initializer_range must be a finite number > 0, got {r!r}")
        self.eos_token_id = _check_eos(self.eos_token_id, "GPTConfig.eos_token_id")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attn_scale(self) -> float:
        """The factor on the attention scores q.k: 1/sqrt(head_dim), or 1 with scale_attn_weights=False
        (before scale_attn_by_inverse_layer_idx: see layer_attn_scale)."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0

    def layer_attn_scale(self, layer_idx: int) -> float:
        """The factor on layer layer_idx's (0-based) attention scores: attn_scale, divided by
        layer_idx + 1 with scale_attn_by_inverse_layer_idx (as transformers' GPT2Attention.scaling)."""
        scale = self.attn_scale
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale

    @property
    def gelu_approximate(self) -> str:
        """The `approximate` argument of ops.bias_gelu for this config."""
        return "tanh" if self.activation == "gelu_tanh" else "none"

    # ---- presets -------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- dict / JSON -----------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Hugging Face config.json ---------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GPTConfig":
        model_type = d.get("model_type", "gpt2")
        if model_type not in ("gpt2", "openai-gpt"):
            raise ValueError(f"{source}: model_type must be 'gpt2' or 'openai-gpt', got {model_type!r}")
        for key, ok in _HF_UNSUPPORTED.items():
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by gptfast (expected {ok!r})")
        if d.get("tie_word_embeddings", True) is False:
            raise ValueError(f"{source}: tie_word_embeddings=False is not supported (GPT ties the LM head)")
        known = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                 "activation_function", "afn", "layer_norm_epsilon", "resid_pdrop", "embd_pdrop",
                 "attn_pdrop", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "initializer_range", "eos_token_id", "gptfast"} | _HF_IGNORED | set(_HF_UNSUPPORTED)
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}")
        # each model reads its own key (GPT2Config ignores "afn", OpenAIGPTConfig "activation_function")
        act = d.get("activation_function", "gelu_new") if model_type == "gpt2" else d.get("afn", "gelu")
        act_map = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu_accurate": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu"}
        if model_type == "openai-gpt":
            act_map = {"gelu": "gelu_tanh"}  # OpenAIGPT's afn table has no other GELU name
        if act not in act_map:
            raise ValueError(f"{source}: activation {act!r} is not supported; expected one of {sorted(act_map)}")
        extra = dict(d.get("gptfast", {}))
        activation = act_map[act]
        if model_type == "openai-gpt":
            # transformers' OpenAIGPT maps afn "gelu" to gelu_new, the tanh form that OpenAI's GPT-1
            # code used and its weights were trained with; gptfast's own erf GPT-1 says so in "gptfast".
            activation = extra.pop("activation", "gelu_tanh")
            if activation not in _ACTIVATIONS:
                raise ValueError(f"{source}: gptfast.activation must be one of {_ACTIVATIONS}, got {activation!r}")
        eos = _check_eos(d.get("eos_token_id", 50256 if model_type == "gpt2" else None), f"{source}: eos_token_id")
        # OpenAIGPT always scales its scores (by 1/sqrt(head_dim) alone) and has a 4 * n_embd MLP,
        # whatever the config says: it has none of GPT-2's attention flags.
        flags = {}
        for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("reorder_and_upcast_attn", False)):
            flags[key] = d.get(key, default) if model_type == "gpt2" else default
            if not isinstance(flags[key], bool):
                raise ValueError(f"{source}: {key} must be true or false, got {flags[key]!r}")
        return cls(
            vocab_size=d.get("vocab_size", 50257 if model_type == "gpt2" else 40478),
            n_positions=d.get("n_positions", 1024 if model_type == "gpt2" else 512),
            n_embd=d.get("n_embd", 768),
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            n_inner=d.get("n_inner") if model_type == "gpt2" else None,
            activation=activation,
            pre_ln=model_type == "gpt2",
            final_ln=model_type == "gpt2",
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            # absent, transformers' GPT2Config / OpenAIGPTConfig default (0.1) is what it trains with
            embd_pdrop=d.get("embd_pdrop", 0.1),
            resid_pdrop=d.get("resid_pdrop", 0.1),
            attn_pdrop=d.get("attn_pdrop", 0.1),
            eos_token_id=eos,
            initializer_range=d.get("initializer_range", 0.02),
            extra=extra,
            **flags,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of the transformers model that computes the same function; ValueError
        (saying why) where there is none (see hf_incompatibility)."""
        reason = self.hf_incompatibility()
        if reason:
            raise ValueError(reason)
        act = "gelu_new" if self.activation == "gelu_tanh" else "gelu"
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, list) else self.eos_token_id
        common = {
            "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_embd": self.n_embd,
            "n_layer": self.n_layer, "n_head": self.n_head, "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.resid_pdrop, "embd_pdrop": self.embd_pdrop, "attn_pdrop": self.attn_pdrop,
            "tie_word_embeddings": True, "initializer_range": self.initializer_range,
        }
        if self.extra:
            common["gptfast"] = self.extra
        if self.pre_ln:
            return {**common, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                    "n_inner": self.n_inner, "activation_function": act,
                    "scale_attn_weights": self.scale_attn_weights,
                    "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
                    "reorder_and_upcast_attn": self.reorder_and_upcast_attn,
                    # transformers' GPT-2 configs write bos == eos; a list's first id for bos
                    "bos_token_id": (eos[0] if eos else None) if isinstance(eos, list) else eos,
                    "eos_token_id": eos}
        if self.activation == "gelu":
            # OpenAIGPT's afn "gelu" runs the tanh form in transformers and has no erf option: the
            # exact form is recorded for gptfast; transformers will run this model with tanh GELU.
            common["gptfast"] = {**self.extra, "activation": "gelu"}
        if eos is not None:  # OpenAIGPTConfig has no default EOS; one read from a config.json is kept
            common["eos_token_id"] = eos
        return {**common, "model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "afn": "gelu"}

    def hf_incompatibility(self) -> Optional[str]:
        """None when transformers' GPT2LMHeadModel / OpenAIGPTLMHeadModel can hold this model, else
        why not (such a model saves as a nanoGPT-style ckpt.pt: GPT.save_pretrained(format="nanogpt"))."""
        if not self.bias:
            return "a config with bias=False (nanoGPT style) has no Hugging Face GPT-2 equivalent"
        if self.pre_ln != self.final_ln:
            return (f"Hugging Face GPT-2/GPT-1 need pre_ln == final_ln, got pre_ln={self.pre_ln}, "
                    f"final_ln={self.final_ln}")
        if not self.pre_ln and self.n_inner != 4 * self.n_embd:
            return (f"Hugging Face OpenAIGPT has no n_inner: it must be 4 * n_embd = {4 * self.n_embd}, "
                    f"got {self.n_inner}")
        if not self.pre_ln and not self.scale_attn_weights:
            return "Hugging Face OpenAIGPT always scales attention: scale_attn_weights=False has no GPT-1 equivalent"
        if not self.pre_ln and self.scale_attn_by_inverse_layer_idx:
            return ("Hugging Face OpenAIGPT scales every layer's attention alike: "
                    "scale_attn_by_inverse_layer_idx=True has no GPT-1 equivalent")
        return None

    @classmethod
    def from_json_file(cls, path: str) -> "GPTConfig":
        return cls.from_hf_dict(read_json_object(path), source=os.path.basename(path))


def _check_eos(value, what: str):
    """eos_token_id as GPTConfig holds it: None, an int >= 0, or a list of them (a tuple becomes a list)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return list(value)
    raise ValueError(f"{what} must be None, a token id (an int >= 0) or a list of them, got {value!r}")


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding an object (a config.json), with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "openai-gpt": dict(n_layer=12, n_head=12, n_embd=768, n_positions=512, vocab_size=40478,
                       pre_ln=False, final_ln=False, activation="gelu", eos_token_id=None),
}
