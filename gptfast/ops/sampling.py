"""Sampling the next token: temperature -> top-k -> top-p -> min-p -> draw.

Semantics follow Hugging Face transformers' logits warpers (DESIGN.md):
- temperature 0 means greedy (argmax, lowest index on ties);
- top-k keeps every token whose value ties the k-th largest; 0 disables;
- top-p, on the distribution renormalised after top-k, keeps a token when the
  probability mass ranked strictly above it is < p (the top token always
  survives); 1.0 disables;
- min-p removes tokens with probability < min_p * max probability; 0 disables.

Randomness is counter-based, so it needs no host sync, can be captured in a
CUDA graph, and one row's token never depends on its batch-mates: every row has
a 64-bit key, and the uniform for (row, token v) is ``uniform_from_key(key, v)``
(a 32-bit integer hash, below). The draw is the Gumbel-max race
``argmax_v log p_v - log(-log u_v)`` over the kept tokens. The C++/CUDA
extension implements the same hash, so it draws the same tokens from the same
keys up to floating-point rounding.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _dispatch

_M32 = 0xFFFFFFFF
_KEY_SALT = 0x9E3779B9

Param = Union[float, int, torch.Tensor]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_from_key(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), float32, shape [B, vocab], from int64 row keys [B].

    u = ((h >> 9) + 0.5) / 2^23 with h = mix(mix(v ^ kk) ^ k1) and
    kk = mix(k0 ^ mix(k1 ^ SALT)), k0/k1 the low/high 32 bits of the key.
    Every value is exact in float32 and strictly inside (0, 1).
    """
    keys = keys.to(torch.int64)
    k0 = (keys & _M32).view(-1, 1)
    k1 = ((keys >> 32) & _M32).view(-1, 1)
    kk = _mix32(k0 ^ _mix32(k1 ^ _KEY_SALT))
    v = torch.arange(vocab, device=keys.device, dtype=torch.int64).view(1, -1)
    h = _mix32(_mix32(v ^ kk) ^ k1)
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def row_keys(batch: int, generator, device) -> torch.Tensor:
    """int64 keys [B] for a call: from a key tensor, a torch.Generator, or torch's RNG."""
    source = getattr(generator, "device", None)
    if (source is not None and source.type != "cuda" and torch.device(device).type == "cuda"
            and torch.cuda.is_current_stream_capturing()):
        # A CPU draw (or copy) would run once, at capture: every replay would reuse its keys.
        raise ValueError(f"generator must be on the logits' device {device} while a CUDA graph captures "
                         f"the call (a CUDA torch.Generator, a CUDA key tensor, or None), got one on {source}")
    if isinstance(generator, torch.Tensor):
        if generator.dtype != torch.int64 or tuple(generator.shape) != (batch,):
            raise ValueError(f"generator as a key tensor must be int64 of shape ({batch},), "
                             f"got {generator.dtype} {tuple(generator.shape)}")
        return generator.to(device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None, a torch.Generator or an int64 key tensor, "
                        f"got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else device
    keys = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=generator,
                         device=gen_device, dtype=torch.int64)
    return keys.to(device)


