"""End-to-end cases: greedy generation and a training step, random-init weights (no downloads).

Generation (tokens/s, ms per token, decode ms per token, prefill ms): gptfast.GPT.generate
vs transformers' GPT2LMHeadModel.generate vs a static-cache PyTorch loop (reference_model.py),
eager and compiled. Training step (fwd + bwd + AdamW; tokens/s, MFU, peak memory): gptfast.GPT
vs the nanoGPT-style reference, eager and compiled. Both sides use bf16 parameters on CUDA
(fp32 on CPU). MFU divides by the bf16 matmul rate measured at the start of the same run, not
by a datasheet figure. First-call time (compilation, CUDA-graph capture, autotuning) is
reported apart from the timed runs.

Speculative decoding (full runs): GPT-2 1.5B shape drafted by the GPT-2 124M shape, and by prompt
lookup (no draft model; its round is one verification pass). A round's
time does not depend on how many drafts are accepted (static shapes, one graph), so the case
measures the round and the plain decode step and projects the speed at given acceptance rates;
random weights agree too rarely for their own acceptance rate to mean anything (it is reported).
"""
from __future__ import annotations

import statistics
import time

import torch

from . import accounting
from .harness import Case, Provider, RunContext, Skip, left_pads, optional_import

# The CPU cases check the plumbing on a model small enough for a shared CPU; not GPT-2 124M.
CPU_TINY = {"n_layer": 2, "n_head": 2, "n_embd": 128}
# gptfast-no-graph: the same loop with cuda_graph=False (one launch per op), to show the graph's share
# hf-transformers+gptfast: transformers' own model with gptfast.patch_transformers (the drop-in)
GEN_PROVIDERS = ("gptfast", "gptfast-no-graph", "hf-transformers", "hf-transformers+gptfast", "static-cache",
                 "static-cache+compile")
TRAIN_PROVIDERS = ("gptfast", "gptfast+compile", "hf-transformers", "hf-transformers+gptfast", "nanogpt",
                   "nanogpt+compile")


def _gptfast_config(preset: str, overrides=None):
    gptfast, reason = optional_import("gptfast")
    if gptfast is None:
        raise Skip(reason)
    try:
        return gptfast, gptfast.GPTConfig.from_preset(preset, **(overrides or {}))
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"gptfast.GPTConfig.from_preset({preset!r}) failed: {exc}") from None


def _label(preset: str, overrides) -> str:
    if not overrides:
        return preset
    return f"{preset} with " + ", ".join(f"{k}={v}" for k, v in overrides.items())


