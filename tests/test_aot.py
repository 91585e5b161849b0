"""Every Triton kernel compiles for the H100 (sm_90) with the installed Triton, no GPU needed.

The CPU tests run the kernels under TRITON_INTERPRET=1, which catches no compile errors
(tl.dot shape/dtype rules, layouts, shared memory, Triton API changes). This runs
kernels/aot_check.py --quick: one representative launch per kernel and dtype, compiled with
triton.compile for sm_90 and checked for errors and shared memory. A subprocess, because
conftest sets TRITON_INTERPRET=1 here, and kernels imported under it cannot be compiled.
.ci/run runs the same check with Triton 3.6 (the GPU machine's).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel",
           "decode_split_kernel", "decode_reduce_kernel", "layer_norm_fwd_kernel", "layer_norm_bwd_kernel",
           "sum_partials_kernel", "bias_gelu_fwd_kernel", "bias_gelu_bwd_kernel", "matmul_bias_gelu_kernel",
           "cross_entropy_fwd_grad_kernel"}


def _missing_reason():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # noqa: BLE001 - no Triton, or no NVIDIA backend in it
        return f"Triton's NVIDIA backend is unavailable: {type(exc).__name__}: {exc}"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = set(os.listdir(bin_dir)) if os.path.isdir(bin_dir) else set()
    if "cuobjdump" not in tools or not tools & {"ptxas", "ptxas-blackwell"}:
        return f"Triton {triton.__version__} ships no ptxas / cuobjdump in {bin_dir}"
    return None


MISSING = _missing_reason()


@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_quick_set_compiles_for_sm90(tmp_path):
    report = tmp_path / "aot.json"
    code = ("import sys; from gptfast.ops._dispatch import import_source_package; "
            "import_source_package('kernels', 'kernels'); from gptfast.kernels import aot_check; "
            f"sys.exit(aot_check.main(['--quick', '--arch', '90', '--json', {str(report)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert {r["kernel"] for r in doc["results"]} == KERNELS
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert 0 < r["regs"] <= 255 and r["smem_bytes"] <= doc["max_shared"], r
    # the TMA variants (Hopper) move their tiles with TMA; the other kernels do not
    tma = {r["kernel"] for r in doc["results"] if r["config"].endswith("tma")}
    assert tma == {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "matmul_bias_gelu_kernel"}
    for r in doc["results"]:
        assert (r["tma_copies"] > 0) == r["config"].endswith("tma"), r


def test_attention_pruner_drops_configs_over_shared_memory():
    """Found by the check: fwd 128 x 128 tiles with 4 stages need 289 KB at D = 128 (the H100
    has 227 KB per block); with 3 stages, 225 KB, they fit. No compile needed."""
    pytest.importorskip("triton")
    from gptfast.ops._dispatch import import_source_package
    import_source_package("kernels", "kernels")
    from gptfast.kernels import attention as K

    def kept(tuner, d):
        configs = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=d, DOT_PRECISION="tf32")
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}

    assert (128, 128, 8, 4) in kept(K.attn_fwd_autotuned, 64)
    assert (128, 128, 8, 4) not in kept(K.attn_fwd_autotuned, 128)
    assert (128, 128, 8, 3) in kept(K.attn_fwd_autotuned, 128)


def test_tma_box_rules_and_the_placeholder():
    """Triton encodes every host descriptor argument at each launch with cuTensorMapEncodeTiled,
    even one the kernel's config leaves unused; that refuses boxes over 256 or whose inner dim is
    not a multiple of 16 bytes. The check (run on every compiled build) and the placeholder the
    launchers give unused descriptors follow that rule. No compile needed."""
    pytest.importorskip("triton")
    from gptfast.ops._dispatch import import_source_package
    import_source_package("kernels", "kernels")
    from gptfast.kernels import aot_check, tma_placeholder_block
    assert aot_check.tma_box_error([1, 1, 1, 1], 2) == \
        "box [1, 1, 1, 1]: the inner dim is 2 bytes, not a multiple of 16"
    assert "1..256" in aot_check.tma_box_error([512, 64], 2)
    assert aot_check.tma_box_error([1, 1, 128, 64], 2) == "" and aot_check.tma_box_error([128, 16], 2) == ""
    for rank in (2, 4):
        for size in (1, 2, 4, 8):
            block = tma_placeholder_block(rank, size)
            assert len(block) == rank and aot_check.tma_box_error(block, size) == "", (rank, size, block)
