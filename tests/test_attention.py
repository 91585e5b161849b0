"""ops.attention / ops.decode_attention: the Triton kernels against the float64 reference.

The rule (flash-attention's): the kernel's error against the float64 reference is at most
2x the error of PyTorch computing the same thing in the input dtype, plus a small atol.
On CPU the kernels run under TRITON_INTERPRET=1 on a subset of shapes that still covers
every T, D, dtype and causal mode; on a GPU the @pytest.mark.gpu tests run full shapes: every T,
and each head dim, dtype, mode, TMA and pointer path at least once, not their whole
cross-product (each case compiles its own kernels: the GPU check's budget, .ci/compile-census).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import gptfast  # noqa: E402
from gptfast import ops  # noqa: E402
from gptfast.ops import _dispatch  # noqa: E402
from op_harness import nan_allocations  # noqa: E402

_KERNEL_REASON = _dispatch.triton_missing_reason() or _dispatch.module_missing_reason("_attention_triton")
pytestmark = pytest.mark.skipif(_KERNEL_REASON is not None, reason=f"attention kernels unavailable: {_KERNEL_REASON}")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# How far PyTorch in the input dtype may be from the float64 reference, relative to the
# reference's largest value (the CPU cases show at most 1e-6, 1e-3, 1e-2; the rest is room for
# the GPU's longer rows): beyond, the two oracles disagree, and the 2x rule would pass a kernel
# against a wrong reference with a tolerance as wide as the reference's own error.
ORACLE_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element left unwritten shows."""
    from gptfast.ops import _attention_triton as at

    nan_allocations("gptfast.ops._attention_triton")(monkeypatch)
    return at


def _qkv(B, H, Tq, D, dtype, Tk=None, requires_grad=False):
    """q, k, v as the model makes them: strided views [B, H, T, D] of a [B, T, 3, H, D] projection."""
    if Tk is None or Tk == Tq:
        qkv = torch.randn(B, Tq, 3, H, D, device=DEV, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = torch.randn(B, Tq, H, D, device=DEV, dtype=dtype).transpose(1, 2)
        kv = torch.randn(B, Tk, 2, H, D, device=DEV, dtype=dtype)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    if requires_grad:  # leaf views keep the strided layout
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def _attention_in_dtype(q, k, v, allowed, scale):
    """What PyTorch gets in the inputs' dtype: matmuls in that dtype, softmax in fp32 then rounded.
    allowed: bool [..., Tq, Tk] or None."""
    s = torch.matmul(q * scale, k.transpose(-2, -1)).float()
    if allowed is None:
        return torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v)
    seen = allowed.any(dim=-1, keepdim=True)  # a row that sees no key (a key window): 0, as SDPA
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0)
    p = (torch.softmax(s, dim=-1) * seen).to(q.dtype)
    return torch.matmul(p, v)


def _causal_mask(tq, tk):
    return torch.ones(tq, tk, dtype=torch.bool, device=DEV).tril(diagonal=tk - tq)


def _check(name, got, ref64, baseline, dtype):
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = (got.double() - ref64).abs().max().item()
    base = (baseline.double() - ref64).abs().max().item()
    bound = ORACLE_RTOL[dtype] * ref64.abs().max().item() + ATOL[dtype]
    assert base <= bound, f"{name}: the reference and PyTorch in {dtype} differ by {base:.3e} > {bound:.3e}"
    assert err <= 2 * base + ATOL[dtype], f"{name}: kernel error {err:.3e} > 2 x torch's {base:.3e} + {ATOL[dtype]}"


def _window_mask(B, Tk, kv_start, kv_end):
    """bool [B, 1, 1, Tk] of a key window (written out here, not the reference's)."""
    keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool, device=DEV)
    for b in range(B):
        lo = 0 if kv_start is None else max(int(kv_start[b]), 0)
        hi = Tk if kv_end is None else min(int(kv_end[b]), Tk)
        keep[b, ..., :lo] = False
        keep[b, ..., max(hi, 0):] = False
    return keep


def _run_fwd_bwd(B, H, Tq, D, dtype, causal, scale, Tk=None, kv_start=None, kv_end=None, qkv=None, dout=None):
    """qkv (leaves requiring grad) and dout: given instead of drawn (_qkv's layout, out's)."""
    Tk = Tq if Tk is None else Tk
    q, k, v = _qkv(B, H, Tq, D, dtype, Tk, requires_grad=True) if qkv is None else qkv
    window = {"kv_start": kv_start, "kv_end": kv_end}
    out = ops.attention(q, k, v, causal=causal, scale=scale, backend="kernel", **window)
    dout = torch.randn_like(out) if dout is None else dout
    grads = torch.autograd.grad(out, (q, k, v), dout)

    sc = 1.0 / math.sqrt(D) if scale is None else scale
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ops.attention_reference(q64, k64, v64, causal, scale, **window)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    allowed = _causal_mask(Tq, Tk) if causal else None
    if kv_start is not None or kv_end is not None:
        window_mask = _window_mask(B, Tk, kv_start, kv_end)
        allowed = window_mask if allowed is None else allowed & window_mask
    base = _attention_in_dtype(qd, kd, vd, allowed, sc)
    base_grads = torch.autograd.grad(base, (qd, kd, vd), dout)

    assert out.dtype == dtype
    _check("out", out, ref, base, dtype)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        _check(name, g, r, b, dtype)


FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (B, H, T, D, dtype, causal, scale): every T, D, dtype and mode at least once, small enough
# for the interpreter on 2 cores.
CPU_CASES = [
    (1, 2, 1, 16, FP32, True, None),
    (2, 1, 7, 32, FP16, False, None),
    (3, 2, 7, 64, FP32, True, 0.3),
    (2, 3, 64, 64, BF16, True, None),
    (1, 2, 64, 128, FP16, True, None),
    (1, 2, 77, 128, FP32, False, None),
    (2, 2, 77, 32, BF16, True, 0.5),
    (1, 1, 200, 16, FP16, True, None),
    (1, 1, 200, 64, BF16, False, None),
    (1, 2, 1, 128, BF16, False, None),
]


@pytest.mark.parametrize("B,H,T,D,dtype,causal,scale", CPU_CASES,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}-{'causal' if c[5] else 'full'}"
                              + (f"-s{c[6]}" if c[6] else "") for c in CPU_CASES])
def test_attention_fwd_bwd(poisoned, B, H, T, D, dtype, causal, scale):
    torch.manual_seed(1000 * T + D)
    _run_fwd_bwd(B, H, T, D, dtype, causal, scale)


# Tk - Tq = 17 and 14: with the interpreter's blocks (fwd 32 x 16, dK/dV 16 x 32) the last key
# a query block sees, and the first query block that sees a whole key block, fall on a block
# boundary, so an off-by-one in either loop bound drops or unmasks a key
@pytest.mark.parametrize("Tq,Tk,causal", [(7, 77, True), (7, 77, False), (40, 57, True), (40, 54, True)])
def test_attention_fewer_queries_than_keys(poisoned, Tq, Tk, causal):
    # bottom-right aligned causal mask, as the reference (and a prefill continuing a cache)
    torch.manual_seed(7 + Tk)
    _run_fwd_bwd(2, 2, Tq, 32, FP32, causal, None, Tk=Tk)


def _ints(values):
    return None if values is None else torch.tensor(values, device=DEV)


# (B, H, Tq, Tk, D, dtype, causal, kv_start, kv_end): padded batches as transformers masks them
WINDOW_CASES = [
    (2, 2, 40, 40, 16, FP32, True, [0, 13], [40, 40]),          # a left-padded row
    (2, 3, 33, 33, 32, BF16, True, [0, 0], [20, 33]),           # a right-padded row
    (3, 1, 77, 77, 64, FP16, True, [-37, 40, 77], [60, 99, 77]),  # clipped bounds; an empty window
    (2, 2, 50, 50, 16, FP32, False, [3, 20], [17, 63]),          # non-causal; an end past Tk
    (2, 2, 7, 50, 128, FP32, True, [3, 45], None),              # queries at the end of a cache
    (2, 1, 64, 64, 64, BF16, True, None, [1, 64]),
    # bounds on and off the 16-key blocks: a partial head block, unmasked bulk, a partial tail
    (3, 2, 100, 100, 32, FP32, True, [16, 33, 48], [100, 80, 64]),
    (2, 2, 100, 100, 16, BF16, False, [32, 7], [96, 71]),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,dtype,causal,kv_start,kv_end", WINDOW_CASES,
                         ids=[f"B{c[0]}T{c[2]}x{c[3]}D{c[4]}-{str(c[5])[6:]}-{'causal' if c[6] else 'full'}"
                              f"-{c[7]}-{c[8]}" for c in WINDOW_CASES])
def test_attention_key_window(poisoned, B, H, Tq, Tk, D, dtype, causal, kv_start, kv_end):
    """kv_start / kv_end: each row's keys limited to a range (a padding mask), forward and all
    three gradients; rows that see no key are 0 with zero gradients, as SDPA."""
    torch.manual_seed(Tq * Tk + D)
    _run_fwd_bwd(B, H, Tq, D, dtype, causal, None, Tk=Tk, kv_start=_ints(kv_start), kv_end=_ints(kv_end))


