"""ops.linear_cross_entropy: the LM head + cross-entropy without the [N, V] logits, against the
float64 reference, in every dtype, with ignored targets and every chunking; the model's
targets= path; memory; torch.compile. Both chunk steps: PyTorch's, and the Triton kernel's
(kernels/cross_entropy.py; under TRITON_INTERPRET=1 on CPU), which also gets its own tests."""
import importlib.util
import logging
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from gptfast import GPT, GPTConfig, ops  # noqa: E402
from gptfast.ops import _dispatch, cross_entropy as CE  # noqa: E402

from op_harness import nan_allocations, nan_like  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # atol on top of the 2x rule
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The chunk step: PyTorch's, or the Triton kernel's
STEPS = ["torch", pytest.param("kernel", marks=pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed"))]


def _fused(step):
    return partial(CE._linear_cross_entropy, backend="kernel", chunk_step=step)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """dx and the kernel's loss rows start as NaN: a row the fused op forgot to write cannot pass."""
    nan_like("gptfast.ops.cross_entropy", "_empty_like")(monkeypatch)
    if HAS_TRITON:
        nan_allocations("gptfast.ops._cross_entropy_triton")(monkeypatch)


def _inputs(N, C, V, dtype, bias=False, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64) / C ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, b, t


def _loss_and_grads(fn, x, w, b, t, dtype, **kw):
    leaves = [a.detach().to(dtype).requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None, **kw)
    return [loss.double()] + [g.double() for g in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("N,C,V", [(1, 8, 5), (7, 16, 101), (77, 32, 1000), (300, 24, 257)])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_float64_equals_the_reference(N, C, V, chunk):
    x, w, b, t = _inputs(N, C, V, torch.float64, bias=True, ignore_every=3 if N > 1 else 0)
    want = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, b, t, torch.float64)
    got = _loss_and_grads(ops.linear_cross_entropy, x, w, b, t, torch.float64, chunk_size=chunk)
    for name, a, r in zip(("loss", "dx", "dw", "db"), got, want):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V,bias", [(77, 1000, False), (130, 257, True)])
def test_every_dtype_within_twice_torchs_error(dtype, N, V, bias, step):
    """The fused op is at most 2x as far from float64 as PyTorch's own unfused head in that dtype."""
    x, w, b, t = _inputs(N, 48, V, dtype, bias=bias, seed=1)
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, b, t, torch.float64)
    torch_ = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, b, t, dtype)
    fused = _loss_and_grads(_fused(step), x, w, b, t, dtype, chunk_size=19)
    for name, e, r, f in zip(("loss", "dx", "dw", "db"), exact, torch_, fused):
        assert (f - e).abs().max() <= 2 * (r - e).abs().max() + TOL[dtype] * e.abs().max(), name


@pytest.mark.parametrize("step", STEPS)
def test_another_ignore_index(step):
    """ignore_index other than -100 (here a valid class, 3) reaches the chunk step: its rows score
    nothing, and -100 is then an ordinary (out of range) target nowhere in the batch."""
    x, w, b, t = _inputs(40, 16, 30, torch.float32, bias=True, ignore_every=0, seed=5)
    t[::4] = 3
    assert (t == 3).sum() > 10 and (t == 3).sum() < 40
    want = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, b, t, torch.float64, ignore_index=3)
    got = _loss_and_grads(_fused(step), x, w, b, t, torch.float32, ignore_index=3, chunk_size=7)
    for name, a, r in zip(("loss", "dx", "dw", "db"), got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("step", STEPS)
def test_under_autocast_as_the_unfused_head(step):
    x, w, _, t = _inputs(90, 64, 500, torch.float32, seed=2)
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_ = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float32)
        fused = _loss_and_grads(_fused(step), x, w, None, t, torch.float32, chunk_size=32)
    for name, e, r, f in zip(("loss", "dx", "dw"), exact, torch_, fused):
        assert (f - e).abs().max() <= 2 * (r - e).abs().max() + 1e-3 * e.abs().max(), name