def _build(kind: str, spec: dict, device, dtype):
    """A random-init model of the spec's shape, built directly on the device."""
    gptfast, config = _gptfast_config(spec["preset"], spec.get("overrides"))
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "gptfast":
            try:
                model = gptfast.GPT(config)
            except Exception as exc:  # noqa: BLE001 - the model is written in parallel; say why
                raise Skip(f"gptfast.GPT could not be built: {type(exc).__name__}: {exc}") from None
        elif kind == "hf":
            transformers, reason = optional_import("transformers")
            if transformers is None:
                raise Skip(reason)
            hf_config = transformers.GPT2Config(  # no dropout, as the other providers
                vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(hf_config)
        else:
            from .reference_model import NanoGPT

            model = NanoGPT.from_gptfast_config(config)
    return model.to(dtype)


def _build_hf(name: str, spec: dict, device, dtype):
    """transformers' GPT2LMHeadModel, patched by gptfast for the "+gptfast" provider."""
    model = _build("hf", spec, device, dtype)
    if name.endswith("+gptfast"):
        import gptfast

        gptfast.patch_transformers(model)
    return model


def _timed(fn, ctx: RunContext) -> float:
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - t0


# ---- generation ------------------------------------------------------------------------------


def _generator(name: str, spec: dict, ctx: RunContext, dtype):
    """-> generate(ids, n, mask) returning [B, T + n] ids, greedy, never stopping early. mask: the
    attention mask of a left-padded batch (1 for real tokens), or None."""
    if name.startswith("gptfast"):
        model = _build("gptfast", spec, ctx.device, dtype).eval()
        # never stop early at a random model's eos, or tokens/s would count tokens not made
        kw = dict(temperature=0.0, ignore_eos=True)
        if name == "gptfast-no-graph":
            kw["cuda_graph"] = False
        return lambda ids, n, mask=None: model.generate(ids, max_new_tokens=n, attention_mask=mask, **kw)
    if name.startswith("hf-transformers"):
        model = _build_hf(name, spec, ctx.device, dtype).eval()

        def hf_generate(ids, n, mask=None):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return hf_generate
    if spec.get("left_padded"):
        raise Skip("the static-cache loop takes no padding mask")
    from .reference_model import decode_one, generate_static

    model = _build("nanogpt", spec, ctx.device, dtype).eval()
    step = decode_one
    if name == "static-cache+compile":
        mode = "reduce-overhead" if ctx.is_cuda else None  # CUDA graphs for the decode step
        step = torch.compile(decode_one, mode=mode, fullgraph=True)
    cache_len = spec["prompt"] + spec["new_tokens"]  # one cache for the N-token and the 1-token runs
    return lambda ids, n, mask=None: generate_static(model, ids, n, step, max_seq_len=cache_len)


def _measure_generation(spec: dict):
    def measure(provider: Provider, ctx: RunContext) -> dict:
        dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
        generate = provider.setup({"spec": spec, "ctx": ctx, "dtype": dtype})
        B, P, N = spec["batch"], spec["prompt"], spec["new_tokens"]
        ids = torch.randint(0, 50000, (B, P), device=ctx.device)
        mask = None
        if spec.get("left_padded"):  # row b left-padded by (b % 4) / 8 of the prompt: prompts of 4 lengths
            mask = (torch.arange(P, device=ctx.device)[None, :] >= left_pads(B, P, ctx.device)[:, None]).long()
            ids = ids * mask
        out = []
        first = _timed(lambda: out.append(generate(ids, N, mask)), ctx)
        if tuple(out[0].shape) != (B, P + N):
            raise RuntimeError(f"expected {B}x{P + N} ids back, got {tuple(out[0].shape)}")
        full = [_timed(lambda: generate(ids, N, mask), ctx) for _ in range(spec["reps"])]
        one = [_timed(lambda: generate(ids, 1, mask), ctx) for _ in range(spec["reps"])]
        t_full, t_one = statistics.median(full), statistics.median(one)
        metrics = {
            "tokens_per_s": B * N / t_full,
            "ms_per_token": t_full / N * 1e3,
            "decode_ms_per_token": (t_full - t_one) / (N - 1) * 1e3 if N > 1 else None,
            "prefill_plus_one_ms": t_one * 1e3,
            "warmup_s": first,
        }
        return {"times_s": full, "metrics": metrics, "first_call_s": first}
    return measure


def _gen_setup(name):
    return lambda a: _generator(name, a["spec"], a["ctx"], a["dtype"])


def _gen_kind(name: str) -> str:
    if name in ("gptfast", "hf-transformers+gptfast"):
        return "gptfast"
    return "reference" if name.startswith("gptfast") else "peer"


def generation_cases(device_kind: str, quick: bool) -> list[Case]:
    if device_kind == "cuda":
        presets = [("gpt2", None)] if quick else [("gpt2", None), ("gpt2-xl", None)]
        prompt, new, reps = (128, 32, 2) if quick else (128, 256, 3)
        batches = (1, 16)
    else:  # CPU: a tiny GPT-2 (the real vocabulary), a short prompt and few tokens
        presets, prompt, new, reps, batches = [("gpt2", CPU_TINY)], 16, 8, 2, (1,)
    runs = [(preset, overrides, B, False) for preset, overrides in presets for B in batches]
    if not quick:  # a batch of prompts of four lengths, left-padded as a tokenizer pads for generate
        runs.append((presets[0][0], presets[0][1], 16 if device_kind == "cuda" else 4, True))
    cases = []
    for preset, overrides, B, padded in runs:
        spec = {"preset": preset, "overrides": overrides, "batch": B, "prompt": prompt,
                "new_tokens": new, "reps": reps}
        if padded:
            spec["left_padded"] = True
        label = _label(preset, overrides)
        providers = [Provider(n, _gen_kind(n), _gen_setup(n), compiled=n.endswith("+compile"))
                     for n in GEN_PROVIDERS]
        cases.append(Case(op="e2e", name=f"generate {label} B={B} prompt={prompt}{' left-padded' if padded else ''}"
                                         f" new={new}",
                          shape=dict(spec, task="generate"), dtype="bf16" if device_kind == "cuda" else "fp32",
                          make_inputs=lambda d: {}, providers=providers,
                          measure=_measure_generation(spec)))
    return cases


# ---- training step -------------------------------------------------------------------------


def _train_step(name: str, spec: dict, ctx: RunContext, dtype):
    kind = "gptfast" if name.startswith("gptfast") else "hf" if name.startswith("hf-") else "nanogpt"
    model = (_build_hf(name, spec, ctx.device, dtype) if kind == "hf" else _build(kind, spec, ctx.device, dtype))
    model.train()
    fwd = torch.compile(model) if name.endswith("+compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.is_cuda)
    B, T = spec["batch"], spec["seq"]
    x = torch.randint(0, 50000, (B, T), device=ctx.device)

    def step():  # as gptfast train computes it: the fused LM head + cross-entropy (targets=)
        if kind == "gptfast":
            loss = fwd(x, targets=x)
        elif kind == "hf":
            loss = fwd(x, labels=x).loss
        else:
            loss = fwd(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())  # without the position table (6N counts matmuls)
    n_params -= model.config.n_positions * model.config.n_embd if kind in ("gptfast", "hf") \
        else model.wpe.weight.numel()
    return step, n_params


def _measure_train(spec: dict):
    def measure(provider: Provider, ctx: RunContext) -> dict:
        dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
        step, n_params = provider.setup({"spec": spec, "ctx": ctx, "dtype": dtype})
        first = _timed(step, ctx)
        _timed(step, ctx)  # the optimizer's state and the second compiled graph settle here
        if ctx.is_cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        times = [_timed(step, ctx) for _ in range(spec["reps"])]
        B, T = spec["batch"], spec["seq"]
        tps = B * T / statistics.median(times)
        _, config = _gptfast_config(spec["preset"], spec.get("overrides"))
        fpt = accounting.train_flops_per_token(n_params, config.n_layer, config.n_head, config.head_dim, T)
        peak = ctx.roofline.get("matmul_tflops")
        metrics = {
            "tokens_per_s": tps, "flops_per_token": fpt, "n_params": n_params,
            "achieved_tflops": tps * fpt / 1e12,
            "mfu_vs_measured_matmul": tps * fpt / (peak * 1e12) if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(ctx.device) / 1e9 if ctx.is_cuda else None,
            "warmup_s": first,
        }
        return {"times_s": times, "metrics": metrics, "first_call_s": first}
    return measure


def _train_setup(name):
    return lambda a: _train_step(name, a["spec"], a["ctx"], a["dtype"])


def training_cases(device_kind: str, quick: bool) -> list[Case]:
    if device_kind == "cuda":
        runs = [("gpt2", None, 8, 1024)] if quick else [("gpt2", None, 16, 1024), ("gpt2-xl", None, 4, 1024)]
        reps = 5 if quick else 10
    else:
        runs, reps = [("gpt2", CPU_TINY, 1, 32)], 2
    cases = []
    for preset, overrides, B, T in runs:
        spec = {"preset": preset, "overrides": overrides, "batch": B, "seq": T, "reps": reps}
        label = _label(preset, overrides)
        providers = [Provider(n, "gptfast" if "gptfast" in n else "peer", _train_setup(n),
                              compiled=n.endswith("+compile")) for n in TRAIN_PROVIDERS]
        cases.append(Case(op="e2e", name=f"train step {label} B={B} T={T} AdamW",
                          shape=dict(spec, task="train"), dtype="bf16" if device_kind == "cuda" else "fp32",
                          make_inputs=lambda d: {}, providers=providers, measure=_measure_train(spec)))
    return cases


# ---- speculative decoding -----------------------------------------------------------------

SPEC_ALPHAS = (0.6, 0.8, 0.9)  # acceptance rates the projection is given at


def expected_tokens_per_round(alpha: float, g: int) -> float:
    """Tokens a round gives when each draft is accepted with probability alpha independently:
    1 + alpha + ... + alpha^g (Leviathan et al. 2023, eq. 1)."""
    return float(g + 1) if alpha >= 1 else (1 - alpha ** (g + 1)) / (1 - alpha)


def _spec_setup(name: str):
    def setup(a):
        spec, ctx, dtype = a["spec"], a["ctx"], a["dtype"]
        model = _build("gptfast", spec, ctx.device, dtype).eval()
        draft = None
        if name.startswith("gptfast-lookup"):
            draft = _gptfast_config(spec["preset"], spec.get("overrides"))[0].PromptLookup()
        elif name != "gptfast":
            draft = _build("gptfast", {"preset": spec["draft_preset"], "overrides": spec.get("draft_overrides")},
                           ctx.device, dtype).eval()

        def generate(ids, n, stats=None):
            return model.generate(ids, max_new_tokens=n, temperature=0.0, ignore_eos=True, draft_model=draft,
                                  num_draft_tokens=spec["draft_tokens"], stats=stats)
        return generate, model
    return setup


def _measure_speculative(spec: dict):
    def measure(provider: Provider, ctx: RunContext) -> dict:
        dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
        generate, model = provider.setup({"spec": spec, "ctx": ctx, "dtype": dtype})
        B, P, N, g = spec["batch"], spec["prompt"], spec["new_tokens"], spec["draft_tokens"]
        ids = torch.randint(0, 50000, (B, P), device=ctx.device)
        first = _timed(lambda: generate(ids, N), ctx)
        stats = {}
        full = [_timed(lambda: generate(ids, N, stats), ctx) for _ in range(spec["reps"])]
        one = [_timed(lambda: generate(ids, 1), ctx) for _ in range(spec["reps"])]
        t_full, t_one = statistics.median(full), statistics.median(one)
        metrics = {"tokens_per_s": B * N / t_full, "ms_per_token": t_full / N * 1e3, "warmup_s": first}
        if provider.name == "gptfast":
            metrics["decode_ms_per_token"] = (t_full - t_one) / (N - 1) * 1e3
        else:
            step = [_timed(lambda: model.generate(ids, max_new_tokens=N, temperature=0.0, ignore_eos=True), ctx)
                    for _ in range(spec["reps"])]
            step_ms = (statistics.median(step) - t_one) / (N - 1) * 1e3  # the model's plain decode step
            round_ms = (t_full - t_one) / stats["rounds"] * 1e3
            metrics.update(round_ms=round_ms, plain_step_ms=step_ms, round_over_step=round_ms / step_ms,
                           draft_tokens=g, acceptance_rate_random_weights=stats["acceptance_rate"])
            for alpha in SPEC_ALPHAS:
                metrics[f"projected_speedup_at_acceptance_{alpha}"] = \
                    expected_tokens_per_round(alpha, g) * step_ms / round_ms
        return {"times_s": full, "metrics": metrics, "first_call_s": first}
    return measure


def speculative_cases(device_kind: str, quick: bool) -> list[Case]:
    if device_kind == "cuda":
        if quick:
            return []
        spec = {"preset": "gpt2-xl", "draft_preset": "gpt2", "batch": 1, "prompt": 128, "new_tokens": 128,
                "draft_tokens": 4, "reps": 3}
    else:
        spec = {"preset": "gpt2", "overrides": CPU_TINY, "draft_preset": "gpt2",
                "draft_overrides": {"n_layer": 1, "n_head": 2, "n_embd": 64}, "batch": 1, "prompt": 16,
                "new_tokens": 8, "draft_tokens": 3, "reps": 2}
    providers = [Provider(n, _gen_kind(n), _spec_setup(n))
                 for n in ("gptfast", f"gptfast-spec{spec['draft_tokens']}", f"gptfast-lookup{spec['draft_tokens']}")]
    name = (f"speculative {_label(spec['preset'], spec.get('overrides'))} drafted by "
            f"{_label(spec['draft_preset'], spec.get('draft_overrides'))} B={spec['batch']} "
            f"prompt={spec['prompt']} new={spec['new_tokens']}")
    return [Case(op="e2e", name=name, shape=dict(spec, task="speculative"),
                 dtype="bf16" if device_kind == "cuda" else "fp32", make_inputs=lambda d: {},
                 providers=providers, measure=_measure_speculative(spec))]


def e2e_cases(device_kind: str, quick: bool) -> list[Case]:
    return generation_cases(device_kind, quick) + speculative_cases(device_kind, quick) + \
        training_cases(device_kind, quick)
