"""ops.attention(..., dropout_p=): dropout on the attention weights inside the flash kernels.

The kernels decide keep/drop per weight from (seed, b * H + h, i * Tk + j) with Philox
(kernels/attention.py _dropout_keep). gptfast.ops._attention_triton.dropout_keep_mask
materialises that mask Z with a kernel of its own; its statistics are checked here on their own,
then the kernel's output and gradients against float64 built from Z:
softmax(q k^T * scale + mask) * Z / (1 - p) @ v, by the 2x-PyTorch-in-dtype rule of
tests/test_attention.py. On CPU under TRITON_INTERPRET=1 at small odd shapes; @gpu at GPT-2's.
"""
import logging
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import gptfast  # noqa: E402
from gptfast import ops  # noqa: E402
from gptfast.ops import _dispatch  # noqa: E402
from test_attention import (ATOL, BF16, CUDA, DEV, FP16, FP32, _causal_mask, _check, _qkv,  # noqa: E402,F401
                            _window_mask, poisoned, tma_forced)

_KERNEL_REASON = _dispatch.triton_missing_reason() or _dispatch.module_missing_reason("_attention_triton")
pytestmark = pytest.mark.skipif(_KERNEL_REASON is not None, reason=f"attention kernels unavailable: {_KERNEL_REASON}")


@pytest.fixture
def seeds(monkeypatch):
    """The seed tensor of every ops.attention call with dropout, as drawn."""
    from gptfast.ops import _attention_triton as at
    drawn = []
    real = at.new_dropout_seed

    def spy(device):
        s = real(device)
        drawn.append(s)
        return s
    monkeypatch.setattr(at, "new_dropout_seed", spy)
    return drawn


def _mask(seed, B, H, Tq, Tk, p, monkeypatch=None):
    from gptfast.ops import _attention_triton as at
    if monkeypatch is not None:  # a poisoned buffer: every element must be written 0 or 1
        monkeypatch.setattr(at, "_new_empty", lambda shape, dtype, device: torch.full(shape, 7, dtype=dtype,
                                                                                      device=device))
    z = at.dropout_keep_mask(seed, B, H, Tq, Tk, p)
    assert z.shape == (B, H, Tq, Tk) and z.dtype == torch.int8
    assert ((z == 0) | (z == 1)).all(), "mask elements left unwritten"
    return z.bool()


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def _binomial_ok(kept, n, p, sigmas=5.0):
    """kept of n trials within `sigmas` standard deviations of keep probability 1 - p."""
    return abs(kept - n * (1 - p)) <= sigmas * math.sqrt(n * p * (1 - p))


def test_keep_mask_statistics(monkeypatch):
    """Z alone: the keep rate is 1 - p within a binomial bound, overall and per (b, h); rows,
    heads and batches get different masks; another seed another mask, agreeing on about
    p^2 + (1 - p)^2 of the weights as independent draws do; a larger p keeps a subset."""
    B, H, T, p = 2, 3, 70, 0.3
    z = _mask(_seed(123456789), B, H, T, T, p, monkeypatch)
    assert _binomial_ok(z.sum().item(), z.numel(), p)
    for b in range(B):
        for h in range(H):
            assert _binomial_ok(z[b, h].sum().item(), T * T, p), (b, h)
    flat = z.reshape(B * H, T, T)
    assert not (flat[:, 1:] == flat[:, :1]).all(-1).any(), "two rows of a head share a mask"
    for i in range(B * H):  # heads / batches: each pair agrees as independent draws would
        for j in range(i):
            agree = (flat[i] == flat[j]).sum().item()
            assert _binomial_ok(agree, T * T, 1 - (p * p + (1 - p) ** 2)), (i, j, agree)
    other = _mask(_seed(987654321), B, H, T, T, p)
    assert _binomial_ok((other == z).sum().item(), z.numel(), 1 - (p * p + (1 - p) ** 2))
    big = _mask(_seed(123456789), B, H, T, T, 0.6)
    assert not (big & ~z).any() and _binomial_ok(big.sum().item(), z.numel(), 0.6)
    # a seed past 32 bits keys the generator too (its high word is Philox's second key)
    assert not torch.equal(_mask(_seed(5 + 2 ** 40), 1, 1, 37, 37, p), _mask(_seed(5), 1, 1, 37, 37, p))


