"""The benchmark suite: its accounting (FLOPs, bytes, statistics, ratios), its JSON schema,
and one `--quick` run on this machine that must write valid JSON and markdown."""
import json
import logging
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from gptfast.ops._dispatch import import_source_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import_source_package("bench", "bench")  # installed, or bench/ of this checkout
from gptfast.bench import accounting, cli, harness, report  # noqa: E402

# ---- accounting ---------------------------------------------------------------------


def test_attention_flops_causal_counts_half_the_square():
    B, H, T, D = 4, 12, 4096, 64
    full = 4 * B * H * T * T * D
    assert accounting.attention_flops(B, H, T, D, causal=False) == full
    assert accounting.attention_flops(B, H, T, D, causal=True) == full / 2
    assert accounting.attention_flops(B, H, T, D, causal=True, pass_="bwd") == 2.5 * full / 2
    assert accounting.attention_flops(B, H, T, D, causal=True, pass_="fwd+bwd") == 3.5 * full / 2
    assert accounting.attention_flops(B, H, T, D, causal=False, pass_="bwd") == 2.5 * full
    with pytest.raises(ValueError, match="pass_"):
        accounting.attention_flops(B, H, T, D, pass_="backward")


def test_byte_counts():
    # decode: K and V caches, bf16
    assert accounting.decode_attention_bytes(32, 12, 1024, 64, 2) == 2 * 32 * 12 * 1024 * 64 * 2
    M, N, e = 16384, 768, 2
    act = M * N * e
    # add+LN fwd: read x, residual; write y, h; plus weight and bias
    assert accounting.layer_norm_bytes(M, N, e, residual=True) == 4 * act + 2 * N * e
    assert accounting.layer_norm_bytes(M, N, e, residual=False) == 2 * act + 2 * N * e
    # bwd: read dy and the input, write dx; dW/dB; fp32 mean and rstd
    assert accounting.layer_norm_bytes(M, N, e, pass_="bwd") == 3 * act + 2 * N * e + 2 * M * 4
    M, N = 16384, 3072
    act = M * N * e
    assert accounting.bias_gelu_bytes(M, N, e) == 2 * act + N * e
    assert accounting.bias_gelu_bytes(M, N, e, pass_="bwd") == 3 * act + N * e
    assert accounting.bias_gelu_bytes(M, N, e, pass_="fwd+bwd") == 5 * act + 2 * N * e
    assert accounting.sampling_bytes(64, 50257, 4) == 64 * 50257 * 4
    assert accounting.matmul_flops(16384, 3072, 768) == 2 * 16384 * 3072 * 768


def test_train_flops_per_token():
    n, L, H, D, T = 124_000_000, 12, 12, 64, 1024
    assert accounting.train_flops_per_token(n, L, H, D, T) == 6 * n + L * 7 * H * T * D


def test_summarize_median_and_iqr():
    s = accounting.summarize([0.005, 0.001, 0.003, 0.002, 0.004])  # seconds, unsorted
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["q25_ms"] == pytest.approx(2.0) and s["q75_ms"] == pytest.approx(4.0)
    assert s["iqr_ms"] == pytest.approx(2.0)
    assert (s["min_ms"], s["max_ms"], s["n"]) == (pytest.approx(1.0), pytest.approx(5.0), 5)
    one = accounting.summarize([0.002])
    assert one["median_ms"] == pytest.approx(2.0) and one["iqr_ms"] == 0
    with pytest.raises(ValueError):
        accounting.summarize([])


def test_ratio_to_best_peer():
    results = [
        {"provider": "gptfast", "kind": "gptfast", "status": "ok", "median_ms": 1.0},
        {"provider": "reference", "kind": "reference", "status": "ok", "median_ms": 0.5},  # not a peer
        {"provider": "sdpa-flash", "kind": "peer", "status": "ok", "median_ms": 2.0},
        {"provider": "sdpa-math", "kind": "peer", "status": "ok", "median_ms": 8.0},
        {"provider": "flash_attn", "kind": "peer", "status": "skipped", "reason": "not installed"},
    ]
    assert accounting.add_ratios(results) == "sdpa-flash"
    ratios = {r["provider"]: r["vs_best_peer"] for r in results}
    assert ratios == {"gptfast": 2.0, "reference": 4.0, "sdpa-flash": 1.0, "sdpa-math": 0.25, "flash_attn": None}
    # no peer ran: no ratio is written
    lone = [{"provider": "gptfast", "kind": "gptfast", "status": "ok", "median_ms": 1.0}]
    assert accounting.add_ratios(lone) is None and lone[0]["vs_best_peer"] is None


