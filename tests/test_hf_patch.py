"""gptfast.patch_transformers: a transformers GPT-2 model with gptfast's ops computes what
transformers computes (logits, loss, gradients, generations), through the kernels under the
interpreter on CPU and natively on a GPU."""
import copy
import logging

import pytest
import torch

import gptfast
from gptfast import ops
from gptfast.ops import _dispatch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# transformers' GPT-2 builds its masks with masking_utils: bool, and a query that sees no key gets
# 0 under SDPA, as in the kernels. Before that (transformers 4.53, not 4.57) they are additive, and such a
# query (a left pad) gets a mean over every key, so the patch leaves a left-padded prompt to SDPA.
ADDITIVE_MASKS = not hasattr(transformers.models.gpt2.modeling_gpt2, "create_causal_mask")
LEFT_PADDED_PROMPT_CALLS = 0 if ADDITIVE_MASKS else 1  # ops.attention calls per layer


def hf_gpt2(seed=0, family="gpt2", **kw):
    """A random GPT-2 (or GPT-1) with randomized LayerNorms and biases (nothing left at an
    identity), and weights large enough that each op's error shows in the logits (transformers'
    init, std 0.02, would hide, say, erf GELU in place of tanh)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=211, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0)
    cfg.update(kw)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=None, eos_token_id=None, **cfg))
    else:
        model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("ln_1.weight") else 0.0))
            else:
                p.normal_(0.0, 0.15)
    model.config._attn_implementation = "eager"  # the unpatched model's attention: transformers' own
    return model.to(DEV).eval()


class Calls:
    """Counts the calls of each gptfast op the patch routes to."""

    NAMES = ("attention", "decode_attention", "layer_norm", "linear_bias_gelu", "linear_cross_entropy")

    def __init__(self, monkeypatch):
        self.n = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(ops, name)

            def counted(*a, _name=name, _original=original, **k):
                self.n[_name] += 1
                return _original(*a, **k)
            monkeypatch.setattr(ops, name, counted)


@pytest.fixture(params=["torch", "kernel"])
def backend(request):
    if request.param == "kernel":
        pytest.importorskip("triton")
    with gptfast.use_backend(request.param):
        yield request.param


def tolerance(backend):
    return {"rtol": 1e-5, "atol": 1e-5} if backend == "torch" else {"rtol": 3e-5, "atol": 3e-5}


FAMILIES = ["gpt2", "gpt1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(backend, monkeypatch, family):
    model = hf_gpt2(family=family)
    ids = torch.randint(0, 211, (3, 29), device=DEV)
    with torch.no_grad():
        want = model(ids).logits
    calls = Calls(monkeypatch)
    gptfast.patch_transformers(model)
    if family == "gpt2":
        assert model.config._attn_implementation == "gptfast"
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, **tolerance(backend))
    layer_norms = 5 if family == "gpt2" else 4  # GPT-1 (post-LN) has no final LayerNorm
    assert calls.n["attention"] == 2 and calls.n["layer_norm"] == layer_norms, calls.n
    assert calls.n["linear_bias_gelu"] == 2, calls.n


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_and_gradients_equal_transformers(backend, monkeypatch, family):
    model = hf_gpt2(seed=1, family=family)
    patched = copy.deepcopy(model)
    calls = Calls(monkeypatch)
    gptfast.patch_transformers(patched)
    ids = torch.randint(0, 211, (2, 23), device=DEV)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt not trained on
    results = []
    for m in (model.train(), patched.train()):
        out = m(ids, labels=labels)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    assert got.logits is None and ref.logits is not None  # the fused loss never made the logits
    assert calls.n["linear_cross_entropy"] == 1 and calls.n["attention"] == 2
    torch.testing.assert_close(got.loss, ref.loss, **tolerance(backend))
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tolerance(backend), msg=name)


def test_with_transformers_gradient_checkpointing():
    """Trainer's gradient_checkpointing: the blocks recompute through the patched modules."""
    model = hf_gpt2(seed=11).train()
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    if hasattr(patched, "activation_checkpointing_enable"):  # newer transformers, where the old name is deprecated
        patched.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 211, (2, 15), device=DEV)
    for m in (model, patched):
        m(ids, labels=ids).loss.backward()
    assert patched.transformer.gradient_checkpointing
    for (name, a), (_, b) in zip(model.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_loss_over_items_of_accumulated_batches(monkeypatch):
    """Trainer's num_items_in_batch: the loss is the sum over this batch's targets divided by it."""
    model = hf_gpt2(seed=2).train()
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    ids = torch.randint(0, 211, (2, 17), device=DEV)
    labels = ids.clone()
    labels[1, 3:9] = -100
    items = torch.tensor(57, device=DEV)
    want = model(ids, labels=labels, num_items_in_batch=items).loss
    got = patched(ids, labels=labels, num_items_in_batch=items).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mean = patched(ids, labels=labels).loss
    torch.testing.assert_close(got, mean * (labels[:, 1:] != -100).sum() / 57, rtol=1e-5, atol=1e-6)
    none = torch.full_like(labels, -100)  # a micro-batch with no target (all prompt) adds 0, not nan
    got = patched(ids, labels=none, num_items_in_batch=items).loss
    torch.testing.assert_close(got, model(ids, labels=none, num_items_in_batch=items).loss)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)


