"""The benchmark suite, tests written from mutation testing (tests/test_bench.py has the rest).

The suite is run for the first time on a lent GPU, in one call: these tests check on CPU what a
GPU run would otherwise be the first to exercise (CUDA timing, input rotation, the device's
properties, the call's peak memory, gpu-check's budgets), that every provider of a case computes
the same thing as its peers (a ratio between different work means nothing), and the counts and
statistics the tables are made of.
"""
import json
import os
import re
import sys
import types

import pytest
import torch

from gptfast.ops._dispatch import import_source_package

import_source_package("bench", "bench")  # installed, or bench/ of this checkout
from gptfast.bench import (accounting, cli, e2e, harness, ops_attention, ops_cross_entropy,  # noqa: E402
                           ops_norm, ops_sampling, report)

CPU = torch.device("cpu")


# ---- every provider computes what the reference computes ----------------------------------------

def _outputs(case, inputs, monkeypatch):
    """{provider: output} of one call of every provider that runs on CPU eagerly, on one set of
    inputs. gptfast's Triton providers run in the Triton interpreter (never timed, but their
    setup is the one timed on a GPU); compiled providers are left out (the function they compile
    is a provider of its own), and so are the ones that cannot run here (SDPA's fused backends,
    libraries not installed)."""
    for mod in (ops_attention, ops_norm):
        monkeypatch.setattr(mod, "no_interpreter", lambda *t: None)
    out = {}
    for p in case.providers:
        if p.compiled:
            continue
        try:
            thunk = p.setup(inputs)
        except harness.Skip:
            continue
        scope = p.context() if p.context else None
        try:
            if scope is not None:
                scope.__enter__()
            out[p.name] = thunk()
        except RuntimeError as exc:
            if "No viable backend" in str(exc) or "No available kernel" in str(exc):  # SDPA backends CPU lacks
                continue
            raise
        finally:
            if scope is not None:
                scope.__exit__(None, None, None)
    return out


def _assert_same_work(case, out, tol):
    want = out["reference"]
    want = want if isinstance(want, tuple) else (want,)
    assert "gptfast" in out, (case.name, list(out))
    for name, got in out.items():
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want), (case.name, name)
        for a, b in zip(got, want):
            # shape and dtype included: a peer timed on other work than gptfast makes the ratio meaningless
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{case.name} [{name}]: {m}")


def _small_inputs(case):
    """Inputs of the case's kind at a small odd shape (the providers take any shape): the
    interpreter runs the Triton kernels at the case's own CPU shapes in minutes."""
    op, pass_ = case.op, case.shape.get("pass")
    if op == "attention":
        make = ops_attention._padded_inputs(4, 24, pass_) if "padding" in case.shape else \
            ops_attention._attention_inputs(1, 37, pass_)
    elif op == "decode_attention":
        make = ops_attention._decode_inputs(2, 45)
    elif op == "layer_norm":
        make = ops_norm._ln_inputs(37, 96, pass_)
    elif op == "bias_gelu":
        make = ops_norm._gelu_inputs(37, 200, pass_)
    elif op == "mlp":
        make = ops_norm._mlp_inputs(37, 64, 96)
    else:
        make = ops_cross_entropy._inputs(37, 32, 300)
    torch.manual_seed(0)
    return make(CPU)


SAME_WORK_OPS = ("attention", "decode_attention", "layer_norm", "bias_gelu", "mlp", "linear_cross_entropy")


