"""Minimal pretraining on a text file, with resume, plus perplexity evaluation.

    gptfast train --data book.txt --out runs/tiny --vocab-size 4096 --n-layer 4 --n-embd 128 ...

The run directory ends up holding the model as a Hugging Face directory (config.json,
model.safetensors, tokenizer.json), log.jsonl and loss.png. During the run, checkpoints/step-N/
holds the model, tokenizer and train_state.pt (optimizer, step, log); each is written to a
temporary directory and renamed into place, then checkpoints/latest is rewritten atomically,
so an interrupted run resumes from the last complete checkpoint when the same command is
run again. Batches are a function of (seed, step, rank), so a resumed run sees the same data
the uninterrupted one would have. Several GPUs: `torchrun --nproc_per_node N -m gptfast.cli train ...`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoint import atomic_torch_save, atomic_write_text
from .config import GPTConfig


@dataclass
class TrainArgs:
    data: str
    out: str
    tokenizer: Optional[str] = None  # directory with tokenizer.json / vocab.json+merges.txt
    vocab_size: int = 4096  # when training a new tokenizer
    init: Optional[str] = None  # preset name or checkpoint to fine-tune from
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    batch_size: int = 16
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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokens(args: TrainArgs, tokenizer) -> torch.Tensor:
    try:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--data file not found: {args.data}") from None
    ids = tokenizer.encode(text)
    if len(ids) < 4 * (args.block_size + 1):
        raise ValueError(f"--data has {len(ids)} tokens; need at least {4 * (args.block_size + 1)} "
                         f"for block_size {args.block_size}")
    return torch.tensor(ids, dtype=torch.int32)


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator, device):
    starts = torch.randint(0, tokens.numel() - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).long()  # (B, T+1)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


def _shifted_loss(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model, tokens, args: TrainArgs, device, gen) -> float:
    model.eval()
    losses = [float(_shifted_loss(model, *get_batch(tokens, args.batch_size, args.block_size, gen, device)))
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def _build(args: TrainArgs, device):
    from .model import GPT
    from .tokenizer import Tokenizer, train_byte_level_bpe

    if args.init and os.path.exists(args.init):  # fine-tune an existing checkpoint with its tokenizer
        model = GPT.from_pretrained(args.init)
        tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.init)
    else:
        tokenizer = (Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                     else train_byte_level_bpe([args.data], args.vocab_size))
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

    from .model import GPT
    from .tokenizer import Tokenizer

    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data file not found: {args.data}")
    rank, world, device = setup_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    ckpt = latest_checkpoint(args.out)
    if ckpt is not None:
        model, tokenizer = GPT.from_pretrained(ckpt).to(device), Tokenizer.from_pretrained(ckpt)
    elif world > 1 and args.tokenizer is None and not (args.init and os.path.exists(args.init)):
        if rank == 0:  # one rank trains the tokenizer; the others read it
            tokenizer = _build(args, device)[1]
            tokenizer.save(os.path.join(args.out, "tokenizer-init"))
        _barrier(world)
        model, tokenizer = _build(TrainArgs(**{**vars(args), "tokenizer": os.path.join(args.out, "tokenizer-init")}),
                                  device)
    else:
        model, tokenizer = _build(args, device)
    model.train()
    raw_model, model = model, wrap_ddp(model, device, world)
    tokens = load_tokens(args, tokenizer)
    n_val = max(args.block_size + 2, int(len(tokens) * args.val_fraction))
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    opt, step, log = make_optimizer(raw_model, args.lr, args.weight_decay, (0.9, 0.95), ckpt)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(total=args.steps, initial=step, desc="train", disable=not progress or rank != 0, unit="step")
    t0, loss_f = time.time(), float("nan")
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_tokens, args.batch_size, args.block_size, _batch_generator(args, step, rank, world),
                         device)
        seed_step(args.seed, step, rank)
        with autocast:
            loss = _shifted_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over ranks here
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss_f = _mean_over_ranks(loss.detach(), world)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_f:.3f}")
        entry = {"step": step, "loss": loss_f, "lr": lr_at(step - 1, args)}

        def validate():
            with autocast:
                entry["val_loss"] = estimate_loss(raw_model, val_tokens, args, device,
                                                  torch.Generator().manual_seed(args.seed))
            entry["val_ppl"] = math.exp(entry["val_loss"])
            return (f"step {step}: train loss {loss_f:.3f}, val loss {entry['val_loss']:.3f}, "
                    f"val ppl {entry['val_ppl']:.1f}")

        log_step(entry, step % args.eval_every == 0 or step == args.steps, validate,
                 lambda: _checkpoint(raw_model, tokenizer, opt, step, log, args), log, bar, progress, rank, world)
    bar.close()
    finish_run(raw_model, tokenizer, log, args.out, rank, world)
    vals = [e for e in log if "val_loss" in e]
    return {"steps": step, "train_loss": loss_f, "val_loss": vals[-1]["val_loss"] if vals else None,
            "seconds": time.time() - t0, "parameters": raw_model.num_parameters(), "out": args.out,
            "world_size": world}


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
def perplexity(model, ids: list[int], stride: Optional[int] = None, progress: bool = True) -> dict:
    """Sliding-window perplexity of a token sequence (each token scored once, with up to
    n_positions - stride tokens of context beyond the window's own)."""
    from tqdm import tqdm

    ctx = model.config.n_positions
    stride = stride or ctx // 2
    if not 0 < stride <= ctx:
        raise ValueError(f"stride must be in (0, {ctx}], got {stride}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    model.eval()
    ids_t = torch.tensor(ids, dtype=torch.long, device=model.device)
    nll, count, prev_end = 0.0, 0, 0
    starts = list(range(0, len(ids) - 1, stride))
    for begin in tqdm(starts, desc="perplexity", disable=not progress):
        end = min(begin + ctx, len(ids))
        window = ids_t[begin:end].unsqueeze(0)
        logits = model(window)[0, :-1].float()
        targets = window[0, 1:]
        first_new = max(prev_end - begin - 1, 0)  # score only tokens not scored before
        losses = torch.nn.functional.cross_entropy(logits[first_new:], targets[first_new:], reduction="sum")
        nll += float(losses)
        count += targets.numel() - first_new
        prev_end = end
        if end == len(ids):
            break
    return {"tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count)}
