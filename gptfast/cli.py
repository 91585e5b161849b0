"""The `gptfast` command: generate, backends, info, prepare, train, finetune, classify, perplexity, eval, bench."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time


def _default_model() -> str:
    from .checkpoint import default_model_path
    path = default_model_path()
    if path is None:
        raise FileNotFoundError("the shipped default model is missing from this install (gptfast/assets/default); "
                                "pass --model PATH")
    return path


def _dtype(name: str):
    from gptfast.train import resolve_dtype  # one list of --dtype names for every command
    return resolve_dtype(name)


def _device(name: str):
    from gptfast.train import _resolve_device  # auto, cpu, cuda, cuda:N; errors name --device
    return _resolve_device(name)


def _at_least(low: int):
    """An argparse type: an int >= low (the error names the flag and the value)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's "invalid int value" for text that is no int
    return parse


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _stop_string(text: str) -> str:
    """--stop: a non-empty string; \\n, \\t, \\r and \\\\ name a newline, tab, carriage return and
    backslash, since `--stop "\\n"` reaches us from the shell as a backslash and an n."""
    text = re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def cmd_generate(args) -> int:
    import gptfast
    from gptfast.checkpoint import resolve_path

    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: pass it as an argument or on standard input")
        prompt = sys.stdin.read()
    if not prompt:
        raise ValueError("the prompt is empty")
    from gptfast.ops.sampling import check_sample_args
    import torch
    check_sample_args(torch.zeros(1, 1), args.temperature, args.top_k, args.top_p, args.min_p)
    path = resolve_path(args.model) if args.model else _default_model()
    device = _device(args.device)
    if args.backend:
        gptfast.use_backend(args.backend)
    t0 = time.perf_counter()
    model = gptfast.GPT.from_pretrained(path, device=device, dtype=_dtype(args.dtype))
    tok = gptfast.Tokenizer.from_pretrained(path)
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    draft = _load_draft(args, tok, prompt, device) if args.draft else None
    if args.verbose:
        print(f"[gptfast] loaded {path} ({model.num_parameters() / 1e6:.1f}M parameters) on {device} "
              f"in {time.perf_counter() - t0:.2f}s; prompt {len(ids)} tokens", file=sys.stderr)
    ctx, whose = model.config.n_positions, "the model's"
    if isinstance(draft, gptfast.GPT) and draft.config.n_positions < ctx:  # the draft runs over the same tokens
        ctx, whose = draft.config.n_positions, "the draft model's"
    budget = ctx - len(ids)
    if budget <= 0:
        raise ValueError(f"the prompt has {len(ids)} tokens; {whose} context is {ctx}")
    max_new = min(args.max_new_tokens, budget)
    if max_new < args.max_new_tokens:
        print(f"[gptfast] generating {max_new} tokens: {whose} context ({ctx}) is full after that", file=sys.stderr)
    if draft is not None:  # before anything is printed
        from gptfast.speculative import check_draft
        check_draft(model, draft, args.draft_tokens, len(ids) + max_new)
    out = sys.stdout
    for n in range(args.num_samples):
        # the prompt goes out with the first text, once the prefill and the first decode step have
        # run: the lines of the ops that fall back (logged once each, on stderr) come before it
        # on a terminal, not inside the text
        head = [(f"\n===== sample {n + 1} =====\n" if args.num_samples > 1 else "") + prompt]

        def write(s, head=head):
            if head:
                out.write(head.pop())
            out.write(s)
        stream = tok.stream_decoder()
        text, t1, count, stats, cut, shown = "", time.perf_counter(), 0, {}, None, 0
        seed = None if args.seed is None else args.seed + n
        for toks in model.generate_stream(ids, max_new_tokens=max_new, temperature=args.temperature,
                                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=seed,
                                          stop_strings=args.stop or None, tokenizer=tok,
                                          ignore_eos=args.ignore_eos,
                                          cuda_graph=False if args.no_cuda_graph else None,
                                          draft_model=draft, num_draft_tokens=args.draft_tokens, stats=stats):
            if toks[0] is None:
                break
            count += 1
            piece = stream.push(toks[0]) if toks[0] < tok.vocab_size else ""  # a padded vocabulary's extra ids
            text += piece  # a stop string new in text ends in the piece: search from there on
            cut = _stop_cut(text, args.stop, len(text) - len(piece))
            if cut is not None:  # print up to the stop string, not beyond
                write(text[shown:cut])
                break
            if count < 2:  # the first decode step has not run yet
                continue
            end = len(text) - _stop_prefix(text, args.stop)  # a stop string's start waits for its end
            write(text[shown:end])
            out.flush()
            shown = end
        if cut is None:  # what a stream that ended inside a character holds back, as decode gives it,
            held = stream.flush()  # which may complete a stop string (generation stopped on it)
            text += held
            write(text[shown:_stop_cut(text, args.stop, len(text) - len(held))])
        write("\n")
        out.flush()
        if args.verbose:
            dt = time.perf_counter() - t1
            print(f"[gptfast] {count} tokens in {dt:.2f}s ({count / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
            if draft is not None and stats.get("rounds"):
                print(f"[gptfast] speculative: {stats['rounds']} rounds, {stats['accepted']}/{stats['drafted']} "
                      f"drafts accepted ({stats['acceptance_rate']:.0%})", file=sys.stderr)
    return 0


def _load_draft(args, tok, prompt: str, device):
    """The --draft model (or prompt lookup); its tokenizer, where it has one, must encode the prompt
    as the model's does."""
    import gptfast
    from gptfast.checkpoint import resolve_path

    if args.draft == "prompt-lookup":
        return gptfast.PromptLookup()
    path = resolve_path(args.draft)
    draft = gptfast.GPT.from_pretrained(path, device=device, dtype=_dtype(args.dtype))
    try:
        draft_tok = gptfast.Tokenizer.from_pretrained(path)
    except FileNotFoundError:
        draft_tok = None  # a bare checkpoint: the vocabulary size is still checked
    if draft_tok is not None and draft_tok.encode(prompt) != tok.encode(prompt):
        raise ValueError(f"--draft {args.draft}: its tokenizer encodes the prompt differently from the model's; "
                         "a draft must share the model's tokenizer")
    return draft


def _stop_cut(text: str, stops, new: int = 0) -> int | None:
    """Where the first stop string in text starts, given none is in text[:new] (each is searched
    from len(s) - 1 characters before new on: linear in the stream, not quadratic); else None."""
    hits = [i for i in (text.find(s, max(0, new - len(s) + 1)) for s in stops or []) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix(text: str, stops) -> int:
    """The length of the longest end of text that begins a stop string (held back from the output
    until the next tokens show whether the stop string follows)."""
    return max((k for s in stops or [] for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
               default=0)


def cmd_backends(args) -> int:
    import gptfast
    report = gptfast.backends()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    dev = report.pop("_device")
    print(f"device: {dev['device']}   torch {dev['torch']}   backend setting: {dev['backend']}")
    width = max(len(k) for k in report)
    for op, r in report.items():
        state = "kernel" if r["available"] else "fallback"
        print(f"  {op:<{width}}  {state:<8}  {r['implementation']}: {r['reason']}")
    return 0


def cmd_info(args) -> int:
    from gptfast.checkpoint import describe
    info = describe(args.model or _default_model())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    kind = "GPT-2 (pre-LN)" if cfg["pre_ln"] else "GPT-1 (post-LN)"
    print(f"{info['path']}\n  {kind}, {info['parameters'] / 1e6:.2f}M parameters")
    print(f"  layers {cfg['n_layer']}, heads {cfg['n_head']}, width {cfg['n_embd']}, MLP {cfg['n_inner']}, "
          f"context {cfg['n_positions']}, vocab {cfg['vocab_size']}, activation {cfg['activation']}")
    if cfg.get("extra"):
        for k, v in cfg["extra"].items():
            print(f"  {k}: {v}")
    print(f"  files: {', '.join(info['files'])}")
    return 0


def _numeric_flags(parser, args_cls, flags, helps=None) -> None:
    """Add each (flag, type) with its default in the help, read from args_cls's field (or helps[flag]);
    the flag's value stays None when not given, so args_cls applies the default."""
    defaults = {f.name: f.default for f in dataclasses.fields(args_cls)}
    for name, typ in flags:
        dest = name.replace("-", "_")
        text = (helps or {}).get(name) or (None if defaults[dest] is None else f"default: {defaults[dest]}")
        parser.add_argument(f"--{name}", type=typ, dest=dest, help=text)


def _run_training(args, args_cls, run) -> int:
    """The flags given on the command line override args_cls's defaults; rank 0 prints the summary."""
    fields = {k: v for k, v in vars(args).items() if k in args_cls.__dataclass_fields__ and v is not None}
    summary = run(args_cls(**fields), progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args) -> int:
    from gptfast.train import TrainArgs, train
    return _run_training(args, TrainArgs, train)


def cmd_finetune(args) -> int:
    from gptfast.finetune import FinetuneArgs, finetune
    return _run_training(args, FinetuneArgs, finetune)


def cmd_classify(args) -> int:
    from gptfast.finetune import GPTClassifier, encode_rows, evaluate, predict, read_rows
    from gptfast.tokenizer import Tokenizer

    if (args.text is None) == (args.data is None):
        raise ValueError("give either a TEXT to classify or --data FILE, not both or neither")
    model = GPTClassifier.from_pretrained(args.model, device=_device(args.device), dtype=_dtype(args.dtype))
    tok = Tokenizer.from_pretrained(args.model)
    spec = model.spec
    if args.data is None:
        if spec.task == "choice":
            if not args.choice or len(args.choice) < 2:
                raise ValueError("this model scores multiple choices: pass --choice TEXT at least twice")
            row, names = {"context": args.text, "choices": args.choice}, args.choice
        else:
            if args.choice:
                raise ValueError("--choice is for multiple-choice models; this one classifies into "
                                 f"{spec.labels}")
            row, names = {"text": args.text, "text_pair": args.pair}, [str(n) for n in spec.labels]
        probs = predict(model, tok, [row])[0].tolist()
        ranked = sorted(zip(names, probs), key=lambda t: -t[1])
        if args.json:
            print(json.dumps({n: p for n, p in ranked}, indent=2))
        else:
            for n, p in ranked:
                print(f"{p:8.4f}  {n}")
        return 0
    rows = read_rows(args.data)
    if all(r.get("label") not in (None, "") for r in rows):
        examples, _ = encode_rows(rows, tok, spec, model.config.n_positions, args.data)
        result = evaluate(model, examples, batch_size=args.batch_size, progress=True)
        print(json.dumps(result, indent=2) if args.json else
              f"accuracy {result['accuracy']:.4f} on {result['examples']} examples (task loss {result['loss']:.4f})")
        return 0
    probs = predict(model, tok, rows, batch_size=args.batch_size, source=args.data)
    for p in probs:  # one prediction per line
        best = int(p.argmax())
        print(json.dumps({"label": spec.labels[best] if spec.task == "classification" else best,
                          "probability": float(p[best])}))
    return 0


def cmd_prepare(args) -> int:
    from gptfast.data import find_sources, prepare, resumable_tokenizer, texts_of
    from gptfast.tokenizer import Tokenizer, train_byte_level_bpe

    if (args.tokenizer is None) == (args.vocab_size is None):
        raise ValueError("give --tokenizer DIR (the model's tokenizer) or --vocab-size N (train a byte-level BPE "
                         "on the inputs), not both or neither")
    if args.tokenizer:
        tok = Tokenizer.from_pretrained(args.tokenizer)
    else:  # an interrupted run's trained tokenizer, if any, so that run resumes
        tok = None if args.restart else resumable_tokenizer(args.out, args.inputs, args.vocab_size, args.text_field)
        if tok is None:
            tok = train_byte_level_bpe((), args.vocab_size,
                                       texts=texts_of(find_sources(args.inputs), args.text_field))
    meta = prepare(args.inputs, args.out, tok, val_fraction=args.val_fraction, text_field=args.text_field,
                   progress=not args.quiet, resume=not args.restart,
                   trained_vocab_size=None if args.tokenizer else args.vocab_size)
    print(json.dumps(meta, indent=2))
    return 0


def cmd_perplexity(args) -> int:
    import gptfast
    from gptfast.data import check_tokenizer, is_token_data, open_tokens
    from gptfast.train import perplexity
    path = args.model or _default_model()
    model = gptfast.GPT.from_pretrained(path, device=_device(args.device), dtype=_dtype(args.dtype))
    tok = gptfast.Tokenizer.from_pretrained(path)
    if is_token_data(args.file):  # token ids: a prepared directory's val.bin, or a .bin file
        ids, _, meta, _ = open_tokens(args.file, split="val")
        check_tokenizer(meta, tok, args.file)
    else:
        try:
            with open(args.file, encoding="utf-8", newline="") as f:
                ids = tok.encode(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"text file not found: {args.file}") from None
    result = perplexity(model, ids, stride=args.stride, batch_size=args.batch_size)
    print(json.dumps(result, indent=2) if args.json else
          f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens (nll {result['nll']:.4f} nats/token)")
    return 0


def cmd_eval(args) -> int:
    import gptfast
    from gptfast.evaluation import evaluate_zero_shot
    from gptfast.finetune import read_rows

    path = args.model or _default_model()
    model = gptfast.GPT.from_pretrained(path, device=_device(args.device), dtype=_dtype(args.dtype))
    rows = read_rows(args.file)[:args.limit]
    result = evaluate_zero_shot(model, gptfast.Tokenizer.from_pretrained(path), rows, batch_size=args.batch_size,
                                delimiter=args.delimiter, progress=not args.json, source=args.file)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["task"] == "choice":
        print(f"accuracy {result['accuracy']:.4f}, accuracy_norm {result['accuracy_norm']:.4f} "
              f"on {result['examples']} examples")
    else:
        print(f"accuracy {result['accuracy']:.4f} on {result['examples']} examples "
              f"(continuation perplexity {result['perplexity']:.3f})")
    return 0


def cmd_bench(argv) -> int:
    try:
        from gptfast.ops._dispatch import import_source_package
        import_source_package("bench", "bench")  # installed, or bench/ of a source checkout
        from gptfast.bench.cli import main as bench_main
    except ImportError as exc:
        raise RuntimeError(f"the benchmark suite is not installed ({exc})") from None
    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptfast", description="Fast, correct GPT-1/GPT-2 runtime.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams to stdout)")
    g.add_argument("prompt", nargs="?", help="prompt text (default: read standard input)")
    g.add_argument("--model", help="HF GPT-2 directory, nanoGPT checkpoint or hub name (default: shipped model)")
    g.add_argument("--max-new-tokens", "-n", type=_at_least(1), default=100, help="default: %(default)s")
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="default: %(default)s (0 disables)")
    g.add_argument("--top-p", type=float, default=0.95, help="default: %(default)s (1 disables)")
    g.add_argument("--min-p", type=float, default=0.0, help="default: %(default)s (0 disables)")
    g.add_argument("--seed", type=int, help="sample i of --num-samples uses seed + i - 1 (default: unseeded)")
    g.add_argument("--stop", action="append", type=_stop_string,
                   help="stop string (repeatable; \\n, \\t, \\r and \\\\ are escapes: --stop '\\n' stops at a newline)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--num-samples", type=_at_least(1), default=1, help="default: %(default)s")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16/bf16, float16/fp16 (default: %(default)s)")
    g.add_argument("--backend", choices=["auto", "kernel", "torch"])
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="run each decode step eagerly instead of replaying a captured CUDA graph")
    g.add_argument("--draft", help="speculative decoding: a smaller model with the same tokenizer (e.g. gpt2 "
                                   "drafting for gpt2-xl), or 'prompt-lookup' (proposals copied from the "
                                   "prompt and the output so far); greedy output is unchanged, samples keep "
                                   "the model's distribution")
    g.add_argument("--draft-tokens", type=int, default=4,
                   help="tokens the draft proposes per round (default: %(default)s)")
    g.add_argument("--verbose", "-v", action="store_true", help="timings and load info on stderr")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("backends", help="which kernels can run here, and why not")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backends)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("model", nargs="?", help="checkpoint (default: shipped model)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("prepare", help="tokenize a corpus once into train.bin / val.bin for gptfast train "
                                       "(nanoGPT's layout; resumes an interrupted run)")
    d.add_argument("inputs", nargs="+", help="text (.txt, .md), JSON-lines (.jsonl) or Parquet (.parquet) files, "
                                             "or directories")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--tokenizer", help="tokenizer directory (a checkpoint's)")
    d.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the inputs instead")
    d.add_argument("--val-fraction", type=float, default=0.005, help="share of the tokens kept for validation")
    d.add_argument("--text-field", default="text", help="the field of a JSON line (column of a Parquet file) "
                                                        "that holds its text")
    d.add_argument("--restart", action="store_true",
                   help="start afresh instead of resuming an interrupted run of the same job in --out")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="pretrain or fine-tune on a text file or prepared token files "
                                     "(resumes an interrupted run)")
    t.add_argument("--data", required=True, help="UTF-8 text file, or a directory made by gptfast prepare "
                                                 "(or nanoGPT's train.bin/val.bin)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--tokenizer", help="tokenizer directory (default: train a byte-level BPE on --data)")
    t.add_argument("--init", help="a checkpoint to start from (directory, nanoGPT .pt, or a hub name that is no "
                   "preset), or a preset name (gpt2, gpt2-medium, ...: that shape, randomly initialised)")
    from gptfast.train import DEFAULT_VOCAB_SIZE, TrainArgs
    _numeric_flags(t, TrainArgs, (("vocab-size", int), ("n-layer", int), ("n-head", int), ("n-embd", int),
                   ("block-size", int), ("batch-size", int), ("grad-accum", int), ("steps", int),
                   ("lr", float), ("min-lr", float), ("warmup", int), ("weight-decay", float),
                   ("grad-clip", float), ("eval-every", int), ("eval-batches", int), ("val-fraction", float),
                   ("seed", int), ("peak-tflops", float)),
                   {"vocab-size": f"default: {DEFAULT_VOCAB_SIZE} (of the BPE trained on --data)", "min-lr": "default: --lr / 10",
                    "peak-tflops": "default: the GPU's datasheet peak, for MFU"})
    t.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training step (default backend: inductor)")
    t.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="activation checkpointing: recompute each block in the backward pass (less memory)")
    t.add_argument("--eval-data", help="zero-shot rows scored at every evaluation (JSON lines, as gptfast eval)")
    t.add_argument("--eval-limit", type=int, help="the first N rows of --eval-data only")
    t.add_argument("--device")
    t.add_argument("--dtype", help="float32 (default), bfloat16/bf16, float16/fp16 (loss-scaled)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="GPT-1-style fine-tuning: a classification or multiple-choice head, "
                                        "task loss + lm_coef x LM loss (resumes an interrupted run)")
    f.add_argument("--data", required=True, help="training examples: .jsonl, .csv or .tsv")
    f.add_argument("--out", required=True, help="run directory")
    f.add_argument("--model", help="checkpoint to start from (default: the shipped model)")
    f.add_argument("--val", help="validation examples (default: --val-fraction of --data)")
    f.add_argument("--task", choices=["classification", "similarity", "choice"],
                   help="similarity: text pairs read in both orders, their states summed (GPT-1)")
    from gptfast.finetune import FinetuneArgs
    _numeric_flags(f, FinetuneArgs, (("lm-coef", float), ("epochs", int), ("batch-size", int), ("grad-accum", int),
                   ("lr", float), ("warmup-fraction", float), ("weight-decay", float), ("grad-clip", float),
                   ("classifier-dropout", float), ("max-len", int), ("eval-every", int),
                   ("val-fraction", float), ("seed", int)),
                   {"max-len": "default: the model's context", "eval-every": "default: 0 (at the end of each epoch)"})
    f.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="activation checkpointing: recompute each block in the backward pass (less memory)")
    f.add_argument("--special-tokens", action="store_true", default=None,
                   help="add learned <|start|>, <|delimiter|>, <|extract|> tokens "
                        "(the GPT-1 paper's input transformation)")
    f.add_argument("--device")
    f.add_argument("--dtype", help="float32 (default), bfloat16/bf16, float16/fp16 (loss-scaled)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("classify", help="run a fine-tuned model on a text, or score it on a data file")
    c.add_argument("text", nargs="?", help="the text (or the context, for a multiple-choice model)")
    c.add_argument("--model", required=True, help="a fine-tuned model directory")
    c.add_argument("--pair", help="second text of a text-pair task")
    c.add_argument("--choice", action="append", help="a choice (repeat; multiple-choice models)")
    c.add_argument("--data", help="a data file: accuracy when every row has a label, else one prediction per row")
    c.add_argument("--batch-size", type=_at_least(1), default=32)
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="float32")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_classify)

    e = sub.add_parser("perplexity", help="perplexity of a model on a text file or token files")
    e.add_argument("file", help="a text file, a .bin token file, or a prepared directory (its val.bin)")
    e.add_argument("--model")
    e.add_argument("--stride", type=_at_least(1), help="tokens each window moves on (default: half the context)")
    e.add_argument("--batch-size", type=_at_least(1), default=1, help="windows per forward pass")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_perplexity)

    z = sub.add_parser("eval", help="zero-shot accuracy by log-likelihood: multiple choice (HellaSwag-style) "
                                    "or completion (LAMBADA-style) JSON lines")
    z.add_argument("file", help='JSON lines: {"context", "choices", "label"} or {"context", "continuation"}')
    z.add_argument("--model")
    z.add_argument("--batch-size", type=_at_least(1), default=8, help="sequences per forward pass")
    z.add_argument("--delimiter", default=" ", help="put between the context and each continuation")
    z.add_argument("--limit", type=_at_least(1), help="the first N rows only")
    z.add_argument("--device", default="auto")
    z.add_argument("--dtype", default="float32")
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_eval)

    sub.add_parser("bench", help="benchmark suite (gptfast bench --help)", add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\n[gptfast] interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output left (`gptfast generate ... | head`): stop, as cat does
        try:  # and leave nothing for Python to fail flushing at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as the shell reports a writer killed by a closed pipe
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"gptfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
