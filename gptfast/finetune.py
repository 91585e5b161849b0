"""GPT-1-style fine-tuning: a linear head on the last token, trained on task loss + lm_coef x LM loss.

    gptfast finetune --data train.jsonl --val val.jsonl --out runs/sst --model path/to/gpt2

As in Radford et al. (2018), "Improving Language Understanding by Generative Pre-Training":
the pretrained decoder reads the example, a linear layer (`score`, no bias) reads the final
hidden state of its last token, and the objective is the task cross-entropy plus lm_coef
(lambda, 0.5 in the paper) times the language-model loss on the same tokens. Defaults follow
the paper: 3 epochs, batch 32, lr 6.25e-5 with linear warm-up over 0.2% of the steps and
linear decay to 0, weight decay 0.01, dropout 0.1 on the head's input.

Tasks and their input transformations:
- "classification": one text, or a text pair (entailment...) joined by the delimiter token:
  `[start] text [delim text_pair] [extract]`, read in the order given.
- "similarity" (`--task similarity`; paraphrase, semantic similarity): a text pair has no order,
  so, as in the paper (section 3.3), the model reads it both ways, `[start] text [delim]
  text_pair [extract]` and `[start] text_pair [delim] text [extract]` (cut alike when too long),
  and the head reads the sum of the two last-token states: swapping the texts changes nothing.
  It is a classification head with `similarity: true` in its TaskSpec; the LM loss covers both
  orders.
- "choice" (multiple choice, e.g. story cloze): each choice becomes `[start] context [delim]
  choice [extract]`, the head gives each one a score, and a softmax over the choices is the
  task's distribution.
By default there is no start or extract token (the head reads the text's last token, as
transformers' GPT2ForSequenceClassification does) and the delimiter is the tokenizer's
end-of-text token. `special_tokens=True` (`--special-tokens`) adds the paper's three learned
tokens `<|start|>`, `<|delimiter|>`, `<|extract|>` to the tokenizer and the embedding.

Data: JSON lines (`{"text": ..., "text_pair": ..., "label": ...}`; for "choice"
`{"context": ..., "choices": [...], "label": index}`), or CSV/TSV with a header row for
classification. Labels may be strings or ints; the label set is read from the training file.

The run directory ends as a Hugging Face directory that transformers loads as
GPT2ForSequenceClassification / OpenAIGPTForSequenceClassification (same logits; the
`pad_token_id` in config.json is chosen so its last-non-pad rule finds the same token), plus
the tokenizer, log.jsonl and loss.png. A similarity model is an exception: transformers knows
no two-order sum, and the same directory loaded there scores one order only; as the head is
linear with no bias, the sum of its logits for both orders is gptfast's logits (in eval mode).
gptfast loads it with the similarity behaviour. `--max-len` is saved with the head, so
predict() and `gptfast classify` cut over-long examples as training and its validation did.
Checkpoints, resume and torchrun work as in gptfast.train: the same command resumes an
interrupted run and reaches the same weights.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import GPTConfig
from .model import GPT

TASKS = ("classification", "choice")
FINETUNE_TASKS = ("classification", "similarity", "choice")  # --task: similarity is a classification head
SPECIAL_TOKENS = ("<|start|>", "<|delimiter|>", "<|extract|>")


@dataclass
class TaskSpec:
    """What the head predicts and how examples become tokens; saved in config.json."""

    task: str = "classification"
    labels: list = field(default_factory=list)  # label names (classification); [] for choice
    start: Optional[int] = None  # token ids of the input transformation (None: not used)
    delimiter: Optional[int] = None
    extract: Optional[int] = None
    pad: Optional[int] = None  # pad id written to config.json for transformers' last-non-pad rule
    text_pair: Optional[bool] = None  # classification: trained on text pairs (True), single texts (False), or unknown
    max_len: Optional[int] = None  # tokens an example is cut to (--max-len; None: the model's context)
    similarity: bool = False  # classification of text pairs read in both orders, states summed (GPT-1 3.3)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError(f"classification needs at least 2 labels, got {self.labels!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels!r}")
        if self.max_len is not None and (isinstance(self.max_len, bool) or not isinstance(self.max_len, int)
                                         or self.max_len < 2):
            raise ValueError(f"max_len must be an int >= 2 or None, got {self.max_len!r}")
        if not isinstance(self.similarity, bool):
            raise ValueError(f"similarity must be True or False, got {self.similarity!r}")
        if self.similarity and (self.task != "classification" or self.text_pair is False):
            raise ValueError(f"similarity reads text pairs in both orders: it needs task 'classification' and "
                             f"text_pair True or None, got task {self.task!r}, text_pair {self.text_pair!r}")

    @property
    def kind(self) -> str:
        """The input transformation: "classification", "similarity" or "choice" (collate's task)."""
        return "similarity" if self.similarity else self.task

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "choice" else len(self.labels)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown fine-tuning field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # [B, labels] (classification) or [B, choices] (choice; -inf for absent choices)
    loss: Optional[torch.Tensor]  # task_loss + lm_coef * lm_loss
    task_loss: Optional[torch.Tensor]
    lm_loss: Optional[torch.Tensor]


class GPTClassifier(GPT):
    """A GPT with a linear head (`score`, as in transformers' *ForSequenceClassification) on the
    last real token of each row. It is still a language model: generate() and the LM head work.

    With spec.similarity the head reads h(a $ b) + h(b $ a), the last-token states of a pair in
    both orders. Saved, such a model still says GPT2ForSequenceClassification (or OpenAIGPT...)
    in config.json: transformers computes score(h(a $ b)), one order only, and the sum of its
    logits over both orders equals this model's logits in eval mode (the head is linear, no bias).
    GPTClassifier.from_pretrained reads `similarity` from config.json and sums the orders."""

    def __init__(self, config: GPTConfig, spec: TaskSpec, classifier_dropout: float = 0.1):
        super().__init__(config)
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"spec must be a TaskSpec, got {type(spec).__name__}")
        if not 0.0 <= classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {classifier_dropout}")
        self.spec = spec
        self.config.extra = {**config.extra, "finetune": asdict(spec)}
        self.classifier_dropout = nn.Dropout(classifier_dropout)
        self.score = nn.Linear(config.n_embd, spec.num_outputs, bias=False)
        self._init_weights(self.score)

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, spec: Optional[TaskSpec] = None, device=None, dtype=None,
                        classifier_dropout: float = 0.1) -> "GPTClassifier":
        """A fine-tuned classifier (gptfast's, or transformers' *ForSequenceClassification, as a
        directory or a model object), or a language model plus a new head for `spec` (required then)."""
        from .checkpoint import _source, build_model, read_checkpoint

        config, state, raw = read_checkpoint(path)
        path = _source(path)
        saved = config.extra.get("finetune")
        if saved is not None:
            saved = TaskSpec.from_dict(saved)
        elif "score.weight" in state:  # trained by transformers: labels from id2label
            id2label = raw.get("id2label") or {str(i): f"LABEL_{i}" for i in range(state["score.weight"].shape[0])}
            eos = raw.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos  # a list: its first id, as bos_token_id
            saved = TaskSpec(labels=[id2label[k] for k in sorted(id2label, key=int)], pad=raw.get("pad_token_id"),
                             delimiter=eos if isinstance(eos, int) and 0 <= eos < config.vocab_size else None)
        if saved is not None and spec is not None and (saved.task, saved.labels) != (spec.task, spec.labels):
            raise ValueError(f"{path} holds a {saved.task} head for labels {saved.labels}; asked for a "
                             f"{spec.task} head for labels {spec.labels}")
        spec = spec or saved
        if spec is None:
            raise ValueError(f"{path} is a language model, not a fine-tuned classifier (it has no fine-tuning "
                             f"head): make one with `gptfast finetune --model {path} --data train.jsonl --out DIR`, "
                             "or in Python pass spec=TaskSpec(...) to add a new head")
        if saved is None:
            state = {k: v for k, v in state.items() if not k.startswith("score.")}
        return build_model(cls, config, state, path, device=device, dtype=dtype, fresh=("score.",), spec=spec,
                           classifier_dropout=classifier_dropout)

    def hf_config_overrides(self) -> dict:
        """Keys that make config.json load in transformers as *ForSequenceClassification."""
        arch = "GPT2ForSequenceClassification" if self.config.pre_ln else "OpenAIGPTForSequenceClassification"
        names = self.spec.labels if self.spec.task == "classification" else ["score"]
        return {"architectures": [arch], "id2label": {str(i): str(n) for i, n in enumerate(names)},
                "label2id": {str(n): i for i, n in enumerate(names)}, "pad_token_id": self.spec.pad}

    # ---- forward -------------------------------------------------------------
    def forward(self, input_ids, lengths=None, labels=None, lm_coef: float = 0.0, validate: bool = True):
        """input_ids [B, T] (classification), [B, 2, T] (similarity: the pair, then the pair swapped)
        or [B, C, T] (choice), right-padded; lengths [B] or [B, C] real tokens per row (default T;
        0 marks an absent choice); labels [B] class or choice index. Returns ClassifierOutput; the
        losses are None without labels, lm_loss is None when lm_coef is 0."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (2, 3):
            raise ValueError(f"input_ids must be [B, T] or [B, C, T], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        choice, similarity = self.spec.task == "choice", self.spec.similarity
        if (input_ids.dim() == 3) != (choice or similarity) or (similarity and input_ids.shape[1] != 2):
            want = "[B, C, T]" if choice else "[B, 2, T] (both orders)" if similarity else "[B, T]"
            raise ValueError(f"a {self.spec.kind} head takes input_ids of {want}, got {tuple(input_ids.shape)}")
        lead, T = input_ids.shape[:-1], input_ids.shape[-1]
        if lengths is None:
            lengths = torch.full(lead, T, dtype=torch.long, device=input_ids.device)
        if tuple(lengths.shape) != tuple(lead):
            raise ValueError(f"lengths must have shape {tuple(lead)}, got {tuple(lengths.shape)}")
        ids, lens = input_ids.reshape(-1, T), lengths.reshape(-1).to(input_ids.device)
        if validate and (int(lens.max()) > T or int(lens.min()) < (0 if choice else 1)):
            raise ValueError(f"lengths must be in [{0 if choice else 1}, {T}], "
                             f"got [{int(lens.min())}, {int(lens.max())}]")
        h = self.hidden_states(ids, validate=validate)  # (N, T, C)
        last = (lens - 1).clamp(min=0)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # (N, C): each row's last real token
        if similarity:
            pooled = pooled.view(lead[0], 2, -1).sum(1)  # (B, C): h(a $ b) + h(b $ a)
        logits = self.score(self.classifier_dropout(pooled)).float()
        if choice:
            logits = logits.view(lead).masked_fill(lens.view(lead) == 0, float("-inf"))  # (B, C)
        task_loss = lm_loss = loss = None
        if labels is not None:
            if tuple(labels.shape) != (lead[0],):
                raise ValueError(f"labels must have shape ({lead[0]},), got {tuple(labels.shape)}")
            if validate and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < logits.shape[-1]:
                raise ValueError(f"labels must be in [0, {logits.shape[-1]}), got [{int(labels.min())}, "
                                 f"{int(labels.max())}]")
            task_loss = F.cross_entropy(logits, labels.to(logits.device))
            loss = task_loss
        if lm_coef and T > 1:
            targets = ids[:, 1:].masked_fill(torch.arange(1, T, device=ids.device) >= lens[:, None], -100)
            lm_loss = ops.linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), self.lm_head.weight,
                                               targets.reshape(-1))  # no [N, T, V] logits held
            loss = lm_coef * lm_loss if loss is None else loss + lm_coef * lm_loss
        return ClassifierOutput(logits, loss, task_loss, lm_loss)


# ---- examples ----------------------------------------------------------------------------

@dataclass
class Example:
    seqs: list  # token ids: one sequence (classification) or one per choice
    label: Optional[int]  # class index or choice index; None when unlabelled


def read_rows(path: str) -> list[dict]:
    """Rows of a JSON-lines, CSV or TSV file (CSV/TSV: a header row names the columns)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.endswith((".csv", ".tsv")):
                sep = "\t" if path.endswith(".tsv") else ","
                reader, rows = csv.reader(f, delimiter=sep), []
                header = next(reader, [])
                if len(set(header)) != len(header):
                    raise ValueError(f"{path}:1: the header names a column twice: {header}")
                for cells in reader:  # a row whose cells do not match the header would shift its columns
                    if not cells:
                        continue
                    if len(cells) != len(header):
                        raise ValueError(f"{path}:{reader.line_num}: {len(cells)} cells, but the header has "
                                         f"{len(header)} ({header}); quote a cell that holds a "
                                         f"{'tab' if sep == chr(9) else 'comma'}")
                    rows.append(dict(zip(header, cells)))
            else:
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{path}:{n}: not a JSON object: {exc}") from None
                        if not isinstance(rows[-1], dict):
                            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rows[-1]).__name__}")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def _check_label_type(raw, where: str) -> None:
    if not isinstance(raw, (str, int, float)):
        raise ValueError(f"{where}: label must be a string or a number, got {raw!r}")


