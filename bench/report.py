"""Reporting: the terminal table, results.json, summary.md and PNG charts.

Everything here reads the run's document (the dict written as results.json); nothing is
measured or invented here. ``latest_summary()`` returns the newest summary.md so the
README can include it.
"""
from __future__ import annotations

import json
import os
from typing import Optional

SCHEMA = "gptfast-bench/1"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_REQUIRED_ENV = ("device_kind", "device_name", "sm_count", "torch", "triton", "cuda", "git_commit", "date")
_REQUIRED_CASE = ("op", "name", "shape", "dtype", "bound", "results", "best_peer")
_REQUIRED_OK = ("median_ms", "iqr_ms", "q25_ms", "q75_ms", "n", "vs_best_peer")


def validate(doc: dict) -> None:
    """Raise ValueError naming the first field that breaks the results schema."""
    def need(obj, key, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"results: {where} is missing {key!r}")
    for key in ("schema", "env", "roofline", "notes", "cases"):
        need(doc, key, "document")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"results: schema must be {SCHEMA!r}, got {doc['schema']!r}")
    for key in _REQUIRED_ENV:
        need(doc["env"], key, "env")
    for i, case in enumerate(doc["cases"]):
        for key in _REQUIRED_CASE:
            need(case, key, f"cases[{i}]")
        for j, r in enumerate(case["results"]):
            where = f"cases[{i}].results[{j}]"
            for key in ("provider", "kind", "status", "reason"):
                need(r, key, where)
            if r["status"] == "ok":
                for key in _REQUIRED_OK:
                    need(r, key, where)
                if not r["median_ms"] > 0:
                    raise ValueError(f"results: {where}.median_ms must be > 0, got {r['median_ms']}")
            elif not r["reason"]:
                raise ValueError(f"results: {where} did not run and gives no reason")


def _fmt(x, spec=".3g", none="-") -> str:
    return none if x is None else format(x, spec)


def _throughput(r: dict) -> str:
    m = r.get("metrics") or {}
    if m.get("tokens_per_s") is not None:
        return f"{m['tokens_per_s']:.4g} tok/s"
    if r.get("tflops") is not None:
        return f"{r['tflops']:.3g} TFLOP/s"
    if r.get("gbps") is not None:
        return f"{r['gbps']:.3g} GB/s"
    return "-"


def _extra(r: dict) -> str:
    m = r.get("metrics") or {}
    parts = []
    if m.get("ms_per_token") is not None:
        parts.append(f"{m['ms_per_token']:.3g} ms/tok")
    if m.get("decode_ms_per_token") is not None:
        parts.append(f"decode {m['decode_ms_per_token']:.3g} ms/tok")
    if m.get("round_ms") is not None:  # speculative: a round against the plain step, and the projection
        parts.append(f"round {m['round_ms']:.3g} ms = {m['round_over_step']:.2f} plain steps "
                     f"({m['draft_tokens']} drafts), accepted {100 * m['acceptance_rate_random_weights']:.0f}% "
                     "(random weights)")
        parts.append("projected " + " / ".join(f"{m[k]:.2f}x at {k.rsplit('_', 1)[1]}" for k in sorted(m)
                                               if k.startswith("projected_speedup_at_acceptance_")))
    if m.get("mfu_vs_measured_matmul") is not None:
        parts.append(f"MFU {100 * m['mfu_vs_measured_matmul']:.1f}%")
    if m.get("peak_memory_gb") is not None:
        parts.append(f"peak {m['peak_memory_gb']:.2f} GB")
    if r.get("call_peak_mb") is not None:
        parts.append(f"allocates {r['call_peak_mb']:.4g} MB")
    if r.get("first_call_s") is not None and (m or r["provider"].endswith("compile")):
        parts.append(f"first call {r['first_call_s']:.2g} s")
    for kernel, config in (r.get("autotuned") or {}).items():  # what the autotuners chose
        parts.append(f"{kernel.removesuffix('_kernel')}: {config}")
    if r.get("fallbacks"):  # what ran instead of a gptfast kernel (the whole lines are in the JSON)
        parts.append("ran a fallback: " + _fallback_note(r["fallbacks"]))
    return ", ".join(parts)


