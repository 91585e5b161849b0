"""Drop-in: gptfast's ops inside a Hugging Face transformers GPT-2 (or GPT-1) model.

    model = transformers.GPT2LMHeadModel.from_pretrained("path/to/gpt2").cuda()
    gptfast.patch_transformers(model)  # the same model object; its hot ops are gptfast's now
    loss = model(input_ids, labels=input_ids).loss  # Trainer, generate(), PEFT... work as before

For people who keep their transformers pipeline (Trainer, generate, PEFT) and want the fast
path without moving to `gptfast.GPT`. What is patched, each on this model's modules only:

- attention: registered with transformers' AttentionInterface as "gptfast" and set as the
  model's attention implementation. Without a mask it runs `ops.attention` (the flash kernel)
  for the prompt or a training batch, and `ops.decode_attention` (split-K) for one new token
  over the cache, with transformers' SDPA semantics (is_causal when more than one query:
  top-left aligned). A padding mask (a left-padded batch in generate, a right-padded one in
  training) goes to the same kernels as a key window per row (ops.attention's kv_start /
  kv_end), once transformers' mask is checked to be exactly causal + one key range per row over
  the keys written so far (a static cache's tail dropped; three host syncs per forward: the
  layers share the mask); a query that sees no key gets 0, as in SDPA. Attention dropout in
  training runs inside the kernel (ops.attention's dropout_p: transformers' distribution, the
  kernel's own masks); `attention_dropout=False` trains without it. Any other mask runs
  transformers' SDPA path instead (with its dropout), and says so once; so does a padding mask
  under torch.compile (reading it would sync inside the graph; it is logged as the trace
  reaches it). A call that asks for the
  attention weights (output_attentions) or passes a head_mask (transformers 4.x) runs
  transformers' eager attention, which computes them, and says so once.
- layer_norm: every nn.LayerNorm runs `ops.layer_norm` (not under autocast, whose fp32 rule
  the module keeps). The residual add stays transformers' own, so the add is not fused.
- mlp: the MLP runs `ops.linear_bias_gelu` (c_fc with its GELU in the matmul epilogue) where
  its activation module is a GELU: the tanh form (gelu_new, gelu_pytorch_tanh, and GPT-1's
  "gelu", which transformers computes with the tanh form) or the erf form (GPT-2's "gelu").
- cross_entropy: GPT2LMHeadModel (OpenAIGPTLMHeadModel) in training with labels computes the loss with
  `ops.linear_cross_entropy`, never holding the [B, T, V] logits; its output then has
  logits=None (as Liger-Kernel does). Evaluation, and calls without labels, are unchanged.

GPT-1 (OpenAIGPT*, post-LN, no KV cache) gets the same, its attention through `ops.attention`
in place of the Attention module's `_attn` (no attention weights asked for; no mask,
or a right-padding one, as kv_end: a left pad's row, which sees no key, gets a uniform mix of
every key from transformers' GPT-1, so left padding keeps transformers' code).

Each op dispatches as everywhere in gptfast (kernels on CUDA, the reference elsewhere, the
first fallback logged). `unpatch_transformers(model)` puts transformers' code back.
"""
from __future__ import annotations

import inspect
import math
import types
import weakref

import torch
from torch import nn

from . import ops
from .ops import _dispatch

ATTENTION_NAME = "gptfast"
MODEL_TYPES = ("gpt2", "openai-gpt")
_TANH_GELUS = ("NewGELUActivation", "PytorchGELUTanh", "GELUTanh")  # transformers' activation modules
_STATE = "_gptfast_patch"
_ASKED = "_gptfast_asked"  # on a patched GPT2Model: what its current call asks of its attention modules


def _check_model(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:
        raise ImportError(f"patch_transformers needs transformers installed: {exc}") from None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (GPT-2), got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model must be a GPT-2 or GPT-1 model (config.model_type one of {MODEL_TYPES}), got "
                         f"{model_type!r} ({type(model).__name__})")


def _gelu_form(act) -> "str | None":
    """"tanh" or "none" (erf) for a GELU activation module, None for anything else."""
    name = type(act).__name__
    if name in _TANH_GELUS:
        return "tanh"
    if name == "GELUActivation":
        return "none"
    if isinstance(act, nn.GELU):
        return act.approximate
    return None


# ---- attention -----------------------------------------------------------------------------