@pytest.mark.parametrize("step", STEPS)
def test_no_grad_and_backend_torch(step):
    x, w, _, t = _inputs(50, 16, 70, torch.float32)
    x, w = x.float(), w.float()
    want = ops.linear_cross_entropy_reference(x, w, t)
    with torch.no_grad():
        assert torch.allclose(_fused(step)(x, w, t, chunk_size=9), want, atol=1e-6)
    assert torch.equal(ops.linear_cross_entropy(x, w, t, backend="torch"), want)
    entry = ops.backends()["linear_cross_entropy"]
    assert entry["available"] and entry["reason"].startswith("ready (chunk step")
    if not torch.cuda.is_available():
        assert "Triton on CUDA" not in entry["reason"]


@pytest.mark.parametrize("step", STEPS)
def test_nothing_scored_gives_a_nan_loss_and_zero_gradients(step):
    """As F.cross_entropy: a micro-batch whose targets are all ignored must not put NaN in the weights."""
    x, w, b, t = _inputs(12, 16, 70, torch.float32, bias=True)
    t_all = torch.full_like(t, -100)
    for fn in (ops.linear_cross_entropy_reference, _fused(step)):
        loss, *grads = _loss_and_grads(fn, x, w, b, t_all, torch.float32, **({} if fn is
                                       ops.linear_cross_entropy_reference else {"chunk_size": 5}))
        assert loss.isnan()
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


@pytest.mark.parametrize("step", STEPS)
def test_never_holds_the_logits(step):
    N, C, V = (400, 16, 3000) if step == "torch" else (60, 16, 700)  # the interpreter is slow
    x, w, _, t = _inputs(N, C, V, torch.float32)
    for fn, kw in ((_fused(step), {"chunk_size": 50}), (ops.linear_cross_entropy_reference, {})):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        with _Largest() as seen:
            fn(xs, ws, t, **kw).backward()
        if fn is not ops.linear_cross_entropy_reference:
            assert seen.numel == max(50 * V, V * C), seen.numel  # a chunk of logits, or dweight
        else:
            assert seen.numel == N * V  # the reference holds them all


@pytest.mark.parametrize("step", STEPS)
def test_compiles_without_graph_breaks(step):
    """fullgraph=True: dynamo traces the op (its autograd.Function, and the kernel's custom op
    that writes the gradient over the logits, included); AOT autograd then traces the backward."""
    x, w, _, t = _inputs(64, 16, 90, torch.float32)
    t[::5] = -100

    def eager(x, w):
        return _fused(step)(x, w, t, chunk_size=16)

    fn = torch.compile(eager, fullgraph=True, backend="aot_eager")
    results = []
    for f in (eager, fn):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        loss = f(xs, ws)
        results.append((loss, *torch.autograd.grad(loss, (xs, ws))))
    torch.testing.assert_close(results[1], results[0])


def test_bad_arguments_are_named():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"x must be \[N, C\] and weight \[V, C\] with the same C, got x \(4, 8\) "
                                         r"and weight \(10, 7\)"):
        ops.linear_cross_entropy(x, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match=r"targets must be an int64/int32 tensor of shape \(4,\), got \(3,\)"):
        ops.linear_cross_entropy(x, w, t[:3])
    with pytest.raises(TypeError, match="x must be a floating torch.Tensor, got torch.int64"):
        ops.linear_cross_entropy(t.view(4, 1), w, t)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        ops.linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\), got \(9,\)"):
        ops.linear_cross_entropy(x, w, t, bias=torch.randn(9))
    with pytest.raises(ValueError, match=r"chunk_step must be one of \('auto', 'kernel', 'torch'\), got 'triton'"):
        CE._linear_cross_entropy(x, w, t, chunk_step="triton")