def test_key_window_reference_is_sdpa_with_that_mask():
    """The reference's window (and its 0 for a row that sees no key) against PyTorch's SDPA given
    the same boolean mask, values and gradients, in float64."""
    torch.manual_seed(8)
    B, H, T, D = 3, 2, 12, 16
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    start, end = torch.tensor([4, 0, 9]), torch.tensor([12, 7, 9])
    mask = _causal_mask(T, T).cpu() & _window_mask(B, T, start, end).cpu()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = ops.attention_reference(q, k, v, True, None, start, end)
    torch.testing.assert_close(got, want)
    assert got[0, :, :4].abs().max() == 0 and got[2].abs().max() == 0  # no key seen: 0
    dout = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_key_window_arguments_are_checked():
    q, k, v = _qkv(2, 1, 5, 16, FP32)
    with pytest.raises(ValueError, match=r"kv_start must be None or an int tensor of shape \[B\]=\[2\], got \(3,\)"):
        ops.attention(q, k, v, kv_start=torch.zeros(3, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="kv_end must be int32 or int64, got torch.float32"):
        ops.attention(q, k, v, kv_end=torch.zeros(2, device=DEV))
    with pytest.raises(ValueError, match="kv_start must be None or an int tensor"):
        ops.decode_attention(q[:, :, :1], k, v, torch.tensor([5, 5], device=DEV), kv_start=[0, 1])


def test_attention_arbitrary_strides(poisoned):
    # head dim not unit-stride: q/k/v are transposes of [B, H, D, T] tensors
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 32, 40, dtype=FP32, device=DEV).transpose(-1, -2) for _ in range(3))
    out = ops.attention(q, k, v, causal=True, backend="kernel")
    ref = ops.attention_reference(q.double(), k.double(), v.double(), True)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_attention_distinct_layouts(poisoned):
    """q, k, v and dout each in a layout of its own: a tensor read through another's strides shows."""
    torch.manual_seed(10)
    B, H, Tq, Tk, D = 2, 3, 24, 40, 32
    q = torch.randn(B, H, Tq, D, device=DEV, dtype=FP16)
    k = torch.randn(B, Tk, H, D, device=DEV, dtype=FP16).transpose(1, 2)
    v = torch.randn(B, H, D, Tk, device=DEV, dtype=FP16).transpose(-1, -2)
    dout = torch.randn(B, Tq, D, H, device=DEV, dtype=FP16).permute(0, 3, 1, 2)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    _run_fwd_bwd(B, H, Tq, D, FP16, True, None, Tk=Tk, qkv=qkv, dout=dout)


def test_window_bounds_may_be_strided_views(poisoned):
    """kv_start / kv_end / cache_seqlens as columns of one [B, 2] tensor (stride 2), forward,
    backward and decode: the kernels read them at unit stride, so the entry points copy them."""
    torch.manual_seed(12)
    bounds = torch.tensor([[3, 40], [17, 33], [0, 21]], device=DEV)
    _run_fwd_bwd(3, 2, 40, 16, FP32, True, None, kv_start=bounds[:, 0], kv_end=bounds[:, 1])
    lens_start = torch.tensor([[77, 5], [40, 17], [30, 0]], device=DEV)
    _run_decode(3, 2, 1, 32, 77, FP32, lens_start[:, 0], kv_start=lens_start[:, 1])


def test_attention_backward_is_deterministic():
    torch.manual_seed(4)
    q, k, v = _qkv(1, 2, 77, 32, FP16, requires_grad=True)
    out = ops.attention(q, k, v, backend="kernel")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- the forward through TMA descriptors (Hopper; emulated by the interpreter) ------------

TMA_CASES = [c for c in CPU_CASES if c[4] != FP32]  # fp32 never takes TMA (FMA configs)


@pytest.fixture
def tma_forced(monkeypatch):
    """GPTFAST_TMA=1, and a record of (kernel, TMA_OK) per launch: did TMA really run?"""
    from gptfast.ops import _attention_triton as at
    monkeypatch.setenv("GPTFAST_TMA", "1")
    seen = []
    real = at._tma

    def spy(kind, tensors):
        got = real(kind, tensors)
        seen.append((kind, got[0]))
        return got

    monkeypatch.setattr(at, "_tma", spy)
    return seen


TMA_ALL = [("fwd", 2), ("dkdv", 2), ("dq", 2)]


@pytest.mark.parametrize("B,H,T,D,dtype,causal,scale", TMA_CASES,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}-{'causal' if c[5] else 'full'}"
                              for c in TMA_CASES])
def test_attention_tma(poisoned, tma_forced, B, H, T, D, dtype, causal, scale):
    # T not a multiple of the blocks: the descriptors zero-fill rows past T and clip the stores
    torch.manual_seed(1000 * T + D + 1)
    _run_fwd_bwd(B, H, T, D, dtype, causal, scale)
    assert tma_forced == TMA_ALL


def test_tma_layout_rules():
    """What cannot be a TMA descriptor keeps to pointer loads, with the reason."""
    from gptfast.ops._tma import layout_reason
    q = torch.randn(2, 3, 5, 16, dtype=BF16)
    assert layout_reason({"q": q}) is None
    assert "last dim is not contiguous" in layout_reason({"q": q.transpose(-1, -2)})
    assert "not multiples of 16 bytes" in layout_reason({"q": torch.randn(2, 3, 5, 12, dtype=BF16)[..., :8]})
    expanded = torch.randn(2, 1, 5, 16, dtype=BF16).expand(2, 3, 5, 16)  # one head shared by three
    assert layout_reason({"q": q, "k": expanded}) == "k has a zero stride (strides (80, 0, 16, 1), shape (2, 3, 5, 16))"
    assert layout_reason({"k": torch.randn(1, 3, 5, 16, dtype=BF16).expand(1, 3, 5, 16)}) is None


@pytest.mark.parametrize("causal", [True, False])
def test_attention_tma_fewer_queries_than_keys(poisoned, tma_forced, causal):
    torch.manual_seed(8)
    _run_fwd_bwd(2, 2, 7, 32, BF16, causal, None, Tk=77)
    assert tma_forced == TMA_ALL


def test_attention_tma_key_window(poisoned, tma_forced):
    # the head, bulk and tail loops of a window through the tensor descriptors
    torch.manual_seed(9)
    _run_fwd_bwd(3, 2, 100, 32, BF16, True, None, kv_start=_ints([16, 33, 0]), kv_end=_ints([100, 80, 41]))
    assert tma_forced == TMA_ALL