@pytest.mark.parametrize("op", SAME_WORK_OPS)
def test_every_provider_computes_what_the_reference_computes(op, monkeypatch):
    """Each case's providers (gptfast's kernels in the interpreter, the reference, the eager peers)
    give the same output (or gradients) on the same inputs: same values, shape and dtype."""
    pytest.importorskip("triton")
    cases = [c for c in cli.OPS[op]("cpu", False) if "B=2 " not in c.name]  # one batch size is enough
    for case in cases:
        if op == "attention" and case.name != cases[0].name:  # the interpreter is slow: the TMA / pointer
            case.providers = [p for p in case.providers if not p.name.startswith("gptfast-")]  # variants once
        # the dropout case's providers draw different masks: the same work shows at p = 0 (each
        # provider still takes the dropout argument; test_dropout_case_providers_drop checks p > 0)
        monkeypatch.setattr(ops_attention, "DROPOUT", 0.0 if "dropout_p" in case.shape else ops_attention.DROPOUT)
        out = _outputs(case, _small_inputs(case), monkeypatch)
        assert len(out) >= 3, (case.name, list(out))
        if op in ("attention", "decode_attention"):
            assert {"sdpa-math", "sdpa-flash"} & set(out), (case.name, list(out))
        _assert_same_work(case, out, 2e-3)


def test_dropout_case_providers_drop(monkeypatch):
    """The full run's dropout case: every provider that runs here applies dropout 0.1 (its result
    differs from the same provider's at p = 0) and repeats itself under the same seed."""
    pytest.importorskip("triton")
    (case,) = [c for c in ops_attention.attention_cases("cpu", quick=False) if "dropout_p" in c.shape]
    assert case.shape["dropout_p"] == ops_attention.DROPOUT == 0.1 and case.shape["pass"] == "fwd+bwd"
    case.providers = [p for p in case.providers if not p.name.startswith("gptfast-")]
    inputs = _small_inputs(case)
    torch.manual_seed(1)
    dropped = _outputs(case, inputs, monkeypatch)
    torch.manual_seed(1)
    again = _outputs(case, inputs, monkeypatch)
    monkeypatch.setattr(ops_attention, "DROPOUT", 0.0)
    plain = _outputs(case, inputs, monkeypatch)
    assert {"gptfast", "reference", "sdpa-math"} <= set(dropped), list(dropped)
    for name, grads in dropped.items():
        for a, b, c in zip(grads, again[name], plain[name]):
            assert torch.isfinite(a).all() and torch.equal(a, b), name
            assert (a - c).abs().max() > 1e-2, name


def test_sampling_peers_filter_as_gptfast_does():
    """The sampling peers keep the tokens gptfast keeps (the same filtered distribution), and every
    provider's greedy mode is the argmax: they time the same draw."""
    torch.manual_seed(0)
    logits = torch.randn(3, 997) * 3
    for mode, (t, k, p) in ops_sampling.MODES.items():
        if t == 0:
            continue
        _, want = ops_sampling.ops.sample_reference(logits, temperature=t, top_k=k, top_p=p, return_probs=True)
        got = torch.softmax(ops_sampling._filter(logits, t, k, p), dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode}: {m}")
    # temperature is applied: at 0.5 the distribution is sharper than at 1
    sharp = torch.softmax(ops_sampling._filter(logits, 0.5, 0, 0.9), dim=-1)
    _, want = ops_sampling.ops.sample_reference(logits, temperature=0.5, top_p=0.9, return_probs=True)
    torch.testing.assert_close(sharp, want, rtol=1e-5, atol=1e-6)
    (case, *_) = [c for c in ops_sampling.sampling_cases("cpu", quick=True) if c.shape["mode"] == "greedy"]
    inputs = {"logits": logits}
    for prov in case.providers:
        if not prov.compiled:
            assert torch.equal(prov.setup(inputs)(), logits.argmax(-1)), prov.name
    for case in ops_sampling.sampling_cases("cpu", quick=True):
        tokens = {prov.name: prov.setup(inputs)() for prov in case.providers if not prov.compiled}
        t, k, p = ops_sampling.MODES[case.shape["mode"]]
        _, probs = ops_sampling.ops.sample_reference(logits, temperature=max(t, 1e-3), top_k=k, top_p=p,
                                                     return_probs=True)
        for name, tok in tokens.items():  # each draws one kept token per row
            assert tok.shape == (3,) and bool((probs.gather(1, tok[:, None]) > 0).all()), (case.name, name)


# ---- statistics, counts and ratios --------------------------------------------------------------

