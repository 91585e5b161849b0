"""ops.linear_cross_entropy: the LM head + cross-entropy without the [N, V] logits, against the
float64 reference, in every dtype, with ignored targets and every chunking; the model's
targets= path; memory; torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptfast import GPT, GPTConfig, ops

from op_harness import nan_like

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # atol on top of the 2x rule


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """dx starts as NaN: a row the fused op forgot to write cannot pass."""
    nan_like("gptfast.ops.cross_entropy", "_empty_like")(monkeypatch)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V", [(77, 1000), (130, 257)])
def test_every_dtype_within_twice_torchs_error(dtype, N, V):
    """The fused op is at most 2x as far from float64 as PyTorch's own unfused head in that dtype."""
    x, w, _, t = _inputs(N, 48, V, dtype, seed=1)
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float64)
    torch_ = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, dtype)
    fused = _loss_and_grads(ops.linear_cross_entropy, x, w, None, t, dtype, chunk_size=19)
    for name, e, r, f in zip(("loss", "dx", "dw"), exact, torch_, fused):
        assert (f - e).abs().max() <= 2 * (r - e).abs().max() + TOL[dtype] * e.abs().max(), name


def test_under_autocast_as_the_unfused_head():
    x, w, _, t = _inputs(90, 64, 500, torch.float32, seed=2)
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_ = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float32)
        fused = _loss_and_grads(ops.linear_cross_entropy, x, w, None, t, torch.float32, chunk_size=32)
    for name, e, r, f in zip(("loss", "dx", "dw"), exact, torch_, fused):
        assert (f - e).abs().max() <= 2 * (r - e).abs().max() + 1e-3 * e.abs().max(), name


def test_no_grad_and_backend_torch():
    x, w, _, t = _inputs(50, 16, 70, torch.float32)
    x, w = x.float(), w.float()
    want = ops.linear_cross_entropy_reference(x, w, t)
    with torch.no_grad():
        assert torch.allclose(ops.linear_cross_entropy(x, w, t, chunk_size=9), want, atol=1e-6)
    assert torch.equal(ops.linear_cross_entropy(x, w, t, backend="torch"), want)
    t_all = torch.full_like(t, -100)  # nothing to score: nan, as F.cross_entropy
    assert ops.linear_cross_entropy(x, w, t_all).isnan() and ops.linear_cross_entropy_reference(x, w, t_all).isnan()
    assert ops.backends()["linear_cross_entropy"]["available"]


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


def test_never_holds_the_logits():
    N, C, V = 400, 16, 3000
    x, w, _, t = _inputs(N, C, V, torch.float32)
    for fn, kw in ((ops.linear_cross_entropy, {"chunk_size": 50}), (ops.linear_cross_entropy_reference, {})):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
        with _Largest() as seen:
            fn(xs, ws, t, **kw).backward()
        if fn is ops.linear_cross_entropy:
            assert seen.numel == max(50 * V, V * C), seen.numel  # a chunk of logits, or dweight
        else:
            assert seen.numel == N * V  # the reference holds them all


def test_compiles_without_graph_breaks():
    """fullgraph=True: dynamo traces the op (its autograd.Function included); AOT autograd then
    traces the backward too."""
    x, w, _, t = _inputs(64, 16, 90, torch.float32)
    fn = torch.compile(lambda x, w: ops.linear_cross_entropy(x, w, t, chunk_size=16), fullgraph=True,
                       backend="aot_eager")
    results = []
    for f in (lambda x, w: ops.linear_cross_entropy(x, w, t, chunk_size=16), fn):
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


@pytest.mark.gpu
def test_gpt2_head_on_cuda_bf16_within_twice_torchs_error_in_less_memory():
    """GPT-2's head at full size on a GPU: N=8192 rows, C=768, V=50257, bf16."""
    x, w, _, t = _inputs(8192, 768, 50257, torch.bfloat16, seed=3)
    x, w, t = x.cuda(), w.cuda(), t.cuda()
    exact = _loss_and_grads(ops.linear_cross_entropy_reference, x, w, None, t, torch.float64)
    peaks = {}
    for name, fn in (("torch", ops.linear_cross_entropy_reference), ("fused", ops.linear_cross_entropy)):
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
