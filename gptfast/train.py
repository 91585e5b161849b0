"""Pretraining on a text file or on prepared token files, with resume, plus perplexity evaluation.

    gptfast train --data book.txt --out runs/tiny --vocab-size 4096 --n-layer 4 --n-embd 128 ...
    gptfast prepare corpus/ --out data/corpus --tokenizer path/to/gpt2     # once (gptfast.data)
    torchrun --nproc_per_node 8 -m gptfast.cli train --data data/corpus --init gpt2 \
        --batch-size 16 --grad-accum 4 --block-size 1024 --dtype bfloat16 --compile --out runs/owt

The run directory ends up holding the model as a Hugging Face directory (config.json,
model.safetensors, tokenizer.json), log.jsonl and loss.png. During the run, checkpoints/step-N/
holds the model, tokenizer and train_state.pt (optimizer, step, log); each is written to a
temporary directory and renamed into place, then checkpoints/latest is rewritten atomically,
so an interrupted run resumes from the last complete checkpoint when the same command is
run again. Batches are a function of (seed, step, rank), so a resumed run sees the same data
the uninterrupted one would have. Several GPUs: `torchrun --nproc_per_node N -m gptfast.cli train ...`.

A step takes grad_accum micro-batches of batch_size rows on each rank (DDP synchronises the
gradients once, on the last), so it trains on batch_size x grad_accum x world x block_size
tokens; its rows are drawn at once, so batch_size=8 equals batch_size=4 with grad_accum=2.
The log and the progress bar report tokens/s, the model's TFLOP/s (6N + attention per token,
as `gptfast bench` counts a training step) and, for 16-bit training on a GPU whose peak is
known (or given as peak_tflops), the model FLOPs utilisation (MFU).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .checkpoint import atomic_torch_save, atomic_write_text
from .config import GPTConfig


@dataclass
class TrainArgs:
    data: str  # a UTF-8 text file, or token files: a prepared directory or a .bin (gptfast.data)
    out: str
    tokenizer: Optional[str] = None  # directory with tokenizer.json / vocab.json+merges.txt
    vocab_size: int = 4096  # when training a new tokenizer
    init: Optional[str] = None  # preset name or checkpoint to fine-tune from
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    batch_size: int = 16  # rows per micro-batch and rank
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    val_fraction: float = 0.05
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    compile: Optional[str] = None  # a torch.compile backend ("inductor") for the training step
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass
    eval_data: Optional[str] = None  # zero-shot rows (gptfast.evaluation) scored at every evaluation
    eval_limit: Optional[int] = None  # the first N rows of eval_data only
    peak_tflops: Optional[float] = None  # the device's peak for MFU (default: known GPUs' datasheet peak)


# Dense (no sparsity) bf16/fp16 tensor-core peaks in NVIDIA's datasheets, TFLOP/s: the
# denominator of MFU (model FLOPs utilisation, as nanoGPT and PaLM define it). First match wins.
PEAK_TFLOPS_16BIT = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", None), ("H100", 989.4), ("A100", 312.0))


def peak_tflops(device: torch.device, dtype: torch.dtype, given: Optional[float]) -> Optional[float]:
    """The peak MFU is measured against: the given one, else the datasheet's for a known GPU
    training in 16 bits, else None (no MFU)."""
    if given is not None:
        return given
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT if key in name), None)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokens(args: TrainArgs, tokenizer) -> np.ndarray:
    """The token ids of a text file (--data), encoded here. Line ends are kept as they are (no
    \r\n -> \n), as gptfast prepare keeps them, so both give a file the same ids."""
    try:
        with open(args.data, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--data file not found: {args.data}") from None
    ids = tokenizer.encode(text)
    if len(ids) < 4 * (args.block_size + 1):
        raise ValueError(f"--data has {len(ids)} tokens; need at least {4 * (args.block_size + 1)} "
                         f"for block_size {args.block_size}")
    return np.asarray(ids, dtype=np.int32)


def load_data(args: TrainArgs, tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token ids: a text file's, encoded here, with its last val_fraction as
    validation; or token files', memory-mapped (a prepared directory's val.bin, or that tail)."""
    from .data import check_tokenizer, is_token_data, open_tokens

    source = f"--data {args.data}"
    if is_token_data(args.data):
        tokens, val, meta, _ = open_tokens(args.data)
        check_tokenizer(meta, tokenizer, source)
        if not meta and tokenizer.vocab_size > 1 << 16:
            raise ValueError(f"{source} has no meta.json (nanoGPT's layout: uint16 ids), but the tokenizer has "
                             f"{tokenizer.vocab_size} tokens; prepare it with gptfast prepare")
        if meta.get("vocab_size", 0) > vocab_size:
            raise ValueError(f"{source} holds ids of a {meta['vocab_size']}-token vocabulary; the model has "
                             f"vocab_size {vocab_size}")
    else:
        tokens, val = load_tokens(args, tokenizer), None
    if val is None:
        n_val = max(args.block_size + 2, int(len(tokens) * args.val_fraction))
        tokens, val = tokens[:-n_val], tokens[-n_val:]
    for name, split in (("training", tokens), ("validation", val)):
        if len(split) < args.block_size + 2:
            raise ValueError(f"{source}: the {name} split has {len(split)} tokens; need at least "
                             f"{args.block_size + 2} for block_size {args.block_size}")
    return tokens, val


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, device,
              vocab_size: Optional[int] = None):
    """batch_size random windows of block_size + 1 tokens -> (inputs, targets), each (B, T), on
    device; ids are checked against vocab_size on the host (token files come from elsewhere)."""
    starts = torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=gen)
    x = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64))
    if vocab_size is not None and int(x.max()) >= vocab_size:
        raise ValueError(f"the training data holds token id {int(x.max())}, outside the model's vocab_size "
                         f"{vocab_size}")
    if torch.device(device).type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x[:, :-1], x[:, 1:]


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