def test_throughput_and_roofline_fraction():
    t = accounting.throughput(flops=2e12, bytes_=None, median_ms=1000.0)
    assert t == {"tflops": 2.0, "gbps": None}
    assert accounting.roofline_fraction("flops", t, {"matmul_tflops": 4.0, "copy_gbps": 1.0}) == 0.5
    t = accounting.throughput(flops=None, bytes_=3e9, median_ms=1.0)
    assert t["gbps"] == pytest.approx(3000.0)
    assert accounting.roofline_fraction("bytes", t, {"copy_gbps": 3000.0}) == pytest.approx(1.0)
    assert accounting.roofline_fraction("bytes", t, {}) is None


# ---- harness ------------------------------------------------------------------------------


def test_run_case_records_every_provider():
    def cannot(_inputs):
        raise harness.Skip("library X not installed")

    def broken(_inputs):
        raise RuntimeError("boom")

    x = torch.randn(64)
    case = harness.Case(
        op="toy", name="copy 64", shape={"N": 64}, dtype="fp32", make_inputs=lambda d: {"x": x},
        providers=[harness.Provider("mine", "gptfast", lambda i: (lambda: i["x"] * 2)),
                   harness.Provider("peer", "peer", lambda i: (lambda: i["x"] + i["x"])),
                   harness.Provider("absent", "peer", cannot),
                   harness.Provider("crashes", "peer", broken),
                   harness.Provider("compiled", "peer", lambda i: (lambda: i["x"]), compiled=True)],
        bytes=2 * 64 * 4)
    ctx = harness.RunContext(device=torch.device("cpu"), compile_budget_s=0.0, cpu_min_run_time_s=0.01)
    rec = harness.run_case(case, ctx)
    by = {r["provider"]: r for r in rec["results"]}
    assert by["mine"]["status"] == by["peer"]["status"] == "ok"
    assert by["mine"]["median_ms"] > 0 and by["mine"]["vs_best_peer"] > 0 and by["mine"]["gbps"] > 0
    assert by["absent"]["status"] == "skipped" and by["absent"]["reason"] == "library X not installed"
    assert "boom" in by["crashes"]["reason"]
    assert "compile budget" in by["compiled"]["reason"]
    assert rec["best_peer"] == "peer"


def test_first_call_includes_a_setup_that_compiles(monkeypatch):
    """A bwd case runs (and a compiled provider compiles) its forward in setup: that time is part
    of first_call_s and of the compile budget, not lost between the two."""
    import time

    def slow_setup(inputs):  # as _pass_thunk with a compiled fn: the forward (compiling) runs here
        time.sleep(0.3)
        return lambda: inputs["x"] + 1
    x = torch.randn(37)
    case = harness.Case(op="toy", name="bwd 37", shape={}, dtype="fp32", make_inputs=lambda d: {"x": x},
                        providers=[harness.Provider("torch+compile", "peer", slow_setup, compiled=True),
                                   harness.Provider("later+compile", "peer", slow_setup, compiled=True)],
                        bytes=37 * 4)
    ctx = harness.RunContext(device=torch.device("cpu"), compile_budget_s=0.25, cpu_min_run_time_s=0.01)
    first, later = harness.run_case(case, ctx)["results"]
    assert first["status"] == "ok" and first["first_call_s"] >= 0.3, first
    assert ctx.compile_spent_s >= 0.3
    assert later["status"] == "skipped" and "compile budget" in later["reason"]


