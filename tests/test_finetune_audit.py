"""Audit of GPT-1 fine-tuning against the paper and transformers' double-heads models: the head
reads each row's last real token, padding never enters the LM loss, a row's result does not
depend on its batch, data errors name the file's row, and classify cuts examples as training did."""
import json

import pytest
import torch

from gptfast import Tokenizer
from gptfast.checkpoint import default_model_path
from gptfast.cli import main
from gptfast.finetune import (Example, FinetuneArgs, GPTClassifier, TaskSpec, collate, encode_rows, evaluate,
                              finetune, label_set, predict, read_rows)

from hf_utils import make_hf_gpt1, make_hf_gpt2
from test_finetune import FILLER, _rows, _write


def _ragged(shape, vocab, gen):
    """Random ids [B, C, T] and lengths [B, C] in [1, T], the padding random ids too (not a pad id)."""
    ids = torch.randint(0, vocab, shape, generator=gen)
    lengths = torch.randint(1, shape[-1] + 1, shape[:-1], generator=gen)
    lengths[0, 0] = shape[-1]  # one row fills the width
    return ids, lengths


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
def test_choice_head_matches_transformers_double_heads(tmp_path, gpt1):
    """mc logits = transformers' with mc_token_ids = the last real token; the LM loss = its LM loss
    with the padding labelled -100; loss = mc loss + lambda * LM loss, and lambda 0 is the mc loss."""
    from transformers import GPT2DoubleHeadsModel, OpenAIGPTDoubleHeadsModel

    vocab = 1003 if gpt1 else 1001
    (make_hf_gpt1 if gpt1 else make_hf_gpt2)(tmp_path, vocab_size=vocab)
    hf = (OpenAIGPTDoubleHeadsModel if gpt1 else GPT2DoubleHeadsModel).from_pretrained(str(tmp_path)).eval()
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=TaskSpec(task="choice", delimiter=5)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
        hf.multiple_choice_head.summary.weight.copy_(model.score.weight)
        hf.multiple_choice_head.summary.bias.zero_()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids, lengths = _ragged((3, 4, 11), vocab, gen)
    labels = torch.randint(0, 4, (3,), generator=gen)
    lm_labels = ids.masked_fill(torch.arange(11) >= lengths[..., None], -100)
    with torch.no_grad():
        want = hf(ids, mc_token_ids=lengths - 1, labels=lm_labels, mc_labels=labels)
        got = model(ids, lengths, labels, lm_coef=0.7)
        pure = model(ids, lengths, labels, lm_coef=0.0)
    torch.testing.assert_close(got.logits, want.mc_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.task_loss, want.mc_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.lm_loss, want.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.mc_loss + 0.7 * want.loss, rtol=0, atol=1e-5)
    assert pure.lm_loss is None and torch.equal(pure.loss, pure.task_loss)
    torch.testing.assert_close(pure.task_loss, want.mc_loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["classification", "choice"])
def test_a_row_scores_the_same_alone_and_in_a_padded_batch(tmp_path, task):
    """Right padding to the batch's longest row (and, for choices, to its most choices) changes
    neither a row's logits nor, whatever the pad id, the LM loss."""
    make_hf_gpt2(tmp_path, vocab_size=1001)
    spec = TaskSpec(task=task, labels=["a", "b", "c"] if task == "classification" else [], delimiter=5)
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=spec).eval()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def seq():
        return torch.randint(0, 1001, (int(torch.randint(1, 14, (), generator=gen)),), generator=gen).tolist()
    examples = [Example([seq() for _ in range(1 if task == "classification" else int(torch.randint(2, 5, (),
                                                                                               generator=gen)))], 0)
                for _ in range(5)]
    with torch.no_grad():
        batch = model(*collate(examples, task, 1000, "cpu"), lm_coef=0.5)
        other_pad = model(*collate(examples, task, 7, "cpu"), lm_coef=0.5)
        for i, e in enumerate(examples):
            alone = model(*collate([e], task, 1000, "cpu")).logits[0]
            torch.testing.assert_close(batch.logits[i, :alone.numel()], alone, rtol=0, atol=1e-5)
            assert torch.all(batch.logits[i, alone.numel():] == float("-inf"))  # absent choices
    torch.testing.assert_close(other_pad.logits, batch.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(other_pad.lm_loss, batch.lm_loss, rtol=0, atol=1e-6)


def test_evaluate_lm_loss_does_not_depend_on_batch_size(tmp_path):
    """The LM loss is a mean over target tokens, as in training: batches of 1, 2 or all give the same."""
    make_hf_gpt2(tmp_path, vocab_size=1001)
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=TaskSpec(labels=["a", "b"], delimiter=5))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    examples = [Example([torch.randint(0, 1001, (n,), generator=gen).tolist()], n % 2) for n in (2, 13, 5, 9, 3)]
    ids, lengths, labels = collate(examples, "classification", 1000, "cpu")
    with torch.no_grad():
        whole = model(ids, lengths, labels, lm_coef=1.0)
    for size in (1, 2, 5):
        got = evaluate(model, examples, batch_size=size, lm_coef=1.0)
        assert got["lm_loss"] == pytest.approx(whole.lm_loss.item(), rel=1e-5), size
        assert got["loss"] == pytest.approx(whole.task_loss.item(), rel=1e-5), size  # last batch partial
        assert got["accuracy"] == int((whole.logits.argmax(-1) == labels).sum()) / len(examples)


# ---- data errors name the file and its row --------------------------------------------------