def label_set(rows: Sequence[dict], source: str) -> list:
    """The sorted distinct labels of classification rows (ints and integer strings numerically)."""
    missing = [n for n, r in enumerate(rows, 1) if r.get("label") in (None, "")]
    if missing:
        raise ValueError(f"{source}: row {missing[0]} has no 'label' ({len(missing)} rows lack one)")
    for n, r in enumerate(rows, 1):
        _check_label_type(r["label"], f"{source}: row {n}")
    values = {r["label"] for r in rows}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sorted(values)
    names = {str(v) for v in values}
    if all(n.lstrip("-").isdigit() for n in names):  # "2" before "10" (CSV cells are strings)
        return sorted(names, key=int)
    return sorted(names)


def encode_rows(rows: Sequence[dict], tokenizer, spec: TaskSpec, max_len: int, source: str,
                labelled: bool = True) -> tuple[list[Example], int]:
    """Examples (token ids per the spec's input transformation) and how many were truncated.
    Each is cut to max_len tokens, or to the spec's max_len (the one it was trained with) when
    that is shorter. An error names the row's number in source."""
    examples, cut = _encode_rows(rows, tokenizer, spec, max_len, source, labelled)
    return examples, sum(cut)


def _encode_rows(rows: Sequence[dict], tokenizer, spec: TaskSpec, max_len: int, source: str,
                 labelled: bool = True) -> tuple[list[Example], list[bool]]:
    """encode_rows, with whether each example was truncated."""
    if spec.max_len is not None:
        max_len = min(max_len, spec.max_len)
    index = {lab: i for i, lab in enumerate(spec.labels)}
    examples, truncated = [], []
    for n, row in enumerate(rows, 1):
        where = f"{source}: row {n}"
        if spec.task == "classification":
            hint = "; a row with 'choices' is multiple choice (--task choice)" if "choices" in row else ""
            text = _field(row, ("text", "sentence", "text_a"), where, hint)
            pair = row.get("text_pair", row.get("text_b"))
            _check_pair(spec, pair not in (None, ""), where)
            parts = [tokenizer.encode(text)] + ([tokenizer.encode(str(pair))] if pair not in (None, "") else [])
            orders = [parts, parts[::-1]] if spec.similarity else [parts]  # similarity: both orders
            seqs = [_join(p, spec, max_len, where) for p in orders]
            label = None
            if labelled or row.get("label") not in (None, ""):
                raw = row.get("label")
                if raw in (None, ""):
                    raise ValueError(f"{where}: no 'label' (one of the model's labels {spec.labels})")
                _check_label_type(raw, where)
                key = raw if raw in index else str(raw)
                if key not in index:
                    raise ValueError(f"{where}: label {raw!r} is not one of the model's labels {spec.labels}")
                label = index[key]
        else:
            context = tokenizer.encode(_field(row, ("context", "text"), where))
            choices = row.get("choices")
            if not isinstance(choices, list) or len(choices) < 2:
                hint = (" (a row of a text and its label is classification: --task classification)"
                        if choices is None and "label" in row else "")
                raise ValueError(f"{where}: 'choices' must be a list of at least 2 texts, got {choices!r}{hint}")
            seqs = [_join([context, tokenizer.encode(str(c))], spec, max_len, where) for c in choices]
            label = row.get("label")
            if label is None and labelled:
                raise ValueError(f"{where}: no 'label' (the index of the right choice)")
            if label is not None and (not isinstance(label, int) or not 0 <= label < len(choices)):
                raise ValueError(f"{where}: label must be an int in [0, {len(choices)}), got {label!r}")
        truncated.append(any(cut for _, cut in seqs))
        examples.append(Example([seq for seq, _ in seqs], label))
    return examples, truncated


