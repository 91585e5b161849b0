"""ops.sample contracts the other sampling tests left open (found by mutation testing):
the filtered distribution against transformers' own logits warpers, top-p's exact
boundary, and the draw from fp16 / bf16 logits (the Gumbel noise must come from fp32
uniforms: a uniform rounded to 1.0 in half precision is an infinite score)."""
from __future__ import annotations

import math

import pytest
import torch

from gptfast.ops import sampling as S

from test_sampling import BACKENDS, chi2_pvalue, make_keys, oracle_probs

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_filtered(logits_row: torch.Tensor, t: float, k: int, p: float, m: float) -> torch.Tensor:
    """transformers' warpers in generate()'s order (temperature, top-k, top-p, min-p), on one
    fp32 row; a disabled filter is left out, as generate() does."""
    scores = logits_row.float().view(1, -1)
    warpers = [TemperatureLogitsWarper(t)]
    if k > 0:
        warpers.append(TopKLogitsWarper(k))
    if p < 1.0:
        warpers.append(TopPLogitsWarper(p))
    if m > 0.0:
        warpers.append(MinPLogitsWarper(m))
    ids = torch.zeros(1, 1, dtype=torch.int64)
    for w in warpers:
        scores = w(ids, scores)
    return scores[0]


def mid_p_near(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, a top-p with the same cutoff as top_p but halfway between the two reachable
    masses (of the groups of equal probabilities) around it: no float rounding can move the
    cutoff, in transformers or here. Rows with top_p 1 stay 1."""
    out = top_p.clone()
    for r, row in enumerate(probs):
        if top_p[r] >= 1:
            continue
        desc = row[row > 0].sort(descending=True).values
        counts = torch.unique_consecutive(desc, return_counts=True)[1]
        above = desc.cumsum(0)[counts.cumsum(0) - 1]  # the mass down to the end of each group
        i = int(torch.searchsorted(above, float(top_p[r])))  # the group at which top_p's mass is reached
        lo = float(above[i - 1]) if i > 0 else 0.0
        out[r] = (lo + float(above[min(i, len(above) - 1)])) / 2
    return out


# per-row (temperature, top_k, top_p, min_p): every filter alone, together, and disabled
ROW_PARAMS = [(1.0, 0, 1.0, 0.0), (0.7, 40, 1.0, 0.0), (1.3, 0, 0.83, 0.0), (0.9, 0, 1.0, 0.07),
              (0.6, 1000, 0.91, 0.02), (1.1, 5, 0.4, 0.0), (2.0, 0, 0.6, 0.2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_transformers_warpers(backend, dtype):
    # The GPT-2 vocabulary (odd, no multiple of a block), one parameter set per row.
    batch, vocab = len(ROW_PARAMS), 50257
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    logits = (torch.randn(batch, vocab, generator=g) * 3).to(dtype)
    t, k, p, m = (torch.tensor([row[i] for row in ROW_PARAMS]) for i in range(4))
    k = k.to(torch.int64)
    p = mid_p_near(oracle_probs(logits, t, k), p)
    params = [(tr, kr, float(pr), mr) for (tr, kr, _, mr), pr in zip(ROW_PARAMS, p)]
    tokens, probs = S.sample(logits, t, k, p, m, generator=make_keys(batch, 3), return_probs=True, backend=backend)
    for r, (tr, kr, pr, mr) in enumerate(params):
        want = hf_filtered(logits[r], tr, kr, pr, mr)
        kept, ours = torch.isfinite(want), probs[r] > 0
        assert bool(ours[tokens[r]]), f"row {r} drew a removed token"
        # Half-precision logits tie: transformers' top-p cuts a group of equal values where its
        # sort puts the cutoff, ops.sample keeps or removes the group whole (DESIGN.md). So
        # ours = transformers' kept set plus the rest of the group at its lowest kept value.
        extra = ours & ~kept
        assert not (kept & ~ours).any(), f"row {r} {params[r]}: removed tokens transformers keeps at " \
            f"{(kept & ~ours).nonzero().flatten()[:8].tolist()}"
        if dtype == torch.float32:
            assert not extra.any(), f"row {r} {params[r]}: kept tokens transformers removes at " \
                f"{extra.nonzero().flatten()[:8].tolist()}"
        elif extra.any():
            assert pr < 1.0, f"row {r}: kept tokens transformers removes, without top-p"
            scaled = logits[r].float() / tr
            assert bool((scaled[extra] == scaled[kept].min()).all()), f"row {r}: kept tokens below the cutoff"
        on_kept = torch.where(kept, probs[r], 0.0)
        torch.testing.assert_close(on_kept / on_kept.sum(), torch.softmax(want, dim=-1), atol=1e-6, rtol=1e-4)
        if not extra.any():
            torch.testing.assert_close(probs[r], torch.softmax(want, dim=-1), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_exact_boundary(backend):
    # Probabilities exactly 1/2, 1/4, 1/4 (expf(-ln 2) rounds to 0.5 in fp32), the rest -inf:
    # at top_p = 0.5 the mass above the 1/4 tokens is exactly p, so they go (transformers
    # removes a token when its ascending cumulative mass is <= 1 - p); just above 0.5 they stay.
    vocab = 9
    logits = torch.full((3, vocab), float("-inf"))
    perm = torch.randperm(vocab)
    logits[:, perm[0]] = 0.0
    logits[:, perm[1:3]] = -math.log(2)
    top_p = torch.tensor([0.5, 0.5000001, 0.4])
    _, probs = S.sample(logits, top_p=top_p, generator=make_keys(3, 1), return_probs=True, backend=backend)
    only_top = torch.zeros(vocab)
    only_top[perm[0]] = 1.0
    three = torch.zeros(vocab)
    three[perm[:3]] = torch.tensor([0.5, 0.25, 0.25])
    assert torch.equal(probs, torch.stack([only_top, three, only_top]))
    # transformers agrees where the boundary falls between values (at 0.5000001 its ascending
    # sort cuts the tied 1/4 group in two; ops.sample keeps equal values together)
    for r in (0, 2):
        assert torch.equal(probs[r] > 0, torch.isfinite(hf_filtered(logits[r], 1.0, 0, float(top_p[r]), 0.0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_k=9, top_p=0.9)], ids=["plain", "filtered"])
def test_half_logits_distribution(backend, dtype, kw):
    # Frequencies from half-precision logits follow the fp32 filtered distribution, and the
    # returned probabilities are the fp32 ones (not rounded to the logits' dtype).
    vocab, draws = 23, 20_000
    row = (torch.randn(vocab) * 1.5).to(dtype)
    logits = row.expand(draws, vocab).contiguous()
    tokens = S.sample(logits, generator=make_keys(draws, 17), backend=backend, **kw)
    want = oracle_probs(row.view(1, -1), kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0))[0]
    counts = torch.bincount(tokens, minlength=vocab)
    assert int(counts[want == 0].sum()) == 0, "drew a zero-probability token"
    assert chi2_pvalue(counts, want) > 1e-3
    _, probs = S.sample(logits[:4], generator=make_keys(4, 2), return_probs=True, backend=backend, **kw)
    torch.testing.assert_close(probs.double(), want.expand(4, vocab), atol=1e-6, rtol=1e-5)


# ---- the CUDA kernels on the emulator (csrc/emu), at exact boundaries --------------

def _boundary_batch(vocab: int):
    """Rows with masses exactly 1/2, 1/4, 1/4 (or 1/2, 1/2) at random places, the rest -inf, and
    per-row top-p / min-p on or just past the boundary; with the exact expected probabilities."""
    perm = torch.randperm(vocab)[:3]
    half = -math.log(2)  # expf rounds it to exactly 0.5
    rows = [  # (values at perm[0], perm[1], perm[2]), top_p, min_p, expected probabilities there
        ((0.0, half, half), 0.5, 0.0, (1.0, 0.0, 0.0)),         # mass above the 1/4s is exactly p: gone
        ((0.0, half, half), 0.5000001, 0.0, (0.5, 0.25, 0.25)),
        ((0.0, half, half), 1.0, 0.5, (0.5, 0.25, 0.25)),       # prob == min_p * max: kept
        ((0.0, half, half), 1.0, 0.5000001, (1.0, 0.0, 0.0)),
        ((0.0, 0.0, half), 1.0, 1.0, (0.5, 0.5, 0.0)),          # min_p 1: the tied maxima stay
        ((0.0, 0.0, half), 0.5, 0.0, (0.5, 0.5, 0.0)),          # a tied group is kept whole
    ]
    batch = len(rows)
    logits = torch.full((batch, vocab), float("-inf"))
    want = torch.zeros(batch, vocab)
    for r, (values, _, _, probs) in enumerate(rows):
        logits[r, perm] = torch.tensor(values)
        want[r, perm] = torch.tensor(probs)
    top_p = torch.tensor([row[1] for row in rows])
    min_p = torch.tensor([row[2] for row in rows])
    return logits, top_p, min_p, want


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_boundaries(backend):
    logits, top_p, min_p, want = _boundary_batch(101)
    _, probs = S.sample(logits, top_p=top_p, min_p=min_p, generator=make_keys(len(want), 4), return_probs=True,
                        backend=backend)
    assert torch.equal(probs, want)


def test_emulated_kernels_exact_boundaries(tmp_path):
    from test_sampling_emu import emulator  # csrc/emu/emulator.py, loaded as test_sampling_emu does

    try:
        exe = emulator.build(tmp_path)
    except emulator.ToolchainUnavailable as exc:
        pytest.skip(f"the kernel emulator cannot be built here: {exc}")
    logits, top_p, min_p, want = _boundary_batch(2053)
    batch = len(want)
    t, k = torch.ones(batch), torch.zeros(batch, dtype=torch.int64)
    for blocks in (1, 8):
        tokens, probs = emulator.run(exe, logits, t, k, top_p, min_p, make_keys(batch, 5), blocks=blocks,
                                     return_probs=True, seed=blocks)
        assert torch.equal(probs, want), f"blocks={blocks}: rows {(probs != want).any(1).nonzero().flatten().tolist()}"
        assert bool((want.gather(1, tokens.view(-1, 1)) > 0).all()), f"blocks={blocks}: drew a removed token"
