"""Backend selection for gptfast.ops: the one door from the model to kernels.

Order of precedence: the call's ``backend=`` argument, then ``use_backend(...)``
(context manager or setter), then the ``GPTFAST_BACKEND`` environment variable,
then "auto". "auto" runs the fast implementation when it can run on these
inputs and the reference otherwise; "kernel" raises ``KernelUnavailable`` with
the reason when it cannot run; "torch" always runs the reference.

Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from typing import Callable, Optional

import torch

logger = logging.getLogger("gptfast")

BACKENDS = ("auto", "kernel", "torch")
# A plain global (not a ContextVar): torch.compile traces reads of it and guards on its value.
# The setting is process-wide, shared by threads.
_override: list[Optional[str]] = [None]
_fallback_logged: set[str] = set()

# op name -> (implementation description, availability probe returning a reason or None)
_REGISTRY: dict[str, tuple[str, Callable[[], Optional[str]], Optional[Callable[[], str]]]] = {}


class KernelUnavailable(RuntimeError):
    """backend="kernel" was asked for where the fused implementation cannot run."""


def _check(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def current_backend(backend: Optional[str] = None) -> str:
    """The backend a call with ``backend=backend`` resolves to."""
    if backend is not None:
        return _check(backend, "backend")
    override = _override[0]
    if override is not None:
        return override
    env = os.environ.get("GPTFAST_BACKEND")
    if env:
        return _check(env.strip().lower(), "GPTFAST_BACKEND")
    return "auto"


class use_backend(contextlib.ContextDecorator):
    """Select the backend for every op, as a setter, a context manager or a decorator.

    ``gptfast.use_backend("torch")`` sets it until changed;
    ``with gptfast.use_backend("kernel"): ...`` sets it inside the block only;
    ``@gptfast.use_backend("torch")`` sets it inside each call of the function only.
    ``use_backend(None)`` returns to the environment / "auto".
    """

    def __init__(self, backend: Optional[str]):
        if backend is not None:
            _check(backend, "backend")
        self._backend = backend
        self._restore = [_override[0]]  # what each exit puts back; the setter's call has set it already
        self._set_by_init = True
        _override[0] = backend

    def __enter__(self):
        if self._set_by_init:  # `with use_backend(x):` - the call above set it
            self._set_by_init = False
        else:  # entered again, or each call of a function it decorates
            self._restore.append(_override[0])
            _override[0] = self._backend
        return self

    def __exit__(self, *exc):
        _override[0] = self._restore.pop()
        return False

    def __call__(self, func):
        """As a decorator (`@use_backend("torch")`): the setting holds inside each call of func
        only, not from the decoration on."""
        if self._set_by_init:
            self._set_by_init = False
            _override[0] = self._restore.pop()
        return super().__call__(func)


# What Triton's knobs read as true, case-insensitive and unstripped (Triton 3.4 to 3.9; 3.9 takes "y" too)
_TRUE = ("1", "true", "yes", "on")


def env_switch(name: str) -> bool:
    """An on-by-default switch (GPTFAST_ATTN_AUTOTUNE, GPTFAST_MATMUL_AUTOTUNE): 0, false, no or
    off, in any case, turn it off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: TRITON_INTERPRET as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE


_triton_probe: list[Optional[str]] = []  # memo; a plain global so torch.compile reads it as a constant


def triton_missing_reason() -> Optional[str]:
    """None when Triton is importable, else why not."""
    if not _triton_probe:
        _triton_probe.append(_probe_triton())
    return _triton_probe[0]


def _probe_triton() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401,F811
    except Exception as exc:  # noqa: BLE001 - a broken install is still a reason
        return f"Triton failed to import: {exc}"
    return None


_module_probe: dict[str, Optional[str]] = {}


def module_missing_reason(module: str) -> Optional[str]:
    """None when gptfast.ops.<module> (a kernel wiring module) imports, else why not.

    Memoised, and probed outside any torch.compile trace (an ImportError cannot be traced).
    """
    if module not in _module_probe:
        _module_probe[module] = _probe_module(module)
    return _module_probe[module]


@torch.compiler.assume_constant_result
def _probe_module(module: str) -> Optional[str]:
    try:
        importlib.import_module(f"gptfast.ops.{module}")
    except Exception as exc:  # noqa: BLE001 - a broken kernel module means: use the reference
        return f"{module} failed to import: {type(exc).__name__}: {exc}"
    return None