def _in_dtype_with_mask(q, k, v, allowed, z, p, scale):
    """PyTorch in the inputs' dtype with the mask: matmuls in that dtype, softmax in fp32."""
    s = torch.matmul(q * scale, k.transpose(-2, -1)).float()
    if allowed is not None:
        seen = allowed.any(dim=-1, keepdim=True)
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0)
        w = torch.softmax(s, dim=-1) * seen
    else:
        w = torch.softmax(s, dim=-1)
    return torch.matmul((w * z / (1 - p)).to(q.dtype), v)


def _oracle64(q, k, v, allowed, z, p, scale):
    q, k, v = (t.double() for t in (q, k, v))
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if allowed is not None:
        seen = allowed.any(dim=-1, keepdim=True)
        w = torch.softmax(s.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0), dim=-1) * seen
    else:
        w = torch.softmax(s, dim=-1)
    return torch.matmul(w * z / (1 - p), v)


def _run_dropout(seeds, B, H, Tq, Tk, D, dtype, causal, p, scale=None, kv_start=None, kv_end=None):
    q, k, v = _qkv(B, H, Tq, D, dtype, Tk, requires_grad=True)
    window = {"kv_start": kv_start, "kv_end": kv_end}
    n = len(seeds)
    out = ops.attention(q, k, v, causal=causal, scale=scale, backend="kernel", dropout_p=p, **window)
    assert len(seeds) == n + 1, "ops.attention drew no dropout seed"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    z = _mask(seeds[-1], B, H, Tq, Tk, p)
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = _causal_mask(Tq, Tk) if causal else None
    if kv_start is not None or kv_end is not None:
        wm = _window_mask(B, Tk, kv_start, kv_end)
        allowed = wm if allowed is None else allowed & wm
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _oracle64(*leaves64, allowed, z, p, sc)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    base = _in_dtype_with_mask(*leaves, allowed, z, p, sc)
    base_grads = torch.autograd.grad(base, leaves, dout)
    assert out.dtype == dtype
    _check("out", out, ref, base, dtype)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        _check(name, g, r, b, dtype)
    # the mask mattered: without it the output is another one
    nodrop = _oracle64(q.detach(), k.detach(), v.detach(), allowed, torch.ones_like(z), 0.0, sc)
    assert (nodrop - ref).abs().max().item() > 10 * ATOL[dtype]
    return out, grads


# (B, H, Tq, Tk, D, dtype, causal, p, kv_start, kv_end): odd T against the interpreter's blocks
# (fwd 32 x 16, dK/dV 16 x 32, dQ 32 x 16), every dtype, both modes, Tq < Tk, key windows
DROPOUT_CASES = [
    (1, 2, 37, 37, 16, FP32, True, 0.1, None, None),
    (2, 1, 70, 70, 64, BF16, True, 0.3, None, None),
    (2, 2, 37, 37, 64, FP16, False, 0.5, None, None),
    (1, 2, 37, 70, 16, FP16, True, 0.2, None, None),
    (2, 1, 37, 70, 16, FP32, False, 0.3, None, None),
    (2, 2, 70, 70, 16, BF16, True, 0.1, [5, 0], [70, 41]),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,dtype,causal,p,kv_start,kv_end", DROPOUT_CASES,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}x{c[3]}D{c[4]}-{str(c[5])[6:]}-"
                              f"{'causal' if c[6] else 'full'}-p{c[7]}" + ("-window" if c[8] else "")
                              for c in DROPOUT_CASES])
def test_dropout_fwd_bwd_against_the_mask(poisoned, seeds, B, H, Tq, Tk, D, dtype, causal, p, kv_start, kv_end):
    torch.manual_seed(Tq * Tk + D)
    ints = (lambda x: None if x is None else torch.tensor(x, device=DEV))
    _run_dropout(seeds, B, H, Tq, Tk, D, dtype, causal, p, 0.3 if dtype == FP32 and causal else None,
                 ints(kv_start), ints(kv_end))


def test_dropout_through_tma(poisoned, tma_forced, seeds):
    """GPTFAST_TMA=1: the descriptor variants of all three kernels apply the same mask."""
    torch.manual_seed(11)
    _run_dropout(seeds, 2, 1, 37, 37, 32, BF16, True, 0.25)
    assert tma_forced == [("fwd", 2), ("dkdv", 2), ("dq", 2)]


