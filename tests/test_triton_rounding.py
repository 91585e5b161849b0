"""Triton narrows fp32 to bf16 by rounding to nearest even, as torch does: on a GPU natively,
under the interpreter through the fix in conftest.py (the interpreter alone rounds toward zero,
which would double the output rounding error every bf16 kernel test measures)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _narrow_explicit(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(Y + offs, x.to(tl.bfloat16), mask=offs < N)


@triton.jit
def _narrow_on_store(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(Y + offs, x, mask=offs < N)  # an fp32 value into a bf16 pointer: cast on store


def _inputs():
    g = torch.Generator().manual_seed(11)
    random = torch.randn(3001, generator=g) * torch.logspace(-3, 3, 3001)
    # exact ties (low 16 bits 0x8000) below odd and even bf16 values, and one bit either side
    base = torch.randint(0x3F80, 0x4780, (200,), generator=g, dtype=torch.int32) << 16
    ties = torch.cat([base | 0x8000, base | 0x7FFF, base | 0x8001, (base | 0x10000) | 0x8000]).view(torch.float32)
    finfo = torch.finfo(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), finfo.max, -finfo.max, finfo.tiny,
                            1e-40, -3e-39, 3.3895314e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    x = torch.cat([random, ties, -ties, special])
    return x[torch.randperm(x.numel(), generator=g)].to(DEV)


@pytest.mark.parametrize("kernel", [_narrow_explicit, _narrow_on_store], ids=["cast", "store"])
def test_fp32_to_bf16_rounds_to_nearest_even(kernel):
    x = _inputs()
    y = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    kernel[(triton.cdiv(x.numel(), 512),)](x, y, x.numel(), BLOCK=512)
    want = x.to(torch.bfloat16)
    got_bits, want_bits = y.view(torch.int16).cpu(), want.view(torch.int16).cpu()
    wrong = (got_bits != want_bits).nonzero().flatten()
    assert wrong.numel() == 0, (
        f"{wrong.numel()} of {x.numel()} values narrowed unlike torch, e.g. x={x[wrong[:3]].tolist()} "
        f"gave {y[wrong[:3]].tolist()}, torch {want[wrong[:3]].tolist()}")


def test_nan_stays_nan():
    x = torch.tensor([float("nan"), -float("nan"), 1.5], device=DEV)
    y = torch.zeros(3, dtype=torch.bfloat16, device=DEV)
    _narrow_explicit[(1,)](x, y, 3, BLOCK=4)
    assert y[:2].isnan().all() and y[2].item() == 1.5
