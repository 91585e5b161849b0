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
run again (it says so, and from which step). The flags that define the model and the data
(shape, --vocab-size, --block-size, --tokenizer, --init, --data, --val-fraction, --seed) must be
the run's (paths by what they hold, so moved data still resumes): a resume with others is an
error that names them; --steps (to go on), the evaluation flags, the learning rate and the like
may change. A step's rows are a function of (seed, step), each rank taking its slice of them, so
a resumed run sees the same data the uninterrupted one would have, and N ranks with --batch-size B
see the rows of one process with --batch-size N x B (and, the gradients averaged over the ranks,
train the same weights up to float rounding). Several GPUs:
`torchrun --nproc_per_node N -m gptfast.cli train ...`.

A model that Hugging Face GPT-2 cannot describe (nanoGPT's bias=False, from --init ckpt.pt) is
saved as a nanoGPT-style ckpt.pt holding the whole config instead (GPT.from_pretrained loads it).
--init NAME with a preset name (gpt2, gpt2-medium, ...) builds that shape, randomly initialised
(pretraining), and says so; pretrained weights come from a checkpoint path (or a hub name that
is no preset, found as gptfast generate finds --model). --dtype float16 scales the loss
(torch.amp.GradScaler; its state is saved with the checkpoint); bfloat16 needs no scaling.

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


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # what gptfast generate accepts
DEFAULT_VOCAB_SIZE = 4096  # of the byte-level BPE trained on a text file
MIN_BPE_VOCAB = 257  # a byte-level BPE holds the 256 bytes and <|endoftext|> before any merge


def resolve_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype of a --dtype name (float32/fp32, bfloat16/bf16, float16/fp16)."""
    if name not in DTYPES:
        raise ValueError(f"{flag} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def flag_name(field_name: str) -> str:
    """The command-line flag of an args field: grad_accum -> --grad-accum."""
    return "--" + field_name.replace("_", "-")


def check_number(args, name: str, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, optional: bool = False, allow_inf: bool = False, why: str = "") -> None:
    """Raise ValueError naming the flag, the expected range and the value when args.<name> is not
    a finite number (or inf, with allow_inf) in range; None passes when optional."""
    value = getattr(args, name)
    if value is None and optional:
        return
    kind = "an int" if integer else "a number"
    ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
          and (integer or math.isfinite(value) or (allow_inf and value == math.inf)))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        expect = f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        expect = f"{kind} {'>' if low_open else '>='} {low}"
    elif high is not None:
        expect = f"{kind} {'<' if high_open else '<='} {high}"
    else:
        expect = kind
    raise ValueError(f"{flag_name(name)} must be {expect}{why}, got {value!r}")


@dataclass
class TrainArgs:
    """What `gptfast train` runs; every value is checked on construction (errors name the flag)."""

    data: str  # a UTF-8 text file, or token files: a prepared directory or a .bin (gptfast.data)
    out: str
    tokenizer: Optional[str] = None  # directory with tokenizer.json / vocab.json+merges.txt
    vocab_size: Optional[int] = None  # of the tokenizer trained on a text file (default DEFAULT_VOCAB_SIZE)
    init: Optional[str] = None  # a checkpoint to start from, or a preset name (its shape, randomly initialised)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    batch_size: int = 16  # rows per micro-batch and rank
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000
    lr: float = 3e-3
    min_lr: Optional[float] = None  # default: lr / 10 (3e-4 for the default lr)
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

    def __post_init__(self):
        for name in ("data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{flag_name(name)} must be a path, got {getattr(self, name)!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "steps",
                     "eval_every", "eval_batches"):
            check_number(self, name, low=1, integer=True)
        check_number(self, "warmup", low=0, integer=True)
        check_number(self, "seed", integer=True)
        check_number(self, "vocab_size", low=MIN_BPE_VOCAB, integer=True, optional=True,
                     why=" (a byte-level BPE holds the 256 bytes and <|endoftext|>, then its merges)")
        check_number(self, "eval_limit", low=1, integer=True, optional=True)
        check_number(self, "lr", low=0, low_open=True)
        check_number(self, "min_lr", low=0, optional=True)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.min_lr > self.lr:  # the cosine would climb from --lr to it
            raise ValueError(f"--min-lr must be <= --lr {self.lr} (the learning rate decays from --lr to --min-lr), "
                             f"got {self.min_lr}")
        check_number(self, "weight_decay", low=0)
        check_number(self, "grad_clip", low=0, low_open=True, allow_inf=True)  # inf: no clipping
        check_number(self, "val_fraction", low=0, high=1, low_open=True, high_open=True)
        check_number(self, "peak_tflops", low=0, low_open=True, optional=True)
        resolve_dtype(self.dtype)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.compile is not None and (not isinstance(self.compile, str) or not self.compile):
            raise ValueError(f"--compile must name a torch.compile backend (inductor), got {self.compile!r}")
        if self.init is None and self.n_embd % self.n_head:
            raise ValueError(f"--n-embd must be a multiple of --n-head {self.n_head}, got {self.n_embd}")


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
    """--device as a torch.device: auto (CUDA where there is a GPU, else the CPU), cpu, cuda or
    cuda:N; an error naming --device for anything else, or for CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available here ({why}; torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_tokens(args: TrainArgs, tokenizer, progress: bool = False) -> np.ndarray:
    """The token ids of a text file (--data), encoded here as gptfast prepare encodes it (in
    pieces, in parallel, with a progress bar): the ids of tokenizer.encode(text) for the whole
    text. Line ends are kept as they are (no \r\n -> \n)."""
    from .data import encode_text_file

    ids = encode_text_file(args.data, tokenizer, progress=progress, source="--data ")
    if len(ids) < 4 * (args.block_size + 1):
        raise ValueError(f"--data has {len(ids)} tokens; need at least {4 * (args.block_size + 1)} "
                         f"for --block-size {args.block_size}")
    return ids


def load_data(args: TrainArgs, tokenizer, vocab_size: int, progress: bool = False,
              warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token ids: a text file's, encoded here, with its last val_fraction as
    validation; or token files', memory-mapped (a prepared directory's val.bin, or that tail).
    warn: say when --val-fraction does not apply (rank 0 of a distributed run only)."""
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
        tokens, val = load_tokens(args, tokenizer, progress), None
    hint = {}  # what to do about a split too small, by split
    if val is None:
        total = len(tokens)
        n_val = max(args.block_size + 2, int(total * args.val_fraction))
        tokens, val = tokens[:-n_val], tokens[-n_val:]
        hint["training"] = (f" ({n_val} of its {total} tokens are the validation split: --val-fraction "
                            f"{args.val_fraction}, and at least --block-size + 2)")
    else:  # gptfast train's --val-fraction does not apply to a val.bin
        if warn and args.val_fraction != TrainArgs.__dataclass_fields__["val_fraction"].default:  # given, so meant
            from .ops._dispatch import logger
            logger.warning("gptfast: --val-fraction %s does not apply: --data %s brings its own validation split "
                           "(val.bin, %d tokens), used as it is; --val-fraction holds out the tail of a text file "
                           "or of token data without a val.bin (to change the split, run gptfast prepare again "
                           "with --val-fraction %s)", args.val_fraction, args.data, len(val), args.val_fraction)
        hint["validation"] = (" (its val.bin: prepare the data again with a larger --val-fraction, or with "
                              "--val-fraction 0 to have gptfast train hold out the tail of train.bin)")
    for name, part in (("training", tokens), ("validation", val)):
        if len(part) < args.block_size + 2:
            raise ValueError(f"{source}: the {name} split has {len(part)} tokens; need at least "
                             f"{args.block_size + 2} for --block-size {args.block_size}" + hint.get(name, ""))
    return tokens, val


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, device,
              vocab_size: Optional[int] = None, rank: int = 0, world: int = 1):
    """batch_size random windows of block_size + 1 tokens -> (inputs, targets), each (B, T), on
    device; ids are checked against vocab_size on the host (token files come from elsewhere).
    With world > 1, gen draws the batch_size x world windows of every rank and this rank gets
    its slice of them, so that the ranks together see the rows one process would see."""
    # a window tokens[s:s + block_size + 1] fits for s <= len - block_size - 1 (randint's high is exclusive)
    starts = torch.randint(0, len(tokens) - block_size, (batch_size * world,), generator=gen)
    starts = starts[rank * batch_size:(rank + 1) * batch_size]
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
    """The learning rate of step (0-based): linear warm-up to lr over warmup steps, then a cosine
    from lr towards min_lr at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - args.min_lr)


def _shifted_loss(model, x, y):
    """The mean loss of predicting y[:, t] at x[:, t], through the fused LM head + cross-entropy
    (no [B, T, V] logits; ops.linear_cross_entropy)."""
    return model(x, targets=y)


@torch.no_grad()
def estimate_loss(model, tokens, args: TrainArgs, device, gen, rank: int = 0, world: int = 1) -> float:
    """The mean loss over eval_batches batches of batch_size x world rows drawn by gen, each rank
    scoring its slice of each (every rank calls this): the figure of one process scoring them all."""
    model.eval()
    vocab = model.config.vocab_size
    losses = [_shifted_loss(model, *get_batch(tokens, args.batch_size, args.block_size, gen, device, vocab,
                                              rank, world)).double()
              for _ in range(args.eval_batches)]
    model.train()
    return _mean_over_ranks(torch.stack(losses).mean(), world)


def resolve_init(init: Optional[str]) -> tuple[str, Optional[str]]:
    """What --init names: ("scratch", None) without one; ("checkpoint", path) for a local path, or a
    hub name (not a preset name) found the way gptfast generate finds --model (the local Hugging
    Face cache, else a download); ("preset", name) for a preset name (gpt2, gpt2-medium, ...: that
    shape, randomly initialised, whatever the cache holds, so a command means the same run on every
    machine; pass a checkpoint directory for pretrained weights)."""
    from .checkpoint import resolve_path
    from .config import PRESETS

    if init is None:
        return "scratch", None
    if os.path.exists(init):
        return "checkpoint", init
    if init in PRESETS:
        return "preset", init
    try:
        return "checkpoint", resolve_path(init)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--init {init}: not a preset ({', '.join(PRESETS)}) and no checkpoint: "
                                f"{exc}") from None