@pytest.mark.parametrize("scaled", [False, True], ids=["scale", "scale-by-layer"])
def test_greedy_generation_equals_transformers(backend, monkeypatch, scaled):
    """scale-by-layer: GPT-2's scale_attn_by_inverse_layer_idx, another scale per layer (passed to
    the decode kernel as its scale)."""
    model = hf_gpt2(seed=3, scale_attn_by_inverse_layer_idx=scaled)
    ids = torch.randint(0, 211, (2, 11), device=DEV)
    kw = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
              return_dict_in_generate=True, output_logits=True)
    want = model.generate(ids, **kw)
    calls = Calls(monkeypatch)
    gptfast.patch_transformers(model)
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):  # each step's logits, not only its argmax
        torch.testing.assert_close(a, b, **tolerance(backend), msg=f"step {step}")
    # the prompt through the flash kernel, each new token over the cache through split-K decoding
    assert calls.n["decode_attention"] == 2 * 8, calls.n
    assert calls.n["attention"] == 2, calls.n


def _sdpa_twin(model):
    """The unpatched model with transformers' SDPA attention: the rule the patch follows for a row
    that sees no key (0; transformers' eager attention gives such a padding row a uniform mix)."""
    twin = copy.deepcopy(model)
    twin.config._attn_implementation = "sdpa"
    return twin


def _padded_mask(ids):
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row (generate), its first queries see no key
    mask[1, -3:] = 0  # a right-padded row (a training batch)
    return mask


def test_padded_batches_run_the_kernels(backend, monkeypatch, caplog):
    """A padding mask goes to the kernel as a key window per row, read from transformers' mask
    once per forward (the layers share it): every position equals transformers with SDPA."""
    from gptfast import hf_patch
    model = hf_gpt2(seed=4)
    ids = torch.randint(1, 211, (3, 10), device=DEV)
    mask = _padded_mask(ids)
    with torch.no_grad():
        want = _sdpa_twin(model)(ids, attention_mask=mask).logits
    gptfast.patch_transformers(model)
    calls = Calls(monkeypatch)
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    reads = []
    real = hf_patch._read_window
    monkeypatch.setattr(hf_patch, "_read_window", lambda *a: reads.append(1) or real(*a))
    with caplog.at_level(logging.WARNING, logger="gptfast"), torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, **tolerance(backend))
    layers = 2 * LEFT_PADDED_PROMPT_CALLS
    assert calls.n["attention"] == layers and len(reads) == 1, (calls.n, reads)
    assert ("runs SDPA" in caplog.text) == ADDITIVE_MASKS
    with torch.inference_mode():  # a serving loop's mode: its tensors have no version counter
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, **tolerance(backend))
    assert calls.n["attention"] == 2 * layers and len(reads) == 2, (calls.n, reads)