def import_source_package(name: str, folder: str):
    """gptfast.<name>, installed (setup.py maps the top-level <folder>/ to it), or from the
    source tree when gptfast runs from a checkout that is not installed: the folder beside
    gptfast/ is registered under its installed name, so relative imports and Triton's source
    lookup both work."""
    full = f"gptfast.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, folder, "__init__.py")
    if not os.path.exists(path):
        raise ModuleNotFoundError(f"{full} is not installed and {path} does not exist")
    spec = importlib.util.spec_from_file_location(full, path, submodule_search_locations=[os.path.dirname(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


_PACKAGE = sys.modules[__package__]  # gptfast.ops, in sys.modules while it imports this file


def kernel_module(module: str):
    """The imported wiring module (call after module_missing_reason returned None).

    An attribute read of the package traces under torch.compile(fullgraph=True);
    importlib.import_module would break the graph.
    """
    return getattr(_PACKAGE, module)


def triton_device_reason(*tensors) -> Optional[str]:
    """Why a Triton kernel cannot run on these tensors, or None.

    Kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1
    (how CI tests them). "auto" never picks the interpreter: see ``use_kernel``.
    """
    reason = triton_missing_reason()
    if reason:
        return reason
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpret():
            continue
        return f"tensor on {t.device.type} (Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 for CPU)"
    return None


def triton_probe(module: str) -> Optional[str]:
    """Availability of a Triton op family here (for backends()): Triton, its wiring module, a device."""
    reason = triton_missing_reason() or module_missing_reason(module)
    if reason:
        return reason
    if not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA device (Triton kernels need one; TRITON_INTERPRET=1 runs them on CPU for tests)"
    return None


def register(op: str, implementation: str, probe: Callable[[], Optional[str]],
             ready: Optional[Callable[[], str]] = None) -> None:
    """Declare an op's fast implementation and a probe of whether it exists here; ready(),
    when given, says how it runs here when it is available (for backends())."""
    _REGISTRY[op] = (implementation, probe, ready)


# Why "auto" does not run a kernel it could run under the Triton interpreter (a test tool)
INTERPRETER_REASON = "Triton interpreter on CPU tensors (ask for backend='kernel' to run it)"


def use_kernel(op: str, backend: Optional[str], reason: Optional[str], *, interpreted: bool = False) -> bool:
    """Decide whether this call runs the fast implementation.

    reason: why the kernel cannot run on these inputs (None if it can).
    interpreted: the kernel would run under the Triton CPU interpreter; "auto"
    prefers the reference then (the interpreter is a test tool, not a fast path).
    """
    mode = current_backend(backend)
    if mode == "torch":
        return False
    if reason is None and mode == "auto" and interpreted:
        reason = INTERPRETER_REASON
    if reason is None:
        return True
    if mode == "kernel":
        raise KernelUnavailable(f"ops.{op}: backend='kernel' cannot run here: {reason}")
    log_once(op, "gptfast: ops.%s falls back to the PyTorch reference: %s", op, reason)
    return False


# Set on the log record of every fallback line (what fallbacks_logged collects)
_FALLBACK_RECORD = "gptfast_fallback"


def log_once(key: str, message: str, *args) -> None:
    """Log a fallback's warning the first time its key is seen.

    A fallback chosen while torch.compile traces is logged too, once, as the trace reaches it,
    with no graph break: Dynamo hands the call to a non-strict trace (plain Python). On a torch
    without torch._dynamo.nonstrict_trace it is skipped inside a trace (logging there would
    break the graph); the eager call before compiling, or `gptfast backends`, says why then.
    """
    if not _compiling():
        _log_first(key, message, *args)
    elif _log_first_traced is not None:
        _log_first_traced(key, message, *args)


def _log_first(key: str, message: str, *args) -> int:
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        logger.warning(message, *args, extra={_FALLBACK_RECORD: True})
    return 0  # a non-strict trace needs an output it can put in a graph (None is not one)


_nonstrict_trace = getattr(getattr(torch, "_dynamo", None), "nonstrict_trace", None)
_log_first_traced = _nonstrict_trace(_log_first) if _nonstrict_trace is not None else None


class _FallbackLines(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, _FALLBACK_RECORD, False):  # log_once: an op's (or the patch's) fallback
            self.lines.append(record.getMessage().removeprefix("gptfast: "))


_fallbacks_shown: set = set()  # the fallback lines this process has let through to the terminal


@contextlib.contextmanager
def fallbacks_logged():
    """The fallback lines gptfast logs inside the block, as a list filled as they come. Each
    fallback logs here again, whatever logged it before (log_once's memory starts empty in the
    block and keeps what it had after), so each block (a benchmark provider's run) says what ran
    instead; the terminal still sees each line once."""
    global _fallback_logged
    lines: list = []
    handler, before, propagate = _FallbackLines(lines), _fallback_logged, logger.propagate
    _fallback_logged = set()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        _fallback_logged = before | _fallback_logged
        for line in dict.fromkeys(lines):
            if line not in _fallbacks_shown:
                _fallbacks_shown.add(line)
                logger.warning("gptfast: %s", line)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def backends() -> dict[str, dict[str, object]]:
    """Per op: the fast implementation, whether it is available here, and why not."""
    cuda = torch.cuda.is_available()
    setting = current_backend()
    report = {}
    for op, (impl, probe, ready) in sorted(_REGISTRY.items()):
        reason = probe()
        if reason is None and ready is not None:
            reason_text = ready()
        elif reason is None and "Triton" in impl and not cuda:
            reason_text = ("ready under TRITON_INTERPRET (CPU tensors: backend='kernel' runs the interpreter; "
                           "'auto' runs the PyTorch reference)")
        else:
            reason_text = reason or "ready"
        if reason is None and setting == "torch":
            reason_text += "; not used: the backend setting is 'torch' (use_backend / GPTFAST_BACKEND)"
        report[op] = {
            "implementation": impl,
            "available": reason is None,
            "reason": reason_text,
            "fallback": "PyTorch reference",
        }
    report["_device"] = {
        "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": setting,
        "torch": torch.__version__,
    }
    return report
