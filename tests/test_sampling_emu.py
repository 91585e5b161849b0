"""The CUDA sampling kernels' logic without a GPU: the real kernel sources, run on the CPU
emulator in csrc/emu (every CUDA thread a fiber, random schedules, DSMEM and barriers
checked; see csrc/emu/README.md).

For every case and every C in {1, 2, 4, 8} (1: sample_kernel, one block per row; 2, 4, 8:
sample_cluster_kernel with C blocks per row):
- the CPU op torch.ops.gptfast.sample draws the same tokens and keeps the same tokens
  (probs > 0), with probabilities equal up to the normalisation (tolerance below);
- C = 2, 4, 8 give bit for bit the tokens and probabilities of C = 1.
The rewrite of the kernels' __shared__ declarations is checked to fail loudly on shapes
it does not know. The emulator is built once per module into pytest's temporary
directory (about 7 s); all runs then go in parallel, one process each (about 6 s on 2 cores).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gptfast.ops import _sampling_ext as E

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _load_emulator():
    """csrc/emu/emulator.py (not a package), without leaving a __pycache__ in csrc/."""
    spec = importlib.util.spec_from_file_location("gptfast_sampling_emulator", CSRC / "emu" / "emulator.py")
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


emulator = _load_emulator()

_EXT_REASON = E.extension_missing_reason()
needs_ext = pytest.mark.skipif(_EXT_REASON is not None, reason=f"extension not available: {_EXT_REASON}")

BLOCKS = (1, 2, 4, 8)
TOKEN_POISON, PROB_POISON = -7, -1.0  # what emu_sample fills the outputs with before the kernel runs


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    vocab: int
    dtype: torch.dtype
    logits: str  # "normal", "tied" (a grid: ties, also at the cutoffs), "levels" (a few values) or "neginf"
    params: dict = field(default_factory=dict)  # temperature / top_k / top_p / min_p: a value or per-row list
    return_probs: bool = True
    row_pad: int = 0  # extra elements per row: the kernels read rows at a stride


CASES = [
    Case("top_k", 3, 3000, torch.float32, "normal", dict(top_k=[40, 1, 2999])),
    Case("top_p", 3, 2500, torch.bfloat16, "normal", dict(top_p=[0.9, 0.5, 1e-6])),
    Case("top_k_top_p_strided", 2, 4100, torch.float32, "normal",
         dict(temperature=[0.7, 1.3], top_k=50, top_p=0.9), return_probs=False, row_pad=3),
    Case("min_p", 2, 1500, torch.float32, "normal", dict(temperature=[1.0, 1.5], min_p=[0.05, 0.3])),
    Case("greedy", 3, 2000, torch.float32, "levels", dict(temperature=0.0), return_probs=False),  # tied maxima
    Case("greedy_filtered_probs", 2, 2000, torch.bfloat16, "tied", dict(temperature=0.0, top_k=20, top_p=0.8)),
    Case("mixed_rows", 6, 2048, torch.bfloat16, "normal",  # every filter disabled on some rows
         dict(temperature=[1.0, 0.0, 0.7, 2.0, 1.0, 0.5], top_k=[0, 5, 1, 0, 50, 40],
              top_p=[1.0, 0.5, 0.93, 1.0, 0.2, 0.77], min_p=[0.0, 0.05, 0.0, 0.3, 0.0, 0.01])),
    Case("ties", 3, 3000, torch.float32, "tied", dict(top_k=[40, 100, 7], top_p=[1.0, 0.8, 0.6])),
    Case("neginf", 2, 3000, torch.float32, "neginf", dict(top_k=[0, 2900], top_p=[0.9, 1.0])),
    Case("tiny_vocab", 2, 33, torch.float32, "tied", dict(top_k=5, top_p=0.9)),  # C = 8: one block gets nothing
    Case("odd_vocab_fp16", 2, 5001, torch.float16, "normal", dict(top_k=20, top_p=0.95)),
    Case("gpt2_vocab", 1, 50257, torch.float32, "normal", dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)),
    # k = the count of x >= 2 (row 0) or >= 0 (row 1): the k-th value is the lowest of a cluster's
    # bin segment (C = 4, 8 split the top digit at 2, C = 2 at 0), so the cutoff's segment total
    # reaches the target exactly; row 0 also holds the float just below 2, which must go
    Case("segment_boundary", 2, 3000, torch.float32, "normal", dict(top_k="segment_boundary")),
]
CASE_IDS = [c.name for c in CASES]


def make_inputs(case: Case, seed: int):
    """Seeded random logits (a strided view when row_pad > 0) and per-row arguments."""
    g = torch.Generator().manual_seed(seed)
    width = case.vocab + case.row_pad
    if case.logits == "tied":
        rows = (torch.randn(case.batch, width, generator=g) * 8).round() / 4
    elif case.logits == "levels":
        rows = torch.randint(-4, 5, (case.batch, width), generator=g).float() / 2
    else:
        rows = torch.randn(case.batch, width, generator=g) * 3
    if case.logits == "neginf":  # about 30 % -inf, the row maximum stays finite
        rows[torch.rand(case.batch, width, generator=g) < 0.3] = float("-inf")
        rows[:, 0] = 1.0
    logits = rows.to(case.dtype)[:, :case.vocab]
    if case.params.get("top_k") == "segment_boundary":
        logits[0, 1] = torch.nextafter(torch.tensor(2.0), torch.tensor(0.0))

    def per_row(name, default, dtype):
        value = case.params.get(name, default)
        if value == "segment_boundary":
            value = [int((logits[r] >= (2.0, 0.0)[r % 2]).sum()) for r in range(case.batch)]
        values = value if isinstance(value, list) else [value] * case.batch
        assert len(values) == case.batch, f"{case.name}: {name} needs {case.batch} values"
        return torch.tensor(values, dtype=dtype)

    keys = torch.randint(-(2**63), 2**63 - 1, (case.batch,), generator=g, dtype=torch.int64)
    return (logits, per_row("temperature", 1.0, torch.float32), per_row("top_k", 0, torch.int64),
            per_row("top_p", 1.0, torch.float32), per_row("min_p", 0.0, torch.float32), keys)


INPUTS = {c.name: make_inputs(c, seed=i) for i, c in enumerate(CASES)}


@pytest.fixture(scope="module")
def emulator_exe(tmp_path_factory):
    try:
        return emulator.build(tmp_path_factory.mktemp("sampling_emu"))
    except emulator.ToolchainUnavailable as exc:
        pytest.skip(f"the kernel emulator cannot be built here: {exc}")


@pytest.fixture(scope="module")
def emulated(emulator_exe):
    """(case name, C) -> (tokens, probs) or the exception of that run; all runs in parallel."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {
            (case.name, blocks): pool.submit(emulator.run, emulator_exe, *INPUTS[case.name], blocks=blocks,
                                             return_probs=case.return_probs, seed=100 * i + blocks)
            for i, case in enumerate(sorted(CASES, key=lambda c: -c.batch * c.vocab))  # longest first
            for blocks in BLOCKS
        }
        results = {}
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except emulator.EmulatorError as exc:
                results[key] = exc
    return results