def _cached_snapshot(name: str) -> Optional[str]:
    """The local Hugging Face cache's snapshot of the hub model `name`, or None (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True, allow_patterns=["config.json", "*.safetensors",
                                                                              "*.json", "*.txt", "*.bin"])
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: nothing to point at
        return None


def describe_init(init: Optional[str], kind: str, where: Optional[str]) -> Optional[str]:
    """The line that says what --init starts from (None without --init); kind, where: resolve_init(init)."""
    if kind == "scratch":
        return None
    if kind == "checkpoint":
        return (f"[gptfast] --init {init}: starting from the checkpoint's weights"
                + (f" ({where})" if where != init else ""))
    cached = _cached_snapshot(init)
    hint = f"; the local Hugging Face cache has them: --init {cached}" if cached else ""
    return (f"[gptfast] --init {init}: the {init} preset, randomly initialised (for {init}'s pretrained weights pass a "
            f"checkpoint directory{hint})")


def trains_tokenizer(args: TrainArgs, init_kind: str) -> bool:
    """Whether the run trains a byte-level BPE on --data (no --tokenizer, a text file, no --init checkpoint)."""
    from .data import is_token_data

    return not args.tokenizer and not is_token_data(args.data) and init_kind != "checkpoint"


def _build(args: TrainArgs, device, init: tuple[str, Optional[str]], tokenizer=None, progress: bool = False):
    """(model, tokenizer) of a new run: --init's checkpoint with its tokenizer, or a model of the
    preset's or the flags' shape over --tokenizer, the tokenizer beside token files, or a byte-level
    BPE trained on --data. init: resolve_init(args.init). `tokenizer` given: that one (torchrun's
    ranks share rank 0's)."""
    from .data import is_token_data, train_tokenizer_on_text
    from .model import GPT
    from .tokenizer import Tokenizer

    kind, where = init
    if kind == "checkpoint":  # fine-tune an existing checkpoint with its tokenizer
        model = GPT.from_pretrained(where)
        if tokenizer is None:
            tokenizer = Tokenizer.from_pretrained(args.tokenizer or where)
    else:
        if tokenizer is not None:
            pass
        elif args.tokenizer:
            tokenizer = Tokenizer.from_pretrained(args.tokenizer)
        elif is_token_data(args.data):  # token files: the tokenizer saved beside them
            tokenizer = _data_tokenizer(args.data)
        else:
            tokenizer = train_tokenizer_on_text(args.data, args.vocab_size or DEFAULT_VOCAB_SIZE, progress=progress,
                                                source="--data ")
        if kind == "preset":
            config = GPTConfig.from_preset(args.init, vocab_size=tokenizer.vocab_size)
        else:
            config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=args.block_size, n_layer=args.n_layer,
                               n_head=args.n_head, n_embd=args.n_embd, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(args.seed)
        model = GPT(config)
    if args.block_size > model.config.n_positions:
        raise ValueError(f"--block-size {args.block_size} exceeds the context of --init {args.init} "
                         f"({model.config.n_positions} positions)")
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


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size) under torchrun, else (0, 1); initialises the process group, with the
    backend of the device the ranks train on (NCCL for CUDA tensors, gloo for CPU ones, whether or
    not the machine has a GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def setup_device(name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): under torchrun on CUDA each rank takes the GPU of its local
    rank, before the process group starts (so that NCCL uses that GPU)."""
    device = _resolve_device(name)  # a bad --device is an error before any process group starts
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    rank, world = _distributed(device)
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


def read_train_state(ckpt: Optional[str]) -> Optional[dict]:
    """A checkpoint's train_state.pt (optimizer, step, log, args, identity, scaler), or None without one."""
    if ckpt is None:
        return None
    return torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)


