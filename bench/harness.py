"""The one benchmark harness: cases, providers, timing, the roofline and the environment.

A Case names its shapes, builds its inputs, lists its Providers (one thin setup function
each: inputs -> a zero-argument callable to time) and states what it counts (FLOPs or
bytes; see accounting.py). The harness times every provider the same way:

- CUDA: CUDA events around each call, after warm-up; the L2 cache is flushed before every
  call (a buffer of twice the L2 size is zeroed outside the timed region, as
  triton.testing.do_bench does), and inputs that fit in L2 are rotated among several copies
  so no call finds its operands left over from the previous one. Median and IQR of many runs.
- CPU: torch.utils.benchmark.Timer.blocked_autorange, with all the threads torch uses.

A provider that cannot run (no CUDA, kernel unavailable, library not installed, out of
memory, torch.compile over its time budget) is recorded as skipped with its reason: a
number that was not measured is never written. Nothing here touches CUDA at import.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from unittest import mock

import torch

from gptfast.ops import KernelUnavailable, _dispatch

from . import accounting

KINDS = ("gptfast", "reference", "peer")


class Skip(Exception):
    """Raised by a setup function: this provider cannot run here, and why."""


@dataclass
class Provider:
    name: str
    kind: str  # "gptfast" (our kernel), "reference" (ops.*_reference eager) or "peer"
    setup: Callable[[dict], Callable[[], Any]]  # inputs -> thunk; may raise Skip
    compiled: bool = False  # counts against the torch.compile time budget
    # Entered around the first call and the timed loop, not per call: e.g. sdpa_kernel(...),
    # whose per-call cost would otherwise be timed as part of a microsecond decode step.
    context: Optional[Callable[[], Any]] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Provider.kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Case:
    op: str  # "attention", "layer_norm", ... (the --ops name)
    name: str  # one line naming the pass and shape: "fwd B=16 H=12 T=1024 D=64"
    shape: dict
    dtype: str
    make_inputs: Callable[[torch.device], dict]
    providers: list[Provider]
    flops: Optional[float] = None
    bytes: Optional[float] = None
    # End-to-end cases time themselves: measure(provider, ctx) -> {"times_s": [...], "metrics": {...}}
    measure: Optional[Callable[[Provider, "RunContext"], dict]] = None

    @property
    def bound(self) -> str:
        return "flops" if self.flops else "bytes"


@dataclass
class RunContext:
    device: torch.device
    quick: bool = False
    compile_budget_s: float = float("inf")  # total first-call (compile) time allowed
    compile_spent_s: float = 0.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_min_run_time_s: float = 0.2
    rotate_copies: int = 4
    roofline: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    _flush_buffer: Optional[torch.Tensor] = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        if not self.is_cuda:
            return
        if self._flush_buffer is None:
            n = 2 * max(l2_bytes(self.device), 64 << 20)
            self._flush_buffer = torch.empty(n // 4, dtype=torch.int32, device=self.device)
        self._flush_buffer.zero_()


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def optional_import(module: str):
    """(module, None) if importable, else (None, reason) for the skip record."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return None, f"{module} is not importable here ({type(exc).__name__}: {exc})"


def no_interpreter(*tensors) -> None:
    """Skip timing a Triton kernel on CPU tensors: there it would run in the Triton
    interpreter (TRITON_INTERPRET=1), a test tool whose speed means nothing."""
    if any(t.device.type == "cpu" for t in tensors):
        raise Skip("Triton kernels need a CUDA device (on CPU they only run in the Triton "
                   "interpreter, which is not timed); GPU figures need a GPU")


_COMPILED: dict[Any, Callable] = {}


