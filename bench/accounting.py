"""What a benchmark counts: FLOPs and bytes per case, robust statistics, ratios.

Pure functions of shapes and timings (no device, no torch), so they are unit-tested
on their own (tests/test_bench.py). Every throughput the suite prints comes from a
count here divided by a time measured in the same run.
"""
from __future__ import annotations

import statistics
from typing import Iterable, Optional

PASSES = ("fwd", "bwd", "fwd+bwd")
# The convention of the Triton fused-attention tutorial and FlashAttention's benchmarks:
# backward = 2.5x forward (two matmuls recomputed or re-read, plus dQ, dK, dV).
ATTENTION_BWD_FACTOR = 2.5


def _check_pass(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")


def attention_flops(B: int, H: int, T: int, D: int, causal: bool = True, pass_: str = "fwd") -> float:
    """FLOPs of softmax(q k^T) v over [B, H, T, D]: two matmuls of 2*T*T*D each per head.

    Causal attention counts half the square (the masked half is skipped by a flash kernel),
    so fwd = 4*B*H*T*T*D / 2; backward = 2.5x forward.
    """
    _check_pass(pass_)
    fwd = 4.0 * B * H * T * T * D
    if causal:
        fwd /= 2
    factor = {"fwd": 1.0, "bwd": ATTENTION_BWD_FACTOR, "fwd+bwd": 1.0 + ATTENTION_BWD_FACTOR}[pass_]
    return fwd * factor


def decode_attention_bytes(B: int, H: int, L: int, D: int, elem_bytes: int) -> float:
    """Bytes a decode step must read: the K and V caches up to length L (q and out are negligible)."""
    return 2.0 * B * H * L * D * elem_bytes


def layer_norm_bytes(M: int, N: int, elem_bytes: int, residual: bool = True, pass_: str = "fwd") -> float:
    """Minimum bytes moved by (add +) LayerNorm over [M, N] activations.

    fwd reads x (and residual) and writes y (and h = x + residual, the new residual stream);
    bwd reads dy and the saved input and writes dx. The weight/bias vectors (and their
    gradients) are N-sized and counted once per pass; the fp32 mean/rstd (M each) likewise.
    """
    _check_pass(pass_)
    act = float(M) * N * elem_bytes
    fwd = (4 if residual else 2) * act + 2.0 * N * elem_bytes
    bwd = 3 * act + 2.0 * N * elem_bytes + 2.0 * M * 4
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def bias_gelu_bytes(M: int, N: int, elem_bytes: int, pass_: str = "fwd") -> float:
    """Minimum bytes moved by gelu(x + bias) over [M, N]: fwd reads x, writes y;
    bwd reads dy and x, writes dx (plus the N-sized bias and its gradient)."""
    _check_pass(pass_)
    act = float(M) * N * elem_bytes
    fwd = 2 * act + N * elem_bytes
    bwd = 3 * act + N * elem_bytes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def matmul_flops(M: int, N: int, K: int) -> float:
    """2*M*N*K: one multiply and one add per term."""
    return 2.0 * M * N * K


def sampling_bytes(B: int, V: int, elem_bytes: int) -> float:
    """Bytes a sampler must read at least once: the logits."""
    return float(B) * V * elem_bytes


def train_flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, T: int) -> float:
    """Training FLOPs per token: 6*N for the weights (fwd 2N + bwd 4N) plus causal attention.

    Attention per token and layer uses the same accounting as attention_flops (causal half
    square, backward 2.5x): 4*T*D*H / 2 * 3.5 = 7*H*T*D.
    """
    attention = attention_flops(1, n_head, T, head_dim, causal=True, pass_="fwd+bwd") / T
    return 6.0 * n_params + n_layer * attention


def summarize(times_s: Iterable[float]) -> dict:
    """Median and spread of a list of per-call times (seconds) -> a dict in milliseconds.

    The interquartile range (q75 - q25) is the spread: robust to the occasional slow run
    that a mean or a standard deviation would chase.
    """
    xs = sorted(float(t) for t in times_s)
    if not xs:
        raise ValueError("summarize needs at least one time, got none")
    if len(xs) == 1:
        q25 = q75 = xs[0]
    else:
        q25, _, q75 = statistics.quantiles(xs, n=4, method="inclusive")
    ms = 1e3
    return {
        "median_ms": statistics.median(xs) * ms,
        "q25_ms": q25 * ms,
        "q75_ms": q75 * ms,
        "iqr_ms": (q75 - q25) * ms,
        "min_ms": xs[0] * ms,
        "max_ms": xs[-1] * ms,
        "n": len(xs),
    }


def best_peer(results: list[dict]) -> Optional[dict]:
    """The fastest result (lowest median) among those of kind "peer" that ran; None if none ran."""
    peers = [r for r in results if r.get("kind") == "peer" and r.get("status") == "ok"]
    return min(peers, key=lambda r: r["median_ms"]) if peers else None


def add_ratios(results: list[dict]) -> Optional[str]:
    """Set r["vs_best_peer"] = best peer time / r time (> 1: faster than every peer).

    Returns the best peer's provider name. Results that did not run, or a case whose
    peers all were skipped, get None: a ratio is written only between two measurements.
    """
    best = best_peer(results)
    for r in results:
        ok = best is not None and r.get("status") == "ok" and r.get("median_ms")
        r["vs_best_peer"] = best["median_ms"] / r["median_ms"] if ok else None
    return best["provider"] if best else None


def throughput(flops: Optional[float], bytes_: Optional[float], median_ms: float) -> dict:
    """TFLOP/s and GB/s (1e9 bytes/s) of one result, None where the case has no such count."""
    s = median_ms / 1e3
    return {
        "tflops": flops / s / 1e12 if flops else None,
        "gbps": bytes_ / s / 1e9 if bytes_ else None,
    }


def roofline_fraction(bound: str, tput: dict, roofline: dict) -> Optional[float]:
    """Achieved fraction of the rate measured in the same run: the matmul rate for a
    FLOP-bound case, the device-to-device copy bandwidth for a byte-bound one."""
    if bound == "flops" and tput.get("tflops") and roofline.get("matmul_tflops"):
        return tput["tflops"] / roofline["matmul_tflops"]
    if bound == "bytes" and tput.get("gbps") and roofline.get("copy_gbps"):
        return tput["gbps"] / roofline["copy_gbps"]
    return None