def _field(row: dict, names: tuple, where: str, hint: str = "") -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    empty = [n for n in names if row.get(n) == ""]
    if empty:
        raise ValueError(f"{where}: the text is empty (field {empty[0]!r})")
    raise ValueError(f"{where}: no text: expected a field {' or '.join(repr(n) for n in names)}, "
                     f"got {sorted(row)}{hint}")


def _check_pair(spec: TaskSpec, has_pair: bool, where: str) -> None:
    """A classification row must be what the head was trained on: a text pair, or a single text."""
    if spec.similarity and not has_pair:
        raise ValueError(f"{where}: this is a similarity model (it compares two texts, in both orders), but the "
                         "row has no second text: give its 'text_pair' (gptfast classify's --pair)")
    if spec.text_pair is None or spec.text_pair == has_pair:
        return
    if has_pair:
        raise ValueError(f"{where}: this model was fine-tuned on single texts, but the row has a second text "
                         "('text_pair'; gptfast classify's --pair): give the text alone")
    raise ValueError(f"{where}: this model was fine-tuned on text pairs, but the row has no second text: give "
                     "its 'text_pair' (gptfast classify's --pair)")


def _join(parts: list[list[int]], spec: TaskSpec, max_len: int, where: str) -> tuple[list[int], bool]:
    """([start] a [delim b] [extract], whether it was cut): the end of the longest part is cut
    until the whole fits max_len."""
    if len(parts) > 1 and spec.delimiter is None:
        raise ValueError(f"{where}: a text pair needs a delimiter token, and this tokenizer has no end-of-text "
                         "token: fine-tune with special_tokens=True (--special-tokens)")
    fixed = (spec.start is not None) + (spec.extract is not None) + (len(parts) - 1)
    parts = [list(p) for p in parts]
    seq, cut = [], False
    while sum(map(len, parts)) + fixed > max_len:
        # similarity: a tie is broken by the tokens, not the order, so both orders are cut alike
        longest = max(parts, key=(lambda p: (len(p), p)) if spec.similarity else len)
        if not longest:
            raise ValueError(f"{where}: max_len {max_len} leaves no room for text")
        del longest[max(0, max_len - fixed - (sum(map(len, parts)) - len(longest))):]
        cut = True
    if not any(parts) and spec.start is None and spec.extract is None:
        raise ValueError(f"{where}: the text encodes to no tokens")
    if spec.start is not None:
        seq.append(spec.start)
    for i, p in enumerate(parts):
        if i:
            seq.append(spec.delimiter)
        seq.extend(p)
    if spec.extract is not None:
        seq.append(spec.extract)
    return seq, cut