def test_a_provider_that_ran_a_fallback_says_so(caplog, monkeypatch):
    """Every provider's record lists the fallbacks gptfast took while it ran, even where an
    earlier provider (or call) logged the same one; the terminal sees each line once; the
    summary and the README row say it ran a fallback."""
    from gptfast import ops
    from gptfast.ops import _dispatch
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    monkeypatch.setattr(_dispatch, "_fallbacks_shown", set())
    x, w, b = torch.randn(5, 12), torch.randn(12), torch.randn(12)
    ops.layer_norm(x, w, b)  # logged before the run: the records must still say it
    mine = harness.Provider("gptfast", "gptfast", lambda i: (lambda: ops.layer_norm(x, w, b)))
    case = harness.Case(op="toy", name="ln 5x12", shape={}, dtype="fp32", make_inputs=lambda d: {},
                        providers=[mine, mine, harness.Provider("eager", "reference",
                                                                lambda i: (lambda: ops.layer_norm_reference(x, w, b)))],
                        bytes=4.0 * 5 * 12 * 2)
    ctx = harness.RunContext(device=torch.device("cpu"), compile_budget_s=0.0, cpu_min_run_time_s=0.01)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        rec = harness.run_case(case, ctx)
    first, second, eager = rec["results"]
    want = "ops.layer_norm falls back to the PyTorch reference: "  # on a CPU tensor, or the interpreter
    assert first["fallbacks"] == second["fallbacks"] and first["fallbacks"][0].startswith(want), first
    assert "fallbacks" not in eager
    assert _dispatch._fallback_logged == {"layer_norm"}  # log_once's memory is kept
    shown = [r for r in caplog.records if want in r.getMessage() and r.funcName == "fallbacks_logged"]
    assert len(shown) == 1, shown  # the terminal sees the line once for the three providers
    doc = {"schema": report.SCHEMA, "env": _doc()["env"], "roofline": {}, "notes": [], "cases": [rec]}
    reason = first["fallbacks"][0].split(": ", 1)[1]
    assert f"ran a fallback: ops.layer_norm ({reason})" in report.format_table(doc)
    assert report._fallback_note(["ops.a falls back to the PyTorch reference: why", "ops.b falls back to x: why",
                                  "transformers attention runs SDPA, not gptfast's kernel: other"]) \
        == "ops.a, ops.b (why); transformers attention runs SDPA, not gptfast's kernel (other)"
    doc["env"].update(device_kind="cuda", device_name="GPU", sm_count=1, torch="t", triton="t", cuda="c",
                      git_commit="g", date="d")
    assert " (ran a fallback) |" in report.readme_block(doc, "bench/results/gpu")


def test_left_padded_generation_case_runs_the_padded_providers():
    """The full run's left-padded generate case: gptfast and transformers (with and without the
    patch) take the mask; the static-cache loop, which cannot, is skipped with the reason."""
    pytest.importorskip("transformers")
    from gptfast.bench import e2e
    (case,) = [c for c in e2e.generation_cases("cpu", quick=False) if "left-padded" in c.name]
    assert case.shape["left_padded"] and case.shape["batch"] == 4
    case.providers = [p for p in case.providers if p.name in ("gptfast", "hf-transformers+gptfast", "static-cache")]
    ctx = harness.RunContext(device=torch.device("cpu"), compile_budget_s=0.0, cpu_min_run_time_s=0.01)
    by = {r["provider"]: r for r in harness.run_case(case, ctx)["results"]}
    assert by["gptfast"]["status"] == by["hf-transformers+gptfast"]["status"] == "ok", by
    assert by["gptfast"]["metrics"]["tokens_per_s"] > 0
    assert by["static-cache"]["status"] == "skipped" and "padding mask" in by["static-cache"]["reason"]


def test_speculative_projection():
    from gptfast.bench.e2e import expected_tokens_per_round
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert abs(expected_tokens_per_round(0.5, 2) - 1.75) < 1e-12  # 1 + 0.5 + 0.25


def test_device_slug():
    assert harness.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.device_slug("  ") == "unknown-device"


def test_unknown_op_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--ops", "attention,flux"])
    assert "--ops must be" in capsys.readouterr().err