def _eager(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' eager attention of the module's model: the one that returns the attention
    weights and applies a head mask. It adds the mask to the scores, so SDPA's boolean mask (what
    transformers makes for "gptfast") becomes additive, and where there is none, the causal mask
    SDPA's is_causal would apply (transformers 5.x's eager applies none of its own)."""
    import sys

    eager = sys.modules[type(module).__module__].eager_attention_forward
    tq, tk = query.shape[2], key.shape[2]
    if attention_mask is None and tq > 1 and _causal(module, kwargs):
        attention_mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :tk]
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_last_window = [None, None]  # [weakref to the last mask read, (its key, what it gave)]: a forward's layers share it


def _key_range(keys):
    """keys: bool [B, Tk], the keys each row's queries see. (start, end, in_range): the first
    seen key, one past the last (0, 0 for a row that sees none), and bool [B, Tk] of start <= j < end."""
    tk = keys.shape[1]
    seen = keys.any(dim=1)
    start = torch.where(seen, keys.int().argmax(dim=1), 0)
    end = torch.where(seen, tk - keys.flip(1).int().argmax(dim=1), 0)
    kpos = torch.arange(tk, device=keys.device)
    return start, end, (kpos >= start[:, None]) & (kpos < end[:, None])


def _read_window(mask, batch: int, tq: int, tk: int):
    """transformers' 4-D attention mask ([B or 1, 1, Tq, Tk], bool or additive float) as a key window
    per row over the first `used` keys: (kv_start, kv_end, used), the int32 [B] bounds None where
    the window is every key in every row. The mask must be exactly the bottom-right causal mask
    over keys 0 .. used - 1, restricted to kv_start[b] <= j < kv_end[b] in row b, and no query
    sees a key past those: the mask of a left- or right-padded batch, in a cache that may be
    longer than what is written (a static cache's tail: its prefill's causal mask is top-left,
    which is bottom-right once the keys stop at the last seen one). None for any other mask, and
    for an additive one that leaves a query no key (see below). Up to three host syncs (the last
    key, the comparison, the bounds). A mask wider than the keys is read over its first tk
    columns, as transformers 4.x's attention functions slice it (its GPT-2 may pass one column
    more than there are keys)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != tq or mask.shape[3] < tk or mask.shape[0] not in (1, batch):
        return None
    mask = mask[..., :tk]
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0].expand(batch, tq, tk)
    start, end, in_range = _key_range(allowed.any(dim=1))  # the keys some query of the row sees
    # no query sees a key at or past `used`; with as many queries as keys, top-left and
    # bottom-right causal agree, and every key is kept (a batch whose rows are all right-padded)
    used = tk if tq == tk else int(end.max())
    if used < tq:  # the first queries would see nothing under a bottom-right mask
        return None
    causal = torch.ones(tq, used, dtype=torch.bool, device=mask.device).tril(diagonal=used - tq)
    if not torch.equal(allowed[..., :used], causal & in_range[:, None, :used]):
        return None
    every_key, unseen = torch.stack([((start == 0) & (end == used)).all(),
                                     ((start > used - tq) | (end == 0)).any()]).tolist()
    if unseen and mask.dtype != torch.bool:
        # A query sees no key (a left pad): an additive mask (transformers 4.x's GPT-2 before
        # masking_utils) gives it a mean over every key under SDPA or eager, not the kernel's 0.
        return None
    if every_key:
        return None, None, used
    return start.to(torch.int32), end.to(torch.int32), used


def _read_gpt1_window(mask, batch: int, tk: int):
    """GPT-1's padding mask ([B or 1, 1, 1, T], additive: 0 where a key is seen) as (kv_end,), int32
    [B], when it is right padding (row b sees keys 0 .. kv_end[b] - 1, at least one), (None,)
    without padding, None otherwise: left padding too, since transformers' GPT-1 gives a query
    that sees no key a uniform mix of every key (its causal mask is -1e4, not -inf), not 0."""
    if mask.dim() != 4 or tuple(mask.shape[1:3]) != (1, 1) or mask.shape[-1] != tk or mask.shape[0] not in (1, batch):
        return None
    keys = (mask if mask.dtype == torch.bool else mask == 0)[:, 0, 0].expand(batch, tk)
    start, end, in_range = _key_range(keys)
    if not torch.equal(keys, in_range) or bool(((start != 0) | (end == 0)).any()):
        return None
    return (None,) if bool((end == tk).all()) else (end.to(torch.int32),)