def test_summarize_is_the_median_not_the_mean():
    # one slow run (a page fault, a clock change) moves a mean, not the median
    s = accounting.summarize([0.001, 0.001, 0.002, 0.003, 0.050])
    assert s["median_ms"] == pytest.approx(2.0)
    assert s["q25_ms"] == pytest.approx(1.0) and s["q75_ms"] == pytest.approx(3.0)
    assert s["max_ms"] == pytest.approx(50.0) and s["n"] == 5
    even = accounting.summarize([0.004, 0.001, 0.002, 0.100])
    assert even["median_ms"] == pytest.approx(3.0)


def test_ratio_is_best_peer_over_provider_and_ignores_skipped_and_reference():
    results = [{"provider": "gptfast", "kind": "gptfast", "status": "ok", "median_ms": 3.0},
               {"provider": "slow", "kind": "peer", "status": "ok", "median_ms": 9.0},
               {"provider": "fast", "kind": "peer", "status": "ok", "median_ms": 1.5},
               {"provider": "ghost", "kind": "peer", "status": "skipped", "reason": "r", "median_ms": 0.1},
               {"provider": "reference", "kind": "reference", "status": "ok", "median_ms": 0.5}]
    assert accounting.add_ratios(results) == "fast"
    assert [r["vs_best_peer"] for r in results] == [0.5, pytest.approx(1 / 6), 1.0, None, 3.0]


def test_counts_of_every_case_match_its_shape():
    """Every case's FLOP or byte count is the accounting function of its own shape (and the
    dtype it times): a count off by a pass, the causal half or the element size is a wrong
    TFLOP/s on every row."""
    for kind, elem in (("cuda", 2), ("cpu", 4)):
        for case in ops_attention.attention_cases(kind, quick=False):
            s = case.shape
            assert s["causal"] and case.flops == 4 * s["B"] * s["H"] * s["T"] ** 2 * s["D"] / 2 * \
                {"fwd": 1, "fwd+bwd": 3.5}[s["pass"]] and case.bound == "flops", case.name
        for case in ops_attention.decode_cases(kind, quick=False):
            s = case.shape
            assert case.bytes == 2 * s["B"] * s["H"] * s["L"] * s["D"] * elem and case.bound == "bytes"
        for case in ops_norm.layer_norm_cases(kind, quick=False):
            act = case.shape["M"] * case.shape["N"] * elem
            n = case.shape["N"] * elem
            want = 4 * act + 2 * n if case.shape["pass"] == "fwd" else 3 * act + 2 * n + 2 * case.shape["M"] * 4
            assert case.bytes == want, case.name
        for case in ops_norm.bias_gelu_cases(kind, quick=False):
            act = case.shape["M"] * case.shape["N"] * elem
            assert case.bytes == (2 if case.shape["pass"] == "fwd" else 3) * act + case.shape["N"] * elem
        (mlp,) = ops_norm.mlp_cases(kind, quick=False)
        assert mlp.flops == 2 * mlp.shape["M"] * mlp.shape["K"] * mlp.shape["N"]
        for case in ops_cross_entropy.linear_cross_entropy_cases(kind, quick=False):
            assert case.flops == 6 * case.shape["N"] * case.shape["C"] * case.shape["V"], case.name
        for case in ops_sampling.sampling_cases(kind, quick=False):
            assert case.bytes == case.shape["B"] * case.shape["V"] * 4 and case.dtype == "fp32"
    # inputs: the dtype a case names is the dtype its inputs have, at its shape
    for case in ops_attention.attention_cases("cpu", quick=True) + ops_norm.layer_norm_cases("cpu", quick=True):
        x = case.make_inputs(CPU)
        t = x.get("q", x.get("x"))
        assert t.dtype == torch.float32 and case.dtype == "fp32"
        if case.op == "attention":
            assert tuple(t.shape) == tuple(case.shape[k] for k in "BHTD")
        else:
            assert tuple(t.shape) == (case.shape["M"], case.shape["N"])