def test_dropout_zero_is_the_call_without_it(poisoned):
    """dropout_p=0 runs the kernels as before (no seed drawn, bitwise the same out and grads)."""
    torch.manual_seed(3)
    q, k, v = _qkv(1, 2, 37, 16, FP16, requires_grad=True)
    rng = torch.get_rng_state()
    results = []
    for kw in ({}, {"dropout_p": 0.0}, {"dropout_p": 0}):
        out = ops.attention(q, k, v, backend="kernel", **kw)
        results.append([out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))])
    assert torch.equal(torch.get_rng_state(), rng), "dropout_p=0 drew from the generator"
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_dropout_is_seeded_by_torch_and_fresh_per_call(poisoned):
    """torch.manual_seed(s) then the same call: bitwise the same output and gradients; the next
    call draws another mask."""
    q, k, v = _qkv(2, 2, 37, 16, FP32, requires_grad=True)
    dout = torch.randn(2, 2, 37, 16, device=DEV)

    def step():
        out = ops.attention(q, k, v, backend="kernel", dropout_p=0.2)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]
    torch.manual_seed(42)
    first, second = step(), step()
    torch.manual_seed(42)
    again = step()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_dropout_p_is_validated(bad):
    q, k, v = _qkv(1, 1, 5, 16, FP32)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\), got"):
        ops.attention(q, k, v, dropout_p=bad)


def test_reference_fallback_drops_out_and_says_so(monkeypatch, caplog):
    """Where the kernel cannot run (fp64 here) the reference applies torch.dropout to its weights
    (its masks, not the kernel's), and the fallback says so once."""
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    B, H, T, D, p = 2, 2, 19, 16, 0.4
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, device=DEV) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        torch.manual_seed(9)
        got = ops.attention(q, k, v, dropout_p=p)
        ops.attention(q, k, v, dropout_p=p)
    lines = [r.getMessage() for r in caplog.records if "attention dropout p=0.4" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    torch.manual_seed(9)
    w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~_causal_mask(T, T), float("-inf")), -1)
    want = torch.dropout(w, p, True) @ v
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - ops.attention(q, k, v)).abs().max() > 1e-3
    torch.manual_seed(9)
    assert torch.equal(ops.attention(q, k, v, backend="torch", dropout_p=p), got)


@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_dropout_runs_the_reference_and_says_so(monkeypatch, Tq):
    """ops.decode_attention(..., dropout_p=p) (a model generating in training mode): the split-K
    kernel has no dropout, so the reference drops the weights over each row's cache with
    torch.dropout (keys past a row's length stay at weight 0): a fallback, logged once under
    "auto", refused under "kernel"; dropout_p=0 is the call without it, bit for bit."""
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    B, H, Tmax, D, p = 3, 2, 23, 16, 0.3
    torch.manual_seed(2)
    q = torch.randn(B, H, Tq, D, device=DEV)
    kc, vc = (torch.randn(B, H, Tmax, D, device=DEV) for _ in range(2))
    lens = torch.tensor([Tq, 11, Tmax], dtype=torch.int32, device=DEV)
    for b, n in enumerate(lens.tolist()):  # the unwritten tails: large, so a weight on them would show
        kc[b, :, n:], vc[b, :, n:] = 30.0, 1e4
    with _dispatch.fallbacks_logged() as lines:
        torch.manual_seed(9)
        got = ops.decode_attention(q, kc, vc, lens, dropout_p=p, scale=0.2)
        again = ops.decode_attention(q, kc, vc, lens, dropout_p=p, scale=0.2)
    assert lines == ["ops.decode_attention falls back to the PyTorch reference: attention dropout p=0.3 (the "
                     "split-K kernel has none; the reference applies torch.dropout)"], lines
    with gptfast.use_backend("kernel"):
        plain = ops.decode_attention(q, kc, vc, lens, scale=0.2)
        assert torch.equal(ops.decode_attention(q, kc, vc, lens, dropout_p=0.0, scale=0.2), plain)
        with pytest.raises(_dispatch.KernelUnavailable, match="backend='kernel' cannot run here: attention dropout"):
            ops.decode_attention(q, kc, vc, lens, dropout_p=p)
    qpos = lens.long().view(B, 1, 1, 1) - Tq + torch.arange(Tq, device=DEV).view(1, 1, Tq, 1)
    seen = torch.arange(Tmax, device=DEV).view(1, 1, 1, Tmax) <= qpos
    torch.manual_seed(9)
    w = torch.softmax((q @ kc.transpose(-1, -2) * 0.2).masked_fill(~seen, float("-inf")), -1)
    torch.testing.assert_close(got, torch.dropout(w, p, True) @ vc, rtol=1e-5, atol=1e-5)
    assert got.abs().max() < 100, "a key past a row's length was weighted"
    assert (got - plain).abs().max() > 1e-2 and (got - again).abs().max() > 1e-2  # dropped, and fresh per call
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\), got 1.0"):
        ops.decode_attention(q, kc, vc, lens, dropout_p=1.0)