@pytest.mark.parametrize("how", ["kwarg", "config"])
def test_tuple_output_keeps_transformers_loss_and_says_so(how, caplog, monkeypatch):
    """return_dict=False (the call's, or transformers 4.x's config.return_dict): the tuple holds the
    logits, so the loss is transformers' own (not the fused one, which has no logits) and is said once."""
    model = hf_gpt2(seed=5).train()
    kw = {"return_dict": False} if how == "kwarg" else {}
    if how == "config":
        model.config.return_dict = False
    ids = torch.randint(0, 211, (2, 13), device=DEV)
    try:
        want = model(ids, labels=ids, **kw)
    except AttributeError as exc:  # transformers 5's GPT2LMHeadModel itself fails on config.return_dict=False
        pytest.skip(f"transformers {transformers.__version__} has no tuple output this way: {exc}")
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        got = patched(ids, labels=ids, **kw)
    assert isinstance(got, tuple) and len(got) == len(want)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)  # the logits, where they belong
    assert "return_dict=False" in caplog.text and "ops.linear_cross_entropy" in caplog.text



def test_padded_training_loss_and_gradients_equal_transformers(backend, monkeypatch):
    """Right- and left-padded rows with the pads' labels kept (as a naive collator leaves them):
    the loss and every gradient through the windowed kernels' backward."""
    model = hf_gpt2(seed=13).train()
    want_model, patched = _sdpa_twin(model), gptfast.patch_transformers(copy.deepcopy(model))
    ids = torch.randint(1, 211, (3, 21), device=DEV)
    mask = _padded_mask(ids)
    calls = Calls(monkeypatch)
    losses, grads = [], []
    for m in (want_model, patched):
        loss = m(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert calls.n["attention"] == 2 * LEFT_PADDED_PROMPT_CALLS, calls.n
    torch.testing.assert_close(losses[1], losses[0], **tolerance(backend))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **tolerance(backend), msg=name)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batched_generation_equals_transformers(backend, monkeypatch, cache):
    """generate() on a left-padded batch: the prompt through the flash kernel with a key window,
    each new token through split-K decoding from the row's first real token. static
    (cache_implementation="static"): the prefill's mask is top-left causal over a longer cache,
    read as the window over the keys written so far."""
    model = hf_gpt2(seed=14)
    ids = torch.randint(1, 211, (3, 8), device=DEV)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
          "return_dict_in_generate": True, "output_logits": True}
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = _sdpa_twin(model).generate(ids, **kw)
    gptfast.patch_transformers(model)
    calls = Calls(monkeypatch)
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, **tolerance(backend), msg=f"step {step}")
    assert calls.n["attention"] == 2 * LEFT_PADDED_PROMPT_CALLS and calls.n["decode_attention"] == 2 * 5, calls.n


def test_other_masks_run_sdpa_and_say_so(caplog, monkeypatch):
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    model = hf_gpt2(seed=4)
    ids = torch.randint(1, 211, (2, 10), device=DEV)
    mask = torch.ones_like(ids)
    mask[0, 3] = 0  # a hole: not one key range
    with torch.no_grad():
        want = _sdpa_twin(model)(ids, attention_mask=mask).logits
    gptfast.patch_transformers(model)
    with caplog.at_level(logging.WARNING, logger="gptfast"), torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "not causal + one key range per row" in caplog.text


def test_gpt1_right_padded_batches_run_the_kernel(backend, monkeypatch, caplog):
    """GPT-1 with a right-padding mask (its fine-tuning batches): the kernel with kv_end, logits
    and the training gradients equal to transformers' own code at every position. Left padding
    keeps transformers' code (a row that sees no key gets a uniform mix there, 0 in the kernel)."""
    model = hf_gpt2(seed=15, family="gpt1")
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    ids = torch.randint(1, 211, (3, 19), device=DEV)
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0
    mask[2, -1:] = 0
    calls = Calls(monkeypatch)
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        for m in (model.train(), patched.train()):
            m(ids, attention_mask=mask, labels=ids).loss.backward()
    assert calls.n["attention"] == 2, calls.n
    assert "GPT-1 attention runs transformers' code" not in caplog.text
    for (name, a), (_, b) in zip(model.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tolerance(backend), msg=name)
    with torch.no_grad():
        torch.testing.assert_close(patched.eval()(ids, attention_mask=mask).logits,
                                   model.eval()(ids, attention_mask=mask).logits, **tolerance(backend))

    left = mask.flip(1)
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gptfast"), torch.no_grad():
        got = patched(ids, attention_mask=left).logits
    assert "not right padding" in caplog.text
    torch.testing.assert_close(got, model(ids, attention_mask=left).logits, rtol=1e-5, atol=1e-5)