def result_of(emulated, case: Case, blocks: int):
    result = emulated[case.name, blocks]
    if isinstance(result, Exception):
        raise result
    tokens, probs = result
    assert not (tokens == TOKEN_POISON).any(), "the kernel left tokens unwritten"
    assert ((tokens >= 0) & (tokens < case.vocab)).all(), f"tokens out of range: {tokens.tolist()}"
    if case.return_probs:
        assert not (probs == PROB_POISON).any(), "the kernel left probabilities unwritten"
        assert (probs >= 0).all(), "negative or NaN probabilities"
    return tokens, probs


@needs_ext
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_matches_cpu_op(emulated, case, blocks):
    tokens, probs = result_of(emulated, case, blocks)
    logits, t, k, p, m, keys = INPUTS[case.name]
    want_tokens, want_probs = torch.ops.gptfast.sample(logits.contiguous(), t, k, p, m, keys, case.return_probs)
    assert torch.equal(tokens, want_tokens)
    if case.return_probs:
        assert torch.equal(probs > 0, want_probs > 0), \
            f"kept sets differ in rows {((probs > 0) != (want_probs > 0)).any(1).nonzero().flatten().tolist()}"
        # Same exps (host expf in both), normalised differently: the kernels by the exact sum
        # of the kept masses in 2^-32 fixed point (each mass rounded by <= 2^-33, at most V of
        # them, and the sum is >= 1: the maximum is kept), the CPU op by a float64 sum; then
        # two float roundings on each side (1 / sum and e * that).
        rtol = case.vocab * 2.0**-33 + 4 * 2.0**-24
        torch.testing.assert_close(probs, want_probs, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("blocks", BLOCKS[1:])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cluster_bit_identical_to_one_block(emulated, case, blocks):
    one_tokens, one_probs = result_of(emulated, case, 1)
    tokens, probs = result_of(emulated, case, blocks)
    assert torch.equal(tokens, one_tokens)
    if case.return_probs:
        assert torch.equal(probs.view(torch.int32), one_probs.view(torch.int32)), \
            f"probabilities differ at {(probs.view(torch.int32) != one_probs.view(torch.int32)).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("name", emulator.KERNEL_HEADERS)
def test_rewrite_takes_every_shared_declaration_of_the_kernels(name):
    text, count = emulator.rewrite_shared((CSRC / name).read_text(), name)  # raises on any it does not know
    assert count >= 1 and "emu::shared<" in text


def test_rewrite_shapes():
    source = ("  __shared__ Shared s;  // a comment\n"
              "  __shared__ float red[32];\n"
              "  extern __shared__ float x_cached[];\n"
              "  // __shared__ in a comment stays\n")
    text, count = emulator.rewrite_shared(source, "t.cuh", first_id=5)
    assert count == 3
    assert text == ("  auto& s = emu::shared<Shared, 5>();  // a comment\n"
                    "  auto& red = emu::shared<float[32], 6>();\n"
                    "  float* x_cached = emu::dyn_shared<float>();\n"
                    "  // __shared__ in a comment stays\n")


@pytest.mark.parametrize("source", [
    "__shared__ float a, b;",                          # two declarators
    "__shared__ float a = 0.f;",                       # an initialiser
    "extern __shared__ float x[64];",                  # a sized extern array
    "#define SHARED __shared__\nSHARED Shared s;",     # behind a macro
    "int f();  // __shared__ Shared s; only in a comment",  # no declaration at all
])
def test_rewrite_fails_loudly(source):
    with pytest.raises(emulator.RewriteError, match="t.cuh"):
        emulator.rewrite_shared(source, "t.cuh")
