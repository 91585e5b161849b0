"""Zero-shot evaluation by log-likelihood, as GPT-2 is usually scored beyond perplexity.

    gptfast eval hellaswag.jsonl --model path/to/gpt2      # {"context", "choices", "label"} rows
    gptfast eval lambada.jsonl --model path/to/gpt2        # {"context", "continuation"} rows

Multiple choice (HellaSwag, PIQA, story cloze...): each choice is scored by the log-likelihood
of its tokens after the context; `accuracy` takes the choice with the highest sum, and
`accuracy_norm` the highest sum per character of the choice (lm-evaluation-harness's acc and
acc_norm). Completion (LAMBADA): `accuracy` is the share of rows whose continuation is the
model's greedy output token for token, and `perplexity` that of the continuation tokens.

A request is encoded as lm-evaluation-harness encodes it: the continuation is the delimiter
(default a space) and the choice, the context's trailing whitespace moves to its front, and its
ids are those of context + continuation past the context's own ids; where the two exceed the
model's context, the context loses its first tokens. An empty context is the end-of-text token,
as lm-evaluation-harness scores it (every token of the continuation is then predicted); with a
tokenizer that has none (GPT-1) the continuation, without the delimiter, is scored from its
second token on. Rows are the JSON lines the fine-tuning data uses (gptfast.finetune).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def prepare_requests(rows: Sequence[dict], tokenizer, delimiter: str = " ",
                     source: str = "rows", context_len: Optional[int] = None) -> tuple[str, list]:
    """The task ("choice" or "completion") and, per row, [(context ids, continuation ids), ...];
    a bad row is an error that names it (with context_len, the model's context: a continuation
    it cannot score too)."""
    if not rows:
        raise ValueError(f"{source} holds no rows")
    kinds = {("choices" in r) for r in rows}
    if len(kinds) != 1:
        raise ValueError(f"{source}: mixes multiple-choice rows (with 'choices') and completion rows")
    task = "choice" if kinds.pop() else "completion"
    out = []
    for n, row in enumerate(rows, 1):
        context = row.get("context")
        conts = row.get("choices") if task == "choice" else [row.get("continuation")]
        if not isinstance(context, str):
            raise ValueError(f"{source}: row {n} needs a string 'context', got {type(context).__name__}")
        if not isinstance(conts, list) or not conts or not all(isinstance(c, str) and c for c in conts):
            what = "'choices' (a list of non-empty strings)" if task == "choice" else "a non-empty 'continuation'"
            raise ValueError(f"{source}: row {n} needs {what}, got {conts!r}")
        if task == "choice":
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(conts):
                raise ValueError(f"{source}: row {n}: 'label' must be an index into its {len(conts)} choices, "
                                 f"got {label!r}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if context.strip():
            pairs = [_encode_pair(tokenizer, context, delimiter + c) for c in conts]
        elif context or eos is None:  # whitespace, or nothing with no end-of-text token (GPT-1)
            ctx, prefix = tokenizer.encode(context), delimiter if context else ""
            pairs = [(ctx, tokenizer.encode(prefix + c)) for c in conts]
        else:  # lm-evaluation-harness's context for an empty one: the end-of-text token
            pairs = [([eos], tokenizer.encode(delimiter + c)) for c in conts]
        for i, (ctx, cont) in enumerate(pairs):
            problem = _unscorable(ctx, cont, context_len)
            if problem:
                which = f"choice {i}" if task == "choice" else "the continuation"
                raise ValueError(f"{source}: row {n}: {which} {problem}")
        out.append(pairs)
    return task, out


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """lm-evaluation-harness's encoding of a request: the context's trailing whitespace moves to
    the front of the continuation, and the continuation's ids are those of the whole text past
    as many ids as the context alone encodes to."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped)
    return ctx, tokenizer.encode(stripped + continuation)[len(ctx):]


def _unscorable(ctx: list, cont: list, context_len: Optional[int]) -> Optional[str]:
    """Why a continuation cannot be scored after ctx in context_len positions, or None."""
    if not cont:
        return "encodes to no tokens"
    if not ctx and len(cont) < 2:
        return "is a single token with no context before it: nothing predicts it"
    if context_len is not None and len(cont) > context_len:
        return f"is {len(cont)} tokens: it must fit in the model's context of {context_len}"
    return None


