"""GPTFAST_ATTN_AUTOTUNE / GPTFAST_MATMUL_AUTOTUNE: on a GPU, 0 launches one fixed config
instead of the autotuner (fast start-up; .ci/gpu-check's test sweeps). The launch is recorded
here in place of the GPU's, with the interpreter off, so the switch is checked on CPU."""
import pytest
import torch

from gptfast.ops import _dispatch
from gptfast.ops import _norm_triton as NT


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False), (" No ", False),
                                       ("FALSE", False), ("yes", True)])
def test_env_switch_reads_off_values(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("GPTFAST_MATMUL_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("GPTFAST_MATMUL_AUTOTUNE", value)
    assert _dispatch.env_switch("GPTFAST_MATMUL_AUTOTUNE") is on


class _Launch:
    """Stands in for a Triton kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, kwargs))


@pytest.mark.parametrize("switch", ["1", "0"])
def test_matmul_switch_picks_the_fixed_config_on_a_gpu(monkeypatch, switch):
    calls = []
    monkeypatch.setenv("GPTFAST_MATMUL_AUTOTUNE", switch)
    monkeypatch.setattr(NT, "triton_interpret", lambda: False)  # as on a GPU
    monkeypatch.setattr(NT._mm_k, "matmul_bias_gelu_kernel", _Launch("fixed", calls))
    monkeypatch.setattr(NT._mm_k, "matmul_bias_gelu_autotuned", _Launch("autotuned", calls))
    M, K, N = max(NT.EPILOGUE_MIN_ROWS, 300), 48, 200
    x, w, b = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(N, K, dtype=torch.bfloat16), torch.randn(N)
    NT._linear_bias_gelu_fwd_launch(x, w, b.to(torch.bfloat16), "tanh", False)
    (name, grid, kwargs), = calls
    if switch == "1":
        assert name == "autotuned" and callable(grid) and "BLOCK_M" not in kwargs
        return
    bm, bn, bk, stages, warps = NT._mm_k.FIXED_TILE
    assert name == "fixed" and grid == (-(-M // bm) * -(-N // bn),)
    assert {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "num_warps", "TMA")} == dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps, TMA=False)
    assert kwargs["enable_fp_fusion"] is True and kwargs["UPCAST_DOT"] is False