def test_opcheck_with_dropout():
    torch.manual_seed(5)
    q, k, v = _qkv(1, 2, 19, 16, FP32)
    seed = _seed(77)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.gptfast.flash_attn_fwd.default, (qg, kg, vg, True, 0.25, None, None, 0.3, seed))
    out, lse = torch.ops.gptfast.flash_attn_fwd(q, k, v, True, 0.25, None, None, 0.3, seed)
    torch.library.opcheck(torch.ops.gptfast.flash_attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, True, 0.25, None, None, 0.3, seed))
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.gptfast.flash_attn_fwd(q, k, v, True, 0.25, None, None, 0.3, None)


def test_compile_fullgraph_with_dropout(poisoned):
    """torch.compile(fullgraph=True) traces the seed draw and the ops; the same seed, the same result."""
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 9, 16, FP32, requires_grad=True)

    def step(q, k, v):
        return ops.attention(q, k, v, backend="kernel", dropout_p=0.3)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    got = compiled(q, k, v)
    g = torch.autograd.grad(got.sum(), (q, k, v))
    torch.manual_seed(1)
    want = step(q, k, v)
    w = torch.autograd.grad(want.sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- the model ----------------------------------------------------------------------------

def _tiny_train_gpt(**kw):
    from gptfast.model import GPT
    torch.manual_seed(0)
    cfg = gptfast.GPTConfig(vocab_size=53, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.1,
                            resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    return GPT(cfg).to(DEV), cfg


def test_model_trains_through_the_kernel_with_attention_dropout(monkeypatch):
    """attn_pdrop 0.1 in training: every layer runs the flash kernel with dropout_p 0.1 (no SDPA,
    no dropout fallback line), loss and gradients finite; eval passes 0; gradient checkpointing
    replays the kernel's masks (the seed is drawn again from the restored generator)."""
    from gptfast.ops import _attention_triton as at
    model, cfg = _tiny_train_gpt(scale_attn_by_inverse_layer_idx=True)
    calls = []
    real = at.attention
    monkeypatch.setattr(at, "attention", lambda *a: calls.append((a[4], a[7])) or real(*a))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: pytest.fail("the model ran torch SDPA"))
    ids = torch.randint(0, cfg.vocab_size, (2, 19), device=DEV)
    results = []
    with gptfast.use_backend("kernel"), _dispatch.fallbacks_logged() as lines:
        for ckpt in (False, True):
            model.train().gradient_checkpointing_enable(ckpt)
            torch.manual_seed(3)
            _, loss = model(ids, labels=ids)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            results.append([loss, *grads])
        model.eval().gradient_checkpointing_enable(False)
        with torch.no_grad():
            model(ids)
    assert not [ln for ln in lines if "dropout" in ln], lines
    head_dim_scale = 1 / math.sqrt(cfg.n_embd // cfg.n_head)
    # layer 1's scale is divided by 2 (scale_attn_by_inverse_layer_idx), kept on the kernel path
    train_call = [(None, 0.1), (head_dim_scale / 2, 0.1)]
    assert calls[:2] == train_call and calls[-2:] == [(None, 0.0), (head_dim_scale / 2, 0.0)], calls
    assert all(torch.isfinite(t).all() for t in results[0])
    for a, b in zip(*results):
        assert torch.equal(a, b), "gradient checkpointing drew another mask"
    with gptfast.use_backend("kernel"):  # another seed, another loss: the dropout is applied
        torch.manual_seed(4)
        _, loss2 = model.train()(ids, labels=ids)
    assert loss2.item() != results[0][0].item()


def test_generation_in_training_mode_drops_attention_weights_over_the_cache(monkeypatch):
    """A model generating in training mode applies attn_pdrop at every attention, as transformers
    does: the prefill through ops.attention's dropout, each decode step through
    ops.decode_attention's; a seed repeats the masks, another changes them. Eval passes 0."""
    model, cfg = _tiny_train_gpt()
    model.config.attn_pdrop = 0.6
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.6
    calls = []
    for name in ("attention", "decode_attention"):
        real = getattr(ops, name)

        def spy(*a, _f=real, _n=name, **kw):
            out = _f(*a, **kw)
            calls.append((_n, kw["dropout_p"], out))
            return out
        monkeypatch.setattr(ops, name, spy)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), device=DEV)
    first_decode = []
    with gptfast.use_backend("auto"):
        for mode, seed in (("train", 0), ("train", 0), ("train", 1), ("eval", 0)):
            getattr(model, mode)()
            calls.clear()
            torch.manual_seed(seed)
            model.generate(prompt, max_new_tokens=6, temperature=0.0, cuda_graph=False)
            p = 0.6 if mode == "train" else 0.0
            assert [c[:2] for c in calls[:2]] == [("attention", p)] * 2, calls
            assert {c[:2] for c in calls[2:]} == {("decode_attention", p)} and len(calls) == 2 + 2 * 5, calls
            first_decode.append(calls[2][2])  # layer 0's first step: the same inputs in every run
    train0, train0_again, train1, eval0 = first_decode
    assert torch.equal(train0, train0_again)  # a seed repeats the masks
    assert (train0 - train1).abs().max() > 1e-3 and (train0 - eval0).abs().max() > 1e-3