def test_import_touches_no_cuda():
    code = ("import sys; sys.path.insert(0, %r); import torch, bench.cli, bench.e2e; "
            "assert not torch.cuda.is_initialized(); print('ok')" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---- schema and the quick run ---------------------------------------------------------------


def _doc():
    env = {k: None for k in ("device_kind", "device_name", "sm_count", "torch", "triton", "cuda",
                             "git_commit", "date")}
    env.update(device_kind="cpu", device_name="test cpu")
    ok = {"provider": "a", "kind": "peer", "status": "ok", "reason": None, "median_ms": 1.0, "iqr_ms": 0.1,
          "q25_ms": 0.95, "q75_ms": 1.05, "n": 10, "vs_best_peer": 1.0}
    case = {"op": "toy", "name": "t", "shape": {}, "dtype": "fp32", "bound": "bytes", "best_peer": "a",
            "results": [ok, {"provider": "b", "kind": "peer", "status": "skipped", "reason": "why"}]}
    return {"schema": report.SCHEMA, "env": env, "roofline": {}, "notes": [], "cases": [case]}


def test_schema_validation():
    report.validate(_doc())
    doc = _doc()
    doc["cases"][0]["results"][1]["reason"] = None
    with pytest.raises(ValueError, match="no reason"):
        report.validate(doc)
    doc = _doc()
    del doc["env"]["git_commit"]
    with pytest.raises(ValueError, match="git_commit"):
        report.validate(doc)
    doc = _doc()
    del doc["cases"][0]["results"][0]["iqr_ms"]
    with pytest.raises(ValueError, match="iqr_ms"):
        report.validate(doc)


def test_latest_summary(tmp_path):
    paths = report.write_all(_doc(), str(tmp_path / "test-cpu"), charts=False)
    text = report.latest_summary(str(tmp_path))
    assert text == open(paths["markdown"]).read() and "| a |" in text and "skipped `b`: why" in text
    with pytest.raises(FileNotFoundError):
        report.latest_summary(str(tmp_path / "empty"))


def test_results_are_written_without_matplotlib(tmp_path, monkeypatch):
    # a machine without matplotlib (the GPU machine may lack it) still gets its JSON and summary
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = report.write_all(_doc(), str(tmp_path / "dev"))
    assert os.path.exists(paths["json"]) and os.path.exists(paths["markdown"])
    assert paths["charts"] == [] and paths["charts_skipped"].startswith("charts skipped: matplotlib")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU quick run; a GPU runs the GPU suite instead")
def test_quick_run_writes_valid_json_and_markdown(tmp_path, capsys):
    assert cli.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    with open(tmp_path / "results.json") as f:
        doc = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    report.validate(doc)
    assert doc["env"]["device_kind"] == "cpu" and any("GPU figures need a GPU" in n for n in doc["notes"])
    import transformers
    assert doc["env"]["peers"]["transformers"] == transformers.__version__  # the peers' versions, beside torch's
    assert set(doc["env"]["peers"]) == {"transformers", "liger-kernel", "flash-attn"}
    with open(tmp_path / "summary.md") as f:
        assert f"transformers {transformers.__version__}" in f.read()
    assert set(doc["ops"]) == set(cli.OPS)
    assert {c["op"] for c in doc["cases"]} == set(cli.OPS)
    assert doc["roofline"]["copy_gbps"] > 0 and doc["roofline"]["matmul_tflops"] > 0
    results = [r for c in doc["cases"] for r in c["results"]]
    assert any(r["status"] == "ok" for r in results)
    assert all(r["reason"] for r in results if r["status"] != "ok")
    kernels = [r for c in doc["cases"] if c["op"] == "attention" for r in c["results"] if r["kind"] == "gptfast"]
    assert kernels and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in kernels)
    summary = (tmp_path / "summary.md").read_text()
    assert "GPU figures need a GPU" in summary and "## attention" in summary
    assert "GPU figures need a GPU" in capsys.readouterr().out


def test_full_attention_cases_time_the_tma_and_pointer_variants(monkeypatch):
    # the full run times each half of the forward/backward autotuner's choice on its own
    from gptfast.bench import ops_attention
    monkeypatch.delenv("GPTFAST_TMA", raising=False)
    for case in ops_attention.attention_cases("cuda", quick=False):
        ours = [p for p in case.providers if p.kind == "gptfast"]
        assert [p.name for p in ours] == ["gptfast", "gptfast-tma", "gptfast-ptr"], case.name
        assert ours[0].context is None
        for provider, mode in zip(ours[1:], ("1", "0")):
            with provider.context():
                assert os.environ["GPTFAST_TMA"] == mode
            assert "GPTFAST_TMA" not in os.environ
    quick = ops_attention.attention_cases("cuda", quick=True)
    assert all([p.name for p in c.providers if p.kind == "gptfast"] == ["gptfast"] for c in quick)


