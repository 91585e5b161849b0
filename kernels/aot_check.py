"""Compile every Triton kernel the launchers use for a GPU target, on a machine without a GPU.

    python -m gptfast.kernels.aot_check [--arch 90] [--quick] [--kernels attn_fwd,decode]
                                        [--jobs N] [--pruned] [--json PATH]

The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) catches no compile
errors: tl.dot shape/dtype rules, layouts, shared memory, API differences between Triton
versions. This check runs the real launchers (gptfast/ops/_attention_triton.py,
_norm_triton.py) on CPU tensors with the kernels swapped for recorders, so every constexpr,
launch option and argument specialization (dtypes, ints equal to 1, divisibility by 16) is
exactly what a launch would produce; each recorded launch (every autotune config of it) is
then compiled with triton.compile for the target, and ptxas's resource usage is read from
the cubin with cuobjdump.

Fails (exit 1) on a compile error, a TMA config whose PTX has no TMA copy
(cp.async.bulk.tensor), or shared memory above the target's per-block opt-in maximum, in
any config a launch can run: fixed configs, and autotune configs that survive the kernel's
early_config_prune. Pruned configs are listed as "pruned" (compiled only with
--pruned, and never fatal). Register spills are warnings.

Not covered: the launchers' INTERPRETER_* configs (they only run under the interpreter,
never compiled), and fp32 linear_bias_gelu (on a GPU it takes the cuBLAS + bias_gelu path).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional
from unittest import mock

if not __package__:  # run as a file (python kernels/aot_check.py): import gptfast from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
HIDDEN_SIZES = (768, 1000, 1600)  # GPT-2 small, an odd size (not a multiple of 16), GPT-2 XL
BATCH, SEQ = 4, 1024  # a training-sized launch: B * T = 4096 rows
DECODE_TMAX = 8192  # long enough for DECODE_MAX_SPLITS splits of 64 keys


@dataclass
class Job:
    kernel: str
    dtype: str
    variant: str
    config: str
    pruned: bool  # an autotune config the kernel's early_config_prune drops for this launch
    fn: object = field(repr=False)  # the JITFunction
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    options: dict = field(repr=False)


@dataclass
class Result:
    kernel: str
    dtype: str
    variant: str
    config: str
    status: str  # ok | error | smem (over the limit) | pruned (compiled only with --pruned) | pruned (error)
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None  # per thread: ptxas stack frame (spill slots)
    smem_bytes: Optional[int] = None  # shared memory per block: dynamic (the launch's request) + static
    tma_copies: Optional[int] = None  # cp.async.bulk.tensor instructions in the PTX (TMA loads / stores)
    seconds: float = 0.0
    error: str = ""


# ---- recording the launchers' launches ------------------------------------------------------

def _launchers():
    from gptfast.ops import _attention_triton as attn
    from gptfast.ops import _norm_triton as norm
    return attn, norm


def _ce_launcher():
    from gptfast.ops import _cross_entropy_triton as ce
    return ce


def _kernel_modules():
    attn, norm = _launchers()
    return [attn._attn_k, attn._dec_k, norm._ln_k, norm._gelu_k, norm._mm_k, _ce_launcher()._ce_k]


class _Recorder:
    """Stands in for a kernel (JITFunction or Autotuner): `kernel[grid](*args, **kwargs)` records."""

    def __init__(self, real, launches):
        self.real, self.launches = real, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.real, args, kwargs))


@contextlib.contextmanager
def _recording(launches, mode: str):
    """mode: "autotune" (GPTFAST_ATTN_AUTOTUNE=1), "fixed" (=0), or "fixed-tma" (=0 with
    GPTFAST_TMA=1). The launchers see a TMA-capable device (the target is sm_90), so the
    autotuned kernels get their descriptors and TMA configs as on an H100."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    from gptfast.ops import _tma
    saved = [(_tma, "capable", _tma.capable)]
    for mod in _kernel_modules():
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (JITFunction, Autotuner)):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, launches))
    _tma.capable = lambda device: True
    try:
        with mock.patch.dict(os.environ, {"GPTFAST_ATTN_AUTOTUNE": "1" if mode == "autotune" else "0",
                                          "GPTFAST_TMA": "1" if mode == "fixed-tma" else "auto"}):
            yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


# ---- the launches to check: (dtype, variant label, autotune modes, call) ------------------------

def _dtype_name(dtype) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]