def test_roofline_fraction_uses_the_peak_of_the_case_bound():
    roof = {"copy_gbps": 100.0, "matmul_tflops": 10.0}
    flops = harness.Case(op="toy", name="f", shape={}, dtype="fp32", make_inputs=lambda d: {},
                         providers=[harness.Provider("p", "peer", lambda i: (lambda: None))], flops=2e9)
    byte = harness.Case(op="toy", name="b", shape={}, dtype="fp32", make_inputs=lambda d: {},
                        providers=[harness.Provider("p", "peer", lambda i: (lambda: None))], bytes=5e7)
    ctx = harness.RunContext(device=CPU, roofline=roof, cpu_min_run_time_s=0.01)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "time_thunks", lambda thunks, ctx: [1e-3] * 5)  # 1 ms per call
        (f,) = harness.run_case(flops, ctx)["results"]
        (b,) = harness.run_case(byte, ctx)["results"]
    assert f["tflops"] == pytest.approx(2.0) and f["roofline_fraction"] == pytest.approx(0.2)
    assert b["gbps"] == pytest.approx(50.0) and b["roofline_fraction"] == pytest.approx(0.5)


# ---- the CUDA branches, on CPU with torch.cuda faked ----------------------------------------------

class _FakeCuda:
    """A clock and an event log in place of a CUDA stream: events stamp the clock when recorded,
    and may be read only after a synchronize that followed their record."""

    def __init__(self, call_ms=2.0, flush_ms=5.0):
        self.now, self.log, self.synced_at = 0.0, [], -1
        self.call_ms, self.flush_ms = call_ms, flush_ms
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "CUDA events must be created with enable_timing=True"
                self.t, self.seq = None, None

            def record(self):
                self.t, self.seq = fake.now, len(fake.log)
                fake.log.append("record")

            def elapsed_time(self, other):
                assert self.seq is not None and other.seq is not None and fake.synced_at > other.seq, \
                    "elapsed_time read before torch.cuda.synchronize()"
                return other.t - self.t  # milliseconds, as CUDA's

        self.Event = Event

    def synchronize(self, device=None):
        self.synced_at = len(self.log)
        self.log.append("sync")

    def flush(self):
        self.now += self.flush_ms
        self.log.append("flush")

    def thunk(self, i):
        def call():
            self.now += self.call_ms
            self.log.append(f"call{i}")
        return call