def _as_row_param(name: str, value: Param, batch: int, device, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [B]=[{batch}], "
                             f"got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((batch,), value, device=device, dtype=dtype)


def _check_range(name: str, t: torch.Tensor, ok_fn, expected: str, scalar: Param, check_values: bool):
    # Python scalars are checked in Python, without making a tensor (so a captured step can
    # pass them). Tensors need one host sync, so only in eager mode (check_values=False while
    # tracing with torch.compile or capturing a CUDA graph).
    if not isinstance(scalar, torch.Tensor):
        if not ok_fn(scalar):
            raise ValueError(f"{name} must be {expected}, got {scalar}")
        return
    if not check_values:
        return
    bad = (~ok_fn(t)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"{name} must be {expected}, got {t[row].item()} in row {row}")


def _isfinite(a):
    return torch.isfinite(a) if isinstance(a, torch.Tensor) else math.isfinite(a)


def check_logits(logits) -> None:
    """The checks of logits' type, shape and dtype, which need no host sync."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be fp16, bf16, fp32 or fp64, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")


def check_sample_args(logits, temperature, top_k, top_p, min_p, check_values: bool = True):
    """Validate and broadcast the arguments; returns per-row tensors (t, k, p, m).

    check_values=False skips the value checks of tensor arguments (they sync with
    the host): for torch.compile tracing and CUDA-graph capture.
    """
    check_logits(logits)
    batch, vocab = logits.shape
    dev = logits.device
    t = _as_row_param("temperature", temperature, batch, dev, torch.float32)
    k = _as_row_param("top_k", top_k, batch, dev, torch.int64)
    p = _as_row_param("top_p", top_p, batch, dev, torch.float32)
    m = _as_row_param("min_p", min_p, batch, dev, torch.float32)
    if isinstance(top_k, float) or (isinstance(top_k, torch.Tensor) and top_k.is_floating_point()):
        raise TypeError(f"top_k must be an integer, got {top_k!r}")
    _check_range("temperature", t, lambda a: (a >= 0) & _isfinite(a), ">= 0 and finite", temperature,
                 check_values)
    _check_range("top_k", k, lambda a: a >= 0, ">= 0 (0 disables)", top_k, check_values)
    _check_range("top_p", p, lambda a: (a > 0) & (a <= 1), "in (0, 1] (1.0 disables)", top_p, check_values)
    _check_range("min_p", m, lambda a: (a >= 0) & (a <= 1), "in [0, 1] (0 disables)", min_p, check_values)
    return t, k, p, m


def check_logits_rows(logits: torch.Tensor) -> None:
    """NaN rows and rows with no finite logit are errors naming the row (one host sync)."""
    nan_rows = torch.isnan(logits).any(dim=-1)
    empty_rows = ~torch.isfinite(logits).any(dim=-1) if logits.is_floating_point() else nan_rows
    bad = (nan_rows | empty_rows).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        what = "NaN" if bool(nan_rows[row]) else "no finite value (all -inf/inf)"
        raise ValueError(f"logits row {row} contains {what}; cannot sample from it")


def host_checks_allowed(logits: torch.Tensor) -> bool:
    """Whether this call may read values on the host (value checks, skipping unused filters).

    Not while torch.compile traces or a CUDA graph captures: such a call trusts its inputs
    (a NaN row then yields some in-range token instead of an error) and runs every filter.
    """
    if torch.compiler.is_compiling():
        return False
    if logits.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def filter_logits(logits, t, k, p, m, skip_unused: bool = True) -> torch.Tensor:
    """The filtered, temperature-scaled logits (removed tokens at -inf), fp32 or fp64.

    Rows with temperature 0 are scaled by 1 here; the caller takes their argmax.
    skip_unused: skip a filter no row uses (one host sync each); False runs them all,
    which gives the same result (a disabled row keeps every token) without syncing.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[-1]
    x = logits.to(acc) / torch.where(t > 0, t, torch.ones_like(t)).to(acc).unsqueeze(-1)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=x.device)
    # top-k: keep values >= the k-th largest (ties kept)
    if not skip_unused or bool((k > 0).any()):
        k_eff = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
        sorted_desc = x.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(-1, (k_eff - 1).unsqueeze(-1))
        x = torch.where(x < kth, neg_inf, x)
    # top-p on the renormalised distribution: keep when the mass of strictly more
    # probable tokens is < p. Ties share the mass above the first of their group, so
    # the result does not depend on how the sort orders equal probabilities.
    if not skip_unused or bool((p < 1).any()):
        probs = torch.softmax(x, dim=-1)
        sp, sidx = probs.sort(dim=-1, descending=True)
        above = torch.cat([torch.zeros_like(sp[:, :1]), sp.cumsum(dim=-1)[:, :-1]], dim=-1)
        pos = torch.arange(vocab, device=x.device).expand_as(sp)
        group_start = torch.ones_like(sp, dtype=torch.bool)
        group_start[:, 1:] = sp[:, 1:] != sp[:, :-1]
        first = torch.where(group_start, pos, torch.zeros_like(pos)).cummax(dim=-1).values
        above = above.gather(-1, first)
        remove_sorted = (above >= p.to(acc).unsqueeze(-1)) & (p < 1).unsqueeze(-1)
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sidx, remove_sorted)
        x = torch.where(remove, neg_inf, x)
    # min-p relative to the most likely token
    if not skip_unused or bool((m > 0).any()):
        probs = torch.softmax(x, dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * m.to(acc).unsqueeze(-1)
        x = torch.where(probs < floor, neg_inf, x)
    return x


def sample_reference(logits, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
                     min_p: Param = 0.0, generator=None, return_probs: bool = False):
    """Pure-PyTorch sampler: the fallback and the oracle of the extension.

    Host syncs (value checks, skipped filters) happen only in eager calls, so a CUDA graph
    can capture it and torch.compile traces it whole (see host_checks_allowed).
    """
    eager = host_checks_allowed(logits)
    t, k, p, m = check_sample_args(logits, temperature, top_k, top_p, min_p, check_values=eager)
    if eager:
        check_logits_rows(logits)
    batch, vocab = logits.shape
    keys = row_keys(batch, generator, logits.device)
    x = filter_logits(logits, t, k, p, m, skip_unused=eager)
    logp = torch.log_softmax(x, dim=-1)
    u = uniform_from_key(keys, vocab).to(logp.dtype)
    drawn = (logp - torch.log(-torch.log(u))).argmax(dim=-1)
    # A +inf in x (a +inf logit, or one that overflowed at this temperature) makes logp NaN:
    # take the first +inf, as the extension does.
    drawn = torch.where(torch.isposinf(x).any(dim=-1), x.argmax(dim=-1), drawn)
    greedy = logits.argmax(dim=-1)
    tokens = torch.where(t > 0, drawn, greedy)
    if return_probs:
        return tokens, logp.exp().to(torch.float32)
    return tokens


_EXT = "_sampling_ext"  # gptfast/ops/_sampling_ext.py: wiring of the gptfast._C extension


def _kernel_reason(logits) -> Optional[str]:
    return _dispatch.module_missing_reason(_EXT) or _dispatch.kernel_module(_EXT).unsupported_reason(logits)


def sample(logits, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
           generator=None, return_probs: bool = False, backend: Optional[str] = None):
    """Next tokens [B] int64 from logits [B, V]; see the module docstring.

    temperature/top_k/top_p/min_p: scalars or per-row [B] tensors.
    generator: None (torch's RNG), a torch.Generator, or int64 row keys [B].
    return_probs: also return the filtered probabilities [B, V] (fp32).
    """
    check_logits(logits)  # before dispatch: a bad argument is an error, not the op's one fallback line
    reason = _kernel_reason(logits)
    if _dispatch.use_kernel("sample", backend, reason):
        return _dispatch.kernel_module(_EXT).sample(logits, temperature, top_k, top_p, min_p, generator, return_probs)
    return sample_reference(logits, temperature, top_k, top_p, min_p, generator, return_probs)


def _probe() -> Optional[str]:
    return _dispatch.module_missing_reason(_EXT) or _dispatch.kernel_module(_EXT).extension_missing_reason()


_dispatch.register("sample", "C++/CUDA extension gptfast._C", _probe)