def _mask_window(mask, key: tuple, read, refused: str):
    """(window, reason): read() (a window, or None for a mask it cannot take), remembered for the
    mask object the last call read (transformers passes every layer the same one), so a forward
    syncs once, not once per layer; reason (why SDPA / transformers' code runs) when there is no
    window: `refused`, or torch.compile, under which the mask is not read (that would sync
    inside the graph)."""
    if torch.compiler.is_compiling():
        return None, "a padding mask under torch.compile (reading it would sync inside the graph)"
    ref, value = _last_window
    key = (None if mask.is_inference() else mask._version, *key)  # inference tensors have no version counter
    if ref is not None and ref() is mask and value[0] == key:
        window = value[1]
    else:
        window = read()
        _last_window[:] = [weakref.ref(mask), (key, window)]
    return window, (refused if window is None else None)


def _causal(module, kwargs) -> bool:
    """Whether transformers' SDPA path would mask causally a call without a mask: the is_causal
    it was passed, else the module's (transformers 4.x passes is_causal=False for any call with
    a mask or one query, 5.x passes none; a mask, where there is one, says what is seen)."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    return bool(causal) and getattr(getattr(module, "config", None), "is_causal", True)


def _scaling(module, head_dim: int) -> float:
    """The score scale of a call that was passed none: the module's own (transformers 5.x's
    GPT-2 sets module.scaling), else what transformers 4.x's GPT-2 eager path computes from the
    config (scale_attn_weights, scale_attn_by_inverse_layer_idx), which its SDPA path ignored."""
    scaling = getattr(module, "scaling", None)
    if scaling is not None:
        return float(scaling)
    scale = head_dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def gptfast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface over gptfast's kernels; q/k/v [B, H, T, D] -> [B, T, H, D]."""
    patch = getattr(module, _STATE, {})
    if not patch.get("attention_dropout", True):
        dropout = 0.0
    tq, tk = query.shape[2], key.shape[2]
    reason = window = None
    asked = [name for name, given in (("output_attentions", patch.get("asked", {}).get("output_attentions")),
                                      ("head_mask", kwargs.get("head_mask") is not None)) if given]
    if asked:
        _dispatch.log_once(f"hf_patch:attention:{asked}", "gptfast: transformers attention runs transformers' "
                           "eager attention, not gptfast's kernel: the call asked for %s", " and ".join(asked))
        return _eager(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if tq > tk or (attention_mask is None and tq > 1 and not _causal(module, kwargs)):
        reason = "not causal self-attention"
    elif attention_mask is not None:
        batch = query.shape[0]
        window, reason = _mask_window(
            attention_mask, ("gpt2", batch, tq, tk), lambda: _read_window(attention_mask, batch, tq, tk),
            "transformers passed an attention mask that is not causal + one key range per row")
    if reason is not None:
        _dispatch.log_once(f"hf_patch:attention:{reason}",
                           "gptfast: transformers attention runs SDPA, not gptfast's kernel: %s", reason)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = _scaling(module, query.shape[-1]) if scaling is None else float(scaling)
    decode = tq == 1 and tk > 1 and not dropout and not (torch.is_grad_enabled() and query.requires_grad)
    kv_start = kv_end = None
    if window is not None:  # the mask's causal limit is bottom-right (queries at the end of the keys)
        kv_start, kv_end, used = window
        if used < tk:  # keys no query sees (a static cache's unwritten tail)
            key, value, tk = key[:, :, :used], value[:, :, :used], used
    elif tq > 1:  # SDPA's is_causal: query i sees keys 0..i (top-left), so only the first tq keys matter
        key, value = key[:, :, :tq], value[:, :, :tq]
    if decode:  # one new token over the cache: split-K flash-decoding, from kv_start to kv_end
        lens = torch.full((query.shape[0],), tk, dtype=torch.int32, device=query.device) if kv_end is None else kv_end
        out = ops.decode_attention(query, key, value, lens, kv_start=kv_start, scale=scale)
    elif tq > 1 or window is not None:
        out = ops.attention(query, key, value, causal=True, scale=scale, kv_start=kv_start, kv_end=kv_end,
                            dropout_p=dropout)
    else:  # one query with a gradient (or one key): every key is visible
        out = ops.attention(query, key, value, causal=False, scale=scale, dropout_p=dropout)
    return out.transpose(1, 2), None


def _gpt2_model_forward(self, *args, **kwargs):
    """GPT2Model.forward, noting for its attention modules whether this call asks for the
    attention weights: transformers 5.x does not pass output_attentions down to them (hooks
    collect what they return), 4.x passes it to the module but not to the attention function."""
    asked = kwargs.get("output_attentions")
    getattr(self, _ASKED)["output_attentions"] = bool(self.config.output_attentions if asked is None else asked)
    return type(self).forward(self, *args, **kwargs)


def _gpt1_attn(self, q, k, v, *args, **kwargs):
    """OpenAIGPT's Attention._attn (k comes transposed, [B, H, D, T]) through ops.attention when
    it is plain causal attention: no head mask, no attention weights, and no mask or a
    right-padding one (the kernel's kv_end); dropout in training is the kernel's."""
    state = getattr(self, _STATE)
    given = {**dict(zip(state["arguments"], args)), **kwargs}  # attention_mask, (head_mask,) output_attentions
    asked = sorted(name for name, value in given.items()
                   if value is not None and value is not False and name != "attention_mask")
    mask = given.get("attention_mask")
    dropout = self.attn_dropout.p if self.training and state["attention_dropout"] else 0.0
    reason = window = None
    if asked:
        reason = "it was given " + ", ".join(asked)
    elif mask is not None:
        batch, tk = q.shape[0], v.shape[2]
        window, reason = _mask_window(mask, ("gpt1", batch, tk), lambda: _read_gpt1_window(mask, batch, tk),
                                      "it was given an attention_mask that is not right padding")
    if reason is not None:
        _dispatch.log_once(f"hf_patch:gpt1-attention:{reason}",
                           "gptfast: GPT-1 attention runs transformers' code: %s", reason)
        return type(self)._attn(self, q, k, v, *args, **kwargs)
    scale = 1.0 / math.sqrt(v.shape[-1]) if self.scale else 1.0
    (kv_end,) = window if window is not None else (None,)
    return [ops.attention(q, k.transpose(-1, -2), v, causal=True, scale=scale, kv_end=kv_end, dropout_p=dropout)]


def _register_attention() -> None:
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError("patching attention needs transformers >= 4.48 (AttentionInterface); "
                          f"patch with attention=False on this version ({exc})") from None
    AttentionInterface.register(ATTENTION_NAME, gptfast_attention)
    try:  # the mask transformers makes for us: SDPA's (None where is_causal is enough)
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


# ---- LayerNorm, MLP, loss ------------------------------------------------------------------

def _layer_norm_forward(self, x):
    if torch.is_autocast_enabled(x.device.type) or len(self.normalized_shape) != 1:
        return nn.LayerNorm.forward(self, x)
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


def _mlp_forward(self, hidden_states):
    fc = self.c_fc
    if type(fc).__name__ != "Conv1D":  # wrapped since the patch (a PEFT adapter...): its own forward
        return self.dropout(self.c_proj(self.act(fc(hidden_states))))
    # Conv1D keeps its weight as [in, out]: the transposed view is nn.Linear's [out, in]
    h = ops.linear_bias_gelu(hidden_states, fc.weight.t(), fc.bias, getattr(self, _STATE)["approximate"])
    return self.dropout(self.c_proj(h))


_LM_HEAD_MODELS = ("GPT2LMHeadModel", "OpenAIGPTLMHeadModel")


def _lm_head_forward(self, x):
    return x if getattr(self, _STATE)["hidden_only"] else nn.Linear.forward(self, x)


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    state = getattr(self, _STATE)
    original = state["forward"]
    if labels is None or not self.training:  # no loss, or evaluation (which wants the logits as well)
        return original(*args, labels=labels, **kwargs)
    return_dict = kwargs.get("return_dict")
    if return_dict is None:  # transformers 4.x also takes it from the config (torchscript: tuples)
        return_dict = getattr(self.config, "return_dict", True) and not getattr(self.config, "torchscript", False)
    reason = ("a tuple output (return_dict=False) holds the logits" if return_dict is False
              else "logits_to_keep asks for logits" if kwargs.get("logits_to_keep", 0) not in (0, None)
              else "the LM head was replaced or wrapped after patching" if getattr(self.lm_head, _STATE, None) is None
              else None)
    if reason is not None:
        _dispatch.log_once(f"hf_patch:loss:{reason}", "gptfast: the training loss runs transformers' LM head and "
                           "cross-entropy, not ops.linear_cross_entropy: %s", reason)
        return original(*args, labels=labels, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    head = self.lm_head
    getattr(head, _STATE)["hidden_only"] = True
    try:
        out = original(*args, labels=None, **kwargs)
    finally:
        getattr(head, _STATE)["hidden_only"] = False
    hidden = out.logits  # the lm_head passed the final hidden states through
    if shift_labels is None:  # as transformers' ForCausalLMLoss: position t predicts label t + 1
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    loss = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets,
                                    bias=head.bias, ignore_index=ignore_index)
    if num_items is not None:  # a sum over the batch divided by the items of all accumulated batches
        num_items = torch.as_tensor(num_items, device=loss.device)
        count = (targets != ignore_index).sum()
        # a batch with no target adds 0 (transformers' sum), not its mean's 0/0 = nan
        loss = torch.where(count > 0, loss, 0.0) * count.to(loss.dtype) / num_items.to(loss.dtype)
    out.loss, out.logits = loss, None
    return out


def _with_signature(function, bound):
    """A copy of function (self, ...) showing bound's signature, so that what inspects
    model.forward (Trainer's column filter, generate's argument check) sees transformers' own.
    A method of it is rebound by copy.deepcopy to the copy, as transformers' forward is."""
    sig = inspect.signature(bound)
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__doc__ = getattr(bound, "__doc__", None)
    copy.__signature__ = sig.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()])
    return copy