def _fallback_note(lines: list) -> str:
    """'ops.layer_norm, ops.attention (tensor on cpu ...)': the fallback lines grouped by reason,
    an op's line shortened to its name."""
    by_reason: dict = {}
    for line in lines:
        what, _, reason = line.partition(": ")
        by_reason.setdefault(reason, []).append(what.split(" ", 1)[0] if what.startswith("ops.") else what)
    return "; ".join(f"{', '.join(whats)} ({reason})" if reason else ", ".join(whats)
                     for reason, whats in by_reason.items())


def _rows(case: dict):
    for r in case["results"]:
        if r["status"] != "ok":
            continue
        frac = r.get("roofline_fraction")
        yield [r["provider"], _fmt(r["median_ms"], ".4g"), _fmt(r["iqr_ms"], ".2g"), _throughput(r),
               "-" if frac is None else f"{100 * frac:.1f}%",
               "-" if r["vs_best_peer"] is None else f"{r['vs_best_peer']:.2f}x", _extra(r)]


HEADER = ["provider", "median ms", "IQR ms", "throughput", "% roofline", "vs best peer", "notes"]


def format_table(doc: dict) -> str:
    """Plain-text tables for the terminal, one block per case, skips listed under it."""
    lines = []
    for case in doc["cases"]:
        best = case["best_peer"] or "none ran"
        lines.append(f"\n== {case['op']}: {case['name']} ({case['dtype']}, best peer: {best})")
        rows = [HEADER] + list(_rows(case))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(HEADER))]
        for row in rows:
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for r in case["results"]:
            if r["status"] != "ok":
                lines.append(f"  skipped {r['provider']}: {r['reason']}")
    return "\n".join(lines)


def _env_lines(doc: dict) -> list[str]:
    e, rf = doc["env"], doc["roofline"]
    lines = [f"- device: **{e['device_name']}** ({e['device_kind']}"
             + (f", {e['sm_count']} SMs" if e.get("sm_count") else "") + ")",
             f"- torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, python {e.get('python')}",
             "- peers: " + (", ".join(f"{name} {version or 'not installed'}"
                                      for name, version in e.get("peers", {}).items()) or "not recorded"),
             f"- git commit {e['git_commit']}{' (uncommitted changes)' if e.get('git_dirty') else ''}, "
             f"date {e['date']}{', --quick' if doc.get('quick') else ''}"]
    if rf.get("copy_gbps"):
        lines.append(f"- roofline measured in this run: copy {rf['copy_gbps']:.4g} GB/s, "
                     f"{rf['matmul_dtype']} matmul {rf['matmul_tflops']:.4g} TFLOP/s "
                     f"({'x'.join(map(str, rf['matmul_shape']))})")
    return lines