def _shifted_loss(model, x, y):
    """The mean loss of predicting y[:, t] at x[:, t], through the fused LM head + cross-entropy
    (no [B, T, V] logits; ops.linear_cross_entropy)."""
    return model(x, targets=y)


@torch.no_grad()
def estimate_loss(model, tokens, args: TrainArgs, device, gen) -> float:
    model.eval()
    vocab = model.config.vocab_size
    losses = [float(_shifted_loss(model, *get_batch(tokens, args.batch_size, args.block_size, gen, device, vocab)))
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def _build(args: TrainArgs, device):
    from .data import is_token_data
    from .model import GPT
    from .tokenizer import Tokenizer, train_byte_level_bpe

    if args.init and os.path.exists(args.init):  # fine-tune an existing checkpoint with its tokenizer
        model = GPT.from_pretrained(args.init)
        tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.init)
    else:
        if args.tokenizer:
            tokenizer = Tokenizer.from_pretrained(args.tokenizer)
        elif is_token_data(args.data):  # token files: the tokenizer saved beside them
            tokenizer = _data_tokenizer(args.data)
        else:
            tokenizer = train_byte_level_bpe([args.data], args.vocab_size)
        if args.init:
            config = GPTConfig.from_preset(args.init, vocab_size=tokenizer.vocab_size)
        else:
            config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=args.block_size, n_layer=args.n_layer,
                               n_head=args.n_head, n_embd=args.n_embd, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(args.seed)
        model = GPT(config)
    if args.block_size > model.config.n_positions:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's n_positions {model.config.n_positions}")
    return model.to(device), tokenizer


def _data_tokenizer(data: str):
    from .data import token_directory
    from .tokenizer import Tokenizer

    directory = token_directory(data)
    try:
        return Tokenizer.from_pretrained(directory)
    except FileNotFoundError:
        raise FileNotFoundError(f"--data {data} holds token ids but {directory} has no tokenizer: pass --tokenizer "
                                "(or --init a checkpoint) with the tokenizer the ids were made with") from None