def make_optimizer(model, lr: float, weight_decay: float, betas: tuple, state: Optional[dict]):
    """(AdamW with decay on matrices only, step, log), restored from a checkpoint's train state
    (read_train_state) when resuming."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    if state is None:
        return opt, 0, []
    opt.load_state_dict(state["optimizer"])
    opt.param_groups[0]["weight_decay"] = weight_decay  # the flag's, not the checkpoint's: a resume may change it
    return opt, state["step"], json.loads(state["log"])


def make_scaler(device: torch.device, dtype: torch.dtype, state: Optional[dict]):
    """Loss scaling for float16 training, whose small gradients underflow to 0 in fp16 without it:
    a torch.amp.GradScaler, enabled for float16 on CUDA (and the CPU), restored from the train
    state when resuming. Disabled (bf16, fp32), its calls pass the loss and the step through."""
    enabled = dtype == torch.float16 and device.type in ("cuda", "cpu")
    scaler = torch.amp.GradScaler(device.type if enabled else "cpu", enabled=enabled)
    if enabled and state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return scaler


def optimizer_step(opt, scaler, params, grad_clip: float) -> None:
    """Clip and step, through the scaler: the gradients are unscaled before the clip sees them,
    and a step whose gradients overflowed is skipped (the scale backs off)."""
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


def _path_key(path: Optional[str]) -> Optional[dict]:
    """A path flag's identity: where it is and what it holds (content_digest), so that data or a
    checkpoint moved elsewhere (another mount, a copy) still resumes its run and other content at
    the same path does not."""
    if not path:
        return None
    real = os.path.realpath(path)
    return {"path": real, "content": content_digest(real)}


_DIGEST_BYTES = 1 << 20  # read from each end of each file


def content_digest(path: str) -> Optional[str]:
    """A cheap digest of a file, or of a directory's files (not hidden ones, not subdirectories):
    their names, sizes and first and last MiB. None where path does not exist."""
    import hashlib

    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
    elif os.path.isfile(path):
        files = [None]
    else:
        return None
    h = hashlib.sha256()
    for name in files:
        full = path if name is None else os.path.join(path, name)
        size = os.path.getsize(full)
        h.update(f"{name}:{size}:".encode())
        with open(full, "rb") as f:
            h.update(f.read(_DIGEST_BYTES))
            if size > 2 * _DIGEST_BYTES:
                f.seek(size - _DIGEST_BYTES)
                h.update(f.read(_DIGEST_BYTES))
            elif size > _DIGEST_BYTES:
                h.update(f.read())
    return h.hexdigest()[:16]


def _same(now, before) -> bool:
    """Whether a flag's value at resume is the run's: path flags by content where both exist
    (else by path: a deleted --init does not stop a resume), the rest by value."""
    if isinstance(now, dict) and isinstance(before, dict):
        if now.get("content") and before.get("content"):
            return now["content"] == before["content"]
        return now.get("path") == before.get("path")
    return now == before


def _has_val_file(data: str) -> bool:
    """Whether token files bring their own validation split (val.bin), as open_tokens reads it."""
    if os.path.isdir(data):
        return os.path.isfile(os.path.join(data, "val.bin"))
    return os.path.basename(data) == "train.bin" and os.path.isfile(os.path.join(os.path.dirname(data), "val.bin"))


def run_identity(args: TrainArgs, init: tuple[str, Optional[str]]) -> dict:
    """The flags that define a run's model and data, flag -> value (paths resolved): a resumed
    run must have the same ones. Flags that do not apply (the shape with --init, --vocab-size
    without a tokenizer to train) are left out."""
    from .data import is_token_data

    kind, where = init
    ident = {"--data": _path_key(args.data), "--block-size": args.block_size, "--seed": args.seed}
    if not (is_token_data(args.data) and _has_val_file(args.data)):
        ident["--val-fraction"] = args.val_fraction
    if args.init is not None:
        ident["--init"] = _path_key(where) if kind == "checkpoint" else args.init
    if args.tokenizer:
        ident["--tokenizer"] = _path_key(args.tokenizer)
    if kind == "scratch":
        ident.update({"--n-layer": args.n_layer, "--n-head": args.n_head, "--n-embd": args.n_embd})
    if trains_tokenizer(args, kind):
        ident["--vocab-size"] = args.vocab_size or DEFAULT_VOCAB_SIZE
    return ident


def _legacy_identity(state: dict, args_cls, identity) -> Optional[dict]:
    """The identity of a checkpoint written before train_state.pt recorded one, from its args."""
    try:
        saved = json.loads(state["args"])
        old = args_cls(**{k: v for k, v in saved.items() if k in args_cls.__dataclass_fields__})
        return identity(old)
    except Exception:  # noqa: BLE001 - args of another version: nothing to compare
        return None


def check_resume(now: dict, before: Optional[dict], out: str, step: int) -> None:
    """Refuse to resume the run in out (at step) with flags that define another model or data."""
    if before is None:
        return
    differ = [k for k in sorted(set(now) | set(before)) if not _same(now.get(k), before.get(k))]
    if not differ:
        return
    parts = "; ".join(_difference(k, before.get(k), now.get(k)) for k in differ)
    raise ValueError(f"--out {out} holds a run (at step {step}) made with other settings: {parts}. Rerun with "
                     f"the run's settings to resume it, or give a new --out to start afresh (or delete "
                     f"{os.path.join(out, 'checkpoints')})")


def _shown(value) -> str:
    if isinstance(value, dict):  # a path flag
        return value["path"]
    return "(not given)" if value is None else str(value)


def _difference(flag: str, before, now) -> str:
    if isinstance(before, dict) and isinstance(now, dict) and before["path"] == now["path"]:
        return f"{flag} {now['path']} holds other content than when the run started"
    return f"{flag} {_shown(before)} there, {_shown(now)} now"


def resume_line(out: str, ckpt: str, step: int, saved_args: str, args, fixed: tuple, total: int,
                total_flag: str) -> str:
    """The line that says a run resumes: from which step, and the flags changed since."""
    try:
        saved = json.loads(saved_args)
    except (TypeError, ValueError):
        saved = {}
    now = vars(args)
    changed = [f"{flag_name(k)} {saved[k]} -> {now[k]}" for k in now
               if k not in fixed and k in saved and saved[k] != now[k]]
    line = f"[gptfast] resuming from step {step} of --out {out} ({os.path.basename(ckpt)})"
    if changed:
        line += f", with {', '.join(changed)}"
    if step >= total:
        line += f"; it has run its {total} steps already: nothing to train (a larger {total_flag} goes on)"
    return line


def ranks_line(state: dict, world: int, args: TrainArgs) -> Optional[str]:
    """The line that says a resumed run goes on over another number of ranks than its checkpoint's
    (None where it is the same, or the checkpoint does not record it): whether its steps keep
    their rows (the same global batch) or not."""
    before = state.get("world")
    if before is None or before == world:
        return None
    try:
        saved = json.loads(state["args"])
        rows_before = saved["batch_size"] * saved["grad_accum"] * before
    except (KeyError, TypeError, ValueError):
        rows_before = None
    rows = args.batch_size * args.grad_accum * world
    line = f"[gptfast] the run was trained on {before} rank(s), now on {world}: "
    if rows == rows_before:
        return line + f"the same {rows} rows a step (batch x grad_accum x ranks), so the same data as before"
    return line + (f"{rows} rows a step (batch x grad_accum x ranks), {rows_before} before: other data from "
                   "here on" if rows_before else f"{rows} rows a step (batch x grad_accum x ranks)")


# flags run_identity may hold, which a resume-line never lists as "changed"
_TRAIN_FIXED = ("data", "out", "tokenizer", "vocab_size", "init", "n_layer", "n_head", "n_embd", "block_size",
                "seed", "val_fraction")


def finite_json(value):
    """value with every NaN or infinite float replaced by None: json.dumps then writes valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def say(rank: int, line: Optional[str]) -> None:
    """A line on stderr from rank 0 (what the run does: resume, --init, the checkpoint format)."""
    if rank == 0 and line:
        print(line, file=sys.stderr, flush=True)


