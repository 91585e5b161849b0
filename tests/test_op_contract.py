"""What every op of gptfast.ops is checked for, from its OpSpec (tests/op_harness.py)."""
import logging

import pytest
import torch

from gptfast import ops
from gptfast.ops import _dispatch

from op_harness import SPECS

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def _params(numeric_only=True, gpu_shapes=True, dtypes=True):
    out = []
    for spec in SPECS.values():
        if numeric_only and not spec.numeric:
            continue
        shapes = [(s, ()) for s in spec.shapes]
        if gpu_shapes:
            shapes += [(s, (pytest.mark.gpu,)) for s in spec.gpu_shapes]
        for shape, marks in shapes:
            for dtype in (spec.dtypes if dtypes else spec.dtypes[:1]):
                out.append(pytest.param(spec.name, shape, dtype, marks=marks,
                                        id=f"{spec.name}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}"))
    return out


def _kernel_or_skip(spec):
    reason = _dispatch._REGISTRY[spec.op_name][1]()
    if reason is not None:
        pytest.skip(f"ops.{spec.op_name}'s kernel is not available here: {reason}")


def _fresh(kwargs):
    """The same arguments with each generator reseeded as drawn (a second call draws the same)."""
    return {k: torch.Generator(device=v.device).manual_seed(v.initial_seed()) if isinstance(v, torch.Generator)
            else v for k, v in kwargs.items()}


def _tensors(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _leaves(kwargs, names, dtype=None):
    """kwargs with the named inputs as fresh leaves requiring grad (cast to dtype if given)."""
    out = dict(kwargs)
    for name in names:
        t = kwargs[name].detach()
        out[name] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_()
    return out


def _check(what, got, exact, torch_out, atol):
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    assert got.dtype == torch_out.dtype, f"{what}: dtype {got.dtype}, expected {torch_out.dtype}"
    assert not torch.isnan(got).any(), f"{what}: NaN in the result (an element never written?)"
    err = (got.double() - exact).abs().max().item()
    base = (torch_out.double() - exact).abs().max().item()
    tol = 2 * base + atol * max(1.0, exact.abs().max().item())
    assert err <= tol, f"{what}: kernel error {err:.3g} > 2 x PyTorch's {base:.3g} + {atol:g} x max|ref|"


@pytest.mark.parametrize("name,shape,dtype", _params())
def test_kernel_within_twice_pytorchs_error(name, shape, dtype, monkeypatch):
    spec = SPECS[name]
    _kernel_or_skip(spec)
    if spec.poison is not None:
        spec.poison(monkeypatch)
    kwargs = spec.inputs(shape, dtype, DEV)
    op, reference = getattr(ops, spec.op_name), getattr(ops, f"{spec.op_name}_reference")
    runs = {"kernel": _leaves(kwargs, spec.grads), "torch": _leaves(kwargs, spec.grads),
            "exact": _leaves(kwargs, spec.grads, torch.float64)}
    for k, v in list(runs["exact"].items()):  # every floating input in float64 for the exact run
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in spec.grads:
            runs["exact"][k] = v.double()
    outs = {"kernel": _tensors(op(**runs["kernel"], **spec.kernel_kwargs, backend="kernel")),
            "torch": _tensors(reference(**runs["torch"])), "exact": _tensors(reference(**runs["exact"]))}
    assert len(outs["kernel"]) == len(outs["exact"]), "the kernel returns another number of outputs"
    atol = spec.atol[dtype]
    for i, (got, exact, base) in enumerate(zip(outs["kernel"], outs["exact"], outs["torch"])):
        _check(f"{name} output {i}", got, exact, base, atol)
    if not spec.grads:
        return
    upstream = [torch.randn_like(o, dtype=torch.float64) for o in outs["exact"]]  # fresh gradients
    grads = {}
    for run in ("kernel", "torch", "exact"):
        dys = [g.to(o.dtype) for g, o in zip(upstream, outs[run])]
        grads[run] = torch.autograd.grad(outs[run], [runs[run][n] for n in spec.grads], dys)
    for n, got, exact, base in zip(spec.grads, grads["kernel"], grads["exact"], grads["torch"]):
        _check(f"{name} d{n}", got, exact, base, atol)


@pytest.mark.parametrize("name", list(SPECS))
def test_torch_backend_is_the_reference_bit_for_bit(name):
    spec = SPECS[name]
    kwargs = spec.inputs(spec.shapes[0], spec.dtypes[0], DEV)
    got = _tensors(getattr(ops, spec.op_name)(**_fresh(kwargs), backend="torch"))
    want = _tensors(getattr(ops, f"{spec.op_name}_reference")(**_fresh(kwargs)))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), f"{name}(backend='torch') differs from ops.{spec.op_name}_reference"


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.numeric])
def test_traces_fullgraph(name):
    """torch.compile(fullgraph=True) through the kernel: registered custom ops, no graph break
    (backend "eager": the trace is what is checked, kept fast)."""
    spec = SPECS[name]
    _kernel_or_skip(spec)
    torch._dynamo.reset()
    kwargs = spec.inputs(spec.shapes[0], spec.dtypes[0], DEV)
    op = getattr(ops, spec.op_name)

    def call(**kw):
        return op(**kw, **spec.kernel_kwargs, backend="kernel")
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    for a, b in zip(_tensors(compiled(**kwargs)), _tensors(call(**kwargs)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.fallback_dtype is not None])
def test_auto_falls_back_and_says_why_once(name, monkeypatch, caplog):
    spec = SPECS[name]
    monkeypatch.setattr(_dispatch, "_fallback_logged", set())
    kwargs = spec.inputs(spec.shapes[0], spec.fallback_dtype, DEV)
    op, reference = getattr(ops, spec.op_name), getattr(ops, f"{spec.op_name}_reference")
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        for _ in range(2):
            got = _tensors(op(**kwargs, backend="auto"))
    lines = [r.getMessage() for r in caplog.records if f"ops.{spec.op_name} falls back" in r.getMessage()]
    assert len(lines) == 1, lines
    for a, b in zip(got, _tensors(reference(**kwargs)), strict=True):
        assert torch.equal(a, b)