def test_attention_tma_unaddressable_layout_falls_back(poisoned, tma_forced, caplog):
    # head dim not unit-stride: TMA cannot address it; pointer loads, with the reason logged once
    from gptfast.ops import _tma
    _tma._logged.clear()
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 32, 40, dtype=FP16, device=DEV).transpose(-1, -2) for _ in range(3))
    with caplog.at_level("WARNING", logger="gptfast"):
        out = ops.attention(q, k, v, causal=True, backend="kernel")
        ops.attention(q, k, v, causal=True, backend="kernel")
    ref = ops.attention_reference(q.double(), k.double(), v.double(), True)
    base = _attention_in_dtype(q, k, v, _causal_mask(40, 40), 32 ** -0.5)
    _check("out", out, ref, base, FP16)
    assert tma_forced == [("fwd", 0), ("fwd", 0)]
    msgs = [r.getMessage() for r in caplog.records if "not TMA" in r.getMessage()]
    assert len(msgs) == 1 and "q's last dim is not contiguous (stride 40)" in msgs[0], msgs


def test_attention_tma_mode_is_validated(monkeypatch):
    from gptfast.ops import _attention_triton as at
    monkeypatch.setenv("GPTFAST_TMA", "yes")
    q = torch.randn(1, 1, 8, 16, dtype=FP16)
    with pytest.raises(ValueError, match="GPTFAST_TMA must be one of auto, 0, 1; got 'yes'"):
        at._tma("fwd", dict(Q_desc=q, K_desc=q, V_desc=q, O_desc=q))


@pytest.mark.parametrize("tma_ok,expect", [(0, "ptr"), (1, "both"), (2, "tma")])
@pytest.mark.parametrize("kernel", ["attn_fwd_autotuned", "attn_bwd_dkdv_autotuned", "attn_bwd_dq_autotuned"])
def test_attention_autotune_tma_candidates(kernel, tma_ok, expect):
    # what each autotuner times: TMA configs only where the launcher gave descriptors
    from gptfast.kernels import attention as K
    tuner = getattr(K, kernel)
    for D in (16, 64, 128):
        kept = tuner.early_config_prune(tuner.configs, {"TMA_OK": tma_ok, "HEAD_DIM": D, "DOT_PRECISION": "tf32"})
        tma = {c.kwargs["TMA"] for c in kept}
        assert tma == {"ptr": {False}, "both": {False, True}, "tma": {True}}[expect], (D, tma)
        assert all(c.pre_hook is not None for c in kept)  # block shapes follow the config
    fp32 = tuner.early_config_prune(tuner.configs, {"TMA_OK": 0, "HEAD_DIM": 64, "DOT_PRECISION": "ieee"})
    assert [c.kwargs["TMA"] for c in fp32] == [False]


def test_attention_tma_block_shapes_follow_the_config():
    # a descriptor's block shape is part of the kernel signature: TMA configs set the tile's,
    # pointer configs put back the launcher's placeholder (one compile per config, whatever ran
    # before; a box TMA accepts, as Triton encodes unused descriptors too), and absent
    # descriptors (no TMA here) are left alone
    from triton.tools.tensor_descriptor import TensorDescriptor
    from gptfast.kernels import attention as K
    t = torch.randn(1, 2, 8, 32, dtype=BF16)
    descs = {n: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 1, 8])
             for n in ("Q_desc", "K_desc", "V_desc")}
    nargs = dict(descs, O_desc=None, BLOCK_M=64, BLOCK_N=16, HEAD_DIM=32, TMA=True)
    K.set_tma_block_shapes("fwd", nargs)
    assert [d.block_shape for d in descs.values()] == [[1, 1, 64, 32], [1, 1, 16, 32], [1, 1, 16, 32]]
    K.set_tma_block_shapes("fwd", dict(nargs, TMA=False))  # 8 bf16 = 16 bytes: a box TMA accepts
    assert all(d.block_shape == [1, 1, 1, 8] for d in descs.values())


def test_attention_tma_auto_needs_hopper(monkeypatch):
    # auto: descriptors only on a TMA-capable device (never on CPU, where only "1" emulates it)
    from gptfast.ops import _attention_triton as at
    monkeypatch.delenv("GPTFAST_TMA", raising=False)
    q = torch.randn(1, 1, 8, 16, dtype=BF16)

    def tma(t):
        return at._tma("dq", dict(Q_desc=t, K_desc=t, V_desc=t, DO_desc=t, DQ_desc=t))

    assert tma(q)[0] == 0
    monkeypatch.setattr(at._tma_mod, "capable", lambda device: True)
    ok, descs = tma(q)
    assert ok == 1 and list(descs) == ["Q_desc", "K_desc", "V_desc", "DO_desc", "DQ_desc"]
    assert all(d.base is q and d.shape == [1, 1, 8, 16] for d in descs.values())
    assert tma(q.float())[0] == 0
    monkeypatch.setenv("GPTFAST_TMA", "0")
    assert tma(q)[0] == 0