def collate(examples: Sequence[Example], task: str, pad_id: int, device) -> tuple:
    """(input_ids, lengths, labels or None) right-padded to the batch's longest sequence; task is
    the spec's kind: ids [B, T] for "classification", [B, 2, T] or [B, C, T] otherwise."""
    C = max(len(e.seqs) for e in examples)
    if task == "classification" and C != 1:  # a similarity example would lose its second order
        raise ValueError(f"classification examples hold one sequence each, got {C}; for a similarity model "
                         "pass task=spec.kind ('similarity')")
    T = max(len(s) for e in examples for s in e.seqs)
    ids = torch.full((len(examples), C, T), pad_id, dtype=torch.long)
    lengths = torch.zeros((len(examples), C), dtype=torch.long)
    for b, e in enumerate(examples):
        for c, s in enumerate(e.seqs):
            ids[b, c, :len(s)] = torch.tensor(s, dtype=torch.long)
            lengths[b, c] = len(s)
    if task == "classification":
        ids, lengths = ids[:, 0], lengths[:, 0]
    labels = None if any(e.label is None for e in examples) else torch.tensor([e.label for e in examples])
    return ids.to(device), lengths.to(device), None if labels is None else labels.to(device)


# ---- evaluation and prediction ---------------------------------------------------------