def test_every_registered_op_has_a_spec():
    """A new op registered with _dispatch.register without an OpSpec fails here: add one to
    tests/op_harness.py and it gets the tests above."""
    missing = sorted(set(_dispatch._REGISTRY) - {s.op_name for s in SPECS.values()})
    assert not missing, f"ops without an OpSpec in tests/op_harness.py: {missing}"
    for spec in SPECS.values():
        op = spec.op_name
        assert callable(getattr(ops, op)) and callable(getattr(ops, f"{op}_reference")), spec.name


def _strided(t):
    """t's values in a view with stride 2 in its last dim; the elements between are poison (NaN,
    or an index far out of range), so a kernel that assumes unit stride reads them."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    poison = torch.full_like(t, float("nan") if t.is_floating_point() else 10 ** 6)
    return torch.stack([t, poison], -1).flatten(-2)[..., ::2]


@pytest.mark.parametrize("name", list(SPECS))
def test_strided_inputs_give_the_contiguous_result(name):
    """Every tensor argument as a non-contiguous view (stride 2, poison between): the kernel
    gives what it gives on contiguous inputs, outputs and gradients."""
    spec = SPECS[name]
    _kernel_or_skip(spec)
    kwargs = spec.inputs(spec.shapes[-1], torch.float32, DEV)
    op = getattr(ops, spec.op_name)
    results = []
    for layout in (lambda t: t, _strided):
        args = {k: layout(v) for k, v in _fresh(kwargs).items()}
        for g in spec.grads:  # leaves in that layout (a clone would make them contiguous)
            args[g] = layout(kwargs[g].detach()).requires_grad_()
        out = _tensors(op(**args, **spec.kernel_kwargs, backend="kernel"))
        grads = []
        if spec.grads:
            torch.manual_seed(0)
            loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64, device=o.device)).sum() for o in out)
            grads = list(torch.autograd.grad(loss, [args[g] for g in spec.grads]))
        results.append(out + grads)
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} result {i} on strided inputs")
