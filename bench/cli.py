"""`gptfast bench`: run the suite, print the table, write JSON + markdown + charts.

    gptfast bench [--ops attention,decode_attention,layer_norm,bias_gelu,mlp,sampling,linear_cross_entropy,e2e]
                  [--quick] [--out DIR] [--time-budget SECONDS]
    python -m gptfast.bench ...        (the same, without the console script)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import e2e, harness, ops_attention, ops_cross_entropy, ops_norm, ops_sampling, report

OPS = {
    "attention": ops_attention.attention_cases,
    "decode_attention": ops_attention.decode_cases,
    "layer_norm": ops_norm.layer_norm_cases,
    "bias_gelu": ops_norm.bias_gelu_cases,
    "mlp": ops_norm.mlp_cases,
    "sampling": ops_sampling.sampling_cases,
    "linear_cross_entropy": ops_cross_entropy.linear_cross_entropy_cases,
    "e2e": e2e.e2e_cases,
}

NO_GPU_NOTE = ("No CUDA device here: this run times the CPU cases at small shapes (fp32) and skips "
               "the GPU kernels. GPU figures need a GPU: run `gptfast bench` on one.")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gptfast bench", description="gptfast benchmark suite: kernels vs "
                                "the PyTorch reference, torch.compile and the field's peers, measured in one run.")
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes, shorter timing runs and a compile budget (minutes on an H100, most of "
                        "them compiling: Triton autotuning, torch.compile)")
    p.add_argument("--out", default=None, help="output folder (default: bench/results/<device>/)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                   help="total seconds of torch.compile first calls before further compiled providers "
                        "are skipped (default: unlimited; --quick: 45 on CUDA, 0 on CPU)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no case after SECONDS of the run (the rest are listed as not run); "
                        "for a machine lent for a fixed time")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary", action="store_true",
                   help="print the latest results/<device>/summary.md and exit (runs nothing)")
    p.add_argument("--update-readme", nargs="?", const="latest", default=None, metavar="RESULTS_JSON",
                   help="write the README's benchmark section from a GPU run's results.json (default: the "
                        "newest GPU one under bench/results/; a stopped run's results.partial.json is taken "
                        "when named) and exit (runs nothing)")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        p.error(f"--ops must be a comma-separated subset of {','.join(OPS)}, got {args.ops!r}")
    args.ops = ops
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    return args


def _context(args, device: torch.device) -> harness.RunContext:
    cuda = device.type == "cuda"
    budget = args.compile_budget
    if budget is None:
        budget = (45.0 if cuda else 0.0) if args.quick else float("inf")
    return harness.RunContext(
        device=device, quick=args.quick, compile_budget_s=budget,
        warmup_ms=10.0 if args.quick else 25.0, rep_ms=40.0 if args.quick else 100.0,
        cpu_min_run_time_s=0.05 if args.quick else 0.2)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _update_readme(results: str, readme: str = README) -> int:
    """The README shows GPU figures only: a CPU run's results are refused."""
    try:
        path = report.latest_results(device_kind="cuda") if results == "latest" else results
        with open(path) as f:
            doc = json.load(f)
        if doc.get("env", {}).get("device_kind") != "cuda":
            raise ValueError(f"{path} was measured on {doc.get('env', {}).get('device_kind')!r}: the README "
                             "shows GPU figures only (device_kind 'cuda')")
        run_dir = os.path.dirname(os.path.abspath(path))
        rel = os.path.relpath(run_dir, os.path.dirname(os.path.abspath(readme)))
        # Link only what this run left there: a stopped run (results.partial.json) wrote no summary.md
        # and no charts (any there are an earlier run's), and a run without matplotlib no charts.
        partial = bool(doc.get("partial"))
        charts = [] if partial else [op for op in dict.fromkeys(c["op"] for c in doc.get("cases", []))
                                     if os.path.isfile(os.path.join(run_dir, f"{op}.png"))]
        details = "summary.md" if not partial and os.path.isfile(os.path.join(run_dir, "summary.md")) \
            else os.path.basename(path)
        report.update_readme(readme, report.readme_block(doc, rel.replace(os.sep, "/"), charts, details))
        stopped = os.path.join(run_dir, report.PARTIAL)
        if results == "latest" and os.path.isfile(stopped) and os.path.getmtime(stopped) > os.path.getmtime(path):
            print(f"note: {stopped} (a run stopped before it finished) is newer than {path}; "
                  "pass its path to --update-readme to show what it measured instead", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"gptfast bench --update-readme: {exc}", file=sys.stderr)
        return 2
    print(f"updated the benchmark section of {readme} from {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.summary:
        try:
            print(report.latest_summary())
        except FileNotFoundError as exc:
            print(f"gptfast bench --summary: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.update_readme:
        return _update_readme(args.update_readme)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gptfast bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    ctx = _context(args, device)
    if not use_cuda:
        ctx.notes.append(NO_GPU_NOTE)
        print(f"gptfast bench: {NO_GPU_NOTE}", file=sys.stderr)
        ctx.notes.append("On CPU nothing flushes the caches: small inputs stay in cache, and the CPU "
                         "matmul rate is measured at one small size, so % roofline and MFU can exceed 100%.")
    if ctx.compile_budget_s == 0:
        ctx.notes.append("torch.compile providers were skipped (compile budget 0 s: --quick on CPU).")
    env = harness.environment(device)
    cases = [c for op in args.ops for c in OPS[op](device.type, args.quick)]
    out_dir = args.out or f"{report.RESULTS_DIR}/{harness.device_slug(env['device_name'])}"

    from tqdm import tqdm

    t0 = time.perf_counter()
    records, not_run = [], []

    def document() -> dict:
        return {
            "schema": report.SCHEMA, "env": env, "quick": args.quick, "ops": args.ops,
            "compile_budget_s": None if ctx.compile_budget_s == float("inf") else ctx.compile_budget_s,
            "compile_spent_s": ctx.compile_spent_s, "time_budget_s": args.time_budget,
            "wall_s": time.perf_counter() - t0, "roofline": ctx.roofline, "notes": ctx.notes, "cases": records,
            "cases_not_run": not_run,
        }

    with tqdm(total=sum(len(c.providers) for c in cases), desc="gptfast bench", unit="run",
              file=sys.stderr, disable=args.no_progress, dynamic_ncols=True) as progress:
        progress.set_postfix_str("roofline: copy + matmul")
        ctx.roofline = harness.measure_roofline(ctx)
        for case in cases:
            if args.time_budget is not None and time.perf_counter() - t0 >= args.time_budget:
                not_run.append(f"{case.op}: {case.name}")
                continue
            records.append(harness.run_case(case, ctx, progress))
            report.write_partial(document(), out_dir)  # what a run stopped from outside keeps
    if not_run:
        ctx.notes.append(f"time budget of {args.time_budget:g} s spent: {len(not_run)} of {len(cases)} cases "
                         "were not run (listed in results.json as cases_not_run)")
    doc = document()
    print(report.format_table(doc))
    paths = report.write_all(doc, out_dir, charts=not args.no_charts)
    print(f"\nwrote {paths['json']}\n      {paths['markdown']}" + "".join(f"\n      {c}" for c in paths["charts"]))
    if paths.get("charts_skipped"):
        print(paths["charts_skipped"], file=sys.stderr)
    for note in ctx.notes:
        print(f"note: {note}")
    return 0