def test_cuda_timing_excludes_the_flush_and_returns_seconds(monkeypatch):
    fake = _FakeCuda(call_ms=2.0, flush_ms=5.0)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    ctx = harness.RunContext(device=CPU, warmup_ms=25.0, rep_ms=100.0)
    monkeypatch.setattr(ctx, "flush_l2", fake.flush)
    times = harness._time_cuda([fake.thunk(i) for i in range(3)], ctx)
    # the estimate (5 calls and their flushes: 7 ms each) sizes the run: 100 ms / 7 ms -> 14 runs
    assert len(times) == 14
    assert times == [pytest.approx(2e-3)] * 14  # each call's 2 ms, in seconds, its flush not timed
    timed = fake.log[fake.log.index("sync") + 1:]
    calls = [e for e in timed if e.startswith("call")]
    assert calls[-14:] == [f"call{i % 3}" for i in range(14)]  # the input copies rotated
    # every timed call is flush, record, call, record
    last = timed[-14 * 4 - 1:-1]
    assert [last[i:i + 4][:2] + ["call"] + last[i + 3:i + 4] for i in range(0, len(last), 4)] == \
        [["flush", "record", "call", "record"]] * 14 and timed[-1] == "sync"
    # a call slower than the budget still runs 10 times
    slow = _FakeCuda(call_ms=50.0, flush_ms=0.0)
    monkeypatch.setattr(torch.cuda, "Event", slow.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", slow.synchronize)
    monkeypatch.setattr(ctx, "flush_l2", slow.flush)
    assert harness._time_cuda([slow.thunk(0)], ctx) == [pytest.approx(0.05)] * 10


class _CudaLikeContext(harness.RunContext):
    """A RunContext that takes the CUDA branches of the harness while its tensors stay on CPU."""

    @property
    def is_cuda(self):
        return True

    def sync(self):
        pass

    def flush_l2(self):
        pass


def test_cuda_run_rotates_small_inputs_and_records_the_call_peak(monkeypatch):
    """On CUDA, inputs smaller than L2 are rotated among ctx.rotate_copies fresh copies (each made
    by make_inputs, each with its own setup), and call_peak_mb is recorded."""
    made, set_up, called = [], [], []

    def make(device):
        made.append(torch.randn(33))
        return {"x": made[-1]}

    def setup(i):
        set_up.append(i["x"])
        return lambda: called.append(i["x"]) or i["x"] * 2

    case = harness.Case(op="toy", name="t", shape={}, dtype="fp32", make_inputs=make,
                        providers=[harness.Provider("mine", "gptfast", setup)], bytes=33 * 4 * 2)
    monkeypatch.setattr(harness, "l2_bytes", lambda device: 1 << 20)
    seen = {}

    def fake_time(thunks, ctx):
        seen["n"] = len(thunks)
        for t in thunks:
            t()
        return [1e-3] * 10

    monkeypatch.setattr(harness, "time_thunks", fake_time)
    monkeypatch.setattr(harness, "call_peak_bytes", lambda thunk, ctx: 3 * 2 ** 20)
    ctx = _CudaLikeContext(device=CPU, rotate_copies=4)
    (rec,) = harness.run_case(case, ctx)["results"]
    assert rec["status"] == "ok", rec
    assert rec["input_copies"] == 4 and seen["n"] == 4 and len(made) == 4
    assert [id(x) for x in set_up] == [id(x) for x in made]  # every copy set up on its own inputs
    assert rec["call_peak_mb"] == pytest.approx(3.0) and rec["median_ms"] == pytest.approx(1.0)
    # inputs larger than L2: one copy
    monkeypatch.setattr(harness, "l2_bytes", lambda device: 64)
    made.clear()
    (rec,) = harness.run_case(case, ctx)["results"]
    assert rec["input_copies"] == 1 and len(made) == 1


def test_call_peak_bytes_is_the_peak_beyond_what_was_allocated(monkeypatch):
    state = {"allocated": 1000, "peak": 0}

    def thunk():
        state["peak"] = max(state["peak"], state["allocated"] + 700)  # a 700-byte temporary at its peak
        return "out"

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    state["peak"] = 10 ** 9  # an earlier call's peak: reset before the call
    assert harness.call_peak_bytes(thunk, _CudaLikeContext(device=CPU)) == 700


def test_environment_on_cuda_reads_the_device_properties(monkeypatch):
    """The CUDA branch of environment() (the first thing a GPU run does after the roofline) with
    the properties torch.cuda.get_device_properties documents: a typo'd attribute fails here."""
    props = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000,
                                  multi_processor_count=132, L2_cache_size=60 << 20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    env = harness.environment(torch.device("cuda"))
    assert (env["device_kind"], env["device_name"], env["sm_count"], env["capability"]) == \
        ("cuda", "NVIDIA H200", 132, "9.0")
    assert env["l2_bytes"] == 60 << 20 and env["memory_gb"] == 150.0 and env["cudnn"] == 91002
    assert harness.l2_bytes(torch.device("cuda")) == 60 << 20 and harness.l2_bytes(CPU) == 0
    assert harness.device_slug(env["device_name"]) == "nvidia-h200"


def test_roofline_counts_the_copy_read_and_write(monkeypatch):
    calls = []

    def fake_time(thunks, ctx):
        calls.append(len(thunks))
        return [0.002] * 5  # 2 ms, whatever is timed

    monkeypatch.setattr(harness, "time_thunks", fake_time)
    ctx = harness.RunContext(device=CPU, quick=True)
    rf = harness.measure_roofline(ctx)
    assert calls == [1, 1]
    elems = 8 << 20
    assert rf["copy_bytes"] == 2 * elems * 4  # read + write, fp32
    assert rf["copy_gbps"] == pytest.approx(2 * elems * 4 / 0.002 / 1e9)
    n = rf["matmul_shape"][0]
    assert rf["matmul_shape"] == [n, n, n] and rf["matmul_dtype"] == "float32"
    assert rf["matmul_tflops"] == pytest.approx(2 * n ** 3 / 0.002 / 1e12)


# ---- results on disk ---------------------------------------------------------------------------

def _doc():
    env = {k: None for k in ("device_kind", "device_name", "sm_count", "torch", "triton", "cuda",
                             "git_commit", "date")}
    env.update(device_kind="cuda", device_name="NVIDIA H200", sm_count=132, torch="2.11", triton="3.6.0",
               cuda="13.0", git_commit="abc1234", date="2026-12-01")
    ok = dict(reason=None, iqr_ms=0.1, q25_ms=0.95, q75_ms=1.05, n=10, status="ok")
    case = {"op": "toy", "name": "t", "shape": {}, "dtype": "bf16", "bound": "bytes", "best_peer": "fast",
            "results": [dict(ok, provider="gptfast", kind="gptfast", median_ms=2.0, vs_best_peer=0.5),
                        dict(ok, provider="fast", kind="peer", median_ms=1.0, vs_best_peer=1.0),
                        dict(ok, provider="slow", kind="peer", median_ms=4.0, vs_best_peer=0.25)]}
    return {"schema": report.SCHEMA, "env": env, "roofline": {}, "notes": [], "cases": [case]}


def test_partial_results_are_replaced_atomically(tmp_path, monkeypatch):
    """A run stopped while results.partial.json is being written keeps the previous one whole."""
    from gptfast import checkpoint
    doc = _doc()
    path = report.write_partial(doc, str(tmp_path))
    before = open(path).read()
    assert json.loads(before)["partial"] is True
    doc["cases"].append(dict(doc["cases"][0], name="second"))

    def stopped(src, dst):
        raise KeyboardInterrupt("stopped from outside before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        report.write_partial(doc, str(tmp_path))
    assert open(path).read() == before
    assert os.listdir(tmp_path) == [report.PARTIAL]  # no temporary left beside it


def test_readme_row_is_gptfast_beside_the_best_peer():
    block = report.readme_block(_doc(), "bench/results/h200")
    (row,) = [line for line in block.splitlines() if line.startswith("| toy |")]
    assert row == "| toy | t (bf16) | 2 | fast | 1 | 0.50x | - |"
    assert block.startswith(report.README_START) and block.endswith(report.README_END)


def test_update_readme_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    head = "# x\n\nsee the benchmark section below\n"
    tail = "\n## after\ntext\n"
    readme.write_text(f"{head}{report.README_START}\nold\n{report.README_END}{tail}")
    report.update_readme(str(readme), f"{report.README_START}\nnew\n{report.README_END}")
    assert readme.read_text() == f"{head}{report.README_START}\nnew\n{report.README_END}{tail}"
    readme.write_text(f"{report.README_END}\n{report.README_START}\n")  # out of order: refused, untouched
    with pytest.raises(ValueError, match="in that order"):
        report.update_readme(str(readme), "x")
    assert readme.read_text() == f"{report.README_END}\n{report.README_START}\n"


# ---- the command line ---------------------------------------------------------------------------

def test_quick_compile_budget_and_timing_by_device():
    quick, full = cli.parse_args(["--quick"]), cli.parse_args([])
    assert cli._context(quick, torch.device("cuda")).compile_budget_s == 45.0
    assert cli._context(quick, CPU).compile_budget_s == 0.0
    assert cli._context(full, torch.device("cuda")).compile_budget_s == float("inf")
    assert cli._context(cli.parse_args(["--quick", "--compile-budget", "7"]), CPU).compile_budget_s == 7.0
    q, f = cli._context(quick, CPU), cli._context(full, CPU)
    assert q.rep_ms < f.rep_ms and q.warmup_ms < f.warmup_ms and q.cpu_min_run_time_s < f.cpu_min_run_time_s


@pytest.mark.parametrize("ops", [["attention"], ["sampling", "e2e"], ["decode_attention", "linear_cross_entropy"],
                                 ["layer_norm", "bias_gelu", "mlp", "sampling", "e2e"]])
def test_ops_runs_the_named_ops_and_only_those(ops, tmp_path, monkeypatch):
    ran = []

    def fake_run_case(case, ctx, progress=None):
        ran.append(case.op)
        return {"op": case.op, "name": case.name, "shape": {}, "dtype": case.dtype, "flops": None, "bytes": 1.0,
                "bound": "bytes", "best_peer": None, "wall_s": 0.0, "results": []}

    monkeypatch.setattr(harness, "run_case", fake_run_case)
    monkeypatch.setattr(harness, "measure_roofline", lambda ctx: {})
    assert cli.parse_args(["--ops", " , ".join(ops)]).ops == ops
    assert cli.main(["--quick", "--ops", ",".join(ops), "--out", str(tmp_path), "--no-progress", "--no-charts"]) == 0
    want = [c.op for op in ops for c in cli.OPS[op]("cpu", True)]
    assert ran == want and set(ran) == set(ops)
    assert json.loads((tmp_path / "results.json").read_text())["ops"] == ops


# ---- end-to-end metrics ------------------------------------------------------------------------

def test_generation_metrics_from_a_known_clock(monkeypatch):
    """tokens/s counts the batch; decode ms/token is the N-token run less the 1-token run over N-1."""
    clock = [0.0]
    monkeypatch.setattr(e2e.time, "perf_counter", lambda: clock[0])
    B, P, N = 3, 5, 9
    spec = {"preset": "gpt2", "batch": B, "prompt": P, "new_tokens": N, "reps": 3}

    def generate(ids, n, mask=None):
        clock[0] += 0.050 + 0.010 * n  # 50 ms prefill, 10 ms a token
        return torch.zeros(ids.shape[0], ids.shape[1] + n)

    prov = harness.Provider("gptfast", "gptfast", lambda a: generate)
    out = e2e._measure_generation(spec)(prov, harness.RunContext(device=CPU))
    m = out["metrics"]
    t_full = 0.050 + 0.010 * N
    assert out["times_s"] == [pytest.approx(t_full)] * 3
    assert m["tokens_per_s"] == pytest.approx(B * N / t_full)
    assert m["ms_per_token"] == pytest.approx(t_full / N * 1e3)
    assert m["decode_ms_per_token"] == pytest.approx(10.0)
    assert m["prefill_plus_one_ms"] == pytest.approx(60.0)


def test_train_mfu_divides_by_the_measured_matmul_rate(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(e2e.time, "perf_counter", lambda: clock[0])
    spec = {"preset": "gpt2", "batch": 2, "seq": 64, "reps": 3}

    def step():
        clock[0] += 0.25

    n_params = 1_000_000
    prov = harness.Provider("gptfast", "gptfast", lambda a: (step, n_params))
    ctx = harness.RunContext(device=CPU, roofline={"matmul_tflops": 0.5})
    m = e2e._measure_train(spec)(prov, ctx)["metrics"]
    fpt = accounting.train_flops_per_token(n_params, 12, 12, 64, 64)  # GPT-2 124M's layers, heads, head dim
    assert m["tokens_per_s"] == pytest.approx(2 * 64 / 0.25) and m["flops_per_token"] == pytest.approx(fpt)
    assert m["mfu_vs_measured_matmul"] == pytest.approx(2 * 64 / 0.25 * fpt / 0.5e12)


# ---- .ci/gpu-check's budget ---------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="bash, GNU timeout and tar")
def test_gpu_check_budget_splits_the_call(tmp_path):
    """GPU_CHECK_BUDGET: the test phase leaves the benchmark phase 240 s + 20 s; the benchmark
    phase ends 15 s before the budget and starts no case after 2/3 of its time."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_bench import _gpu_check
    log, out, members = _gpu_check(tmp_path, GPU_CHECK_BUDGET="570", TEST_TIMEOUT="300")
    tests = (out / "tests.txt").read_text()
    (t,) = re.findall(r"test phase: at most (\d+)s \(GPU_CHECK_BUDGET=570s\)", tests)
    assert int(t) == 300, tests  # 570 - 260 = 310 left: TEST_TIMEOUT is the smaller
    bench = (out / "bench.txt").read_text()
    (b, s) = map(int, re.findall(r"benchmark phase: at most (\d+)s, no case started after (\d+)s", bench)[0])
    assert 545 <= b <= 555 and s == b * 2 // 3, bench  # 570 - 15 - the seconds the stubbed tests took
    assert f"--time-budget {s} " in log
    (tmp_path / "short").mkdir()
    log, out, _ = _gpu_check(tmp_path / "short", GPU_CHECK_BUDGET="400", TEST_TIMEOUT="300")
    (t,) = re.findall(r"test phase: at most (\d+)s", (out / "tests.txt").read_text())
    assert 138 <= int(t) <= 140  # 400 - 260
    assert members == ["./nvidia-h200/results.json", "./nvidia-h200/summary.md"]


def test_a_compile_that_fails_counts_against_the_compile_budget():
    """A torch.compile provider that fails after compiling for a while spent the budget as one that
    succeeded does: the later compiled providers are skipped, not compiled past --compile-budget."""
    import time

    def fails_after_compiling(inputs):
        time.sleep(0.3)  # the compile
        raise RuntimeError("inductor: lowering failed")

    x = torch.randn(19)
    case = harness.Case(op="toy", name="t", shape={}, dtype="fp32", make_inputs=lambda d: {"x": x},
                        providers=[harness.Provider("a+compile", "peer", fails_after_compiling, compiled=True),
                                   harness.Provider("b+compile", "peer", lambda i: (lambda: i["x"] + 1), compiled=True),
                                   harness.Provider("eager", "peer", lambda i: (lambda: i["x"] + 1))], bytes=19 * 8)
    ctx = harness.RunContext(device=CPU, compile_budget_s=0.25, cpu_min_run_time_s=0.01)
    a, b, eager = harness.run_case(case, ctx)["results"]
    assert a["status"] == "skipped" and "lowering failed" in a["reason"]
    assert ctx.compile_spent_s >= 0.3
    assert b["status"] == "skipped" and "compile budget" in b["reason"], b
    assert eager["status"] == "ok"


def test_flash_attn_setups_pass_its_layout(monkeypatch):
    """The flash_attn peers (GPU only, not installed here) with a stand-in module computing what
    flash_attn documents ([B, T, H, D] in and out; the KV-cache call with cache_seqlens): the
    setups transpose q, k, v, dout (and the caches) so the peer does the case's attention."""
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=dropout_p,
                                              is_causal=causal).transpose(1, 2)

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None):
        L = int(cache_seqlens.max())
        return flash_attn_func(q, k_cache[:, :L], v_cache[:, :L])

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache))
    for case in ops_attention.attention_cases("cpu", quick=True):
        inputs = _small_inputs(case)
        providers = {p.name: p for p in case.providers}
        want = providers["reference"].setup(inputs)()
        got = providers["flash_attn"].setup(inputs)()
        if isinstance(want, tuple):  # gradients, in flash_attn's layout
            assert len(got) == 3
            got = tuple(g.transpose(1, 2) for g in got)
        else:
            got = got.transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (case, *_) = ops_attention.decode_cases("cpu", quick=True)
    inputs = _small_inputs(case)
    providers = {p.name: p for p in case.providers}
    torch.testing.assert_close(providers["flash_attn"].setup(inputs)().transpose(1, 2),
                               providers["reference"].setup(inputs)(), rtol=1e-4, atol=1e-4)