def test_model_targets_path_equals_the_logits_path():
    """GPT(x, targets=y): the loss and every parameter's gradient (the tied head included) of
    the unfused logits + cross-entropy."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=211, n_positions=32, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 211, (3, 17)), torch.randint(0, 211, (3, 17))
    y[0, :4] = -100
    fused = model(x, targets=y)
    g_fused = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(x)
    ref = F.cross_entropy(logits.reshape(-1, 211).float(), y.reshape(-1), ignore_index=-100)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"targets must have shape \(3, 17\), got \(3, 16\)"):
        model(x, targets=y[:, 1:])


# ---- the Triton chunk step on its own (kernels/cross_entropy.py) -------------------------------

def _rows_reference(logits, targets, ignore_index=-100):
    """(per-row loss, d(sum of the losses)/d(logits)) in float64, ignored rows 0."""
    lg = logits.double().requires_grad_()
    loss = F.cross_entropy(lg, targets, ignore_index=ignore_index, reduction="none")
    return loss.detach(), torch.autograd.grad(loss.sum(), lg)[0]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,V", [(1, 1), (3, 5), (7, 32), (9, 33), (5, 1000)])
@pytest.mark.parametrize("write_grad", [True, False])
def test_chunk_kernel_rows_against_float64(dtype, M, V, write_grad):
    """Each row's loss in fp32 and, written over the logits (a strided view: rows of a wider
    buffer), softmax - one-hot in their dtype; the columns beyond V untouched."""
    from gptfast.ops import _cross_entropy_triton as CT
    buf = (torch.randn(M, V + 3, device=DEV) * 4).to(dtype)
    logits = buf[:, :V]
    targets = torch.randint(0, V, (M,), device=DEV)
    targets[1::3] = -100
    want_loss, want_grad = _rows_reference(logits, targets)
    pad = buf[:, V:].clone()
    loss = CT.cross_entropy_rows(logits, targets, -100, write_grad)
    assert loss.dtype == torch.float32 and loss.shape == (M,)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    if write_grad:
        ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype]
        torch.testing.assert_close(logits.double(), want_grad, rtol=ulp, atol=ulp)
    assert torch.equal(buf[:, V:], pad)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_chunk_kernel_is_stable_at_large_and_masked_logits():
    """The running max: a logit 3000 above the rest in the first block, then in the last; a row
    whose first blocks are all -inf (a masked vocabulary) and a -inf target's infinite loss, as
    F.cross_entropy gives them."""
    from gptfast.ops import _cross_entropy_triton as CT
    widest = max(c.kwargs["BLOCK_V"] for c in CT._ce_k.CONFIGS)
    V = 3 * (CT.INTERPRETER_BLOCK_V if DEV.type == "cpu" else widest) + 5
    logits = torch.randn(5, V, device=DEV) * 3
    logits[0, 1] += 3000
    logits[1, -2] += 3000
    logits[2, : V - 7] = float("-inf")
    logits[3, :: 2] = float("-inf")
    targets = torch.tensor([1, 4, V - 3, 1, 0], device=DEV)  # row 3: a finite logit; row 4: target -inf
    logits[4, 0] = float("-inf")
    want_loss, want_grad = _rows_reference(logits, targets)
    loss = CT.cross_entropy_rows(logits, targets, -100, True)
    # lse - logit at 3000: an fp32 ulp there is 2.4e-4
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=5e-4)
    torch.testing.assert_close(logits[:4].double(), want_grad[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", STEPS)
def test_strided_inputs(step):
    """x, weight and targets as strided views (a transposed weight, every other target)."""
    x, w, _, t = _inputs(40, 16, 90, torch.float32, seed=4)
    t2 = torch.stack([t, torch.randint(0, 90, (40,))], 1).reshape(-1)[::2]  # t, at stride 2
    x2 = torch.stack([x, -x], 2).reshape(40, 32)[:, ::2]  # x, at column stride 2
    w2 = w.t().contiguous().t()  # w, column-major
    assert not (t2.is_contiguous() or x2.is_contiguous() or w2.is_contiguous())
    want = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float32)
    got = _loss_and_grads(lambda xs, ws, tt, **kw: _fused(step)(xs, ws, t2, chunk_size=7, **kw),
                          x2, w2, None, t2, torch.float32)
    for name, a, b in zip(("loss", "dx", "dw"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_chunk_kernel_out_of_range_target_gives_nan():
    """No host check of the targets (it would sync): an index outside [0, V) reads nothing and
    makes that row's loss NaN, so the mean is NaN, instead of reading out of bounds."""
    from gptfast.ops import _cross_entropy_triton as CT
    logits = torch.randn(5, 10, device=DEV)
    targets = torch.tensor([3, 10, -1, -100, 2**32 + 3], device=DEV)  # the last is 3 if cut to 32 bits
    loss = CT.cross_entropy_rows(logits.clone(), targets, -100, False)
    assert loss[0].isfinite() and loss[1].isnan() and loss[2].isnan() and loss[3] == 0 and loss[4].isnan()
    targets = targets[:4]
    x, w = torch.randn(4, 8, device=DEV), torch.randn(10, 8, device=DEV)
    assert _fused("kernel")(x, w, targets).isnan()


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_chunk_kernel_opcheck():
    from gptfast.ops import _cross_entropy_triton  # noqa: F401 - registers the op
    targets = torch.tensor([2, -100, 0, 6], device=DEV)
    for write_grad, dtype in ((True, torch.float32), (False, torch.float32), (True, torch.bfloat16)):
        # bf16 logits: the loss is fp32 whatever their dtype, in the fake as in the kernel
        torch.library.opcheck(torch.ops.gptfast.cross_entropy_rows.default,
                              (torch.randn(4, 7, device=DEV).to(dtype), targets, -100, write_grad))
    from gptfast.ops._cross_entropy_triton import cross_entropy_rows
    with pytest.raises(TypeError, match="logits must be float16, bfloat16 or float32 .* got torch.float64"):
        cross_entropy_rows(torch.randn(4, 7, dtype=torch.float64, device=DEV), targets, -100, True)
    with pytest.raises(ValueError, match=r"unit column stride .* got logits \(4, 7\) stride \(1, 4\)"):
        cross_entropy_rows(torch.randn(7, 4, device=DEV).t(), targets, -100, True)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_chunk_step_fallback_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    x, w, _, t = _inputs(6, 8, 20, torch.float64)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        for _ in range(2):
            CE._linear_cross_entropy(x, w, t, backend="kernel")
    lines = [r.getMessage() for r in caplog.records if "chunk's loss in PyTorch" in r.getMessage()]
    assert len(lines) == 1 and "logits dtype torch.float64 is not supported" in lines[0], lines


@pytest.mark.gpu
@pytest.mark.parametrize("step", STEPS)
def test_gpt2_head_on_cuda_bf16_within_twice_torchs_error_in_less_memory(step):
    """GPT-2's head at full size on a GPU: N=8192 rows, C=768, V=50257, bf16; either chunk step."""
    x, w, _, t = _inputs(8192, 768, 50257, torch.bfloat16, seed=3)
    x, w, t = x.cuda(), w.cuda(), t.cuda()
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float64)
    peaks = {}
    for name, fn in (("torch", ops.linear_cross_entropy_reference), ("fused", _fused(step))):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = _loss_and_grads(fn, x, w, None, t, torch.bfloat16)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        if name == "torch":
            torch_ = got
    for label, e, r, f in zip(("loss", "dx", "dw"), exact, torch_, got):
        assert (f - e).abs().max() <= 2 * (r - e).abs().max() + TOL[torch.bfloat16] * e.abs().max(), label
    assert peaks["fused"] < peaks["torch"] / 2, peaks  # the fp32 logits alone are 1.6 GB here