@torch.no_grad()
def evaluate(model: GPTClassifier, examples: Sequence[Example], batch_size: int = 32, lm_coef: float = 0.0,
             progress: bool = False) -> dict:
    """Accuracy and mean task loss (and LM loss when lm_coef) over labelled examples: the task
    loss averaged over examples, the LM loss over target tokens (as in training), so neither
    depends on how the examples fall into batches."""
    from tqdm import tqdm

    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    correct, task_sum, lm_sum, lm_targets = 0, 0.0, 0.0, 0
    pad = _pad_id(model.spec)
    for i in tqdm(range(0, len(examples), batch_size), desc="evaluate", disable=not progress):
        chunk = examples[i:i + batch_size]
        ids, lengths, labels = collate(chunk, model.spec.kind, pad, model.device)
        if labels is None:
            raise ValueError("evaluate needs labelled examples")
        out = model(ids, lengths, labels, lm_coef=lm_coef)
        correct += int((out.logits.argmax(-1) == labels).sum())
        task_sum += float(out.task_loss) * len(chunk)
        if out.lm_loss is not None:
            n = sum(max(len(s) - 1, 0) for e in chunk for s in e.seqs)  # the tokens lm_loss is the mean over
            lm_sum += float(out.lm_loss) * n
            lm_targets += n
    model.train(was_training)
    result = {"examples": len(examples), "accuracy": correct / len(examples), "loss": task_sum / len(examples)}
    if lm_coef:
        result["lm_loss"] = lm_sum / lm_targets if lm_targets else None
    return result


