"""Triton kernel: the cross-entropy of a chunk of logits and, in the same call, its gradient
written over the logits. The inner step of ops.linear_cross_entropy (gptfast/ops/cross_entropy.py).

Launcher and torch.library registration: gptfast/ops/_cross_entropy_triton.py; design notes and
what to measure: kernels/CROSS_ENTROPY_NOTES.md.

One program per row of logits [M, V] (any float dtype, read as fp32):
  pass 1: the row's log-sum-exp, online over blocks of BLOCK_V (running max, rescaled sum,
          in base 2: exp2 is the hardware instruction);
  loss:   lse - logit[target] in fp32, 0 where the target is ignore_index, NaN where the
          target is outside [0, V) (nothing checks it on the host: that would sync);
  pass 2: (WRITE_GRAD) softmax - one-hot(target), the gradient of the row's loss, stored over
          the logits in their dtype; zeros for an ignored row, so the caller can sum the rows
          for the bias gradient and run the matmuls without masking.
On a GPU the launcher runs the autotuned variant (block width x warps, keyed on V and
WRITE_GRAD; the autotuner restores the logits between its timing runs, since the kernel
writes over them); under the interpreter, a small fixed block.
The PyTorch chunk (logsumexp, gather, sub_, exp_, scatter_add_, and the casts to fp32 and
back) reads and writes the [M, V] block about six times; this reads it twice and writes it
once, and the second read of a row mostly hits L2 (one 100 KB row per program).
"""
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def cross_entropy_fwd_grad_kernel(
    LOGITS,  # [M, V] logits, row stride stride_l; overwritten by the gradient if WRITE_GRAD
    TARGETS,  # [M] int32 / int64 class indices
    LOSS,  # [M] fp32 out: the row's loss
    M, V, stride_l, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_l
    target = tl.load(TARGETS + row)  # in its own dtype: an int64 past 2^31 must not wrap into range
    cols = tl.arange(0, BLOCK_V)

    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)  # running max, in log2 units
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)  # sum of 2^(x - m) so far
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32) * _LOG2E
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # -inf while every logit so far is -inf (a masked vocabulary): rescale by 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe), axis=0)
        m = m_new
    lse2 = m + tl.log2(s)

    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    target = tl.where(valid & in_range, target, -1).to(tl.int32)  # -1: no column is the target
    x_t = tl.load(base + target, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = lse2 * _LN2 - x_t
    loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(LOSS + row, loss)

    if WRITE_GRAD:
        keep = valid.to(tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            p = tl.exp2(x * _LOG2E - lse2)
            g = (p - tl.where(c == target, 1.0, 0.0)) * keep
            tl.store(base + c, g.to(LOGITS.dtype.element_ty), mask=c < V)


# (BLOCK_V, num_warps): 4 to 16 fp32 values per thread per step; wide blocks mean fewer
# serial steps over a 50257-wide row, narrow ones more rows resident per SM.
CONFIGS = [triton.Config({"BLOCK_V": b}, num_warps=w) for b, w in
           ((1024, 4), (2048, 4), (4096, 8), (4096, 16), (8192, 16), (16384, 32))]


def _prune(configs, named_args, **kwargs):
    """Blocks no wider than the row needs (the narrowest config always stays)."""
    width = max(1024, triton.next_power_of_2(named_args["V"]))
    return [c for c in configs if c.kwargs["BLOCK_V"] <= width] or configs[:1]


cross_entropy_fwd_grad_autotuned = triton.autotune(
    CONFIGS, key=["V", "WRITE_GRAD"], restore_value=["LOGITS"],
    prune_configs_by={"early_config_prune": _prune})(cross_entropy_fwd_grad_kernel)