@pytest.mark.parametrize("bad", [4, 11, 26])
def test_errors_in_the_val_split_name_the_row_of_the_file(tmp_path, bad):
    """The split shuffles the rows; an error still names the row's number in the file, and of
    two bad rows the first in the file, whichever split each falls in."""
    rows = _rows(30, 14)
    rows[bad - 1] = {"text": "", "label": "day"}
    data = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=rf"d\.jsonl: row {bad}: the text is empty"):
        finetune(FinetuneArgs(data=data, out=str(tmp_path / "o"), device="cpu"), progress=False)
    for seed in range(4):  # the seed moves each row between the splits; the error stays the same
        later = {"text": "", "label": "day"}
        two = rows[:bad + 2] + [later] + rows[bad + 3:]
        data = _write(tmp_path / f"two{seed}.jsonl", two)
        with pytest.raises(ValueError, match=rf"two{seed}\.jsonl: row {bad}: the text is empty"):
            finetune(FinetuneArgs(data=data, out=str(tmp_path / f"o{seed}"), device="cpu", seed=seed), progress=False)


def test_csv_row_whose_cells_do_not_match_the_header_is_an_error(tmp_path):
    """An unquoted comma would shift a row's cells: its text's tail would become its label."""
    (tmp_path / "d.csv").write_text('text,label\n"fine, quoted",day\nhello, there,night\n')
    with pytest.raises(ValueError, match=r"d\.csv:3: 3 cells, but the header has 2 .*quote a cell that holds a comma"):
        read_rows(str(tmp_path / "d.csv"))
    (tmp_path / "d.tsv").write_text("text\ttext_pair\tlabel\nhello\tthere\n")
    with pytest.raises(ValueError, match=r"d\.tsv:2: 2 cells, but the header has 3 .*holds a tab"):
        read_rows(str(tmp_path / "d.tsv"))
    (tmp_path / "twice.csv").write_text("text,label,text\na,day,b\n")
    with pytest.raises(ValueError, match=r"twice\.csv:1: the header names a column twice"):
        read_rows(str(tmp_path / "twice.csv"))
    (tmp_path / "ok.tsv").write_text('text\tlabel\n"two\nlines"\tday\n\nbye\tnight\n')
    assert read_rows(str(tmp_path / "ok.tsv")) == [{"text": "two\nlines", "label": "day"},
                                                   {"text": "bye", "label": "night"}]


def test_label_errors_name_the_row():
    with pytest.raises(ValueError, match=r"t: row 2: label must be a string or a number, got \[1\]"):
        label_set([{"label": "a"}, {"label": [1]}], "t")
    spec = TaskSpec(labels=["day", "night"])
    tok = Tokenizer.from_pretrained(default_model_path())
    with pytest.raises(ValueError, match=r"v\.jsonl: row 2: no 'label' \(one of the model's labels"):
        encode_rows([{"text": "a", "label": "day"}, {"text": "b"}], tok, spec, 32, "v.jsonl")
    with pytest.raises(ValueError, match=r"v\.jsonl: row 1: label must be a string or a number, got \{"):
        encode_rows([{"text": "a", "label": {"x": 1}}], tok, spec, 32, "v.jsonl")


# ---- a saved fine-tuned model predicts as it was validated ----------------------------------

def test_classify_cuts_examples_as_training_did(tmp_path, capsys):
    """Trained with --max-len 12 (and the special tokens, saved with model and tokenizer), the saved
    model's predictions (predict, gptfast classify) cut long examples at 12 tokens too: classify
    --data VAL reproduces the run's val loss and accuracy."""
    rows = [{"text": r["text"] + " " + " ".join(FILLER), "label": r["label"]} for r in _rows(24, 15)]
    val = _write(tmp_path / "v.jsonl", rows[:7])
    args = FinetuneArgs(data=_write(tmp_path / "d.jsonl", rows), val=val, out=str(tmp_path / "o"), epochs=1,
                        batch_size=8, lr=1e-3, max_len=12, special_tokens=True, device="cpu")
    summary = finetune(args, progress=False)
    capsys.readouterr()
    assert main(["classify", "--data", val, "--model", args.out, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert got["accuracy"] == summary["val_accuracy"]
    model, tok = GPTClassifier.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    ex, _ = encode_rows(rows[:7], tok, model.spec, model.config.n_positions, "v")
    assert max(len(e.seqs[0]) for e in ex) == 12 and model.spec.max_len == 12
    assert all(e.seqs[0][0] == model.spec.start and e.seqs[0][-1] == model.spec.extract for e in ex)
    unlabelled = [{"text": r["text"]} for r in rows[:7]]
    probs = predict(model, tok, unlabelled, batch_size=3)
    with torch.no_grad():
        want = model(*collate(ex, "classification", model.spec.pad, "cpu")[:2]).logits.softmax(-1)
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-6)


def test_predict_names_the_source_and_keeps_the_training_mode(tmp_path):
    make_hf_gpt2(tmp_path, vocab_size=4096)
    tok = Tokenizer.from_pretrained(default_model_path())
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=TaskSpec(labels=["a", "b"], delimiter=0)).train()
    assert predict(model, tok, [{"text": "and the lord"}]).shape == (1, 2)
    assert model.training  # predict does not switch dropout off for the rest of a training loop
    with pytest.raises(ValueError, match=r"u\.jsonl: row 2: the text is empty"):
        predict(model, tok, [{"text": "a"}, {"text": ""}], source="u.jsonl")