# ---- public --------------------------------------------------------------------------------

def patch_transformers(model, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
                       cross_entropy: bool = True, attention_dropout: bool = True):
    """Run a transformers GPT-2 or GPT-1 model's hot ops through gptfast (module docstring);
    returns the same model. Patching a patched model first undoes the earlier patch."""
    _check_model(model)
    if getattr(model, _STATE, None) is not None:
        unpatch_transformers(model)
    patched: list[tuple[nn.Module, str]] = []  # (module, attribute) of each instance override
    gpt1 = model.config.model_type == "openai-gpt"
    asked = {}  # GPT2Attention -> the flags of the GPT2Model it is in (_gpt2_model_forward sets them)
    for module in model.modules():
        if attention and type(module).__name__ == "GPT2Model":
            flags = {"output_attentions": False}
            setattr(module, _ASKED, flags)
            module.forward = types.MethodType(_with_signature(_gpt2_model_forward, module.forward), module)
            patched.append((module, "forward"))
            asked.update((m, flags) for m in module.modules() if type(m).__name__ == "GPT2Attention")

    def patch(module, function, attr="forward", **state):
        setattr(module, _STATE, state)
        setattr(module, attr, types.MethodType(function, module))
        patched.append((module, attr))

    for module in model.modules():
        name = type(module).__name__
        if layer_norm and isinstance(module, nn.LayerNorm):
            patch(module, _layer_norm_forward)
        elif mlp and name in ("GPT2MLP", "MLP") and hasattr(module, "c_fc") and hasattr(module, "act"):
            form = _gelu_form(module.act)
            if form is not None:
                patch(module, _mlp_forward, approximate=form)
            else:
                act = type(module.act).__name__
                _dispatch.log_once(f"hf_patch:mlp:{act}",
                                   "gptfast: the MLP keeps transformers' code: its activation %s is not a GELU", act)
        elif attention and name == "GPT2Attention":
            setattr(module, _STATE, {"attention_dropout": attention_dropout, "asked": asked.get(module, {})})
        elif attention and gpt1 and name == "Attention" and hasattr(module, "_attn"):
            arguments = list(inspect.signature(type(module)._attn).parameters)[4:]  # after self, q, k, v
            patch(module, _gpt1_attn, "_attn", attention_dropout=attention_dropout, arguments=arguments)
    previous = getattr(model.config, "_attn_implementation", None)
    interface = attention and not gpt1  # GPT-1's attention has no interface: its _attn is patched above
    if interface:
        _register_attention()
        _set_attention(model, ATTENTION_NAME)
    if cross_entropy and isinstance(getattr(model, "lm_head", None), nn.Linear) \
            and type(model).__name__ in _LM_HEAD_MODELS:
        patch(model.lm_head, _lm_head_forward, hidden_only=False)
        forward = model.forward  # transformers' (bound), called by _causal_lm_forward
        model.forward = types.MethodType(_with_signature(_causal_lm_forward, forward), model)
    else:
        forward = None
    setattr(model, _STATE, {"forward": forward, "modules": patched, "attention": previous if interface else None,
                            "attention_modules": interface})
    return model


def unpatch_transformers(model):
    """Undo patch_transformers: transformers' own forwards and attention implementation again."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for module, attr in state["modules"]:
        delattr(module, attr)  # the instance attribute: the class's method shows through again
        if hasattr(module, _ASKED):
            delattr(module, _ASKED)
        if module is not model and hasattr(module, _STATE):  # a patched GPT2Model may be the model itself
            delattr(module, _STATE)
    if state["forward"] is not None:
        del model.forward
    for module in model.modules():
        if type(module).__name__ == "GPT2Attention" and hasattr(module, _STATE):
            delattr(module, _STATE)
    if state["attention_modules"]:
        _set_attention(model, state["attention"] or "eager")
    delattr(model, _STATE)
    return model