def save_format_line(model, what: str) -> Optional[str]:
    """The line that says a model is saved as nanoGPT's ckpt.pt (no Hugging Face equivalent), or None."""
    reason = model.config.hf_incompatibility()
    if reason is None:
        return None
    return (f"[gptfast] {what}: {reason}: checkpoints and the final model are saved as a nanoGPT-style ckpt.pt "
            "holding the whole config (gptfast loads it; transformers does not)")


def _check_inputs(args: TrainArgs, init_kind: str) -> None:
    """What the files and the flags' combination must be, checked before anything runs."""

    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data file not found: {args.data}")
    if args.eval_data is not None and not os.path.isfile(args.eval_data):
        raise FileNotFoundError(f"--eval-data file not found: {args.eval_data}")
    if args.vocab_size is not None and not trains_tokenizer(args, init_kind):
        if args.tokenizer:
            why = f"--tokenizer {args.tokenizer} is the tokenizer"
        elif init_kind == "checkpoint":
            why = f"--init {args.init} brings its tokenizer"
        else:
            why = f"--data {args.data} holds token ids, made with the tokenizer saved beside them"
        raise ValueError(f"--vocab-size {args.vocab_size} sets the size of a tokenizer trained on a text --data, "
                         f"and none is trained here: {why}; drop --vocab-size")