@torch.no_grad()
def predict(model: GPTClassifier, tokenizer, rows: Sequence[dict], batch_size: int = 32,
            source: str = "input") -> torch.Tensor:
    """Probabilities [N, labels] (classification, similarity) or [N, choices] (choice) for rows
    in the data file format (labels not needed); source names the rows in errors (their file)."""
    examples, _ = encode_rows(rows, tokenizer, model.spec, model.config.n_positions, source, labelled=False)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        ids, lengths, _ = collate(examples[i:i + batch_size], model.spec.kind, _pad_id(model.spec), model.device)
        out.append(model(ids, lengths).logits.softmax(-1).cpu())
    model.train(was_training)
    width = max(o.shape[-1] for o in out)
    return torch.cat([F.pad(o, (0, width - o.shape[-1])) for o in out])


def _pad_id(spec: TaskSpec) -> int:
    return spec.pad if spec.pad is not None else 0  # any id: lengths mask the padding


# ---- training ----------------------------------------------------------------------------

@dataclass
class FinetuneArgs:
    """What `gptfast finetune` runs; every value is checked on construction (errors name the flag)."""

    data: str
    out: str
    model: Optional[str] = None  # checkpoint to start from (default: the shipped model)
    val: Optional[str] = None  # validation file (default: a val_fraction split of data)
    task: str = "classification"  # or "similarity" (a text pair in both orders), "choice"
    lm_coef: float = 0.5
    epochs: int = 3
    batch_size: int = 32  # examples per micro-batch and rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 6.25e-5
    warmup_fraction: float = 0.002
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    classifier_dropout: float = 0.1
    special_tokens: bool = False
    max_len: Optional[int] = None  # default: the model's context
    eval_every: int = 0  # steps between evaluations; 0: at the end of each epoch
    val_fraction: float = 0.1
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    grad_checkpoint: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self):
        from .train import check_number, flag_name, resolve_dtype

        for name in ("data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{flag_name(name)} must be a path, got {getattr(self, name)!r}")
        if self.task not in FINETUNE_TASKS:
            raise ValueError(f"--task must be one of {FINETUNE_TASKS}, got {self.task!r}")
        for name in ("epochs", "batch_size", "grad_accum"):
            check_number(self, name, low=1, integer=True)
        check_number(self, "eval_every", low=0, integer=True, why=" (0: at the end of each epoch)")
        check_number(self, "max_len", low=2, integer=True, optional=True)
        check_number(self, "seed", integer=True)
        check_number(self, "lr", low=0, low_open=True)
        check_number(self, "lm_coef", low=0)
        check_number(self, "val_fraction", low=0, high=1, low_open=True, high_open=True)
        check_number(self, "warmup_fraction", low=0, high=1, high_open=True)
        check_number(self, "weight_decay", low=0)
        check_number(self, "grad_clip", low=0, low_open=True, allow_inf=True)  # inf: no clipping
        check_number(self, "classifier_dropout", low=0, high=1, high_open=True)
        resolve_dtype(self.dtype)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# flags that define a fine-tuning run (its model, head and data): a resume must keep them
_FINETUNE_FIXED = ("data", "out", "model", "val", "task", "special_tokens", "max_len", "val_fraction", "seed",
                   "batch_size", "grad_accum")


def run_identity(args: FinetuneArgs, world: int) -> dict:
    """The flags that define a fine-tuning run, flag -> value (paths resolved): a resumed run must
    have the same. The examples a step takes count, not how they split into micro-batches."""
    from .train import _path_key

    ident = {"--data": _path_key(args.data), "--model": _path_key(args.model) if args.model else None,
             "--task": args.task, "--special-tokens": bool(args.special_tokens), "--max-len": args.max_len,
             "--seed": args.seed, "--batch-size x --grad-accum x ranks": args.batch_size * args.grad_accum * world}
    if args.val:
        ident["--val"] = _path_key(args.val)
    else:
        ident["--val-fraction"] = args.val_fraction
    return ident