def _cases(quick: bool):
    import torch
    attn, norm = _launchers()
    cpu = torch.device("cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    hidden = HIDDEN_SIZES[:1] if quick else HIDDEN_SIZES

    def qkv(B, T, H, D, dtype):  # [B, H, T, D] views of the [B, T, 3, H, D] projection, as the model passes
        return torch.empty(B, T, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)

    def flash(dtype, D, causal, window=False, dropout=False):
        B, T, H = BATCH, SEQ, 768 // D
        q, k, v = qkv(B, T, H, D, dtype)
        bounds = (torch.empty(B, dtype=torch.int32), torch.empty(B, dtype=torch.int32)) if window else (None, None)
        drop = (0.1, torch.empty(1, dtype=torch.int64)) if dropout else ()  # attention dropout: p and its seed
        out, lse = attn._flash_fwd_launch(q, k, v, causal, D ** -0.5, *bounds, *drop)
        dout = attn._bhtd_like_bthd(B, H, T, D, dtype, cpu)  # grad of the model's y.transpose(1, 2).reshape
        attn._flash_bwd_launch(dout, q, k, v, out, lse, causal, D ** -0.5, *bounds, *drop)

    def decode(dtype, D, tq, splits, window=False):
        B, H = BATCH, 768 // D
        q, _, _ = qkv(B, tq, H, D, dtype)
        kc, vc = (torch.empty(B, H, DECODE_TMAX, D, dtype=dtype) for _ in range(2))
        attn._decode_launch(q, kc, vc, torch.empty(B, dtype=torch.long),
                            torch.empty(B, dtype=torch.int32) if window else None, num_splits=splits)

    def layer_norm(dtype, n, residual, affine, pdtype):
        x = torch.empty(BATCH, SEQ, n, dtype=dtype)
        w, b = (torch.empty(n, dtype=pdtype) if affine else None for _ in range(2))
        r = torch.empty_like(x) if residual else None
        _, h, mean, rstd = norm._layer_norm_fwd_launch(x, w, b, r, 1e-5)
        norm._layer_norm_bwd_launch(torch.empty_like(x), r, h if residual else x, w, b, mean, rstd)

    def bias_gelu(dtype, n, bias, db, approx, pdtype):
        x = torch.empty(BATCH, SEQ, n, dtype=dtype)
        b = torch.empty(n, dtype=pdtype) if bias else None
        norm._bias_gelu_fwd_launch(x, b, approx)
        norm._bias_gelu_bwd_launch(torch.empty_like(x), x, b, approx, db)

    def linear_gelu(dtype, c, bias, approx, save_pre):
        x = torch.empty(BATCH, SEQ, c, dtype=dtype)
        w = torch.empty(4 * c, c, dtype=dtype)
        norm._linear_bias_gelu_fwd_launch(x, w, torch.empty(4 * c, dtype=dtype) if bias else None, approx, save_pre)

    def cross_entropy(dtype, vocab, write_grad):  # a chunk of the LM head's logits
        _ce_launcher()._launch(torch.empty(1000, vocab, dtype=dtype), torch.empty(1000, dtype=torch.long),
                               -100, write_grad)

    for dtype in dtypes:
        dn = _dtype_name(dtype)
        for D in (64,) if quick else attn._HEAD_DIMS:
            for causal in (True,) if quick else (True, False):
                # every path: autotuned (each config the pruner keeps), GPTFAST_ATTN_AUTOTUNE=0, and
                # that with GPTFAST_TMA=1
                yield dn, f"D={D} {'causal' if causal else 'full'}", \
                    ("fixed", "fixed-tma") if quick else ("autotune", "fixed", "fixed-tma"), \
                    partial(flash, dtype, D, causal)
            if D in (64, 128):  # a key window (padded batches, transformers' masks): causal, both modes
                yield dn, f"D={D} causal kv-window", ("fixed",) if quick else ("autotune", "fixed"), \
                    partial(flash, dtype, D, True, True)
            if D in ((64,) if quick else (64, 128)):  # attention dropout (training): causal, every path
                yield dn, f"D={D} causal dropout", \
                    ("fixed", "fixed-tma") if quick else ("autotune", "fixed", "fixed-tma"), \
                    partial(flash, dtype, D, True, False, True)
            # 1 split: the split kernel writes the output; 22: B*H = 12 on 132 SMs; the largest reduce
            for tq in (1,) if quick else (1, 17, attn.DECODE_MAX_TQ):  # query blocks of 16, 32, 64
                for splits in (22,) if quick else (1, 22, attn.DECODE_MAX_SPLITS):
                    yield dn, f"D={D} Tq={tq} splits={splits}", ("autotune",), partial(decode, dtype, D, tq, splits)
            if D == 64:
                for splits in (22,) if quick else (1, 22):
                    yield dn, f"D={D} Tq=1 splits={splits} kv-start", ("autotune",), \
                        partial(decode, dtype, D, 1, splits, True)
        # 16-bit activations with fp32 parameters too (a bf16 model's LayerNorm kept in fp32)
        params = (dtype,) if quick or dtype == torch.float32 else (dtype, torch.float32)
        for n in hidden:
            for residual, affine in ((True, True),) if quick else ((True, True), (False, True), (False, False)):
                for p in params if affine else (dtype,):
                    label = f"N={n}{' +res' if residual else ''}{' w,b' if affine else ''}" + \
                        (f" {_dtype_name(p)} params" if p != dtype else "")
                    yield dn, label, ("autotune",), partial(layer_norm, dtype, n, residual, affine, p)
            for approx in ("tanh",) if quick else ("tanh", "none"):
                for bias, db in ((True, True),) if quick else ((True, True), (True, False), (False, False)):
                    for p in params if bias else (dtype,):
                        label = f"N={4 * n} {approx}{' bias' if bias else ''}{' db' if db else ''}" + \
                            (f" {_dtype_name(p)} bias" if p != dtype else "")
                        yield dn, label, ("autotune",), partial(bias_gelu, dtype, 4 * n, bias, db, approx, p)
        for vocab in (50257,) if quick else (50257, 1000, 7):
            for write_grad in (True,) if quick else (True, False):
                yield dn, f"V={vocab}{' grad' if write_grad else ''}", ("autotune",), \
                    partial(cross_entropy, dtype, vocab, write_grad)
        # the epilogue kernel only where a GPU launch takes it (fp32 goes to cuBLAS + bias_gelu)
        if norm._mlp_front_path(types.SimpleNamespace(shape=(BATCH * SEQ, 768), is_cuda=True, dtype=dtype)) \
                == "epilogue":
            for c in hidden:
                flags = [(True, "tanh", True)]
                if not quick and c == 768:
                    flags += [(True, "tanh", False), (False, "none", False)]
                for bias, approx, save_pre in flags:
                    label = f"K={c} N={4 * c} {approx}{' bias' if bias else ''}{' save_pre' if save_pre else ''}"
                    yield dn, label, ("autotune",), partial(linear_gelu, dtype, c, bias, approx, save_pre)


# ---- from launches to compile jobs --------------------------------------------------------------

def _config_label(constexprs: dict, fn, options) -> str:
    names = fn.arg_names
    blocks = [f"{names[k[0]].replace('BLOCK_', '')}={v}" for k, v in sorted(constexprs.items())
              if names[k[0]].startswith(("BLOCK", "GROUP"))]
    tma = ["tma"] if any(names[k[0]] == "TMA" and v for k, v in constexprs.items()) else []
    return " ".join(blocks + [f"w{options['num_warps']}", f"s{options['num_stages']}"] + tma)


def _specialize(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as fn[grid](*args, **kwargs) would compile."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return signature, constexprs, attrs, dict(options.__dict__)


def _expand(real, args, kwargs):
    """(JITFunction, kwargs, pruned) per config a launch of `real` may compile."""
    from triton.runtime.autotuner import Autotuner
    if not isinstance(real, Autotuner):
        yield real, kwargs, False
        return
    real.nargs = dict(zip(real.arg_names, args))  # what Autotuner.run sets before pruning
    try:
        kept = real.prune_configs(kwargs)
    finally:
        real.nargs = None
    for cfg in real.configs:
        kw = {**kwargs, **cfg.all_kwargs()}
        pruned = not any(cfg is k for k in kept)
        if cfg.pre_hook is not None:  # e.g. TMA descriptor block shapes, part of the signature
            cfg.pre_hook({**dict(zip(real.arg_names, args)), **kw})
        yield real.fn, kw, pruned


def collect_jobs(arch: int, quick: bool = False, kernels=None) -> list[Job]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction
    backend = make_backend(GPUTarget("cuda", arch, 32))
    jobs: dict[tuple, Job] = {}
    for dtype, variant, modes, call in _cases(quick):
        launches = []
        for mode in modes:
            with _recording(launches, mode):
                call()
        for real, args, kwargs in launches:
            for fn, kw, pruned in _expand(real, args, kwargs):
                if not isinstance(fn, JITFunction):
                    raise RuntimeError(f"{fn} is not a JITFunction: were the kernels imported under "
                                       "TRITON_INTERPRET=1? Run this check in a process without it.")
                name = fn.__name__
                if kernels and not any(k in name for k in kernels):
                    continue
                sig, constexprs, attrs, options = _specialize(fn, args, kw, backend)
                key = (name, repr(sig), repr(sorted(constexprs.items())), repr(attrs), repr(sorted(options.items())))
                if key in jobs:  # the same binary (fixed config == autotune config, a shared kernel)
                    jobs[key].pruned &= pruned
                    continue
                jobs[key] = Job(name, dtype, variant, _config_label(constexprs, fn, options), pruned,
                                fn, sig, constexprs, attrs, options)
    out = list(jobs.values())
    if quick:  # one representative config per kernel and dtype (and TMA or not, key window, dropout or not)
        first = {}
        for j in out:
            if not j.pruned:
                first.setdefault((j.kernel, j.dtype, j.config.endswith("tma"), "kv-" in j.variant,
                                  "dropout" in j.variant), j)
        out = list(first.values())
    return out


# ---- compiling ----------------------------------------------------------------------------------

def nvidia_tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _resource_usage(cubin: bytes, kernel: str) -> tuple[int, int, int]:
    """(registers, stack frame bytes per thread, static shared memory bytes) of `kernel` in the
    cubin, from cuobjdump. Triton kernels keep no local arrays: their stack frame is spill slots."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump's output:\n{out}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def compile_job(job: Job, arch: int, max_shared: Optional[int]) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    r = Result(job.kernel, job.dtype, job.variant, job.config, "ok")
    t0 = time.perf_counter()
    try:
        src = ASTSource(job.fn, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
        r.regs, r.spill_bytes, static = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
        # the launch asks for metadata.shared dynamic bytes on top of the static ones; the driver
        # allows dynamic + static <= the opt-in maximum
        r.smem_bytes = compiled.metadata.shared + static
        r.tma_copies = compiled.asm["ptx"].count("cp.async.bulk.tensor")
        if job.config.endswith("tma") and not r.tma_copies:
            raise RuntimeError("a TMA config compiled without a single TMA copy (cp.async.bulk.tensor)")
        for i, meta in enumerate(getattr(compiled.metadata, "tensordesc_meta", None) or []):
            why = tma_box_error(meta["block_size"], meta["elem_size"])
            if why:  # the launch would fail in cuTensorMapEncodeTiled, used descriptor or not
                raise RuntimeError(f"tensor descriptor argument {i}: {why}")
    except Exception as exc:  # noqa: BLE001 - every failure is a result to report
        r.status, r.error = "error", f"{type(exc).__name__}: {exc}".strip()
    r.seconds = time.perf_counter() - t0
    if r.status == "ok" and max_shared is not None and r.smem_bytes > max_shared:
        r.status = "smem"
    if job.pruned:
        r.status = "pruned" if r.status != "error" else "pruned (error)"
    return r


def tma_box_error(block, elem_size: int) -> str:
    """Why cuTensorMapEncodeTiled would refuse this box (Triton encodes every host descriptor
    argument at each launch, even one the kernel leaves unused), or ""."""
    if not 1 <= len(block) <= 5:
        return f"rank {len(block)} outside 1..5"
    if any(not 1 <= b <= 256 for b in block):
        return f"box {list(block)}: every dim must be in 1..256"
    if block[-1] * elem_size % 16:
        return f"box {list(block)}: the inner dim is {block[-1] * elem_size} bytes, not a multiple of 16"
    return ""


_JOBS: list[Job] = []  # read by forked workers: jobs hold kernels, which are not picklable


def _compile_index(i, arch, max_shared):
    return compile_job(_JOBS[i], arch, max_shared)


def _warm_hashes(jobs):
    """Compute the cache-key hashes every compile needs once, before forking, not once per worker."""
    with contextlib.suppress(Exception):  # an optimization only: Triton internals differ by version
        from triton.runtime.cache import triton_key
        triton_key()  # hashes Triton's own sources (~0.5 s)
    for j in jobs:
        with contextlib.suppress(Exception):
            j.fn.cache_key  # noqa: B018 - lazily computed hash of the kernel and its callees


def run_jobs(jobs: list[Job], arch: int, max_shared: Optional[int], workers: int, compile_pruned: bool):
    """One Result per job, in job order, yielded as they complete."""
    todo = [i for i, j in enumerate(jobs) if compile_pruned or not j.pruned]
    _JOBS[:] = jobs
    pool = None
    if workers > 1 and len(todo) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _warm_hashes(jobs[i] for i in todo)
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile_index, todo, [arch] * len(todo), [max_shared] * len(todo))
    else:
        results = (compile_job(jobs[i], arch, max_shared) for i in todo)
    try:
        todo_set, results = set(todo), iter(results)
        for i, j in enumerate(jobs):
            yield next(results) if i in todo_set else Result(j.kernel, j.dtype, j.variant, j.config, "pruned")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# ---- report -------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return "-" if v is None else str(v)


def _row(r: Result) -> str:
    return (f"{r.kernel:28} {r.dtype:4} {r.variant:34} {r.config:30} {r.status:8} "
            f"{_fmt(r.regs):>4} {_fmt(r.spill_bytes):>5} {_fmt(r.smem_bytes):>6} {r.seconds:5.1f}s")


def summarize(results: list[Result]) -> dict[str, dict]:
    """Per kernel, over the configs a launch can run (not pruned)."""
    out: dict[str, dict] = {}
    for r in results:
        s = out.setdefault(r.kernel, dict(compiled=0, errors=0, pruned=0, max_regs=0, spilling=0,
                                          max_spill_bytes=0, max_smem_bytes=0, over_smem=0))
        if r.status.startswith("pruned"):
            s["pruned"] += 1
            continue
        s["compiled"] += 1
        s["errors"] += r.status == "error"
        s["over_smem"] += r.status == "smem"
        if r.regs is not None:
            s["max_regs"] = max(s["max_regs"], r.regs)
            s["spilling"] += r.spill_bytes > 0
            s["max_spill_bytes"] = max(s["max_spill_bytes"], r.spill_bytes)
            s["max_smem_bytes"] = max(s["max_smem_bytes"], r.smem_bytes)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptfast.kernels.aot_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100)")
    p.add_argument("--quick", action="store_true", help="one representative config per kernel and dtype")
    p.add_argument("--kernels", default="", help="comma-separated substrings of kernel names to check")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--pruned", action="store_true", help="also compile autotune configs the pruner drops")
    p.add_argument("--json", metavar="PATH", help="write every result and the summary as JSON")
    args = p.parse_args(argv)

    if os.environ.pop("TRITON_INTERPRET", "0") not in ("0", ""):
        print("aot_check: ignoring TRITON_INTERPRET (this check compiles)", file=sys.stderr)
    # Triton 3.9's notice that its default (fusion on, what a launch gets here too) will change
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    try:
        make_backend(GPUTarget("cuda", args.arch, 32))
    except Exception as exc:  # noqa: BLE001
        print(f"aot_check: no NVIDIA backend in Triton {triton.__version__}: {exc}", file=sys.stderr)
        return 2
    max_shared = MAX_SHARED.get(args.arch)
    kernels = [k for k in args.kernels.split(",") if k]
    t0 = time.perf_counter()
    jobs = collect_jobs(args.arch, args.quick, kernels)
    print(f"Triton {triton.__version__}, sm_{args.arch}: {len(jobs)} kernel builds "
          f"({sum(j.pruned for j in jobs)} pruned), {args.jobs} processes; shared memory limit "
          f"{_fmt(max_shared)} bytes")
    print(f"{'kernel':28} {'dt':4} {'variant':34} {'config':30} {'status':8} {'regs':>4} {'spill':>5} "
          f"{'smem':>6}   time")
    results = []
    for r in run_jobs(jobs, args.arch, max_shared, args.jobs, args.pruned):
        results.append(r)
        print(_row(r), flush=True)
        if r.error:
            print("    " + "\n    ".join(r.error.splitlines()[-6:]), flush=True)

    summary = summarize(results)
    print(f"\n{'kernel':28} {'compiled':>8} {'errors':>6} {'pruned':>6} {'max regs':>8} {'spilling':>8} "
          f"{'max spill':>9} {'max smem':>8}")
    for name, s in summary.items():
        print(f"{name:28} {s['compiled']:8} {s['errors']:6} {s['pruned']:6} {s['max_regs']:8} {s['spilling']:8} "
              f"{s['max_spill_bytes']:9} {s['max_smem_bytes']:8}")
    failed = [r for r in results if r.status in ("error", "smem")]
    spills = [r for r in results if r.status in ("ok", "smem") and r.spill_bytes]
    for r in spills:
        print(f"WARNING: {r.kernel} {r.dtype} {r.variant} [{r.config}] spills: {r.spill_bytes} bytes "
              f"of stack per thread ({r.regs} registers)")
    for r in failed:
        why = r.error.splitlines()[-1] if r.status == "error" else f"shared memory {r.smem_bytes} > {max_shared}"
        print(f"FAILED: {r.kernel} {r.dtype} {r.variant} [{r.config}]: {why}")
    print(f"{len(results)} builds, {len(failed)} failed, {len(spills)} spilling, "
          f"{time.perf_counter() - t0:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "max_shared": max_shared,
                       "results": [asdict(r) for r in results], "summary": summary}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