def _batch_generator(args: TrainArgs, step: int) -> torch.Generator:
    # A step's rows are a function of (seed, step) only, drawn for all ranks at once (get_batch):
    # a resumed run draws exactly the batches the uninterrupted run would have drawn, with no RNG
    # state to save, and on any number of ranks with the same global batch.
    return torch.Generator().manual_seed(args.seed * 1_000_003 + step)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global RNGs (dropout) from (seed, step, rank), so a resumed run draws the same
    dropout masks as the uninterrupted one."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank + 1)


def train(args: TrainArgs, progress: bool = True) -> dict:
    """Train (or resume) and return a summary dict; see the module docstring.

    Under torchrun (WORLD_SIZE > 1) every rank trains on its slice of each step's rows with DDP
    (global batch = batch_size x grad_accum x world size) and scores its slice of the validation
    rows; rank 0 alone logs, runs the zero-shot evaluation and writes checkpoints. A run directory
    that holds a checkpoint resumes from it, if the flags that define the model and the data are
    the run's (else an error names them); the summary's floats are finite or None.
    """
    from tqdm import tqdm

    from .data import train_tokenizer_on_text
    from .model import GPT
    from .tokenizer import Tokenizer

    ckpt = latest_checkpoint(args.out)
    try:
        init = resolve_init(args.init)
    except FileNotFoundError:
        if ckpt is None:
            raise
        init = ("checkpoint", args.init)  # gone since the run started: the run's checkpoint has all it needs
    _check_inputs(args, init[0])
    rank, world, device = setup_device(args.device)
    dtype = resolve_dtype(args.dtype)
    os.makedirs(args.out, exist_ok=True)
    state = read_train_state(ckpt)
    identity = run_identity(args, init)
    if ckpt is not None:
        check_resume(identity, state.get("identity") or _legacy_identity(
            state, TrainArgs, lambda old: run_identity(old, resolve_init(old.init))), args.out, state["step"])
        say(rank, resume_line(args.out, ckpt, state["step"], state.get("args"), args, _TRAIN_FIXED, args.steps,
                              "--steps"))
        say(rank, ranks_line(state, world, args))
        model, tokenizer = GPT.from_pretrained(ckpt).to(device), Tokenizer.from_pretrained(ckpt)
        if args.block_size > model.config.n_positions:  # a checkpoint of an older version, without identity
            raise ValueError(f"--block-size {args.block_size} exceeds the context of the run's model in {ckpt} "
                             f"({model.config.n_positions} positions)")
    else:
        say(rank, describe_init(args.init, *init))
        shared = None
        if world > 1 and trains_tokenizer(args, init[0]):  # one rank trains the tokenizer; the others read it
            shared = os.path.join(args.out, "tokenizer-init")
            if rank == 0:
                train_tokenizer_on_text(args.data, args.vocab_size or DEFAULT_VOCAB_SIZE, progress=progress,
                                        source="--data ").save(shared)
            _barrier(world)
            shared, path = Tokenizer.from_pretrained(shared), shared
            _barrier(world)  # every rank has read it: it leaves the run directory
            if rank == 0:
                shutil.rmtree(path)
        model, tokenizer = _build(args, device, init, tokenizer=shared, progress=progress and rank == 0)
    say(rank, save_format_line(model, f"--init {args.init}" if ckpt is None else f"the run in --out {args.out}"))
    model.train()
    model.gradient_checkpointing_enable(args.grad_checkpoint)
    vocab = model.config.vocab_size
    train_tokens, val_tokens = load_data(args, tokenizer, vocab, progress=progress and rank == 0, warn=rank == 0)
    zero_shot = _zero_shot_requests(args, tokenizer, model.config.n_positions) if args.eval_data and rank == 0 \
        else None
    raw_model = model
    if args.compile:
        model = torch.compile(model, backend=args.compile)
    model = wrap_ddp(model, device, world)
    opt, step, log = make_optimizer(raw_model, args.lr, args.weight_decay, (0.9, 0.95), state)
    scaler = make_scaler(device, dtype, state)
    start, state = step, None  # the optimizer holds its state now
    if args.warmup >= args.steps > step:  # a short run with the default --warmup 50, say
        say(rank, f"[gptfast] --warmup {args.warmup} is not below --steps {args.steps}: the learning rate warms up "
                  f"over the whole run, to {lr_at(args.steps - 1, args):.3g} at the last step (--lr {args.lr}), "
                  "and never decays to --min-lr; give a smaller --warmup for the schedule")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(total=args.steps, initial=min(step, args.steps), desc="train", disable=not progress or rank != 0,
               unit="step")
    b, accum = args.batch_size, args.grad_accum
    meter = Throughput(b * accum * args.block_size * world, _flops_per_token(raw_model, args.block_size),
                       peak_tflops(device, dtype, args.peak_tflops))
    if progress and rank == 0:
        bar.write(f"{len(train_tokens):,} training tokens; a step takes {b} x {accum} x {world} x "
                  f"{args.block_size} = {meter.tokens_per_step:,} (batch x grad_accum x ranks x block)",
                  file=sys.stderr)
    t0, loss_f = time.time(), None
    while step < args.steps:
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_tokens, b * accum, args.block_size, _batch_generator(args, step), device, vocab,
                         rank, world)
        seed_step(args.seed, step, rank)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro, sync in micro_steps(model, accum, world):
            with sync:
                with autocast:
                    loss = _shifted_loss(model, x[micro * b:(micro + 1) * b], y[micro * b:(micro + 1) * b]) / accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        optimizer_step(opt, scaler, raw_model.parameters(), args.grad_clip)
        step += 1
        loss_f = _mean_over_ranks(loss_sum, world)  # a host read: the step's work is done here
        meter.add(time.perf_counter() - t_step)
        bar.update(1)
        bar.set_postfix(meter.postfix(loss=f"{loss_f:.3f}"))
        entry = {"step": step, "loss": loss_f, "lr": lr_at(step - 1, args)}
        eval_now = step % args.eval_every == 0 or step == args.steps
        if eval_now or step % 10 == 0:  # the entries log_step keeps
            entry.update(meter.window())
        if eval_now:  # on every rank, each scoring its slice of the validation rows
            with autocast:
                entry["val_loss"] = estimate_loss(raw_model, val_tokens, args, device,
                                                  torch.Generator().manual_seed(args.seed), rank, world)

        def validate():
            with autocast:
                extra = _zero_shot(raw_model, zero_shot, args.batch_size, entry) if zero_shot else ""
            entry["val_ppl"] = _exp(entry["val_loss"])
            return (f"step {step}: train loss {loss_f:.3f}, val loss {entry['val_loss']:.3f}, "
                    f"val ppl {entry['val_ppl']:.1f}{extra}")

        log_step(entry, eval_now, validate,
                 lambda: _checkpoint(raw_model, tokenizer, opt, step, log, args, identity, scaler, world),
                 log, bar, progress, rank, world)
    bar.close()
    finish_run(raw_model, tokenizer, log, args.out, rank, world)
    vals = [e for e in log if "val_loss" in e]
    if step == start:  # nothing trained in this call (a finished run run again): its last logged loss
        loss_f = log[-1]["loss"] if log else None
    return finite_json({"steps": step, "train_loss": loss_f, "val_loss": vals[-1]["val_loss"] if vals else None,
                        "seconds": time.time() - t0, "parameters": raw_model.num_parameters(), "out": args.out,
                        "world_size": world, **meter.summary(device)})