# GPU compile budget (.ci/compile-census): each head dim once through the descriptors (their
# box and swizzle follow D), each dtype and mode twice, not the 16-case cross-product. D 16 and
# 32 non-causal here, where test_attention_fwd_bwd_full runs them causal only.
TMA_FULL = [(16, FP16, False), (32, FP16, False), (64, BF16, True), (128, BF16, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype,causal", TMA_FULL, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in TMA_FULL])
def test_attention_tma_full(D, dtype, causal, poisoned, tma_forced, monkeypatch):
    # the fixed configs with TMA on the GPU; the autotuned test below times TMA configs beside
    # the pointer ones on sm_90 and may pick either
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    monkeypatch.setenv("GPTFAST_ATTN_AUTOTUNE", "0")
    torch.manual_seed(D + 17)
    for T in (1, 7, 77, 1000, 2048):
        _run_fwd_bwd(2, 12, T, D, dtype, causal, None)
    _run_fwd_bwd(2, 4, 300, D, dtype, causal, None, Tk=1000)
    assert tma_forced == TMA_ALL * 6


# GPU compile budget (.ci/compile-census): a (D, dtype, mode) compiles its kernels once per class
# of T (1, not a multiple of 16, a multiple), so every T stays for the cases kept. fp32 and bf16
# at every head dim, non-causal at D 64 and 128 only (D 16 and 32 non-causal: test_attention_tma_full);
# fp16 in GPT-2's case, D 64 causal (fp16 at the other head dims: test_attention_tma_full,
# test_attention_fwd_bwd_autotuned, test_attention_key_window_full).
FULL_CASES = [(D, dt, causal) for D in (16, 32, 64, 128) for dt in (FP32, FP16, BF16) for causal in (True, False)
              if (causal or D >= 64) and (dt != FP16 or (D, causal) == (64, True))]


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype,causal", FULL_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in FULL_CASES])
@pytest.mark.parametrize("T", [1, 7, 64, 77, 200, 1000, 1024, 2048])
def test_attention_fwd_bwd_full(T, D, dtype, causal, poisoned, monkeypatch):
    # fixed configs: the cross-product would otherwise autotune (compile every candidate) per case
    monkeypatch.setenv("GPTFAST_ATTN_AUTOTUNE", "0")
    torch.manual_seed(T + D)
    B, H = (4, 12) if T <= 1024 else (2, 12)
    _run_fwd_bwd(B, H, T, D, dtype, causal, None)
    _run_fwd_bwd(B, H, T, D, dtype, causal, 0.3)


# GPU compile budget (.ci/compile-census): a 16-bit case compiles every config its pruner keeps
# (31 at D 64, 20 at D 128, for each class of T), so GPT-2's case (D 64 causal, bf16) and one
# that turns every axis (D 128 non-causal, fp16: where the pruner cuts most); fp32 prunes to the
# fixed configs test_attention_fwd_bwd_full runs (nothing to compile), here through the autotuner.
AUTOTUNED_FULL = [(64, BF16, True), (128, FP16, False), (64, FP32, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype,causal", AUTOTUNED_FULL, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in AUTOTUNED_FULL])
def test_attention_fwd_bwd_autotuned(D, dtype, causal, poisoned, monkeypatch):
    monkeypatch.setenv("GPTFAST_ATTN_AUTOTUNE", "1")  # whatever the environment says (.ci/gpu-check: 0)
    torch.manual_seed(D)
    for T in (77, 1000, 2048):
        _run_fwd_bwd(2, 12, T, D, dtype, causal, None)
    _run_fwd_bwd(2, 4, 300, D, dtype, causal, None, Tk=1000)


# every D and dtype on the fixed configs, and GPT-2's case through the TMA descriptors (forced).
# GPU compile budget (.ci/compile-census): no autotuned case (one compiled 32 configs, 28 of them
# for it alone, and checked only the one it chose; the autotuner: test_attention_fwd_bwd_autotuned).
WINDOW_FULL = [(D, dt, "autotune0") for D in (64, 128) for dt in (FP16, BF16, FP32)] + [(64, BF16, "tma1")]


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype,mode", WINDOW_FULL, ids=[f"D{c[0]}-{str(c[1])[6:]}-{c[2]}" for c in WINDOW_FULL])
def test_attention_key_window_full(D, dtype, mode, poisoned, monkeypatch, request):
    """Padded batches at full length: left, right and both, rows that see no key."""
    monkeypatch.setenv("GPTFAST_ATTN_AUTOTUNE", "0")
    tma = None
    if mode == "tma1":
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("TMA needs sm_90+")
        tma = request.getfixturevalue("tma_forced")
    torch.manual_seed(D + (tma is not None))
    for T in (1000, 2048):
        start = _ints([0, T // 3, 0, T - 1])
        end = _ints([T, T, T // 2 + 7, T])
        _run_fwd_bwd(4, 12, T, D, dtype, True, None, kv_start=start, kv_end=end)
    assert tma is None or tma == TMA_ALL * 2


# ---- decode -------------------------------------------------------------------------------

def _run_decode(B, H, Tq, D, Tmax, dtype, lens, num_splits=None, via_ops=True, kv_start=None, v_bthd=False,
                scale=None):
    """v_bthd: the value cache a [B, Tmax, H, D] tensor's view (the key cache stays contiguous)."""
    from gptfast.ops import _attention_triton as at
    q = torch.randn(B, Tq, H, D, device=DEV, dtype=dtype).transpose(1, 2)
    k_cache = torch.randn(B, H, Tmax, D, device=DEV, dtype=dtype)
    if v_bthd:
        v_cache = torch.randn(B, Tmax, H, D, device=DEV, dtype=dtype).transpose(1, 2)
    else:
        v_cache = torch.randn(B, H, Tmax, D, device=DEV, dtype=dtype)
    if via_ops:
        out = ops.decode_attention(q, k_cache, v_cache, lens, backend="kernel", kv_start=kv_start, scale=scale)
    else:
        out = at._decode_launch(q, k_cache, v_cache, lens, kv_start, num_splits=num_splits, scale=scale)
    ref = ops.decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), lens, kv_start, scale)
    qpos = lens.long().view(-1, 1, 1) - Tq + torch.arange(Tq, device=DEV).view(1, -1, 1)
    allowed = (torch.arange(Tmax, device=DEV).view(1, 1, -1) <= qpos).unsqueeze(1)
    if kv_start is not None:
        allowed = allowed & _window_mask(B, Tmax, kv_start, None)
    base = _attention_in_dtype(q, k_cache, v_cache, allowed, 1.0 / math.sqrt(D) if scale is None else scale)
    assert out.dtype == dtype
    _check("decode out", out, ref, base, dtype)


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one-split"])
@pytest.mark.parametrize("Tq", [1, 4])
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=str)
def test_decode_attention(poisoned, dtype, Tq, num_splits):
    torch.manual_seed(11 * Tq)
    B, H, D, Tmax = 4, 2, 64, 77  # Tmax not a multiple of the block
    # ragged: the shortest valid length (Tq: the new queries only), the full cache, two between
    lens = torch.tensor([Tq, Tmax, 33, Tmax - 1], dtype=torch.int32, device=DEV)
    _run_decode(B, H, Tq, D, Tmax, dtype, lens, num_splits, via_ops=num_splits is None)


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one-split"])
@pytest.mark.parametrize("Tq", [1, 4])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_decode_attention_kv_start(poisoned, dtype, Tq, num_splits):
    """A left-padded cache: row b sees entries kv_start[b] .. its length; a row whose start is
    past its queries (here the fifth, start 40 > length 30) sees no key and gets 0; a negative
    start (the last) is no limit."""
    torch.manual_seed(13 * Tq)
    B, H, D, Tmax = 6, 2, 32, 77
    lens = torch.tensor([Tmax, 40, Tmax, 33, 30, 50], dtype=torch.int32, device=DEV)
    start = torch.tensor([0, 17, Tmax - 1, 16, 40, -20], dtype=torch.int64, device=DEV)
    _run_decode(B, H, Tq, D, Tmax, dtype, lens, num_splits, via_ops=num_splits is None, kv_start=start)


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one-split"])
@pytest.mark.parametrize("scale", [1.0, 0.29, 0.125 / 7], ids=["unscaled", "0.29", "inverse-layer-idx"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_decode_attention_scale(poisoned, dtype, scale, num_splits):
    """Another score scale than 1/sqrt(D): HF's scale_attn_weights=False (1.0), a custom one, and
    scale_attn_by_inverse_layer_idx's 1/(sqrt(D) (i + 1)) at D=64, layer 6; with a left padding."""
    torch.manual_seed(int(scale * 1000) + 3)
    B, H, D, Tmax = 3, 2, 64, 45
    lens = torch.tensor([Tmax, 20, 31], dtype=torch.int32, device=DEV)
    start = torch.tensor([0, 5, 30], dtype=torch.int32, device=DEV)
    _run_decode(B, H, 2, D, Tmax, dtype, lens, num_splits, via_ops=num_splits is None, kv_start=start, scale=scale)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("inf"), float("nan"), True, "0.1"])
def test_decode_attention_bad_scale(bad):
    q = torch.randn(1, 2, 1, 16, device=DEV)
    kc = torch.randn(1, 2, 5, 16, device=DEV)
    with pytest.raises(ValueError, match="scale must be a positive finite float or None"):
        ops.decode_attention(q, kc, kc, torch.tensor([5], device=DEV), scale=bad)
    with pytest.raises(ValueError, match="scale must be a positive finite float or None"):
        ops.attention(q, kc, kc, scale=bad)


@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one-split"])
def test_decode_attention_distinct_cache_layouts(poisoned, num_splits):
    # the value cache read through the key cache's strides (or the other way) shows
    torch.manual_seed(14)
    lens = torch.tensor([77, 4, 50], dtype=torch.int32, device=DEV)
    _run_decode(3, 2, 4, 32, 77, BF16, lens, num_splits, via_ops=num_splits is None, v_bthd=True)


@pytest.mark.parametrize("D,Tmax,lengths", [(16, 50, [1, 50, 9]), (32, 1, [1, 1, 1]), (128, 5, [5, 2, 1])])
def test_decode_attention_head_dims_int64_lengths(poisoned, D, Tmax, lengths):
    torch.manual_seed(D)
    lens = torch.tensor(lengths, dtype=torch.int64, device=DEV)
    _run_decode(3, 3, 1, D, Tmax, FP16, lens)


@pytest.mark.parametrize("Tq", [5, 17, 64])  # query blocks of 16, 32, 64 (speculative rounds, chunked prefill)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_decode_attention_query_blocks(poisoned, dtype, D, Tq):
    """Every query block, incl. the fp32 tile of decode_tile (16-key blocks, 8 warps on a GPU)."""
    if not torch.cuda.is_available() and (D, dtype) != (64, FP32):
        pytest.skip("one head dim and dtype under the interpreter; the GPU runs them all")
    torch.manual_seed(Tq * D)
    Tmax = 150
    lens = torch.tensor([Tq, Tmax, 100], dtype=torch.int32, device=DEV)
    _run_decode(3, 2, Tq, D, Tmax, dtype, lens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32], ids=str)
@pytest.mark.parametrize("B,Tq,Tmax", [(1, 1, 1024), (32, 1, 1024), (4, 4, 2048), (8, 1, 1000), (1, 1, 16384)])
def test_decode_attention_full(poisoned, dtype, B, Tq, Tmax):
    torch.manual_seed(B * Tmax)
    lens = torch.randint(Tq, Tmax + 1, (B,), device=DEV)
    lens[0] = Tmax
    lens[-1] = Tq
    _run_decode(B, 12, Tq, 64, Tmax, dtype, lens)


@pytest.mark.gpu
def test_decode_attention_no_sync_and_cuda_graph():
    B, H, D, Tmax = 2, 12, 64, 1024
    q = torch.randn(B, H, 1, D, device=DEV, dtype=FP16)
    kc, vc = (torch.randn(B, H, Tmax, D, device=DEV, dtype=FP16) for _ in range(2))
    lens = torch.tensor([5, 900], device=DEV)
    ops.decode_attention(q, kc, vc, lens, backend="kernel")  # warm-up: compile outside capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.decode_attention(q, kc, vc, lens, backend="kernel")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, kc, vc, lens, backend="kernel")
    lens.copy_(torch.tensor([700, 3], device=DEV))  # new lengths, same graph
    graph.replay()
    ref = ops.decode_attention_reference(q.double(), kc.double(), vc.double(), lens)
    assert (out.double() - ref).abs().max().item() < 2e-3


@pytest.mark.gpu
def test_decode_attention_kv_start_no_sync_and_cuda_graph():
    """The left-padded decode step (transformers' batched generate) syncs nothing and replays
    in a CUDA graph with new starts and lengths."""
    B, H, D, Tmax = 3, 12, 64, 1024
    q = torch.randn(B, H, 1, D, device=DEV, dtype=BF16)
    kc, vc = (torch.randn(B, H, Tmax, D, device=DEV, dtype=BF16) for _ in range(2))
    lens, start = torch.tensor([5, 900, 1024], device=DEV), torch.tensor([0, 300, 1000], device=DEV)
    ops.decode_attention(q, kc, vc, lens, backend="kernel", kv_start=start)  # compile outside capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.decode_attention(q, kc, vc, lens, backend="kernel", kv_start=start)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, kc, vc, lens, backend="kernel", kv_start=start)
    lens.copy_(torch.tensor([700, 3, 1024], device=DEV))
    start.copy_(torch.tensor([699, 0, 17], device=DEV))
    graph.replay()
    ref = ops.decode_attention_reference(q.double(), kc.double(), vc.double(), lens, start)
    assert (out.double() - ref).abs().max().item() < 2e-2


# ---- custom ops, compile, backend selection -----------------------------------------------

def test_opcheck_custom_ops():
    torch.manual_seed(5)
    q, k, v = _qkv(1, 2, 19, 16, FP32)
    torch.library.opcheck(torch.ops.gptfast.flash_attn_fwd.default, (q, k, v, True, 0.25))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.gptfast.flash_attn_fwd.default, (qg, kg, vg, False, 0.25))
    out, lse = torch.ops.gptfast.flash_attn_fwd(q, k, v, True, 0.25)
    torch.library.opcheck(torch.ops.gptfast.flash_attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, True, 0.25))
    kc, vc = torch.randn(2, 2, 21, 16, device=DEV), torch.randn(2, 2, 21, 16, device=DEV)
    torch.library.opcheck(torch.ops.gptfast.decode_attention.default,
                          (torch.randn(2, 2, 1, 16, device=DEV), kc, vc,
                           torch.tensor([3, 21], dtype=torch.int32, device=DEV)))
    # with a key window
    start, end = torch.tensor([4], dtype=torch.int32, device=DEV), torch.tensor([15], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.gptfast.flash_attn_fwd.default, (qg, kg, vg, True, 0.25, start, end))
    out, lse = torch.ops.gptfast.flash_attn_fwd(q, k, v, True, 0.25, start, end)
    torch.library.opcheck(torch.ops.gptfast.flash_attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, True, 0.25, start, end))
    torch.library.opcheck(torch.ops.gptfast.decode_attention.default,
                          (torch.randn(2, 2, 1, 16, device=DEV), kc, vc,
                           torch.tensor([3, 21], dtype=torch.int32, device=DEV),
                           torch.tensor([1, 5], dtype=torch.int32, device=DEV)))
    torch.library.opcheck(torch.ops.gptfast.decode_attention.default,  # another scale
                          (torch.randn(2, 2, 1, 16, device=DEV), kc, vc,
                           torch.tensor([3, 21], dtype=torch.int32, device=DEV), None, 0.3))


def test_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(6)
    q, k, v = _qkv(1, 2, 9, 16, FP32, requires_grad=True)
    lens = torch.tensor([9], device=DEV)

    def step(q, k, v):
        out = ops.attention(q, k, v, causal=True, backend="kernel")
        dec = ops.decode_attention(q[:, :, -1:].detach(), k.detach(), v.detach(), lens, backend="kernel")
        dec_scaled = ops.decode_attention(q[:, :, -1:].detach(), k.detach(), v.detach(), lens, backend="kernel",
                                          scale=0.3)  # another scale: a float argument of the op
        return out.sum() + dec.sum() + 2 * dec_scaled.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v))
    want = step(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)


