"""Shared test setup: the Triton interpreter on CPU-only machines, the gpu marker, HF fixtures."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter (how CI tests them).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
