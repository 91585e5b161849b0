"""Dispatch: use_backend as a decorator, TRITON_INTERPRET read as Triton reads it, a backends()
report that says what "auto" runs here, and imports that never touch CUDA."""
import os
import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast.ops import _dispatch


def test_use_backend_as_a_decorator_sets_the_backend_inside_each_call_only():
    """ContextDecorator use: the setting held from the decoration on (the decorator's
    construction set it globally) and, after the first call returned, no more inside later calls."""
    assert _dispatch.current_backend() == "auto"
    try:
        @gptfast.use_backend("torch")
        def inside():
            return _dispatch.current_backend()

        assert _dispatch.current_backend() == "auto"  # decorating changed nothing
        assert [inside(), inside()] == ["torch", "torch"]
        assert _dispatch.current_backend() == "auto"
        with gptfast.use_backend("kernel"):
            assert inside() == "torch" and _dispatch.current_backend() == "kernel"
        assert _dispatch.current_backend() == "auto"

        @gptfast.use_backend("kernel")
        def recursive(n):
            return [_dispatch.current_backend()] + (recursive(n - 1) if n else [])

        with gptfast.use_backend("torch"):
            assert recursive(2) == ["kernel"] * 3 and _dispatch.current_backend() == "torch"
        cm = gptfast.use_backend("torch")  # one object entered twice
        with cm:
            assert _dispatch.current_backend() == "torch"
        assert _dispatch.current_backend() == "auto"
        with cm:
            assert _dispatch.current_backend() == "torch"
        assert _dispatch.current_backend() == "auto"
    finally:
        gptfast.use_backend(None)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "On", "yes", "0", "false", "FALSE", "off", "no", "2", " 1"])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """TRITON_INTERPRET=off (or no, FALSE, 2) is off for Triton, which then compiles for a GPU;
    gptfast took it as on (kernels on CPU tensors, 'ready (TRITON_INTERPRET)' in backends)."""
    knobs = getattr(pytest.importorskip("triton"), "knobs", None)
    if knobs is None:
        pytest.skip("this Triton has no knobs module (older Triton reads only TRITON_INTERPRET=1)")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _dispatch.triton_interpret() == bool(knobs.runtime.interpret), value


def test_backends_say_what_auto_runs_under_the_interpreter(monkeypatch):
    """On CPU under TRITON_INTERPRET=1 "auto" runs the references (the interpreter is a test
    tool); the report said 'ready (TRITON_INTERPRET)' as if the kernels ran."""
    if torch.cuda.is_available():
        pytest.skip("reports the CUDA kernels on a GPU machine")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("GPTFAST_BACKEND", raising=False)
    report = gptfast.backends()
    for op in ("attention", "decode_attention", "layer_norm", "bias_gelu", "linear_bias_gelu"):
        assert report[op]["available"], report[op]
        assert "backend='kernel' runs the interpreter; 'auto' runs the PyTorch reference" in report[op]["reason"]
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    assert not _dispatch.use_kernel("attention", None, None, interpreted=True)  # what the report says
    monkeypatch.delenv("TRITON_INTERPRET")
    report = gptfast.backends()
    assert not report["attention"]["available"] and "no CUDA device" in report["attention"]["reason"]


def test_backends_say_when_the_setting_keeps_a_kernel_unused(monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "torch")
    report = gptfast.backends()
    assert report["_device"]["backend"] == "torch"
    for op, entry in report.items():
        if op != "_device" and entry["available"]:
            assert entry["reason"].endswith("not used: the backend setting is 'torch' (use_backend / GPTFAST_BACKEND)")
    monkeypatch.delenv("GPTFAST_BACKEND")
    assert not any("not used" in e["reason"] for k, e in gptfast.backends().items() if k != "_device")


_NO_CUDA = r"""
import importlib, sys, torch
calls = []
def refuse(name):
    def f(*a, **k):
        calls.append(name)
        raise RuntimeError("torch.cuda." + name)
    return f
for name in ("is_available", "device_count", "get_device_name", "get_device_properties", "current_device",
             "init", "_lazy_init", "get_device_capability", "synchronize", "set_device", "mem_get_info",
             "is_bf16_supported", "current_stream", "get_arch_list"):
    setattr(torch.cuda, name, refuse(name))
for m in sys.argv[1:]:
    importlib.import_module(m)
import gptfast
gptfast.GPT, gptfast.Tokenizer, gptfast.patch_transformers
assert not torch.cuda.is_initialized()
print("calls:", calls)
"""


def test_no_import_touches_cuda(tmp_path):
    """Every module imports with CUDA_VISIBLE_DEVICES garbage and torch.cuda's queries raising."""
    modules = ["gptfast", "gptfast.ops", "gptfast.model", "gptfast.checkpoint", "gptfast.cli", "gptfast.generation",
               "gptfast.speculative", "gptfast.hf_patch", "gptfast.train", "gptfast.finetune", "gptfast.evaluation",
               "gptfast.data", "gptfast.tokenizer", "gptfast.ops._sampling_ext"]
    if _dispatch.triton_missing_reason() is None:
        modules += ["gptfast.ops._attention_triton", "gptfast.ops._norm_triton", "gptfast.ops._cross_entropy_triton"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "garbage,-7"}
    proc = subprocess.run([sys.executable, "-c", _NO_CUDA, *modules], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "calls: []" in proc.stdout, proc.stdout