def test_read_gpt1_window():
    from gptfast.hf_patch import _read_gpt1_window
    keys = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    additive = ((1.0 - keys) * torch.finfo(torch.float32).min)[:, None, None, :]
    (end,) = _read_gpt1_window(additive, 2, 5)
    assert end.tolist() == [3, 5] and end.dtype == torch.int32
    assert _read_gpt1_window(torch.zeros(1, 1, 1, 5), 2, 5) == (None,)
    assert _read_gpt1_window(additive.flip(-1), 2, 5) is None  # left padding
    assert _read_gpt1_window(additive[..., :4], 2, 5) is None
    holed = additive.clone()
    holed[1, ..., 2] = torch.finfo(torch.float32).min
    assert _read_gpt1_window(holed, 2, 5) is None
    assert _read_gpt1_window(torch.full((2, 1, 1, 5), torch.finfo(torch.float32).min), 2, 5) is None  # no key


def test_read_window_of_transformers_masks():
    from gptfast.hf_patch import _read_window
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    keys = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = (causal & keys[:, None, :])[:, None]  # [2, 1, 5, 5]
    start, end, used = _read_window(mask, 2, 5, 5)
    assert start.tolist() == [2, 0] and end.tolist() == [5, 3] and used == 5 and start.dtype == torch.int32
    def additive(m):
        return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    # an additive mask leaving a query no key (row 0's first two): transformers' SDPA and eager give
    # it a mean over every key, not 0, so it is not a window; with right padding alone it is one
    assert _read_window(additive(mask), 2, 5, 5) is None
    start, end, used = _read_window(additive(mask[1:]), 1, 5, 5)
    assert (start.tolist(), end.tolist(), used) == ([0], [3], 5)
    wider = torch.cat([mask, torch.zeros(2, 1, 5, 1, dtype=torch.bool)], dim=-1)  # transformers 4.x: a column more
    start, end, used = _read_window(wider, 2, 5, 5)
    assert (start.tolist(), end.tolist(), used) == ([2, 0], [5, 3], 5)
    assert _read_window(causal[None, None].expand(1, 1, 5, 5), 3, 5, 5) == (None, None, 5)  # batch 1, no padding
    decode = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None]  # one query over a cache
    start, end, used = _read_window(decode, 1, 1, 6)
    assert (start.tolist(), end.tolist(), used) == ([1], [6], 6)
    # a static cache: 5 queries over 8 slots, top-left causal, the last 3 slots unwritten
    static = torch.zeros(2, 1, 5, 8, dtype=torch.bool)
    static[..., :5] = mask
    start, end, used = _read_window(static, 2, 5, 8)
    assert (start.tolist(), end.tolist(), used) == ([2, 0], [5, 3], 5)
    assert _read_window(~mask, 2, 5, 5) is None  # not causal
    assert _read_window(mask[..., :4], 2, 5, 5) is None  # another shape
    assert _read_window(mask[:, :, :, :3].contiguous(), 2, 5, 3) is None  # more queries than keys seen
    holed = mask.clone()
    holed[1, 0, 2:, 1] = False
    assert _read_window(holed, 2, 5, 5) is None


def test_dropout_runs_in_ops_attention(monkeypatch):
    """Attention dropout in training goes to ops.attention's dropout_p (the kernel's own masks on
    a GPU; on CPU its reference draws torch.dropout as transformers' eager attention does, so
    the same seed gives transformers' loss); attention_dropout=False trains without it."""
    ids = torch.randint(1, 211, (2, 10), device=DEV)
    for family in FAMILIES:
        model = hf_gpt2(seed=4, family=family, attn_pdrop=0.1).train()
        drop = gptfast.patch_transformers(copy.deepcopy(model))
        seen, real = [], ops.attention
        monkeypatch.setattr(ops, "attention", lambda *a, **k: seen.append(k.get("dropout_p")) or real(*a, **k))
        torch.manual_seed(7)
        got = drop(ids, labels=ids).loss
        assert seen == [0.1, 0.1], (family, seen)  # every layer, with the config's p
        if DEV.type == "cpu":
            torch.manual_seed(7)
            torch.testing.assert_close(got, model(ids, labels=ids).loss, rtol=1e-5, atol=1e-5, msg=family)
        got.backward()
        assert all(torch.isfinite(p.grad).all() for p in drop.parameters() if p.grad is not None), family
        monkeypatch.setattr(ops, "attention", real)
        keep = gptfast.patch_transformers(copy.deepcopy(model), attention_dropout=False).train()
        plain = hf_gpt2(seed=4, family=family).train()  # attn_pdrop 0
        kept = keep(ids, labels=ids).loss
        torch.testing.assert_close(kept, plain(ids, labels=ids).loss,
                                   rtol=1e-5, atol=1e-5)  # no dropout on the attention weights at all
        assert (got - kept).abs() > 1e-5, family  # the same patched model but for the dropout