def format_markdown(doc: dict) -> str:
    out = ["# gptfast benchmark results", ""] + _env_lines(doc) + [""]
    notes = _notes(doc)
    for note in notes:
        out.append(f"> {note}")
    if notes:
        out.append("")
    out.append("Times are medians of many runs (IQR = interquartile range). *vs best peer* = the "
               "fastest peer's time / this provider's time (> 1 is faster than every peer). "
               "*% roofline* = achieved FLOP/s over the matmul rate, or GB/s over the copy "
               "bandwidth, both measured at the start of this run.")
    current_op = None
    for case in doc["cases"]:
        if case["op"] != current_op:
            current_op = case["op"]
            out += ["", f"## {current_op}"]
        out += ["", f"**{case['name']}** ({case['dtype']})", "",
                "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        out += ["| " + " | ".join(row) + " |" for row in _rows(case)]
        skips = [r for r in case["results"] if r["status"] != "ok"]
        if skips:
            out.append("")
            out += [f"- skipped `{r['provider']}`: {r['reason']}" for r in skips]
    return "\n".join(out) + "\n"


def write_charts(doc: dict, out_dir: str) -> list[str]:
    """One PNG per op: each case's providers as bars of speed relative to the best peer."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    paths = []
    ops = list(dict.fromkeys(c["op"] for c in doc["cases"]))
    for op in ops:
        cases = [c for c in doc["cases"] if c["op"] == op and any(r["status"] == "ok" for r in c["results"])]
        if not cases:
            continue
        fig, axes = plt.subplots(len(cases), 1, figsize=(8, 1.2 + 1.6 * len(cases)), squeeze=False)
        for ax, case in zip(axes[:, 0], cases):
            ok = [r for r in case["results"] if r["status"] == "ok"]
            # Relative to the best peer where one ran, else to the fastest provider.
            base = min((r["median_ms"] for r in ok if r["kind"] == "peer"), default=min(r["median_ms"] for r in ok))
            speed = [base / r["median_ms"] for r in ok]
            colors = ["tab:red" if r["kind"] == "gptfast" else "tab:gray" if r["kind"] == "reference"
                      else "tab:blue" for r in ok]
            ax.barh([r["provider"] for r in ok], speed, color=colors)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_title(case["name"], fontsize=9)
            ax.tick_params(labelsize=8)
            ax.invert_yaxis()
        axes[-1, 0].set_xlabel("speed relative to the best peer (higher is faster)")
        fig.suptitle(f"{op} on {doc['env']['device_name']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


PARTIAL = "results.partial.json"
PARTIAL_NOTE = (f"This run was stopped before it finished ({PARTIAL}): only the cases it completed are "
                "shown; the cases after them were not run.")


def _notes(doc: dict) -> list[str]:
    """The run's notes, and for a stopped run the note that says so."""
    return doc["notes"] + ([PARTIAL_NOTE] if doc.get("partial") else [])


def write_partial(doc: dict, out_dir: str) -> str:
    """The run so far (the cases finished), as results.partial.json with "partial": true, written
    atomically after each case, so a run stopped from outside keeps what it measured;
    write_all removes it."""
    from gptfast.checkpoint import atomic_write_text

    validate(doc)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PARTIAL)
    atomic_write_text(path, json.dumps({**doc, "partial": True}, indent=1, allow_nan=False))
    return path


def write_all(doc: dict, out_dir: str, charts: bool = True) -> dict:
    """results.json, summary.md (each written atomically) and the charts into out_dir; returns
    their paths."""
    from gptfast.checkpoint import atomic_write_text

    validate(doc)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "summary.md")}
    atomic_write_text(paths["json"], json.dumps(doc, indent=1, allow_nan=False))
    atomic_write_text(paths["markdown"], format_markdown(doc))
    if os.path.exists(os.path.join(out_dir, PARTIAL)):
        os.unlink(os.path.join(out_dir, PARTIAL))
    paths["charts"] = []
    if charts:
        try:
            paths["charts"] = write_charts(doc, out_dir)
        except ImportError as exc:  # results and summary are written; only the pictures are lost
            paths["charts_skipped"] = f"charts skipped: matplotlib is not importable ({exc})"
    return paths


def _found(name: str, results_dir: Optional[str], device: Optional[str] = None) -> list[str]:
    """Every results/<device>/<name> (or that device's), newest first."""
    root = results_dir or RESULTS_DIR
    found = [os.path.join(root, d, name) for d in sorted(os.listdir(root))
             if device is None or d == device] if os.path.isdir(root) else []
    return sorted((p for p in found if os.path.isfile(p)), key=os.path.getmtime, reverse=True)


def _newest(name: str, results_dir: Optional[str], device: Optional[str] = None) -> str:
    """The newest results/<device>/<name> (or that device's)."""
    found = _found(name, results_dir, device)
    if not found:
        raise FileNotFoundError(f"no {name} under {results_dir or RESULTS_DIR}"
                                + (f" for device {device!r}" if device else "") + "; run `gptfast bench` first")
    return found[0]


def latest_summary(results_dir: Optional[str] = None, device: Optional[str] = None) -> str:
    """The newest results/<device>/summary.md (or that device's), for the README to include."""
    with open(_newest("summary.md", results_dir, device)) as f:
        return f.read()


# ---- the README's benchmark section ---------------------------------------------------------

README_START = "<!-- bench:start: written by `gptfast bench --update-readme`; edits here are replaced -->"
README_END = "<!-- bench:end -->"
README_HEADER = ["op", "case", "gptfast ms", "best peer", "peer ms", "gptfast vs best peer", "% roofline"]


def _short(reason: str, n: int = 60) -> str:
    reason = " ".join(str(reason).split()).replace("|", "/")
    return reason if len(reason) <= n else reason[:n - 3] + "..."