def _distributed():
    """(rank, world_size, local_rank) under torchrun, else (0, 1, 0); initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def setup_device(name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): under torchrun on CUDA each rank takes the GPU of its local rank."""
    rank, world, local_rank = _distributed()
    device = _resolve_device(name)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return rank, world, device


def wrap_ddp(model, device: torch.device, world: int):
    """The model to call in the training step: DDP over the ranks, or the model itself."""
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def micro_steps(model, n: int, world: int):
    """(k, context) for each of a step's n micro-batches: run its forward and backward inside the
    context. DDP averages the gradients over ranks in the last one's backward only."""
    for k in range(n):
        yield k, contextlib.nullcontext() if k == n - 1 or world == 1 else model.no_sync()


def make_optimizer(model, lr: float, weight_decay: float, betas: tuple, ckpt: Optional[str]):
    """(AdamW with decay on matrices only, step, log), restored from ckpt's train_state.pt when resuming."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    if ckpt is None:
        return opt, 0, []
    state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return opt, state["step"], json.loads(state["log"])


def _batch_generator(args: TrainArgs, step: int, rank: int, world: int) -> torch.Generator:
    # Data order is a function of (seed, step, rank) only: a resumed run draws exactly the
    # batches the uninterrupted run would have drawn, with no RNG state to save.
    return torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + rank)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global RNGs (dropout) from (seed, step, rank), so a resumed run draws the same
    dropout masks as the uninterrupted one."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank + 1)


def train(args: TrainArgs, progress: bool = True) -> dict:
    """Train (or resume) and return a summary dict; see the module docstring.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its own batches with DDP (global batch
    = batch_size x world size); rank 0 alone evaluates, logs and writes checkpoints.
    """
    from tqdm import tqdm

    from .data import is_token_data
    from .model import GPT
    from .tokenizer import Tokenizer

    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data file not found: {args.data}")
    if not (isinstance(args.grad_accum, int) and args.grad_accum >= 1):
        raise ValueError(f"grad_accum must be an int >= 1, got {args.grad_accum!r}")
    rank, world, device = setup_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    ckpt = latest_checkpoint(args.out)
    if ckpt is not None:
        model, tokenizer = GPT.from_pretrained(ckpt).to(device), Tokenizer.from_pretrained(ckpt)
    elif (world > 1 and args.tokenizer is None and not (args.init and os.path.exists(args.init))
          and not is_token_data(args.data)):
        if rank == 0:  # one rank trains the tokenizer; the others read it
            tokenizer = _build(args, device)[1]
            tokenizer.save(os.path.join(args.out, "tokenizer-init"))
        _barrier(world)
        model, tokenizer = _build(TrainArgs(**{**vars(args), "tokenizer": os.path.join(args.out, "tokenizer-init")}),
                                  device)
    else:
        model, tokenizer = _build(args, device)
    model.train()
    model.gradient_checkpointing_enable(args.grad_checkpoint)
    vocab = model.config.vocab_size
    train_tokens, val_tokens = load_data(args, tokenizer, vocab)
    zero_shot = _zero_shot_requests(args, tokenizer) if args.eval_data and rank == 0 else None
    raw_model = model
    if args.compile:
        model = torch.compile(model, backend=args.compile)
    model = wrap_ddp(model, device, world)
    opt, step, log = make_optimizer(raw_model, args.lr, args.weight_decay, (0.9, 0.95), ckpt)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(total=args.steps, initial=step, desc="train", disable=not progress or rank != 0, unit="step")
    b, accum = args.batch_size, args.grad_accum
    meter = Throughput(b * accum * args.block_size * world, _flops_per_token(raw_model, args.block_size),
                       peak_tflops(device, dtype, args.peak_tflops))
    if progress and rank == 0:
        bar.write(f"{len(train_tokens):,} training tokens; a step takes {b} x {accum} x {world} x "
                  f"{args.block_size} = {meter.tokens_per_step:,} (batch x grad_accum x ranks x block)",
                  file=sys.stderr)
    t0, loss_f = time.time(), float("nan")
    while step < args.steps:
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_tokens, b * accum, args.block_size, _batch_generator(args, step, rank, world),
                         device, vocab)
        seed_step(args.seed, step, rank)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro, sync in micro_steps(model, accum, world):
            with sync:
                with autocast:
                    loss = _shifted_loss(model, x[micro * b:(micro + 1) * b], y[micro * b:(micro + 1) * b]) / accum
                loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss_f = _mean_over_ranks(loss_sum, world)  # a host read: the step's work is done here
        meter.add(time.perf_counter() - t_step)
        bar.update(1)
        bar.set_postfix(meter.postfix(loss=f"{loss_f:.3f}"))
        entry = {"step": step, "loss": loss_f, "lr": lr_at(step - 1, args)}
        eval_now = step % args.eval_every == 0 or step == args.steps
        if eval_now or step % 10 == 0:  # the entries log_step keeps
            entry.update(meter.window())

        def validate():
            with autocast:
                entry["val_loss"] = estimate_loss(raw_model, val_tokens, args, device,
                                                  torch.Generator().manual_seed(args.seed))
                extra = _zero_shot(raw_model, zero_shot, args.batch_size, entry) if zero_shot else ""
            entry["val_ppl"] = math.exp(entry["val_loss"])
            return (f"step {step}: train loss {loss_f:.3f}, val loss {entry['val_loss']:.3f}, "
                    f"val ppl {entry['val_ppl']:.1f}{extra}")

        log_step(entry, eval_now, validate,
                 lambda: _checkpoint(raw_model, tokenizer, opt, step, log, args), log, bar, progress, rank, world)
    bar.close()
    finish_run(raw_model, tokenizer, log, args.out, rank, world)
    vals = [e for e in log if "val_loss" in e]
    return {"steps": step, "train_loss": loss_f, "val_loss": vals[-1]["val_loss"] if vals else None,
            "seconds": time.time() - t0, "parameters": raw_model.num_parameters(), "out": args.out,
            "world_size": world, **meter.summary(device)}


def _zero_shot_requests(args: TrainArgs, tokenizer):
    """(rows, task, tokenized requests) of --eval-data, read and checked before training starts."""
    from .evaluation import prepare_requests
    from .finetune import read_rows

    rows = read_rows(args.eval_data)[:args.eval_limit]
    return (rows, *prepare_requests(rows, tokenizer, source=f"--eval-data {args.eval_data}"))


def _zero_shot(model, requests, batch_size: int, entry: dict) -> str:
    """Score the zero-shot rows into entry (eval_accuracy, and eval_accuracy_norm or
    eval_perplexity); returns the progress line's part."""
    from .evaluation import evaluate_requests

    rows, task, reqs = requests
    result = evaluate_requests(model, rows, task, reqs, batch_size=batch_size)
    entry["eval_accuracy"] = result["accuracy"]
    if task == "choice":
        entry["eval_accuracy_norm"] = result["accuracy_norm"]
        return f", zero-shot accuracy {result['accuracy']:.3f} (norm {result['accuracy_norm']:.3f})"
    entry["eval_perplexity"] = result["perplexity"]
    return f", zero-shot accuracy {result['accuracy']:.3f} (continuation ppl {result['perplexity']:.1f})"