def test_padded_attention_case_gives_sdpa_the_same_mask():
    """The left-padded case: gptfast's kv_start and SDPA's boolean mask are one attention (the
    reference with the window against SDPA's math backend with the mask, both passes)."""
    from gptfast.bench import ops_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel
    padded = [c for c in ops_attention.attention_cases("cpu", quick=False) if "padded" in c.name]
    assert [c.shape["pass"] for c in padded] == ["fwd", "fwd+bwd"]
    for case in padded:
        torch.manual_seed(0)
        inputs = case.make_inputs(torch.device("cpu"))
        assert inputs["kv_start"].unique().numel() == 4
        providers = {p.name: p for p in case.providers}
        want = providers["reference"].setup(inputs)()
        with sdpa_kernel(SDPBackend.MATH):
            got = providers["sdpa-math"].setup(inputs)()
        if not isinstance(got, tuple):  # fwd: the output; fwd+bwd: the three gradients
            got, want = (got,), (want,)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_full_mlp_case_times_tma_pointer_and_split_variants(monkeypatch):
    # the MLP front: the epilogue matmul with TMA only / pointers only, and the cuBLAS split path
    pytest.importorskip("triton")
    from gptfast.bench import ops_norm
    from gptfast.ops import _norm_triton
    monkeypatch.delenv("GPTFAST_TMA", raising=False)
    (case,) = ops_norm.mlp_cases("cuda", quick=False)
    ours = {p.name: p for p in case.providers if p.kind == "gptfast"}
    assert list(ours) == ["gptfast", "gptfast-tma", "gptfast-ptr", "gptfast-split"]
    for name, mode in (("gptfast-tma", "1"), ("gptfast-ptr", "0")):
        with ours[name].context():
            assert os.environ["GPTFAST_TMA"] == mode
    with ours["gptfast-split"].context():
        assert _norm_triton.MLP_FRONT == "split"
    assert _norm_triton.MLP_FRONT == "epilogue" and "GPTFAST_TMA" not in os.environ
    (quick,) = ops_norm.mlp_cases("cuda", quick=True)
    assert [p.name for p in quick.providers if p.kind == "gptfast"] == ["gptfast"]


def test_gptfast_providers_record_the_autotuned_configs(monkeypatch):
    # which config (TMA or not) each autotuned kernel ran with lands in the result and the summary
    import types
    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    def fake_tuner(name):
        t = object.__new__(Autotuner)  # no kernel behind it: only what the harness reads
        t.fn = types.SimpleNamespace(__name__=name)
        return t

    fwd, dq, unused = fake_tuner("attn_fwd_kernel"), fake_tuner("attn_bwd_dq_kernel"), fake_tuner("other_kernel")
    unused.best_config = triton.Config({"BLOCK_M": 16}, num_warps=1, num_stages=1)  # stale: from an earlier run
    module = types.ModuleType("gptfast.kernels._bench_fake")
    module.a, module.b, module.c = fwd, dq, unused
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def run(_inputs):
        def thunk():
            fwd.best_config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "TMA": True}, num_warps=4, num_stages=3)
            dq.best_config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "TMA": False}, num_warps=8, num_stages=3)
        return thunk

    x = torch.randn(8)
    case = harness.Case(op="toy", name="n", shape={}, dtype="fp32", make_inputs=lambda d: {"x": x},
                        providers=[harness.Provider("mine", "gptfast", run),
                                   harness.Provider("peer", "peer", lambda i: (lambda: i["x"] + 1))], bytes=64)
    ctx = harness.RunContext(device=torch.device("cpu"), cpu_min_run_time_s=0.01)
    rec = harness.run_case(case, ctx)
    mine, peer = rec["results"]
    assert mine["autotuned"] == {"attn_fwd_kernel": "M=128 N=64 w4 s3 tma", "attn_bwd_dq_kernel": "M=128 N=32 w8 s3"}
    assert "autotuned" not in peer
    row = next(r for r in report._rows(rec) if r[0] == "mine")
    assert "attn_fwd: M=128 N=64 w4 s3 tma" in row[-1] and "attn_bwd_dq: M=128 N=32 w8 s3" in row[-1]


