"""Shared test setup: the Triton interpreter on CPU-only machines, the gpu marker, HF fixtures."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter (how CI tests them).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interpreter_rounds_bf16_to_nearest():
    """Make the Triton interpreter narrow fp32 to bf16 as a GPU does.

    The interpreter (Triton 3.6 to 3.9 at least) narrows fp32 to bf16 by dropping the low 16
    bits: round toward zero, up to 1 ulp off. A GPU rounds to nearest even (cvt.rn.bf16.f32), as
    torch does. Every bf16 output of a kernel goes through that cast, so under the unpatched
    interpreter a bf16 kernel carries twice the output rounding error it has on a GPU. The
    "at most 2x PyTorch's error" rule then passes or fails by the luck of the inputs: with
    torch 2.11's bf16 randn, the attention and decode tests failed on CPU.
    The interpreter's cast is wrapped here for fp32 -> bf16 only (explicit casts, implicit
    casts on store, bf16 constants). tests/test_triton_rounding.py checks that it took (and,
    on a GPU, that the hardware cast is the same)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton: the kernel tests skip themselves
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None or getattr(cast, "gptfast_rne", False):
        return  # a Triton laid out otherwise: tests/test_triton_rounding.py says so

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.asarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32)
            # round half to even on the 16 bits dropped; overflow carries into the exponent (inf)
            narrowed = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            quiet_nan = ((bits >> 16) | np.uint32(0x40)).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(x), quiet_nan, narrowed), dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl.gptfast_rne = True
    builder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Each test starts from a seed of its own id: fresh inputs per test, yet the same ones
    whatever runs before it (pytest-xdist hands tests to workers in no fixed order), so a failure
    on the GPU machine reproduces with the test alone. Tests that seed themselves still do."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _backend_setting_stays_in_its_test():
    """A test that sets the backend (gptfast.use_backend as a setter, or `gptfast ... --backend`
    run in-process) leaves the next tests the setting it found."""
    from gptfast.ops import _dispatch

    saved = _dispatch._override[0]
    yield
    _dispatch._override[0] = saved


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def forbid_host_reads():
    """A context manager: inside it, reading a tensor's values on the host (item, tolist,
    bool/int/float/index of a tensor, nonzero, cpu, numpy) raises, and the samplers skip their
    host-side checks as under CUDA-graph capture. The CPU stand-in for a capture of a step that
    must not sync (torch.cuda.set_sync_debug_mode("error") needs a GPU)."""
    import contextlib
    from unittest import mock

    from gptfast.ops import _sampling_ext, sampling

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host read of a tensor ({name}) inside a step that a CUDA graph captures")
        return method

    @contextlib.contextmanager
    def forbid():
        names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(mock.patch.object(torch.Tensor, name, refuse(name)))
            for module in (sampling, _sampling_ext):
                stack.enter_context(mock.patch.object(module, "host_checks_allowed", lambda logits: False))
            yield
    return forbid