def _flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token, counted as `gptfast bench` counts a training step."""
    from .ops._dispatch import import_source_package

    import_source_package("bench", "bench")
    from .bench.accounting import train_flops_per_token

    c = model.config
    return train_flops_per_token(model.num_parameters(non_embedding=True), c.n_layer, c.n_head, c.head_dim,
                                 block_size)


class Throughput:
    """Step times -> tokens/s, model TFLOP/s and MFU, over the steps since the last window() and
    over the whole run (less this process's first step, which compiles and autotunes)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_tflops: Optional[float]):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_tflops
        self.first_step_s: Optional[float] = None
        self.run = [0.0, 0]  # seconds, steps (after the first)
        self.recent = [0.0, 0]

    def add(self, seconds: float) -> None:
        if self.first_step_s is None:
            self.first_step_s = seconds
        else:
            self.run[0] += seconds
            self.run[1] += 1
        self.recent[0] += seconds
        self.recent[1] += 1

    def _rates(self, seconds: float, steps: int) -> dict:
        if steps == 0 or seconds <= 0:
            return {}
        tps = self.tokens_per_step * steps / seconds
        rates = {"tokens_per_s": tps, "model_tflops": tps * self.flops_per_token / 1e12}
        if self.peak:
            rates["mfu"] = rates["model_tflops"] / self.peak
        return rates

    def window(self) -> dict:
        rates = self._rates(*self.recent)
        self.recent = [0.0, 0]
        return rates

    def postfix(self, **fields) -> dict:
        rates = self._rates(*self.recent)
        if rates:
            fields["tok/s"] = f"{rates['tokens_per_s']:,.0f}"
            if "mfu" in rates:
                fields["mfu"] = f"{rates['mfu']:.1%}"
        return fields

    def summary(self, device: torch.device) -> dict:
        out = {"tokens_per_step": self.tokens_per_step, "first_step_s": self.first_step_s,
               **{k: None for k in ("tokens_per_s", "model_tflops")}, **self._rates(*self.run)}
        if device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        return out


def log_step(entry: dict, eval_now: bool, validate, checkpoint, log: list, bar, progress: bool,
             rank: int, world: int) -> None:
    """The end of a training step. On an evaluation step rank 0 runs validate() (it adds the
    validation figures to entry and returns the progress line), logs the entry and checkpoints,
    and every rank waits for it; otherwise every 10th step's entry is logged."""
    if eval_now:
        if rank == 0:
            line = validate()
            if progress:
                bar.write(line, file=sys.stderr)
            log.append(entry)
            checkpoint()
        _barrier(world)
    elif entry["step"] % 10 == 0:
        log.append(entry)


def finish_run(model, tokenizer, log: list, out: str, rank: int, world: int) -> None:
    """Rank 0 writes the final model, tokenizer, log.jsonl and loss.png to out; the process group ends."""
    if rank == 0:
        model.save_pretrained(out)
        tokenizer.save(out)
        atomic_write_text(os.path.join(out, "log.jsonl"), "".join(json.dumps(e) + "\n" for e in log))
        plot_losses(log, os.path.join(out, "loss.png"))
    _barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


def latest_checkpoint(out: str) -> Optional[str]:
    pointer = os.path.join(out, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        path = os.path.join(out, "checkpoints", f.read().strip())
    if not os.path.isfile(os.path.join(path, "train_state.pt")):
        raise FileNotFoundError(f"{pointer} names {path}, which has no train_state.pt: the run directory "
                                "was modified by hand; delete checkpoints/ to start over")
    return path


def _checkpoint(model, tokenizer, opt, step, log, args):
    root = os.path.join(args.out, "checkpoints")
    name = f"step-{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save(tmp)
    atomic_torch_save({"optimizer": opt.state_dict(), "step": step, "log": json.dumps(log),
                       "args": json.dumps(vars(args))},
                      os.path.join(tmp, "train_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    atomic_write_text(os.path.join(root, "latest"), name)
    for old in os.listdir(root):  # keep only the newest complete checkpoint
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def plot_losses(log: list, path: str) -> Optional[str]:
    """Train and validation loss curves (and validation accuracy when logged) as a PNG
    (skipped when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from .ops._dispatch import logger
        logger.warning("gptfast: no loss plot (%s): matplotlib is not importable (%s)", path, exc)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [e["step"] for e in log]
    vals = [e for e in log if "val_loss" in e]
    accs = [e for e in vals if "val_accuracy" in e]
    if accs:  # fine-tuning: task losses side by side, the LM term apart, accuracy on a second axis
        ax.plot(steps, [e["task_loss"] for e in log], label="train task loss", lw=1)
        if all("lm_loss" in e for e in log):
            ax.plot(steps, [e["lm_loss"] for e in log], label="train LM loss", lw=1, alpha=0.5)
        ax.plot([e["step"] for e in vals], [e["val_loss"] for e in vals], "o-", label="validation task loss")
        ax.set_ylabel("cross-entropy")
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in accs], [e["val_accuracy"] for e in accs], "s--", color="C3",
                 label="validation accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.02)
        fig.legend(loc="upper center", ncol=2, fontsize="small", bbox_to_anchor=(0.5, 1.0))
        fig.subplots_adjust(top=0.8)
    else:
        ax.plot(steps, [e["loss"] for e in log], label="train", lw=1)
        if vals:
            ax.plot([e["step"] for e in vals], [e["val_loss"] for e in vals], "o-", label="validation")
        ax.set_ylabel("cross-entropy (nats/token)")
        zero_shot = [e for e in vals if "eval_accuracy" in e]
        if zero_shot:  # --eval-data: zero-shot accuracy on a second axis
            ax2 = ax.twinx()
            ax2.plot([e["step"] for e in zero_shot], [e["eval_accuracy"] for e in zero_shot], "s--", color="C3",
                     label="zero-shot accuracy")
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(0, 1.02)
            ax2.legend(loc="upper right")
            ax.legend(loc="upper left")
        else:
            ax.legend()
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not accs:
        fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def perplexity(model, ids, stride: Optional[int] = None, progress: bool = True, batch_size: int = 1) -> dict:
    """Sliding-window perplexity of a token sequence (a list or an array such as a memory-mapped
    val.bin): every token after the first is scored once, with up to n_positions - stride tokens
    of context beyond the window's own. stride = n_positions means windows without overlap; they
    step by n_positions - 1, since a window's first token is no target of its own. batch_size
    windows go through the model at once (the result is the same)."""
    from tqdm import tqdm

    ctx = model.config.n_positions
    stride = stride or ctx // 2
    if not 0 < stride <= ctx:
        raise ValueError(f"stride must be in (0, {ctx}], got {stride}")
    if ctx < 2:
        raise ValueError(f"a model with n_positions {ctx} scores no token")
    stride = min(stride, ctx - 1)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = len(ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    if int(np.max(ids)) >= model.config.vocab_size:
        raise ValueError(f"token id {int(np.max(ids))} is outside the model's vocab_size {model.config.vocab_size}")
    model.eval()
    ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    windows, prev_end = [], 0  # (begin, end, first target not scored by an earlier window)
    for begin in range(0, n - 1, stride):
        end = min(begin + ctx, n)
        windows.append((begin, end, max(prev_end - begin - 1, 0)))
        prev_end = end
        if end == n:
            break
    full = windows if windows[-1][1] - windows[-1][0] == ctx else windows[:-1]  # a short last one goes alone
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [windows[len(full):]] * (
        len(full) < len(windows))
    nll, count = 0.0, 0
    with tqdm(total=len(windows), desc="perplexity", disable=not progress) as bar:
        for group in groups:
            x = torch.stack([ids_t[b:e] for b, e, _ in group]).to(model.device)  # (G, L)
            # each position's next token, -100 where it is not scored (already scored, or none):
            # the loss goes through ops.linear_cross_entropy, so no [G, L, V] logits are made
            first = torch.tensor([f for _, _, f in group], device=x.device)
            scored = torch.arange(x.shape[1] - 1, device=x.device) >= first[:, None]
            targets = torch.full_like(x, -100)
            targets[:, :-1] = x[:, 1:].masked_fill(~scored, -100)
            n_scored = int(scored.sum())
            nll += float(model(x, targets=targets)) * n_scored
            count += n_scored
            bar.update(len(group))
    return {"tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count)}