def _exp(x: float) -> float:
    """exp(x), inf past the float range (a diverged loss), not OverflowError."""
    return math.exp(x) if x < 709 else math.inf


def _zero_shot_requests(args: TrainArgs, tokenizer, context_len: int):
    """(rows, task, tokenized requests) of --eval-data, read and checked (a continuation must fit
    in the model's context_len) before training starts."""
    from .evaluation import prepare_requests
    from .finetune import read_rows

    rows = read_rows(args.eval_data)[:args.eval_limit]
    return (rows, *prepare_requests(rows, tokenizer, source=f"--eval-data {args.eval_data}", context_len=context_len))


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
        save_run_model(model, out)
        tokenizer.save(out)
        atomic_write_text(os.path.join(out, "log.jsonl"), "".join(json.dumps(finite_json(e)) + "\n" for e in log))
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


def save_run_model(model, path: str) -> None:
    """The model as a Hugging Face directory, or, for a config with none (nanoGPT's bias=False), as
    a nanoGPT-style ckpt.pt with the whole config; GPT.from_pretrained(path) loads either. Model
    files of the other format, left by an earlier save, go first: a config.json would shadow a ckpt.pt."""
    from .checkpoint import remove_model_files

    fmt = "hf" if model.config.hf_incompatibility() is None else "nanogpt"  # save_pretrained's "auto"
    remove_model_files(path, keep=fmt)
    model.save_pretrained(path, format=fmt)


def _checkpoint(model, tokenizer, opt, step, log, args, identity: Optional[dict] = None, scaler=None,
                world: Optional[int] = None):
    """Write checkpoints/step-N (model, tokenizer, train_state.pt, with the number of ranks when
    given) atomically, point latest at it, and remove the older ones."""
    root = os.path.join(args.out, "checkpoints")
    name = f"step-{step:07d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_run_model(model, tmp)
    tokenizer.save(tmp)
    state = {"optimizer": opt.state_dict(), "step": step, "log": json.dumps(log), "args": json.dumps(vars(args))}
    if identity is not None:
        state["identity"] = identity
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if world is not None:
        state["world"] = world
    atomic_torch_save(state, os.path.join(tmp, "train_state.pt"))
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
    stride = ctx // 2 if stride is None else stride
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