def test_backend_selection(monkeypatch):
    from gptfast.ops import _attention_triton as at
    q, k, v = _qkv(1, 2, 5, 16, FP32)
    calls = []
    real = at.attention
    monkeypatch.setattr(at, "attention", lambda *a: calls.append(1) or real(*a))
    want = ops.attention_reference(q, k, v, True)
    assert torch.allclose(ops.attention(q, k, v, backend="kernel"), want, atol=1e-5) and calls == [1]
    assert torch.equal(ops.attention(q, k, v, backend="torch"), want) and calls == [1]
    with gptfast.use_backend("kernel"):
        ops.attention(q, k, v)
    assert calls == [1, 1]
    if not CUDA:  # auto never picks the interpreter
        ops.attention(q, k, v)
        assert calls == [1, 1]


@pytest.mark.parametrize("what", ["head_dim", "dtype", "causal_more_queries"])
def test_kernel_request_unsupported_raises(what):
    if what == "head_dim":
        q, k, v = _qkv(1, 2, 5, 8, FP32)
        match = "head dim 8"
    elif what == "dtype":
        q, k, v = _qkv(1, 2, 5, 16, torch.float64)
        match = "float64"
    else:
        q, k, v = _qkv(1, 2, 9, 16, FP32, Tk=5)
        match = "more queries"
    with pytest.raises(ops.KernelUnavailable, match=match):
        ops.attention(q, k, v, backend="kernel")
    # auto falls back to the reference (whose first rows are NaN when Tq > Tk: no key to see)
    torch.testing.assert_close(ops.attention(q, k, v, backend="auto"), ops.attention_reference(q, k, v),
                               rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ops.KernelUnavailable, match="head dim 8"):
        qd = torch.randn(1, 2, 1, 8, device=DEV)
        ops.decode_attention(qd, qd, qd, torch.tensor([1], device=DEV), backend="kernel")