# ---- GPU: GPT-2's shape ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tma", [False, True])
def test_dropout_full_gpt2_shape(poisoned, seeds, monkeypatch, tma):
    """B=2, H=12, T=1024, D=64, bf16, causal, p=0.1: the mask's keep rate, the output and the
    three gradients against float64 with that mask, no host sync, and a repeat under the same seed."""
    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    monkeypatch.setenv("GPTFAST_ATTN_AUTOTUNE", "0")  # one fixed config per kernel: few compiles
    monkeypatch.setenv("GPTFAST_TMA", "1" if tma else "0")
    torch.manual_seed(2024)
    B, H, T, D, p = 2, 12, 1024, 64, 0.1
    q, k, v = _qkv(B, H, T, D, BF16, requires_grad=True)
    dout = torch.randn(B, H, T, D, device=DEV, dtype=BF16)
    torch.manual_seed(7)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.attention(q, k, v, backend="kernel", dropout_p=p)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    z = _mask(seeds[-1], B, H, T, T, p)
    assert _binomial_ok(z.sum().item(), z.numel(), p)
    allowed = _causal_mask(T, T)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _oracle64(*leaves64, allowed, z, p, D ** -0.5)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    base = _in_dtype_with_mask(*leaves, allowed, z, p, D ** -0.5)
    base_grads = torch.autograd.grad(base, leaves, dout)
    _check("out", out, ref, base, BF16)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        _check(name, g, r, b, BF16)
    torch.manual_seed(7)
    again = ops.attention(q, k, v, backend="kernel", dropout_p=p)
    assert torch.equal(again, out)


def test_dropout_configs_are_pruned_apart():
    """What the autotuners time with dropout: the candidates that compiled for sm_90 without
    spilling under the Philox draws (kernels/ATTENTION_NOTES.md), and without dropout exactly
    the configs they timed before (the dropout-only dK/dV tiles are never among them)."""
    from gptfast.kernels import attention as K

    def kept(tuner, d, dropout):
        args = {"TMA_OK": 1, "HEAD_DIM": d, "DOT_PRECISION": "tf32"}
        if dropout is not None:
            args["DROPOUT"] = dropout
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["TMA"])
                for c in tuner.early_config_prune(tuner.configs, args)}
    dropout_only = {(m, n, w, s, tma) for m, n, w, s in K.DKDV_TILES_DROPOUT for tma in (False, True)}
    for tuner in (K.attn_fwd_autotuned, K.attn_bwd_dkdv_autotuned, K.attn_bwd_dq_autotuned):
        for d in (16, 64, 128):
            assert not kept(tuner, d, False) & dropout_only
            assert not kept(tuner, d, None) & dropout_only  # a launch without the flag: DROPOUT off
            assert kept(tuner, d, True), (tuner, d)
    # spilled under dropout (Triton 3.9, sm_90): the 4-warp 128 x 64 forward (336 bytes), every
    # earlier dK/dV tile at D = 128 (8-64 bytes)
    assert not {c for c in kept(K.attn_fwd_autotuned, 64, True) if c[:3] == (128, 64, 4)}
    assert kept(K.attn_bwd_dkdv_autotuned, 128, True) <= dropout_only
    for kind in ("fwd", "dkdv", "dq"):
        for d in (64, 128):
            meta, launch = K.fixed_config(kind, d, False, dropout=True)
            assert (meta["BLOCK_M"], meta["BLOCK_N"], launch["num_warps"]) in \
                {(m, n, w) for m, n, w, s, _ in kept(getattr(K, {"fwd": "attn_fwd_autotuned",
                                                                "dkdv": "attn_bwd_dkdv_autotuned",
                                                                "dq": "attn_bwd_dq_autotuned"}[kind]), d, True)}
            assert K.fixed_config(kind, d, False) == K.fixed_config(kind, d, False, dropout=False)