def left_pads(B: int, T: int, device) -> torch.Tensor:
    """Left padding of a benchmark's padded batch: row b padded by (b % 4) / 8 of T, so the
    batch holds prompts of four lengths (the attention and generate cases share it)."""
    return (torch.arange(B, device=device) % 4) * (T // 8)


def compiled(fn: Callable, **options) -> Callable:
    """torch.compile(fn), memoised, so rotated input copies share one compiled graph."""
    key = (fn, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]


# ---- timing -------------------------------------------------------------------------


def _time_cuda(thunks: list[Callable], ctx: RunContext) -> list[float]:
    """Per-call seconds from CUDA events; L2 flushed before each call, inputs rotated."""
    # Estimate the call time (flushes included in the loop, not in the events) to size the run.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        ctx.flush_l2()
        thunks[i % len(thunks)]()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for i in range(max(1, int(ctx.warmup_ms / est_ms))):
        thunks[i % len(thunks)]()
    reps = int(min(max(ctx.rep_ms / est_ms, 10), 1000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        ctx.flush_l2()
        starts[i].record()
        thunks[i % len(thunks)]()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def _time_cpu(thunks: list[Callable], ctx: RunContext) -> list[float]:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": thunks[0]}, num_threads=torch.get_num_threads())
    return list(timer.blocked_autorange(min_run_time=ctx.cpu_min_run_time_s).times)


def time_thunks(thunks: list[Callable], ctx: RunContext) -> list[float]:
    return _time_cuda(thunks, ctx) if ctx.is_cuda else _time_cpu(thunks, ctx)


def first_call(thunk: Callable, ctx: RunContext) -> float:
    """Seconds of the first call (compilation, autotuning, lazy init), reported apart."""
    ctx.sync()
    t0 = time.perf_counter()
    thunk()
    ctx.sync()
    return time.perf_counter() - t0


def call_peak_bytes(thunk: Callable, ctx: RunContext) -> int:
    """CUDA memory one call allocates at its peak beyond what was allocated before it (its
    inputs and anything kept from setup): one more call, after the timed ones."""
    ctx.sync()
    base = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    out = thunk()
    ctx.sync()
    del out
    return torch.cuda.max_memory_allocated(ctx.device) - base


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ---- running a case -----------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def env_context(**values: str):
    """A Provider.context setting environment variables around the provider's calls."""
    return lambda: mock.patch.dict(os.environ, values)


def _autotuners() -> list:
    """Every Triton autotuner of the gptfast kernels imported so far."""
    triton, _ = optional_import("triton")
    if triton is None:
        return []
    from triton.runtime.autotuner import Autotuner
    return [obj for name, mod in list(sys.modules.items()) if name.startswith("gptfast.kernels.")
            for obj in vars(mod).values() if isinstance(obj, Autotuner)]


def _kernel_name(tuner) -> str:
    fn = tuner.fn
    while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", repr(fn))


def config_label(config) -> str:
    """'M=128 N=64 w4 s3 tma' for a Config (meta-parameters shortened, TMA shown when on)."""
    kw = dict(config.kwargs)
    tma = kw.pop("TMA", False)
    parts = [f"{k.replace('BLOCK_', '')}={v}" for k, v in kw.items()]
    parts += [f"w{config.num_warps}", f"s{config.num_stages}"] + (["tma"] if tma else [])
    return " ".join(parts)


def run_provider(case: Case, provider: Provider, ctx: RunContext) -> dict:
    """One provider on one case -> a result record (status "ok" or "skipped", never silent).
    gptfast providers also record the config each autotuned kernel ran with ("autotuned"), and
    any provider the fallbacks gptfast took while it ran ("fallbacks": a gptfast row that ran a
    reference is labelled so)."""
    with _dispatch.fallbacks_logged() as fallbacks:
        rec = _run_provider(case, provider, ctx)
    if fallbacks and rec["status"] == "ok":
        rec["fallbacks"] = list(dict.fromkeys(fallbacks))
    return rec


def _run_provider(case: Case, provider: Provider, ctx: RunContext) -> dict:
    rec: dict = {"provider": provider.name, "kind": provider.kind, "status": "skipped", "reason": None}
    tuners = _autotuners() if provider.kind == "gptfast" else []
    for t in tuners:  # Autotuner.run sets best_config to the config of its latest launch
        t.best_config = None
    if provider.compiled and ctx.compile_spent_s >= ctx.compile_budget_s:
        budget = f"is {ctx.compile_budget_s:.0f} s" if ctx.compile_budget_s == 0 else \
            f"of {ctx.compile_budget_s:.0f} s is spent"
        quick = " (--quick)" if ctx.quick else ""
        rec["reason"] = (f"torch.compile skipped: the run's compile budget {budget}{quick}; "
                         "raise --compile-budget or run without --quick to include it")
        return rec
    caught: list = []
    started = time.perf_counter()
    try:
        if case.measure is not None:
            out = case.measure(provider, ctx)
            times, rec["metrics"] = out["times_s"], out.get("metrics", {})
            rec["first_call_s"] = out.get("first_call_s")
        else:
            inputs = case.make_inputs(ctx.device)
            copies = 1
            if ctx.is_cuda and tensor_bytes(inputs) < l2_bytes(ctx.device):
                copies = ctx.rotate_copies
            scope = provider.context or contextlib.nullcontext
            with warnings.catch_warnings(record=True) as caught:
                # Some refusals (SDPA's) come as a warning followed by a generic error: keep the
                # warning for the reason. Only setup and the first call: the timed loop is left alone.
                warnings.simplefilter("always")
                # A bwd case runs its forward in setup: a compiled provider compiles it there, so the
                # setup counts as part of the first call (and against the compile budget).
                thunks: list = []
                setup_s = first_call(lambda: thunks.append(provider.setup(inputs)), ctx)
                thunks += [provider.setup(case.make_inputs(ctx.device)) for _ in range(copies - 1)]
                with scope():
                    rec["first_call_s"] = setup_s + first_call(thunks[0], ctx)
            with scope():
                times = time_thunks(thunks, ctx)
                rec["call_peak_mb"] = call_peak_bytes(thunks[0], ctx) / 2**20 if ctx.is_cuda else None
            rec["input_copies"] = copies
            del thunks, inputs
        if provider.compiled and rec.get("first_call_s"):
            ctx.compile_spent_s += rec["first_call_s"]
    except Skip as exc:
        rec["reason"] = str(exc)
        return rec
    except KernelUnavailable as exc:  # backend="kernel" refused, with gptfast's own reason
        rec["reason"] = str(exc)
        return rec
    except Exception as exc:  # noqa: BLE001 - any failure is recorded as the provider's reason
        if provider.compiled and rec.get("first_call_s") is None:  # a compile that failed spent the budget too
            ctx.compile_spent_s += time.perf_counter() - started
        rec["reason"] = ("out of memory: " if _is_oom(exc) else f"failed on {ctx.device.type}: ") + _short(exc)
        if caught:
            rec["reason"] += " | warning: " + str(caught[0].message).strip().splitlines()[0][:300]
        return rec
    finally:
        _free_memory()
    rec["status"] = "ok"
    tuners = tuners or (_autotuners() if provider.kind == "gptfast" else [])  # imported by this run
    tuned = {_kernel_name(t): config_label(t.best_config) for t in tuners
             if getattr(t, "best_config", None) is not None}
    if tuned:
        rec["autotuned"] = tuned
    rec.update(accounting.summarize(times))
    rec.update(accounting.throughput(case.flops, case.bytes, rec["median_ms"]))
    rec["roofline_fraction"] = accounting.roofline_fraction(case.bound, rec, ctx.roofline)
    return rec


def run_case(case: Case, ctx: RunContext, progress=None) -> dict:
    t0 = time.perf_counter()
    results = []
    for provider in case.providers:
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.name} [{provider.name}]"[:70], refresh=False)
        results.append(run_provider(case, provider, ctx))
        if progress is not None:
            progress.update(1)
    best = accounting.add_ratios(results)
    return {"op": case.op, "name": case.name, "shape": dict(case.shape), "dtype": case.dtype,
            "flops": case.flops, "bytes": case.bytes, "bound": case.bound,
            "best_peer": best, "wall_s": time.perf_counter() - t0, "results": results}


# ---- roofline and environment ---------------------------------------------------------


def measure_roofline(ctx: RunContext) -> dict:
    """The device's copy bandwidth and matmul rate, measured now, in the same process.

    Copy: dst.copy_(src) over buffers far larger than L2 (reads + writes counted).
    Matmul: a square matmul in the dtype the cases use (bf16 on CUDA, fp32 on CPU).
    """
    dev = ctx.device
    if ctx.is_cuda:
        copy_elems, n, dtype = (256 << 20) if ctx.quick else (512 << 20), 8192, torch.bfloat16
    else:
        copy_elems, n, dtype = 8 << 20, 512 if ctx.quick else 1024, torch.float32
    src = torch.randn(copy_elems, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    copy_s = accounting.summarize(time_thunks([lambda: dst.copy_(src)], ctx))["median_ms"] / 1e3
    copy_bytes = 2 * tensor_bytes(src)
    del src, dst
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_s = accounting.summarize(time_thunks([lambda: a @ b], ctx))["median_ms"] / 1e3
    del a, b
    _free_memory()
    return {
        "copy_gbps": copy_bytes / copy_s / 1e9, "copy_bytes": copy_bytes,
        "matmul_tflops": accounting.matmul_flops(n, n, n) / mm_s / 1e12,
        "matmul_shape": [n, n, n], "matmul_dtype": str(dtype).replace("torch.", ""),
    }


def _git(*args: str) -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


PEER_PACKAGES = ("transformers", "liger-kernel", "flash-attn")


def peer_versions() -> dict:
    """The installed version of each peer library a case may time (None where it is not
    installed), read from the package metadata: nothing is imported."""
    versions = {}
    for name in PEER_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device) -> dict:
    env = {
        "device_kind": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "argv": sys.argv,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    triton, reason = optional_import("triton")
    env["triton"] = getattr(triton, "__version__", None) if triton else None
    env["peers"] = peer_versions()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", l2_bytes=l2_bytes(device),
                   memory_gb=round(props.total_memory / 1e9, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device_name=env["cpu"], sm_count=None, capability=None, l2_bytes=None,
                   memory_gb=None, cudnn=None)
    return env


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"