def test_gpt1_attention_weights_asked_for_run_transformers_code(caplog):
    model = hf_gpt2(seed=12, family="gpt1")
    ids = torch.randint(0, 211, (2, 10), device=DEV)
    want = model(ids, output_attentions=True)
    gptfast.patch_transformers(model)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        got = model(ids, output_attentions=True)
    assert "it was given output_attentions" in caplog.text
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.attentions[1], want.attentions[1])


def test_gpt2_attention_weights_and_head_mask_run_transformers_eager(monkeypatch, caplog):
    """output_attentions (and transformers 4.x's head_mask, which scales the weights) need the
    attention weights, which the kernels never make: those calls run transformers' eager attention
    and say so (not empty or None attentions, not a head mask dropped), on a padded batch, with
    cross-attention and through generate; a call without them is back on the kernel."""
    model = hf_gpt2(seed=16)
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    ids = torch.randint(1, 211, (3, 11), device=DEV)
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    calls = Calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="gptfast"), torch.no_grad():
        for kw in ({}, {"attention_mask": _padded_mask(ids)}):
            want, got = model(ids, output_attentions=True, **kw), patched(ids, output_attentions=True, **kw)
            assert len(got.attentions) == len(want.attentions) == 2, kw
            for a, b in zip(got.attentions, want.attentions):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        head_mask = torch.ones(2, 4, device=DEV)
        head_mask[1, 2], head_mask[0, 0] = 0.0, 0.5
        torch.testing.assert_close(patched(ids, head_mask=head_mask).logits, model(ids, head_mask=head_mask).logits,
                                   rtol=1e-5, atol=1e-5)  # applied by transformers 4.x, ignored by 5.x: as unpatched
        assert calls.n["attention"] == 0, calls.n
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  return_dict_in_generate=True, output_attentions=True)
        want, got = model.generate(ids, **kw), patched.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences) and len(got.attentions) == len(want.attentions) == 3
        for step_got, step_want in zip(got.attentions, want.attentions):
            for a, b in zip(step_got, step_want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(patched(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert calls.n["attention"] == 2, calls.n  # the last call, asking for nothing: the kernel again
    assert "runs transformers' eager attention, not gptfast's kernel: the call asked for output_attentions" \
        in caplog.text

    cross = hf_gpt2(seed=17, add_cross_attention=True)
    patched = gptfast.patch_transformers(copy.deepcopy(cross))
    enc = torch.randn(3, 6, 64, device=DEV)
    with torch.no_grad():
        want, got = (m(ids, encoder_hidden_states=enc, output_attentions=True) for m in (cross, patched))
        for a, b in zip(got.attentions + got.cross_attentions, want.attentions + want.cross_attentions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert len(got.cross_attentions) == 2

def test_bidirectional_config_runs_sdpa(caplog):
    """transformers' config.is_causal=False (its bidirectional switch) is not causal attention."""
    if ADDITIVE_MASKS:
        pytest.skip("this transformers' GPT-2 ignores config.is_causal (its masks are causal whatever it says)")
    model = hf_gpt2(seed=10)
    model.config.is_causal = False
    ids = torch.randint(0, 211, (2, 9), device=DEV)
    want = model(ids).logits
    gptfast.patch_transformers(model)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "not causal self-attention" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_puts_transformers_back(family):
    model = hf_gpt2(seed=5, family=family)
    ids = torch.randint(0, 211, (1, 12), device=DEV)
    want = model(ids).logits
    gptfast.patch_transformers(model)
    gptfast.patch_transformers(model, mlp=False)  # a second patch replaces the first
    assert "forward" not in vars(model.transformer.h[0].mlp)
    gptfast.unpatch_transformers(model)
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in vars(m) or "_attn" in vars(m) for m in model.modules())
    assert torch.equal(model(ids).logits, want)


def test_a_patched_model_copies_and_shows_transformers_signature():
    """Trainer drops dataset columns that model.forward's signature does not name, and copies
    of a model (deepcopy) must run on their own weights."""
    import inspect

    model = gptfast.patch_transformers(hf_gpt2(seed=7)).train()
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params), list(params)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = torch.randint(0, 211, (1, 9), device=DEV)
    a, b = model(ids, labels=ids).loss, twin(ids, labels=ids).loss
    assert not torch.allclose(a, b)
    gptfast.unpatch_transformers(twin)
    torch.testing.assert_close(twin(ids, labels=ids).loss, b, rtol=1e-5, atol=1e-5)


def test_modules_wrapped_after_the_patch_keep_their_own_forward():
    """A PEFT-style wrapper put around c_fc or lm_head after patching is not bypassed."""

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model = hf_gpt2(seed=8).train()
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    for m in (model, patched):
        m.transformer.h[1].mlp.c_fc = Doubled(m.transformer.h[1].mlp.c_fc)
        m.lm_head = Doubled(m.lm_head)
    ids = torch.randint(0, 211, (2, 9), device=DEV)
    want = model(ids, labels=ids)
    got = patched(ids, labels=ids)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert got.logits is not None  # the unfused head, as the wrapper asks


def test_patched_training_step_traces_fullgraph():
    """torch.compile(fullgraph=True) traces the patched model's training loss with no graph
    break (the ops are torch.library custom ops); backend "eager" keeps the test fast."""
    torch._dynamo.reset()
    model = hf_gpt2(seed=9).train()
    ids = torch.randint(0, 211, (2, 17), device=DEV)
    want = model(ids, labels=ids).loss
    gptfast.patch_transformers(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got = compiled(ids, labels=ids)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)


def test_padded_training_step_under_compile_runs_sdpa_fullgraph(monkeypatch, caplog):
    """Under torch.compile the mask is not read (that would sync in the graph): SDPA runs, the
    trace has no graph break, the loss is transformers' own, and the trace says why, once."""
    torch._dynamo.reset()
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    model = hf_gpt2(seed=9).train()
    ids = torch.randint(1, 211, (3, 17), device=DEV)
    mask = _padded_mask(ids)
    want = _sdpa_twin(model)(ids, attention_mask=mask, labels=ids).loss
    gptfast.patch_transformers(model)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        got = torch.compile(model, fullgraph=True, backend="eager")(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)
    said = [r.getMessage() for r in caplog.records if "runs SDPA" in r.getMessage()]
    why = "a padding mask under torch.compile (reading it would sync inside the graph)"
    assert said == [f"gptfast: transformers attention runs SDPA, not gptfast's kernel: {why}"], said


def test_bad_models_are_refused():
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel"):
        gptfast.patch_transformers(torch.nn.Linear(2, 2))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="GPT-2 or GPT-1 model .*got 'bert'"):
        gptfast.patch_transformers(bert)


@pytest.mark.gpu
def test_patched_bf16_training_on_cuda_matches_within_twice_transformers_error():
    """On a GPU at GPT-2 124M's width: the patched model's loss and gradients in bf16 are as
    close to an fp32 run as transformers' own bf16 run is (the kernels, not the reference)."""
    cfg = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=2, n_head=12)
    ref32 = hf_gpt2(seed=6, **cfg).train()
    ids = torch.randint(0, 50257, (4, 512), device=DEV)
    runs = {}
    for name in ("fp32", "hf-bf16", "gptfast-bf16"):
        m = copy.deepcopy(ref32)
        if name != "fp32":
            m = m.to(torch.bfloat16)
        if name == "gptfast-bf16":
            gptfast.patch_transformers(m)
        with gptfast.use_backend("kernel" if name == "gptfast-bf16" else "torch"):
            loss = m(ids, labels=ids).loss
            loss.backward()
        runs[name] = (loss.float(), m.transformer.h[0].mlp.c_fc.weight.grad.float())
    for k in (0, 1):
        err_hf = (runs["hf-bf16"][k] - runs["fp32"][k]).abs().max()
        err = (runs["gptfast-bf16"][k] - runs["fp32"][k]).abs().max()
        assert err <= 2 * err_hf + 1e-3, (k, err.item(), err_hf.item())