def test_time_budget_stops_starting_cases_and_each_case_is_kept_as_it_ends(tmp_path, monkeypatch):
    """--time-budget: no case starts once the budget is spent; after each case the run so far is
    on disk (results.partial.json), so a run stopped from outside keeps it."""
    clock = [0.0]
    seen_partial = []

    def fake_run_case(case, ctx, progress=None):
        partial = tmp_path / report.PARTIAL
        seen_partial.append(len(json.loads(partial.read_text())["cases"]) if partial.exists() else 0)
        clock[0] += 10.0  # each case takes 10 s
        return {"op": case.op, "name": case.name, "shape": dict(case.shape), "dtype": case.dtype, "flops": None,
                "bytes": 1.0, "bound": "bytes", "best_peer": None, "wall_s": 10.0, "results": []}

    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(harness, "run_case", fake_run_case)
    monkeypatch.setattr(harness, "measure_roofline", lambda ctx: {"copy_gbps": 1.0, "matmul_tflops": 1.0,
                                                               "matmul_dtype": "float32", "matmul_shape": [8, 8, 8]})
    assert cli.main(["--quick", "--ops", "layer_norm,bias_gelu", "--out", str(tmp_path), "--no-progress",
                     "--no-charts", "--time-budget", "25"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    total = len(cli.OPS["layer_norm"]("cpu", True)) + len(cli.OPS["bias_gelu"]("cpu", True))
    assert total > 3 and len(doc["cases"]) == 3  # started at 0, 10 and 20 s; none at 30 s
    assert seen_partial == [0, 1, 2]
    assert len(doc["cases_not_run"]) == total - 3 and doc["time_budget_s"] == 25
    assert any(f"{total - 3} of {total} cases were not run" in n for n in doc["notes"])
    assert not (tmp_path / report.PARTIAL).exists()  # the whole run was written
    with pytest.raises(SystemExit):
        cli.parse_args(["--time-budget", "0"])


def test_update_readme_writes_the_section_from_a_gpu_run_only(tmp_path):
    """The README's benchmark section comes from a results.json, with gptfast beside the best peer
    of the same run; a CPU run is refused; the text around the markers is kept."""
    doc = _doc()
    ours = {"provider": "gptfast", "kind": "gptfast", "status": "ok", "reason": None, "median_ms": 0.5,
            "iqr_ms": 0.01, "q25_ms": 0.49, "q75_ms": 0.51, "n": 10, "vs_best_peer": 2.0, "roofline_fraction": 0.8}
    doc["cases"][0]["results"].insert(0, ours)
    skipped = dict(doc["cases"][0], name="u", results=[{"provider": "gptfast", "kind": "gptfast",
                                                          "status": "skipped", "reason": "needs | a GPU"}])
    doc["cases"].append(skipped)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_START}\nold figures\n{report.README_END}\nafter\n")
    run = tmp_path / "bench" / "results" / "dev"
    report.write_all(doc, str(run), charts=False)
    # measured on a CPU: refused, the README untouched
    assert cli._update_readme(str(run / "results.json"), str(readme)) == 2
    assert "old figures" in readme.read_text()
    doc["env"].update(device_kind="cuda", device_name="NVIDIA H200", sm_count=132, torch="2.11", triton="3.6.0",
                      cuda="13.0", git_commit="abc1234", date="2026-12-01",
                      peers={"transformers": "5.2.0", "liger-kernel": None, "flash-attn": "2.8.3"})
    report.write_all(doc, str(run), charts=False)
    assert cli._update_readme(str(run / "results.json"), str(readme)) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n" + report.README_START) and text.endswith(report.README_END + "\nafter\n")
    assert "old figures" not in text
    assert ("**NVIDIA H200** (132 SMs), torch 2.11, Triton 3.6.0, CUDA 13.0, transformers 5.2.0, flash-attn 2.8.3, "
            "commit abc1234, 2026-12-01") in text  # the installed peers' versions; liger-kernel is not
    assert "| toy | t (fp32) | 0.5 | a | 1 | 2.00x | 80.0% |" in text
    assert "| toy | u (fp32) | not run: needs / a GPU | a | - | - | - |" in text
    assert "[bench/results/dev/summary.md](bench/results/dev/summary.md)" in text
    assert "![toy]" not in text  # charts=False: no toy.png to show (a GPU machine without matplotlib)
    (run / "toy.png").write_bytes(b"png")
    assert cli._update_readme(str(run / "results.json"), str(readme)) == 0
    text = readme.read_text()
    assert "![toy](bench/results/dev/toy.png)" in text
    # idempotent; and a README without the markers is an error naming them
    assert cli._update_readme(str(run / "results.json"), str(readme)) == 0 and readme.read_text() == text
    (tmp_path / "plain.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        report.update_readme(str(tmp_path / "plain.md"), "x")
    assert cli._update_readme(str(tmp_path / "missing.json"), str(readme)) == 2


# ---- .ci/gpu-check, dry-run on this machine -----------------------------------------------------

_STUB_PYTHON = r"""#!/usr/bin/env bash
# python3 for .ci/gpu-check on a machine without a GPU: every call is logged; pip, pytest and
# the bench do what STUB_* say (the bench writes its results as gptfast bench does)
echo "python3 $*" >> "$STUB_LOG"
case "$1 $2" in
  "-m pip") [[ "$*" == *" -e ."* ]] && { echo "pip: building"; exit "${STUB_BUILD_RC:-0}"; }; exit 0;;
  "-m pytest") echo "pytest: running"; sleep "${STUB_TEST_SLEEP:-0}"; exit 0;;
  "-m gptfast.cli")
    [[ $3 == bench ]] || exit 0
    out=""; prev=""; for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
    mkdir -p "$out" && echo '{"partial": true}' > "$out/results.partial.json"
    sleep "${STUB_BENCH_SLEEP:-0}"
    rm "$out/results.partial.json" && echo '{}' > "$out/results.json" && echo '#' > "$out/summary.md";;
  "-c "*)
    case "$2" in
      *device_slug*) echo nvidia-h200;;
      *get_device_capability*) echo 9.0;;
      "import xdist") exit 1;;
    esac;;
esac
exit 0
"""


def _gpu_check(tmp_path, **env):
    """.ci/gpu-check with python3 and nvidia-smi stubbed (no build, no GPU): its bash logic,
    limits and archive. Returns (the stub's log, $OUT, the archive's members)."""
    import tarfile
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text(_STUB_PYTHON)
    (stubs / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA H200 (stub)'\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "python3.log"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "BENCH_", "TEST_", "PHASES"))}
    run_env.update(PATH=f"{stubs}:{os.environ['PATH']}", OUT=str(out), STUB_LOG=str(log), **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu-check")], env=run_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(out / "bench.tgz") as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
    return log.read_text(), out, members


@pytest.mark.skipif(sys.platform != "linux", reason="bash, GNU timeout and tar")
def test_gpu_check_archive_unpacks_where_update_readme_looks(tmp_path):
    """The archive holds <device-slug>/results.json, so `tar xzf bench.tgz -C bench/results` is
    where --update-readme looks; BENCH_TIME_BUDGET=0 is no budget (not --time-budget 0, an error)."""
    log, out, members = _gpu_check(tmp_path, BENCH_TIME_BUDGET="0")
    assert members == ["./nvidia-h200/results.json", "./nvidia-h200/summary.md"], members
    (bench,) = [line for line in log.splitlines() if " gptfast.cli bench " in line]
    assert "--time-budget" not in bench and "--out /tmp/gptfast-bench." in bench, bench
    assert "built for TORCH_CUDA_ARCH_LIST=9.0" in (out / "build.txt").read_text()
    assert [line.split(" -m ", 2)[-1][:3] for line in log.splitlines() if "-m pytest" in line] == ["gpu"] + \
        ["not"] * 2  # the three passes


@pytest.mark.skipif(sys.platform != "linux", reason="bash, GNU timeout and tar")
def test_gpu_check_limits_and_a_failed_build_are_said(tmp_path):
    """A failed build is said (not "built for ..."); TEST_TIMEOUT stops the test passes and
    BENCH_TIMEOUT the benchmark, each saying so; the archive keeps the stopped run's partial results."""
    log, out, members = _gpu_check(tmp_path, STUB_BUILD_RC="1", STUB_TEST_SLEEP="30", TEST_TIMEOUT="2",
                                   STUB_BENCH_SLEEP="30", BENCH_TIMEOUT="2", BENCH_TIME_BUDGET="1")
    build = (out / "build.txt").read_text()
    assert "BUILD FAILED: pip install -e . exited 1" in build and "built for" not in build, build
    tests = (out / "tests.txt").read_text()
    assert "== gpu-only: stopped at TEST_TIMEOUT=2s" in tests and "== the rest: not run" in tests, tests
    assert "benchmark stopped after BENCH_TIMEOUT=2s" in (out / "bench.txt").read_text()
    assert members == ["./nvidia-h200/results.partial.json"], members
    assert "--time-budget 1 " in log


def _gpu_doc(name="NVIDIA H200"):
    doc = _doc()
    doc["env"].update(device_kind="cuda", device_name=name, sm_count=132, torch="2.11", triton="3.6.0", cuda="13.0",
                      git_commit="abc1234", date="2026-12-01")
    doc["cases"][0]["results"].insert(0, {"provider": "gptfast", "kind": "gptfast", "status": "ok", "reason": None,
                                          "median_ms": 0.5, "iqr_ms": 0.01, "q25_ms": 0.49, "q75_ms": 0.51, "n": 10,
                                          "vs_best_peer": 2.0})
    return doc


def test_update_readme_takes_the_newest_gpu_run_and_says_a_stopped_one(tmp_path, capsys):
    """--update-readme (no path) takes the newest GPU results.json, not a CPU run made after it;
    a stopped run (results.partial.json, named) is shown as stopped and links the file it left,
    not a summary.md or charts it never wrote; with nothing complete the error names the partial."""
    root = tmp_path / "bench" / "results"
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    with pytest.raises(FileNotFoundError, match="no results.json measured on 'cuda'"):
        report.latest_results(str(root), device_kind="cuda")
    gpu = report.write_all(_gpu_doc(), str(root / "nvidia-h200"), charts=False)["json"]
    cpu = report.write_all(_doc(), str(root / "some-cpu"), charts=False)["json"]
    os.utime(gpu, (1e9, 1e9))  # the CPU run is the newer
    assert report.latest_results(str(root)) == cpu
    assert report.latest_results(str(root), device_kind="cuda") == gpu
    with mock.patch.object(report, "RESULTS_DIR", str(root)):
        assert cli._update_readme("latest", str(readme)) == 0
        assert "**NVIDIA H200**" in readme.read_text() and "stopped" not in readme.read_text()
        assert "newer than" not in capsys.readouterr().err
        report.write_partial(_gpu_doc(), str(root / "nvidia-h200"))  # a later run there, stopped
        assert cli._update_readme("latest", str(readme)) == 0
        assert "results.partial.json (a run stopped before it finished) is newer than" in capsys.readouterr().err
    # a run stopped from outside: its partial results, beside the charts and summary of an earlier run
    stopped = _gpu_doc("NVIDIA H100 80GB HBM3")
    partial = report.write_partial(stopped, str(root / "nvidia-h100"))
    for leftover in ("summary.md", "toy.png"):
        (root / "nvidia-h100" / leftover).write_text("an earlier run's")
    assert cli._update_readme(partial, str(readme)) == 0
    text = readme.read_text()
    assert "**NVIDIA H100 80GB HBM3**" in text and report.PARTIAL_NOTE in text
    assert "[bench/results/nvidia-h100/results.partial.json](bench/results/nvidia-h100/results.partial.json)" in text
    assert "summary.md" not in text and "![toy]" not in text
    with open(partial) as f:
        assert report.PARTIAL_NOTE in report.format_markdown(json.load(f))
    # nothing complete: the error names what the stopped run left
    only = tmp_path / "stopped-only"
    report.write_partial(stopped, str(only / "nvidia-h100"))
    with pytest.raises(FileNotFoundError, match="results.partial.json: pass its path"):
        report.latest_results(str(only), device_kind="cuda")