def test_decode_kernel_request_with_grad_raises():
    q = torch.randn(1, 2, 1, 16, device=DEV, requires_grad=True)
    kc = torch.randn(1, 2, 8, 16, device=DEV)
    lens = torch.tensor([4], device=DEV)
    with pytest.raises(ops.KernelUnavailable, match="no backward"):
        ops.decode_attention(q, kc, kc, lens, backend="kernel")
    ops.decode_attention(q, kc, kc, lens).sum().backward()  # auto: the differentiable reference
    assert q.grad is not None
    with torch.no_grad():
        ops.decode_attention(q, kc, kc, lens, backend="kernel")


# ---- the model --------------------------------------------------------------------------

def _tiny_gpt():
    try:
        from gptfast.model import GPT
    except ImportError as exc:
        pytest.skip(f"gptfast.model cannot be imported yet: {exc}")
    for module in ("_norm_triton",):
        reason = _dispatch.module_missing_reason(module)
        if reason:
            pytest.skip(f"the LayerNorm/GELU kernels are not available, so backend='kernel' cannot "
                        f"cover the whole model: {reason}")
    torch.manual_seed(0)
    cfg = gptfast.GPTConfig(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    return GPT(cfg).to(DEV).eval(), cfg  # eval: no dropout, so both runs see the same function


def test_model_training_step_kernel_vs_torch():
    model, cfg = _tiny_gpt()
    ids = torch.randint(0, cfg.vocab_size, (2, 37), device=DEV)
    results = {}
    for backend in ("torch", "kernel"):
        model.zero_grad(set_to_none=True)
        with gptfast.use_backend(backend):
            logits, loss = model(ids, labels=ids)
            loss.backward()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (l_t, g_t), (l_k, g_k) = results["torch"], results["kernel"]
    assert (l_k - l_t).abs().max().item() < 1e-4
    for name, g in g_t.items():
        err = (g_k[name] - g).abs().max().item()
        assert err <= 1e-4 + 1e-3 * g.abs().max().item(), f"grad of {name}: max error {err:.3e}"


def test_model_kv_cache_decode_kernel_vs_torch():
    model, cfg = _tiny_gpt()
    prompt = torch.randint(0, cfg.vocab_size, (2, 11), device=DEV)
    steps = torch.randint(0, cfg.vocab_size, (2, 3), device=DEV)
    results = {}
    for backend in ("torch", "kernel"):
        cache = model.setup_cache(2, max_seq_len=40)
        with torch.no_grad(), gptfast.use_backend(backend):
            out = [model(prompt, cache=cache)]
            out += [model(steps[:, i:i + 1], cache=cache) for i in range(steps.shape[1])]
        results[backend] = out
    for got, want in zip(results["kernel"], results["torch"]):
        assert (got - want).abs().max().item() < 1e-4