def finetune(args: FinetuneArgs, progress: bool = True) -> dict:
    """Fine-tune (or resume) and return a summary; see the module docstring.

    Under torchrun every rank trains on its own slice of each global batch (batch_size x
    grad_accum per rank) with DDP; rank 0 alone evaluates, logs and writes checkpoints. With
    grad_accum > 1 the micro-batches' losses are weighted (by examples for the task loss, by
    target tokens for the LM loss) so that their sum is the whole step's objective. A run
    directory that holds a checkpoint resumes from it if the flags that define the run are the
    same (else an error names them); the summary's floats are finite or None.
    """
    from tqdm import tqdm

    from .tokenizer import Tokenizer
    from .train import (_checkpoint, _legacy_identity, _mean_over_ranks, check_resume, finish_run, finite_json,
                        latest_checkpoint, log_step, make_optimizer, make_scaler, micro_steps, optimizer_step,
                        read_train_state, resolve_dtype, resume_line, save_format_line, say, seed_step,
                        setup_device, wrap_ddp)

    for flag, path in (("--data", args.data), ("--val", args.val)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} file not found: {path}")
    rank, world, device = setup_device(args.device)
    dtype = resolve_dtype(args.dtype)
    train_rows = read_rows(args.data)
    os.makedirs(args.out, exist_ok=True)
    ckpt = latest_checkpoint(args.out)
    state = read_train_state(ckpt)
    identity = run_identity(args, world)
    if ckpt is not None:
        check_resume(identity, state.get("identity") or _legacy_identity(
            state, FinetuneArgs, lambda old: run_identity(old, world)), args.out, state["step"])
        model = GPTClassifier.from_pretrained(ckpt, classifier_dropout=args.classifier_dropout)
        tokenizer = Tokenizer.from_pretrained(ckpt)
    else:
        model, tokenizer = _start(args, train_rows)
    say(rank, save_format_line(model, f"--model {args.model}" if ckpt is None else f"the run in --out {args.out}"))
    model.to(device).train()
    model.gradient_checkpointing_enable(args.grad_checkpoint)
    spec = model.spec
    max_len = min(args.max_len or model.config.n_positions, model.config.n_positions)
    if args.val:
        train_set, cut_train = encode_rows(train_rows, tokenizer, spec, max_len, args.data)
        val_set, cut_val = encode_rows(read_rows(args.val), tokenizer, spec, max_len, args.val)
    else:  # a seeded split of the training file, encoded in file order (an error names its first bad row)
        examples, cuts = _encode_rows(train_rows, tokenizer, spec, max_len, args.data)
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, int(len(train_rows) * args.val_fraction))
        val_set, train_set = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
        cut_val, cut_train = sum(cuts[i] for i in order[:n_val]), sum(cuts[i] for i in order[n_val:])
    if (cut_train or cut_val) and rank == 0:
        print(f"[gptfast] {cut_train} training and {cut_val} validation examples truncated to {max_len} tokens",
              file=sys.stderr)
    b, accum = args.batch_size, args.grad_accum
    steps_per_epoch = len(train_set) // (b * accum * world)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {b} x --grad-accum {accum} x {world} rank(s) exceeds the "
                         f"{len(train_set)} training examples")
    total = args.epochs * steps_per_epoch
    if ckpt is not None:
        say(rank, resume_line(args.out, ckpt, state["step"], state.get("args"), args, _FINETUNE_FIXED, total,
                              "--epochs"))
    eval_every = args.eval_every or steps_per_epoch
    raw_model, model = model, wrap_ddp(model, device, world)
    opt, step, log = make_optimizer(raw_model, args.lr, args.weight_decay, (0.9, 0.999), state)
    scaler = make_scaler(device, dtype, state)
    start, state = step, None  # the optimizer holds its state now
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    warmup = max(1, round(args.warmup_fraction * total))
    bar = tqdm(total=total, initial=min(step, total), desc="finetune", disable=not progress or rank != 0,
               unit="step")
    t0, loss_f = time.time(), None
    pad = _pad_id(spec)
    while step < total:
        lr = args.lr * min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = _batch(train_set, step, steps_per_epoch, b * accum, rank, world, args.seed)
        micro = [batch[k * b:(k + 1) * b] for k in range(accum)]
        targets = [sum(max(len(s) - 1, 0) for e in mb for s in e.seqs) for mb in micro]  # LM loss terms
        seed_step(args.seed, step, rank)
        opt.zero_grad(set_to_none=True)
        sums = {name: torch.zeros((), device=device) for name in ("loss", "task_loss", "lm_loss")}
        for k, sync in micro_steps(model, accum, world):
            ids, lengths, labels = collate(micro[k], spec.kind, pad, device)
            w_task, w_lm = 1 / accum, targets[k] / max(1, sum(targets))  # 1.0 and 1.0 without accumulation
            with sync:
                with autocast:
                    out = model(ids, lengths, labels, lm_coef=args.lm_coef)
                loss = w_task * out.task_loss
                if out.lm_loss is not None:
                    loss = loss + args.lm_coef * (w_lm * out.lm_loss)
                    sums["lm_loss"] += w_lm * out.lm_loss.detach()
                scaler.scale(loss).backward()
            sums["loss"] += loss.detach()
            sums["task_loss"] += w_task * out.task_loss.detach()
        optimizer_step(opt, scaler, raw_model.parameters(), args.grad_clip)
        step += 1
        loss_f = _mean_over_ranks(sums["loss"], world)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_f:.3f}")
        entry = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_f,
                 "task_loss": _mean_over_ranks(sums["task_loss"], world), "lr": lr}
        if args.lm_coef:
            entry["lm_loss"] = _mean_over_ranks(sums["lm_loss"], world)

        def validate():
            with autocast:
                val = evaluate(raw_model, val_set, args.batch_size, args.lm_coef)
            entry.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
            if "lm_loss" in val:
                entry["val_lm_loss"] = val["lm_loss"]
            return (f"step {step} (epoch {entry['epoch']:.2f}): train loss {loss_f:.3f}, "
                    f"val accuracy {val['accuracy']:.4f}, val task loss {val['loss']:.4f}")

        log_step(entry, step % eval_every == 0 or step == total, validate,
                 lambda: _checkpoint(raw_model, tokenizer, opt, step, log, args, identity, scaler),
                 log, bar, progress, rank, world)
    bar.close()
    finish_run(raw_model, tokenizer, log, args.out, rank, world)
    vals = [e for e in log if "val_accuracy" in e]
    if step == start:  # nothing trained in this call (a finished run run again): its last logged loss
        loss_f = log[-1]["loss"] if log else None
    return finite_json({"steps": step, "epochs": args.epochs, "train_loss": loss_f, "task": spec.kind,
                        "labels": spec.labels, "val_accuracy": vals[-1]["val_accuracy"] if vals else None,
                        "val_loss": vals[-1]["val_loss"] if vals else None, "train_examples": len(train_set),
                        "val_examples": len(val_set), "seconds": time.time() - t0, "out": args.out,
                        "world_size": world})