def readme_block(doc: dict, results_dir: str, charts: Optional[list] = None, details: str = "summary.md") -> str:
    """The README's benchmark section for one run: where and with what it was measured, one row
    per case (gptfast's own provider beside the best peer of the same run), and the charts.
    results_dir: the run's folder, as a path relative to the README; charts: the ops whose
    <op>.png is there (None: every op with a provider that ran, as write_charts draws them);
    details: the file there the section links to for every provider (summary.md; a stopped
    run has only its results.partial.json)."""
    validate(doc)
    e = doc["env"]
    lines = [README_START,
             f"Measured by `gptfast bench{' --quick' if doc.get('quick') else ''}` on **{e['device_name']}**"
             + (f" ({e['sm_count']} SMs)" if e.get("sm_count") else "")
             + f", torch {e['torch']}, Triton {e['triton']}, CUDA {e['cuda']}"
             + "".join(f", {name} {version}" for name, version in e.get("peers", {}).items() if version)
             + f", commit {e['git_commit']}"
             + (" (uncommitted changes)" if e.get("git_dirty") else "") + f", {e['date']}. "
             f"Every row is one run: *gptfast vs best peer* = the best peer's time / gptfast's (> 1: faster). "
             f"All providers, spreads and notes: [{results_dir}/{details}]({results_dir}/{details}).",
             "", "| " + " | ".join(README_HEADER) + " |", "|" + "---|" * len(README_HEADER)]
    for case in doc["cases"]:
        ours = next((r for r in case["results"] if r["provider"] == "gptfast"), None)
        peer = next((r for r in case["results"] if r["provider"] == case["best_peer"] and r["status"] == "ok"), None)
        if ours is None:
            continue
        peer_cols = [case["best_peer"] or "none ran", "-" if peer is None else _fmt(peer["median_ms"], ".4g")]
        if ours["status"] == "ok":
            frac = ours.get("roofline_fraction")
            ours_cols = [_fmt(ours["median_ms"], ".4g") + (" (ran a fallback)" if ours.get("fallbacks") else ""),
                         *peer_cols,
                         "-" if ours["vs_best_peer"] is None else f"{ours['vs_best_peer']:.2f}x",
                         "-" if frac is None else f"{100 * frac:.1f}%"]
        else:
            ours_cols = [f"not run: {_short(ours['reason'])}", *peer_cols, "-", "-"]
        lines.append("| " + " | ".join([case["op"], f"{case['name']} ({case['dtype']})", *ours_cols]) + " |")
    for note in _notes(doc):
        lines += ["", f"> {note}"]
    if charts is None:
        charts = [c["op"] for c in doc["cases"] if any(r["status"] == "ok" for r in c["results"])]
    if charts:
        lines.append("")
        lines += [f"![{op}]({results_dir}/{op}.png)" for op in dict.fromkeys(charts)]
    return "\n".join(lines + [README_END])


def update_readme(readme: str, block: str) -> None:
    """Replace the README's section between README_START and README_END by block (atomically)."""
    from gptfast.checkpoint import atomic_write_text

    with open(readme) as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no benchmark section to replace: it needs the lines "
                         f"{README_START!r} and {README_END!r}, in that order")
    atomic_write_text(readme, text[:start] + block + text[end + len(README_END):])


def _device_kind(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return json.load(f).get("env", {}).get("device_kind")
    except (OSError, ValueError, AttributeError):
        return None


def latest_results(results_dir: Optional[str] = None, device_kind: Optional[str] = None) -> str:
    """The path of the newest results/<device>/results.json, or the newest measured on
    device_kind ("cuda": what the README shows, whatever CPU runs came after it)."""
    root = results_dir or RESULTS_DIR
    for path in _found("results.json", results_dir):
        if device_kind is None or _device_kind(path) == device_kind:
            return path
    partial = [p for p in _found(PARTIAL, results_dir) if device_kind is None or _device_kind(p) == device_kind]
    raise FileNotFoundError(
        f"no results.json{f' measured on {device_kind!r}' if device_kind else ''} under {root}; run "
        "`gptfast bench` first" + (f" (a run stopped before it finished left {partial[0]}: pass its path "
                                   "to use what it measured)" if partial else ""))