@torch.no_grad()
def score_continuations(model, pairs: Sequence[tuple[list, list]], batch_size: int = 8,
                        progress: bool = False) -> list[tuple[float, bool, int]]:
    """(log-likelihood, is greedy, tokens) of each continuation after its context.

    As lm-evaluation-harness: a sequence longer than the context keeps its last n_positions + 1
    tokens, and the model reads all but the last (which is only a target). Sequences are batched
    right-padded (causal attention: padding never reaches a real token); only the continuation's
    positions go through the LM head. Identical sequences are scored once (so identical
    choices tie exactly, whatever batches they would have fallen in)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    ctx_len = model.config.n_positions
    seqs = []
    for n, (ctx, cont) in enumerate(pairs):
        problem = _unscorable(ctx, cont, ctx_len)
        if problem:
            raise ValueError(f"pair {n}: the continuation {problem}")
        ids = (ctx + cont)[-(ctx_len + 1):]
        scored = len(cont) if ctx else len(cont) - 1  # with no context the first token is no target
        seqs.append((tuple(ids), scored))
    unique = list(dict.fromkeys(seqs))  # first-seen order
    scores = dict(zip(unique, _score_sequences(model, unique, batch_size, progress)))
    return [scores[seq] for seq in seqs]


def _score_sequences(model, seqs: list[tuple[tuple, int]], batch_size: int, progress: bool):
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    results = []
    device = model.transformer.wte.weight.device
    for start in tqdm(range(0, len(seqs), batch_size), desc="eval", disable=not progress):
        group = seqs[start:start + batch_size]
        T = max(len(ids) for ids, _ in group)
        x = torch.zeros((len(group), T), dtype=torch.long)
        for b, (ids, _) in enumerate(group):
            x[b, :len(ids)] = torch.tensor(ids)
        x = x.to(device)
        h = model.hidden_states(x[:, :-1])  # (G, T - 1, C): the last column is a target only
        rows, cols = [], []
        for b, (ids, scored) in enumerate(group):  # position t predicts token t + 1
            cols += range(len(ids) - scored - 1, len(ids) - 1)
            rows += [b] * scored
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        logp = F.log_softmax(model.lm_head(h[rows_t, cols_t]).float(), dim=-1)  # (N, V)
        targets = x[rows_t, cols_t + 1]
        token_logp = logp.gather(1, targets[:, None])[:, 0]
        greedy = logp.argmax(dim=-1) == targets
        offset = 0
        for _, scored in group:
            results.append((float(token_logp[offset:offset + scored].sum()),
                            bool(greedy[offset:offset + scored].all()), scored))
            offset += scored
    model.train(was_training)
    return results


def evaluate_zero_shot(model, tokenizer, rows: Sequence[dict], batch_size: int = 8, delimiter: str = " ",
                       progress: bool = False, source: str = "rows") -> dict:
    """Accuracy (and accuracy_norm, or perplexity) of rows; see the module docstring."""
    task, requests = prepare_requests(rows, tokenizer, delimiter, source, model.config.n_positions)
    return evaluate_requests(model, rows, task, requests, batch_size, progress)


def evaluate_requests(model, rows: Sequence[dict], task: str, requests: list, batch_size: int = 8,
                      progress: bool = False) -> dict:
    """evaluate_zero_shot on rows already tokenized by prepare_requests (a training run
    tokenizes them once and evaluates at every evaluation step)."""
    flat = [pair for row in requests for pair in row]
    scores = iter(score_continuations(model, flat, batch_size=batch_size, progress=progress))
    if task == "completion":
        got = [next(scores) for _ in requests]
        nll, tokens = -sum(s for s, _, _ in got), sum(n for _, _, n in got)
        return {"task": task, "examples": len(rows), "accuracy": sum(g for _, g, _ in got) / len(rows),
                "perplexity": math.exp(nll / tokens), "tokens": tokens}
    correct = correct_norm = 0
    for row, reqs in zip(rows, requests):
        logliks = [next(scores)[0] for _ in reqs]
        per_char = [ll / len(c) for ll, c in zip(logliks, row["choices"])]
        correct += _argmax(logliks) == row["label"]
        correct_norm += _argmax(per_char) == row["label"]
    return {"task": task, "examples": len(rows), "accuracy": correct / len(rows),
            "accuracy_norm": correct_norm / len(rows)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal scores
