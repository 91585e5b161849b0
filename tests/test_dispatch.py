"""Backend selection: argument > use_backend > GPTFAST_BACKEND > auto; fallbacks logged once."""
import logging

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast import ops
from gptfast.ops import _dispatch


def test_precedence(monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "torch")
    assert _dispatch.current_backend() == "torch"
    with gptfast.use_backend("kernel"):
        assert _dispatch.current_backend() == "kernel"
        assert _dispatch.current_backend("auto") == "auto"
    assert _dispatch.current_backend() == "torch"
    monkeypatch.delenv("GPTFAST_BACKEND")
    assert _dispatch.current_backend() == "auto"


def test_use_backend_as_setter():
    try:
        gptfast.use_backend("torch")
        assert _dispatch.current_backend() == "torch"
    finally:
        gptfast.use_backend(None)
    assert _dispatch.current_backend() == "auto"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'kernel', 'torch'\), got 'cuda'"):
        gptfast.use_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.layer_norm(torch.randn(2, 4), None, None, backend="fast")
    monkeypatch.setenv("GPTFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="GPTFAST_BACKEND must be one of"):
        _dispatch.current_backend()


def test_fallback_logged_once_per_op(caplog, monkeypatch):
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        for _ in range(3):
            assert not _dispatch.use_kernel("demo_op", None, "no CUDA device")
    lines = [r.getMessage() for r in caplog.records if "demo_op" in r.getMessage()]
    assert lines == ["gptfast: ops.demo_op falls back to the PyTorch reference: no CUDA device"]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_fallback_chosen_under_compile_is_logged_once_without_a_graph_break(compiler, caplog, monkeypatch):
    """The first call is compiled (no eager call before it says why): the trace logs the
    fallback once, fullgraph holds, and the compiled calls after it log nothing more."""
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    w, b = torch.randn(12), torch.randn(12)
    fn = torch.compile(lambda x: ops.layer_norm(x, w, b) * 2, fullgraph=True, backend=compiler)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        for _ in range(3):
            x = torch.randn(5, 12)
            torch.testing.assert_close(fn(x), 2 * F.layer_norm(x, (12,), w, b))
    lines = [r.getMessage() for r in caplog.records if "ops.layer_norm" in r.getMessage()]
    assert len(lines) == 1 and "falls back to the PyTorch reference: tensor on cpu" in lines[0], lines


def test_kernel_request_that_cannot_run_raises():
    with pytest.raises(ops.KernelUnavailable, match=r"ops.demo_op: backend='kernel' cannot run here: why"):
        _dispatch.use_kernel("demo_op", "kernel", "why")
    assert _dispatch.use_kernel("demo_op", "kernel", None)
    assert not _dispatch.use_kernel("demo_op", "torch", None)


def test_auto_never_picks_the_interpreter(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    assert not _dispatch.use_kernel("demo_op", "auto", None, interpreted=True)
    assert _dispatch.use_kernel("demo_op", "kernel", None, interpreted=True)


def test_backends_report_covers_every_op():
    report = gptfast.backends()
    for op in ("attention", "decode_attention", "layer_norm", "bias_gelu", "linear_bias_gelu", "sample"):
        entry = report[op]
        assert set(entry) >= {"implementation", "available", "reason"}
        assert isinstance(entry["available"], bool) and entry["reason"]
    assert report["_device"]["torch"] == torch.__version__


def test_torch_backend_is_the_reference():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 33), torch.randn(33), torch.randn(33)
    assert torch.equal(ops.layer_norm(x, w, b, backend="torch"), ops.layer_norm_reference(x, w, b))
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    assert torch.equal(ops.attention(q, k, v, backend="torch"), ops.attention_reference(q, k, v))


def test_reference_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 77, 32, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ops.attention_reference(q, k, v), expected, atol=1e-10)


def test_reference_decode_matches_attention_on_prefix():
    torch.manual_seed(0)
    B, H, Tmax, D = 3, 2, 20, 16
    kc, vc = torch.randn(B, H, Tmax, D, dtype=torch.float64), torch.randn(B, H, Tmax, D, dtype=torch.float64)
    lens = torch.tensor([1, 13, 20])
    q = torch.randn(B, H, 4, D, dtype=torch.float64)
    out = ops.decode_attention_reference(q[:, :, :1], kc, vc, lens)
    for b, L in enumerate(lens.tolist()):
        full = ops.attention_reference(q[b:b + 1, :, :1], kc[b:b + 1, :, :L], vc[b:b + 1, :, :L], causal=False)
        assert torch.allclose(out[b:b + 1], full, atol=1e-12)
    out4 = ops.decode_attention_reference(q, kc, vc, torch.tensor([4, 13, 20]))
    for b, L in enumerate([4, 13, 20]):  # bottom-right causal over the last 4 positions
        full = ops.attention_reference(q[b:b + 1], kc[b:b + 1, :, :L], vc[b:b + 1, :, :L], causal=True)
        assert torch.allclose(out4[b:b + 1], full, atol=1e-12)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_reference_gelu_and_layer_norm(approximate):
    torch.manual_seed(0)
    x, b = torch.randn(7, 50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert torch.allclose(ops.bias_gelu_reference(x, b, approximate),
                          torch.nn.functional.gelu(x + b, approximate=approximate))
    r, w = torch.randn(7, 50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    y, h = ops.layer_norm_reference(x, w, b, 1e-5, residual=r)
    assert torch.equal(h, x + r)
    assert torch.allclose(y, torch.nn.functional.layer_norm(x + r, (50,), w, b, 1e-5))


def test_op_argument_errors():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, H, T, D\], got shape \(2, 5, 16\)"):
        ops.attention(q[0], q, q)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        ops.attention(q, q.double(), q)
    with pytest.raises(ValueError, match=r"cache_seqlens must be an int tensor of shape \[B\]=\[1\]"):
        ops.decode_attention(q, q, q, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        ops.layer_norm(torch.randn(3, 16), torch.randn(15), None)
    with pytest.raises(ValueError, match="approximate must be one of"):
        ops.bias_gelu(torch.randn(3, 16), None, approximate="sigmoid")