def _start(args: FinetuneArgs, rows: list[dict]) -> tuple[GPTClassifier, object]:
    """A new classifier from the --model language model (or classifier), with its tokenizer."""
    from .checkpoint import default_model_path, locate_checkpoint, resolve_path
    from .tokenizer import Tokenizer

    path = args.model or default_model_path()
    if path is None:
        raise FileNotFoundError("the shipped default model is missing from this install; pass --model PATH")
    try:
        path = resolve_path(path)
        locate_checkpoint(path)  # what is wrong with a path that is no checkpoint, before the tokenizer's error
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--model {args.model}: {exc}") from None
    tokenizer = Tokenizer.from_pretrained(path)
    labels = label_set(rows, args.data) if args.task != "choice" else []
    torch.manual_seed(args.seed)  # the new head's (and new tokens') init
    if args.special_tokens:
        start, delimiter, extract = tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        pad = delimiter  # never the last token of an example
    else:
        start = extract = None
        delimiter = pad = tokenizer.eos_token_id
    pairs = ({r.get("text_pair", r.get("text_b")) not in (None, "") for r in rows}
             if args.task == "classification" else set())
    similarity = args.task == "similarity"  # every row a pair: encode_rows names one that is not
    spec = TaskSpec(task="choice" if args.task == "choice" else "classification", labels=labels, start=start,
                    delimiter=delimiter, extract=extract, pad=pad,
                    text_pair=True if similarity else pairs.pop() if len(pairs) == 1 else None,  # None: mixed
                    max_len=args.max_len, similarity=similarity)
    model = GPTClassifier.from_pretrained(path, spec=spec, classifier_dropout=args.classifier_dropout)
    model.config.extra["finetuned_from"] = path
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)
    return model, tokenizer


def _batch(examples: list[Example], step: int, steps_per_epoch: int, size: int, rank: int, world: int,
           seed: int) -> list[Example]:
    # The order is a function of (seed, epoch) only, so a resumed run sees the same batches.
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (i * world + rank) * size
    return [examples[j] for j in order[start:start + size].tolist()]
