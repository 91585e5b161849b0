"""ops.sample: filters, distribution, RNG contract, errors, extension vs reference.

Every behavioural test runs on both backends: "torch" (sample_reference) and
"kernel" (the extension gptfast._C; CPU here, CUDA in the @gpu tests). Masks are
compared with a float64 sort-based oracle written below, independent of both.
"""
from __future__ import annotations

import pytest
import torch

from gptfast.ops import sampling as S
from gptfast.ops import _sampling_ext as E

_EXT_REASON = E.extension_missing_reason()
needs_ext = pytest.mark.skipif(_EXT_REASON is not None, reason=f"extension not available: {_EXT_REASON}")
BACKENDS = ["torch", pytest.param("kernel", marks=needs_ext)]


def make_keys(batch: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (batch,), generator=g, dtype=torch.int64).to(device)


def row_param(values, batch, dtype=torch.float32):
    """A [B] tensor cycling through `values` (mixes enabled and disabled rows)."""
    v = torch.tensor(values, dtype=dtype)
    return v.repeat(batch // len(values) + 1)[:batch]


def oracle_probs(logits, t=1.0, k=0, p=1.0, m=0.0):
    """Filtered probabilities in float64, straight from the definitions (a loop over rows)."""
    batch, vocab = logits.shape
    as_row = lambda v, dt: (v if isinstance(v, torch.Tensor) else torch.full((batch,), v)).to(dt)  # noqa: E731
    t, k, p, m = as_row(t, torch.float64), as_row(k, torch.int64), as_row(p, torch.float64), as_row(m, torch.float64)
    out = torch.zeros(batch, vocab, dtype=torch.float64)
    for r in range(batch):
        x = logits[r].to(torch.float32) / (float(t[r]) if t[r] > 0 else 1.0)  # the scaling is fp32 in both
        x = x.double()
        keep = torch.isfinite(x)
        if 0 < k[r] < vocab:
            kth = x.sort(descending=True).values[int(k[r]) - 1]
            keep &= x >= kth
        e = torch.where(keep, torch.exp(x - x.max()), torch.zeros_like(x))
        if p[r] < 1:
            total = e.sum()
            for v in range(vocab):  # mass of strictly larger values among the survivors
                if keep[v] and e[x > x[v]].sum() >= p[r] * total:
                    keep[v] = False
        e = torch.where(keep, e, torch.zeros_like(e))
        if m[r] > 0:
            keep &= e >= m[r] * e.max()
        e = torch.where(keep, e, torch.zeros_like(e))
        out[r] = e / e.sum()
    return out


def tied_logits(batch, vocab, seed, dtype=torch.float32):
    """Random logits on a coarse grid, so that values tie (also at the k-th place)."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(batch, vocab, generator=g) * 8).round() / 4).to(dtype)


def mid_p(logits, k):
    """Per-row top-p values halfway between two reachable cumulative masses: no float ambiguity."""
    probs = oracle_probs(logits, k=k)
    ps = []
    g = torch.Generator().manual_seed(1)
    for row in probs:
        levels = torch.unique(row[row > 0], sorted=True).flip(0)
        masses = torch.cumsum(torch.stack([row[row == lv].sum() for lv in levels]), 0)
        masses = torch.cat([torch.zeros(1, dtype=torch.float64), masses[:-1]])
        i = int(torch.randint(0, len(masses), (1,), generator=g)) if len(masses) > 1 else 0
        hi = masses[i + 1] if i + 1 < len(masses) else torch.tensor(1.0, dtype=torch.float64)
        ps.append(float((masses[i] + hi) / 2) if i + 1 < len(masses) else 1.0)
    return torch.tensor(ps, dtype=torch.float32)


FILTERS = {
    "none": {},
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=7),
    "top_k_large": dict(top_k=10_000),
    "top_p": dict(top_p="mid"),
    "min_p": dict(min_p=0.13),
    "min_p_one": dict(min_p=1.0),  # an exact boundary: only the tokens tied at the maximum stay
    "k_p": dict(top_k=20, top_p="mid"),
    "all": dict(temperature=1.3, top_k=30, top_p="mid", min_p=0.02),
    "mixed_rows": dict(temperature="rows", top_k="rows", top_p="rows", min_p="rows"),
}


def resolve(spec, logits):
    batch = logits.shape[0]
    kw = {}
    for name, value in spec.items():
        if value == "rows":
            value = {"temperature": row_param([1.0, 0.7, 0.0, 2.0], batch),  # 0: greedy, filtered at 1
                     "top_k": row_param([0, 5, 1, 0, 50], batch, torch.int64),
                     "top_p": row_param([1.0, 0.5, 0.93, 1.0, 0.2, 0.77], batch),
                     "min_p": row_param([0.0, 0.05, 0.0, 0.3], batch)}[name]
        kw[name] = value
    if kw.get("top_p") == "mid":
        t = kw.get("temperature", 1.0)
        kw["top_p"] = mid_p(logits.float() / t, kw.get("top_k", 0))
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("vocab", [7, 77, 1000])
def test_mask_matches_float64_oracle(backend, name, vocab):
    logits = tied_logits(24, vocab, seed=vocab)
    kw = resolve(FILTERS[name], logits)
    want = oracle_probs(logits, kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0),
                        kw.get("min_p", 0.0))
    tokens, probs = S.sample(logits, generator=make_keys(24, 0), return_probs=True, backend=backend, **kw)
    mismatched = ((probs > 0) != (want > 0)).any(dim=1)
    assert not mismatched.any(), f"rows {mismatched.nonzero().flatten().tolist()}"
    torch.testing.assert_close(probs.double(), want, atol=1e-5, rtol=1e-4)
    assert bool((want.gather(1, tokens.view(-1, 1)) > 0).all()), "drew a removed token"
    greedy = torch.as_tensor(kw.get("temperature", 1.0)).expand(24) == 0
    assert torch.equal(tokens[greedy], logits.argmax(dim=-1)[greedy]), "a temperature-0 row did not take the argmax"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    logits = tied_logits(16, 300, seed=3, dtype=dtype)
    want = oracle_probs(logits, 0.9, 25, 1.0, 0.05)
    tokens, probs = S.sample(logits, 0.9, 25, 1.0, 0.05, generator=make_keys(16, 1), return_probs=True,
                             backend=backend)
    assert torch.equal(probs > 0, want > 0)
    assert tokens.dtype == torch.int64 and tokens.shape == (16,)


def chi2_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square with the bins of expected count < 5 pooled; p-value via gammaincc."""
    n = counts.sum().double()
    exp = expected_probs.double() * n
    small = exp < 5
    obs_b = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp_b = torch.cat([exp[~small], exp[small].sum().view(1)])
    keep = exp_b > 0
    obs_b, exp_b = obs_b[keep], exp_b[keep]
    stat = ((obs_b - exp_b) ** 2 / exp_b).sum()
    df = max(int(keep.sum()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


DIST_FILTERS = [dict(), dict(top_k=6), dict(top_p=0.7), dict(min_p=0.1), dict(temperature=0.7, top_k=12, top_p=0.9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["peaked", "flat"])
@pytest.mark.parametrize("kw", DIST_FILTERS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()) or "plain")
def test_distribution_chi_square(backend, shape, kw):
    vocab, draws = 40, 20_000
    g = torch.Generator().manual_seed(7)
    row = torch.randn(vocab, generator=g) * (3.0 if shape == "peaked" else 0.3)
    logits = row.expand(draws, vocab).contiguous()
    tokens = S.sample(logits, generator=make_keys(draws, 11), backend=backend, **kw)
    want = oracle_probs(row.view(1, -1), kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0),
                        kw.get("min_p", 0.0))[0]
    counts = torch.bincount(tokens, minlength=vocab)
    assert int(counts[want == 0].sum()) == 0, "drew a zero-probability token"
    assert chi2_pvalue(counts, want) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_reproducible(backend):
    logits = torch.randn(8, 500)
    a = S.sample(logits, top_k=50, generator=make_keys(8, 5), backend=backend)
    b = S.sample(logits, top_k=50, generator=make_keys(8, 5), backend=backend)
    c = S.sample(logits, top_k=50, generator=make_keys(8, 6), backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ga = S.sample(logits, generator=torch.Generator().manual_seed(3), backend=backend)
    gb = S.sample(logits, generator=torch.Generator().manual_seed(3), backend=backend)
    assert torch.equal(ga, gb)


def _lowbias32(x: int) -> int:
    """C. Wellons' lowbias32 on Python ints, independent of both implementations."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_uniform_from_key_is_the_documented_hash():
    # Bit for bit what the docstring (and csrc/sampling_common.h) defines: the reference and the
    # extension draw the same tokens only if both compute exactly this.
    keys = torch.cat([torch.tensor([0, -1, 2**63 - 1, -(2**63), 12345]), make_keys(3, 8)])
    vocab = 37
    got = S.uniform_from_key(keys, vocab)
    for r, key in enumerate(keys.tolist()):
        k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
        kk = _lowbias32(k0 ^ _lowbias32(k1 ^ 0x9E3779B9))
        want = [((_lowbias32(_lowbias32(v ^ kk) ^ k1) >> 9) + 0.5) / 2**23 for v in range(vocab)]
        assert got[r].tolist() == want, f"row {r} (key {key})"


@needs_ext
def test_extension_draws_with_the_same_hash():
    # Equal logits: the Gumbel-max draw is the token with the largest uniform, exactly.
    batch, vocab = 64, 1000
    keys = make_keys(batch, 13)
    logits = torch.full((batch, vocab), 0.3)
    tokens = S.sample(logits, generator=keys, backend="kernel")
    assert torch.equal(tokens, S.uniform_from_key(keys, vocab).argmax(dim=-1))


@needs_ext
def test_float64_logits_fall_back_to_the_reference(caplog, monkeypatch):
    # The extension takes fp32 / fp16 / bf16: fp64 runs the reference under "auto" (and says so),
    # and backend="kernel" is an error naming the dtype, not the op's own argument error.
    import logging

    from gptfast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    logits, keys = torch.randn(5, 64, dtype=torch.float64) * 2, make_keys(5, 3)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        tokens = S.sample(logits, 0.9, 10, 0.8, generator=keys, backend="auto")
    assert torch.equal(tokens, S.sample_reference(logits, 0.9, 10, 0.8, generator=keys))
    assert any("ops.sample falls back" in r.getMessage() and "float64" in r.getMessage() for r in caplog.records)
    with pytest.raises(_dispatch.KernelUnavailable, match="float64"):
        S.sample(logits, generator=keys, backend="kernel")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    logits = torch.randn(16, 333) * 2
    keys = make_keys(16, 9)
    top_p = row_param([0.9, 1.0, 0.5], 16)
    batch = S.sample(logits, 0.8, 20, top_p, 0.01, generator=keys, backend=backend)
    for r in (0, 5, 15):
        alone = S.sample(logits[r:r + 1], 0.8, 20, top_p[r:r + 1], 0.01, generator=keys[r:r + 1], backend=backend)
        assert int(alone) == int(batch[r])


@needs_ext
@pytest.mark.parametrize("kw", [dict(), dict(top_k=40), dict(top_p=0.9), dict(top_k=40, top_p=0.9),
                                dict(min_p=0.05), dict(temperature=0.7, top_k=100, top_p=0.8, min_p=0.01)],
                         ids=str)
def test_extension_agrees_with_reference(kw):
    logits = torch.randn(256, 2000) * 2.5
    keys = make_keys(256, 21)
    ref = S.sample(logits, generator=keys, backend="torch", **kw)
    ext = S.sample(logits, generator=keys, backend="kernel", **kw)
    assert (ref == ext).float().mean() >= 0.99


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy(backend, dtype):
    logits = tied_logits(32, 100, seed=4, dtype=dtype)
    logits[3, 10] = logits[3, 60] = 1e3  # ties at the max: the lowest index wins
    tokens = S.sample(logits, temperature=0.0, top_k=5, generator=make_keys(32, 0), backend=backend)
    assert torch.equal(tokens, logits.argmax(dim=-1)) and int(tokens[3]) == 10
    mixed = S.sample(logits, temperature=row_param([0.0, 1.0], 32), generator=make_keys(32, 0), backend=backend)
    assert torch.equal(mixed[::2], logits.argmax(dim=-1)[::2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(top_k=3, top_p=0.9, min_p=0.1)], ids=["plain", "filtered"])
def test_infinite_logit_takes_the_row(backend, kw):
    # A +inf logit (or one that overflows at the row's temperature) has all the mass: the first
    # one is drawn, never some other token (token 0 is -inf here, a removed token).
    logits = torch.randn(4, 50) * 2
    logits[:, 0] = float("-inf")
    logits[1, [9, 30]] = float("inf")
    logits[2, 41] = float("inf")
    logits[3, [5, 17]] = torch.tensor([2e38, 3e38])  # finite, but +inf at temperature 0.01
    temperature = torch.tensor([1.0, 1.0, 0.7, 0.01])
    tokens = S.sample(logits, temperature, generator=make_keys(4, 5), backend=backend, **kw)
    assert tokens[1:].tolist() == [9, 41, 5]
    assert int(tokens[0]) != 0


BAD = [
    (dict(top_p=0.0), ValueError, "top_p must be in"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\].*1.5"),
    (dict(top_p=torch.tensor([0.5, 1.2, 0.9])), ValueError, "top_p .* in row 1"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer"),
    (dict(temperature=-0.1), ValueError, "temperature must be >= 0"),
    (dict(min_p=1.5), ValueError, "min_p must be in"),
    (dict(temperature=torch.ones(4)), ValueError, r"temperature must be a scalar or a tensor of shape \[B\]=\[3\]"),
    (dict(generator=torch.zeros(3, dtype=torch.int32)), ValueError, "generator as a key tensor must be int64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,exc,match", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_arguments(backend, kw, exc, match):
    with pytest.raises(exc, match=match):
        S.sample(torch.randn(3, 10), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_logits(backend):
    with pytest.raises(ValueError, match="logits must be 2-D"):
        S.sample(torch.randn(10), backend=backend)
    with pytest.raises(TypeError, match="logits must be fp16, bf16, fp32 or fp64"):
        S.sample(torch.ones(2, 5, dtype=torch.int64), backend=backend)
    nan = torch.randn(4, 10)
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="logits row 2 contains NaN"):
        S.sample(nan, backend=backend)
    dead = torch.randn(4, 10)
    dead[1] = float("-inf")
    with pytest.raises(ValueError, match="logits row 1 contains no finite value"):
        S.sample(dead, backend=backend)


@needs_ext
def test_op_rejects_bad_tensors():
    logits, f, i = torch.randn(2, 5), torch.ones(2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="top_k must be Long"):
        torch.ops.gptfast.sample(logits, f, f, f, f, i, False)
    with pytest.raises(RuntimeError, match=r"keys must have shape \[B\]=\[2\]"):
        torch.ops.gptfast.sample(logits, f, i, f, f, torch.zeros(3, dtype=torch.int64), False)
    with pytest.raises(RuntimeError, match="logits must be float32, float16 or bfloat16"):
        torch.ops.gptfast.sample(logits.double(), f, i, f, f, i, False)
    huge = torch.ones(2, 1).expand(2, 2**31 - 2**16 + 1)  # no memory: the check reads the sizes only
    with pytest.raises(RuntimeError, match=r"vocab size must be in \[1, 2\^31 - 2\^16\], got 2147418113"):
        torch.ops.gptfast.sample(huge, f, i, f, f, i, False)


def _op_args(batch=4, vocab=50, dtype=torch.float32, return_probs=False, device="cpu"):
    return (torch.randn(batch, vocab, dtype=dtype, device=device),
            row_param([1.0, 0.0, 0.5], batch).to(device), row_param([0, 3], batch, torch.int64).to(device),
            row_param([1.0, 0.8], batch).to(device), row_param([0.0, 0.1], batch).to(device),
            make_keys(batch, 2, device), return_probs)


@needs_ext
@pytest.mark.parametrize("return_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype, return_probs):
    torch.library.opcheck(torch.ops.gptfast.sample.default, _op_args(dtype=dtype, return_probs=return_probs))


@needs_ext
def test_torch_compile_fullgraph():
    def step(logits, t, k, p, m, keys):
        tokens, _ = torch.ops.gptfast.sample(logits, t, k, p, m, keys, False)
        return tokens

    args = _op_args(batch=6, vocab=64)[:-1]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), step(*args))


# ---- GPU: the CUDA kernel (skipped without CUDA) ---------------------------------

def _cuda_built():
    return _EXT_REASON is None and E._has_kernel_for("cuda")


needs_cuda_ext = pytest.mark.skipif(not (torch.cuda.is_available() and _cuda_built()),
                                    reason="needs a CUDA device and a CUDA build of gptfast._C")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.0), dict(top_k=40), dict(top_p=0.9),
                                dict(top_k=40, top_p=0.9), dict(min_p=0.05),
                                dict(temperature=0.7, top_k=1000, top_p=0.8, min_p=0.01)], ids=str)
def test_cuda_matches_cpu(batch, dtype, kw):
    logits = (torch.randn(batch, 50257) * 3).to(dtype)
    keys = make_keys(batch, 4)
    cpu_tok, cpu_probs = S.sample(logits, generator=keys, return_probs=True, backend="kernel", **kw)
    cuda_tok, cuda_probs = S.sample(logits.cuda(), generator=keys.cuda(), return_probs=True, backend="kernel", **kw)
    assert (cuda_tok.cpu() == cpu_tok).float().mean() >= 0.95
    cuda_probs = cuda_probs.cpu()
    mask_diff = ((cuda_probs > 0) != (cpu_probs > 0)).sum(dim=1)
    assert int(mask_diff.max()) <= 2  # only tokens on a float boundary of top-p / min-p
    # A flipped boundary token moves every kept probability by its mass: compare the two
    # distributions renormalised over the tokens both kept.
    both = (cuda_probs > 0) & (cpu_probs > 0)
    assert bool(both.any(dim=1).all())
    on_both = [torch.where(both, q, 0.0) for q in (cuda_probs, cpu_probs)]
    on_both = [q / q.sum(dim=1, keepdim=True) for q in on_both]
    torch.testing.assert_close(on_both[0], on_both[1], atol=1e-5, rtol=1e-3)
    exact = mask_diff == 0  # rows whose kept sets agree: the probabilities as they are
    torch.testing.assert_close(cuda_probs[exact], cpu_probs[exact], atol=1e-5, rtol=1e-3)
    tok_only = S.sample(logits.cuda(), generator=keys.cuda(), backend="kernel", **kw)
    assert torch.equal(tok_only, cuda_tok)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4097])
def test_cuda_masks_small_vocab(vocab):
    logits = tied_logits(24, vocab, seed=vocab)
    kw = resolve(FILTERS["all"], logits)
    want = oracle_probs(logits, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"])
    _, probs = S.sample(logits.cuda(), generator=make_keys(24, 0, "cuda"), return_probs=True, backend="kernel",
                        **{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert torch.equal(probs.cpu() > 0, want > 0)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_graph_replay_with_fresh_keys():
    batch, vocab = 8, 50257
    logits = torch.randn(batch, vocab, device="cuda") * 3
    keys = make_keys(batch, 0, "cuda")
    top_p = torch.full((batch,), 0.9, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        S.sample(logits, 1.0, 40, top_p, 0.0, generator=keys, backend="kernel")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = S.sample(logits, 1.0, 40, top_p, 0.0, generator=keys, backend="kernel")
    seen = []
    for seed in range(3):
        keys.copy_(make_keys(batch, 100 + seed, "cuda"))
        graph.replay()
        eager = S.sample(logits, 1.0, 40, top_p, 0.0, generator=keys, backend="kernel")
        assert torch.equal(out, eager)
        seen.append(out.clone())
    assert not torch.equal(seen[0], seen[1]) or not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize("source", ["generator", "keys"])
def test_capture_refuses_a_cpu_random_source(source, monkeypatch):
    """Under CUDA-graph capture a CPU generator's draw (or a CPU key tensor's copy) would run once
    and every replay would reuse its keys: an error naming the argument instead (the capture is
    simulated: row_keys raises before touching the device)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    gen = torch.Generator().manual_seed(0) if source == "generator" else make_keys(2, 0)
    with pytest.raises(ValueError, match=r"generator must be on the logits' device cuda while a CUDA graph "
                                         r"captures .* got one on cpu"):
        S.row_keys(2, gen, torch.device("cuda"))
    assert S.row_keys(2, gen, torch.device("cpu")).shape == (2,)  # not on a CUDA device: no capture


# ---- the reference without host syncs (torch.compile tracing, CUDA-graph capture) ------

@pytest.mark.parametrize("name", list(FILTERS))
def test_reference_without_host_syncs_is_identical(name, monkeypatch):
    logits = tied_logits(24, 77, seed=5)
    kw = resolve(FILTERS[name], logits)
    keys = make_keys(24, 9)
    eager_tok, eager_probs = S.sample_reference(logits, generator=keys, return_probs=True, **kw)
    # what a capture sees: no value checks, every filter run even where no row uses it
    monkeypatch.setattr(S, "host_checks_allowed", lambda logits: False)
    tok, probs = S.sample_reference(logits, generator=keys, return_probs=True, **kw)
    assert torch.equal(tok, eager_tok) and torch.equal(probs, eager_probs)


def test_reference_traces_whole():
    def step(logits, keys):
        return S.sample_reference(logits, 0.8, 5, 0.9, 0.0, generator=keys)

    logits, keys = torch.randn(4, 50) * 2, make_keys(4, 1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # a host sync would break the graph
    assert torch.equal(compiled(logits, keys), step(logits, keys))


# ---- GPU: the cluster kernel (several blocks per row) against the one-block kernel ----

def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


CLUSTER_FILTERS = {
    "top_k": dict(top_k=40), "top_p": dict(top_p=0.9), "k_p": dict(top_k=40, top_p=0.9), "min_p": dict(min_p=0.05),
    "greedy": dict(temperature=0.0), "mixed_rows": dict(temperature="rows", top_k="rows", top_p="rows", min_p="rows"),
}


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.skipif(not _sm90(), reason="the cluster kernel needs sm_90")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 1000, 50257])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("name", list(CLUSTER_FILTERS))
def test_cuda_cluster_matches_one_block(name, batch, vocab, dtype):
    # Same tokens and bit-identical probabilities from 1, 2, 4 and 8 blocks per row
    # (tiny vocabularies leave some blocks of a cluster without tokens).
    logits = (tied_logits(batch, vocab, seed=batch * vocab) if vocab < 50257
              else torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch)) * 3).to(dtype)
    spec = resolve(CLUSTER_FILTERS[name], logits)
    t, k, p, m = S.check_sample_args(logits, spec.get("temperature", 1.0), spec.get("top_k", 0),
                                     spec.get("top_p", 1.0), spec.get("min_p", 0.0))
    args = [a.cuda() for a in (logits, t, k, p, m, make_keys(batch, 3))]
    for return_probs in (True, False):
        want_tok, want_probs = torch.ops.gptfast._sample_with_cluster(*args, return_probs, 1)
        for cluster in (2, 4, 8):
            tok, probs = torch.ops.gptfast._sample_with_cluster(*args, return_probs, cluster)
            assert torch.equal(tok, want_tok), f"cluster={cluster} return_probs={return_probs}"
            assert torch.equal(probs, want_probs), f"cluster={cluster}"


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.skipif(not _sm90(), reason="the cluster kernel needs sm_90")
def test_cuda_cluster_chosen_for_small_batches():
    # The launcher's choice without an override: a cluster for B=1, one block per row for
    # a batch too large for one wave of clusters. Catches a cluster path silently disabled
    # (e.g. the loaded binary not recognised as sm_90 code).
    import os
    if os.environ.get("GPTFAST_SAMPLE_CLUSTER", "auto") not in ("", "auto"):
        pytest.skip("GPTFAST_SAMPLE_CLUSTER overrides the choice")
    blocks = torch.ops.gptfast._sample_blocks_per_row
    assert blocks(torch.empty(1, 50257, device="cuda")) == 8
    assert blocks(torch.empty(1, 1000, device="cuda")) == 1  # under 1024 tokens per block
    assert blocks(torch.empty(1024, 50257, device="cuda")) == 1


@pytest.mark.parametrize("bad, error", [([[1.0, 2.0]], TypeError), (torch.randn(2, 3, 5), ValueError),
                                        (torch.randn(0, 5), ValueError), (torch.randint(0, 5, (2, 5)), TypeError)])
def test_bad_logits_are_an_error_before_dispatch(bad, error, caplog, monkeypatch):
    """A bad logits argument raises without logging a fallback line: the op logs only its first
    fallback, which a bad call would otherwise use up (a later real fallback would say nothing)."""
    import logging

    from gptfast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    with caplog.at_level(logging.WARNING, logger="gptfast"), pytest.raises(error, match="logits must be"):
        S.sample(bad)
    assert not [r for r in caplog.records if "ops.sample" in r.getMessage()]
    assert "sample" not in _dispatch._fallback_logged
