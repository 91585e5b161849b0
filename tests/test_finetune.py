"""GPT-1-style fine-tuning: the classifier against transformers' *ForSequenceClassification, the
task + lambda * LM objective, training to a learnable task, resume, torchrun, CLI and errors."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast import GPT, Tokenizer
from gptfast.checkpoint import default_model_path
from gptfast.cli import main
from gptfast.finetune import (FinetuneArgs, GPTClassifier, TaskSpec, collate, encode_rows, finetune, label_set,
                              predict, read_rows)
from gptfast.train import latest_checkpoint

from hf_utils import assert_same_weights, make_hf_classifier, make_hf_gpt2

PAD = 1000


def _right_padded(lengths, T, vocab=PAD, pad=PAD, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)  # never the pad id
    for b, n in enumerate(lengths):
        ids[b, n:] = pad
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
def test_logits_match_transformers_classifier(tmp_path, gpt1):
    hf = make_hf_classifier(tmp_path, gpt1=gpt1)
    model = GPTClassifier.from_pretrained(str(tmp_path))
    assert model.spec.labels == ["class-0", "class-1", "class-2"] and model.spec.pad == PAD
    ids, lengths = _right_padded([13, 1, 7, 10], 13)
    with torch.no_grad():
        expected = hf(ids).logits  # transformers pools the last non-pad token
        got = model(ids, lengths).logits
    assert got.shape == (4, 3)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("gpt1", [False, True], ids=["gpt2", "gpt1"])
def test_saved_classifier_loads_in_transformers(tmp_path, gpt1):
    from transformers import AutoModelForSequenceClassification

    make_hf_classifier(tmp_path / "hf", gpt1=gpt1, num_labels=4)
    model = GPTClassifier.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():  # make the head differ from the one we loaded
        model.score.weight.mul_(-2.0).add_(0.1)
    model.save_pretrained(str(tmp_path / "ours"))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(hf).__name__ == ("OpenAIGPTForSequenceClassification" if gpt1 else "GPT2ForSequenceClassification")
    assert hf.config.id2label == {i: f"class-{i}" for i in range(4)}
    ids, lengths = _right_padded([5, 9, 2], 9, seed=1)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids, lengths).logits).abs().max().item() <= 1e-4
    again = GPTClassifier.from_pretrained(str(tmp_path / "ours"))
    assert again.spec == model.spec
    assert torch.equal(again.score.weight, model.score.weight)


def test_objective_is_task_loss_plus_lambda_lm_loss(tmp_path):
    """loss = CE(head) + lambda * LM loss over the real tokens, as transformers computes each part."""
    from transformers import GPT2LMHeadModel

    hf_clf = make_hf_classifier(tmp_path)
    hf_lm = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()  # same transformer, tied LM head
    model = GPTClassifier.from_pretrained(str(tmp_path))
    ids, lengths = _right_padded([11, 4, 8], 11, seed=2)
    labels = torch.tensor([2, 0, 1])
    lm_labels = ids.masked_fill(torch.arange(11) >= lengths[:, None], -100)
    with torch.no_grad():
        task = F.cross_entropy(hf_clf(ids).logits, labels)
        lm = hf_lm(ids, labels=lm_labels).loss
        out = model(ids, lengths, labels, lm_coef=0.5)
    assert abs(out.task_loss.item() - task.item()) <= 1e-5
    assert abs(out.lm_loss.item() - lm.item()) <= 1e-5
    assert abs(out.loss.item() - (task + 0.5 * lm).item()) <= 1e-5
    no_lm = model(ids, lengths, labels, lm_coef=0.0)
    assert no_lm.lm_loss is None and torch.equal(no_lm.loss, no_lm.task_loss)


def test_gradients_flow_to_head_and_body(tmp_path):
    make_hf_classifier(tmp_path)
    model = GPTClassifier.from_pretrained(str(tmp_path)).train()
    ids, lengths = _right_padded([6, 3], 6, seed=3)
    model(ids, lengths, torch.tensor([1, 2]), lm_coef=0.5).loss.backward()
    for name in ("score.weight", "transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_padding_does_not_change_a_row(tmp_path):
    make_hf_classifier(tmp_path)
    model = GPTClassifier.from_pretrained(str(tmp_path))
    ids, lengths = _right_padded([7, 3], 7, seed=4)
    with torch.no_grad():
        both = model(ids, lengths).logits
        alone = model(ids[1:, :3], lengths[1:]).logits
    assert (both[1] - alone[0]).abs().max() <= 1e-5


def test_multiple_choice_scores_each_choice(tmp_path):
    make_hf_gpt2(tmp_path, vocab_size=1001)
    spec = TaskSpec(task="choice", delimiter=5)
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=spec)
    ids = torch.randint(0, 1001, (2, 3, 8))
    lengths = torch.tensor([[8, 5, 0], [2, 8, 6]])  # row 0 has two choices
    with torch.no_grad():
        out = model(ids, lengths, torch.tensor([1, 2]))
        one = model.score(model.hidden_states(ids[1, 2:3, :6])[:, -1]).squeeze()
    assert out.logits.shape == (2, 3) and out.logits[0, 2] == float("-inf")
    assert (out.logits[1, 2] - one).abs() <= 1e-5
    assert torch.isfinite(out.task_loss)


def test_new_head_on_a_language_model_needs_a_spec(tmp_path):
    make_hf_gpt2(tmp_path)
    with pytest.raises(ValueError, match=r"is a language model, not a fine-tuned classifier .*gptfast finetune "
                                         r"--model .*pass spec=TaskSpec"):
        GPTClassifier.from_pretrained(str(tmp_path))
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=TaskSpec(labels=["a", "b"]))
    assert model.score.weight.shape == (2, 64) and 0.005 < model.score.weight.std() < 0.05  # fresh init
    with pytest.raises(ValueError, match="holds a classification head for labels"):
        model.save_pretrained(str(tmp_path / "c"))
        GPTClassifier.from_pretrained(str(tmp_path / "c"), spec=TaskSpec(labels=["x", "y", "z"]))


def test_language_model_loads_from_a_classifier(tmp_path):
    hf = make_hf_classifier(tmp_path)
    lm = GPT.from_pretrained(str(tmp_path))  # the head is not part of the LM
    assert not hasattr(lm, "score")
    ids = torch.randint(0, PAD, (1, 5))
    with torch.no_grad():
        assert (lm.hidden_states(ids) - hf.transformer(ids).last_hidden_state).abs().max() <= 1e-4


# ---- data -------------------------------------------------------------------------------

FILLER = "the lord said unto him and they went into land of city people was upon earth water house".split()


def _rows(n, seed):
    """Label 'day' when 'light' is in the text, 'night' when 'darkness' is: learnable, chance 0.5."""
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rnd.choice(FILLER) for _ in range(rnd.randint(4, 12))]
        label = rnd.choice(["day", "night"])
        words.insert(rnd.randint(0, len(words)), "light" if label == "day" else "darkness")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_encoding_input_transformations():
    tok = Tokenizer.from_pretrained(default_model_path())
    a, b = tok.encode("in the beginning"), tok.encode("was the word")
    plain = TaskSpec(labels=["x", "y"], delimiter=tok.eos_token_id, pad=tok.eos_token_id)
    ex, cut = encode_rows([{"text": "in the beginning", "text_pair": "was the word", "label": "y"}], tok, plain,
                          100, "t")
    assert ex[0].seqs == [a + [tok.eos_token_id] + b] and ex[0].label == 1 and cut == 0
    marked = TaskSpec(labels=["x", "y"], start=7, delimiter=8, extract=9, pad=8)
    ex, _ = encode_rows([{"text": "in the beginning", "label": "x"}], tok, marked, 100, "t")
    assert ex[0].seqs == [[7] + a + [9]]
    long = {"text": "and " * 50, "text_pair": "was the word", "label": "x"}
    ex, cut = encode_rows([long], tok, marked, 12, "t")
    assert cut == 1 and len(ex[0].seqs[0]) == 12 and ex[0].seqs[0][-len(b) - 1:] == b + [9]  # the longer part is cut
    choice = TaskSpec(task="choice", delimiter=8)
    ex, _ = encode_rows([{"context": "in the beginning", "choices": ["was the word", "x"], "label": 0}], tok,
                        choice, 100, "t")
    assert ex[0].seqs[0] == a + [8] + b and len(ex[0].seqs) == 2
    ids, lengths, labels = collate(ex, "choice", 0, "cpu")
    assert ids.shape == (1, 2, len(a) + 1 + len(b)) and lengths.tolist() == [[len(a) + 1 + len(b), len(a) + 2]]


def test_csv_and_tsv_rows(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"hello, there",pos\nbye,neg\n')
    (tmp_path / "d.tsv").write_text("text\ttext_pair\tlabel\nhello\tthere\t1\n")
    assert read_rows(str(tmp_path / "d.csv")) == [{"text": "hello, there", "label": "pos"},
                                                  {"text": "bye", "label": "neg"}]
    assert read_rows(str(tmp_path / "d.tsv"))[0]["text_pair"] == "there"
    assert label_set([{"label": "10"}, {"label": "2"}, {"label": "-1"}], "t") == ["-1", "2", "10"]
    assert label_set([{"label": 3}, {"label": 1}], "t") == [1, 3]
    assert label_set([{"label": "b"}, {"label": "a"}, {"label": "b"}], "t") == ["a", "b"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    args = FinetuneArgs(data=_write(d / "train.jsonl", _rows(320, 0)), val=_write(d / "val.jsonl", _rows(64, 1)),
                        out=str(d / "out"), epochs=2, batch_size=16, lr=1e-3, device="cpu")
    return args, finetune(args, progress=False)


def test_finetune_learns_the_task(tuned):
    args, summary = tuned
    assert summary["labels"] == ["day", "night"] and summary["steps"] == 40
    assert summary["val_accuracy"] >= 0.95  # chance is 0.5
    log = [json.loads(line) for line in open(os.path.join(args.out, "log.jsonl"))]
    assert [e["step"] for e in log if "val_accuracy" in e] == [20, 40]  # once per epoch
    assert all(abs(e["loss"] - (e["task_loss"] + 0.5 * e["lm_loss"])) < 1e-4 for e in log)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png"):
        assert os.path.isfile(os.path.join(args.out, name)), name
    config = json.load(open(os.path.join(args.out, "config.json")))
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["gptfast"]["finetune"]["labels"] == ["day", "night"]
    assert config["gptfast"]["finetuned_from"] == default_model_path()


def test_finetuned_model_predicts_and_still_generates(tuned):
    args, _ = tuned
    model, tok = GPTClassifier.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    probs = predict(model, tok, [{"text": "the people went into the light"}, {"text": "darkness upon the earth"}])
    assert probs.shape == (2, 2) and probs[0, 0] > 0.9 and probs[1, 1] > 0.9
    prompt = tok.encode("And the lord")
    assert len(GPT.from_pretrained(args.out).generate(prompt, max_new_tokens=4, temperature=0)) == len(prompt) + 4


def test_finetuned_model_matches_transformers(tuned):
    from transformers import AutoModelForSequenceClassification

    args, _ = tuned
    model, tok = GPTClassifier.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    hf = AutoModelForSequenceClassification.from_pretrained(args.out).eval()
    rows = [{"text": "the people went into the light"}, {"text": "darkness"}]
    ex, _ = encode_rows(rows, tok, model.spec, 256, "t", labelled=False)
    ids, lengths, _ = collate(ex, "classification", model.spec.pad, "cpu")
    with torch.no_grad():
        assert (hf(ids).logits - model(ids, lengths).logits).abs().max() <= 1e-4


def test_special_tokens_grow_the_vocabulary(tmp_path):
    base_vocab = Tokenizer.from_pretrained(default_model_path()).vocab_size
    rows = [{"text": r["text"], "text_pair": "so it was", "label": r["label"]} for r in _rows(40, 2)]
    args = FinetuneArgs(data=_write(tmp_path / "d.jsonl", rows), out=str(tmp_path / "o"), epochs=1, batch_size=8,
                        special_tokens=True, device="cpu")
    finetune(args, progress=False)
    model, tok = GPTClassifier.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    assert tok.vocab_size == model.config.vocab_size == base_vocab + 3
    spec = model.spec
    assert [spec.start, spec.delimiter, spec.extract] == tok.encode("<|start|><|delimiter|><|extract|>")
    assert spec.pad == spec.delimiter
    ex, _ = encode_rows(rows[:1], tok, spec, 256, "t")
    assert ex[0].seqs[0][0] == spec.start and ex[0].seqs[0][-1] == spec.extract


def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import gptfast.finetune as ft

    base = dict(data=_write(tmp_path / "d.jsonl", _rows(96, 3)), epochs=2, batch_size=16, lr=1e-3, device="cpu",
                eval_every=2)
    finetune(FinetuneArgs(out=str(tmp_path / "whole"), **base), progress=False)
    real, calls = ft.evaluate, []

    def dies_on_third_eval(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "evaluate", dies_on_third_eval)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneArgs(out=str(tmp_path / "cut"), **base), progress=False)
    monkeypatch.setattr(ft, "evaluate", real)
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000004")
    finetune(FinetuneArgs(out=str(tmp_path / "cut"), **base), progress=False)
    a = GPTClassifier.from_pretrained(str(tmp_path / "whole")).state_dict()
    b = GPTClassifier.from_pretrained(str(tmp_path / "cut")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["classification", "choice"])
def test_finetune_grad_accum_equals_one_larger_batch(task, tmp_path):
    """Micro-batches weighted by examples (task loss) and by target tokens (LM loss) sum to the
    whole batch's objective: batch 8 = 4 x 2 = 2 x 4 in losses and weights, with rows of
    different lengths."""
    if task == "choice":
        rnd = random.Random(8)
        rows = [{"context": " ".join(rnd.choice(FILLER) for _ in range(rnd.randint(2, 9))),
                 "choices": [" ".join(rnd.choice(FILLER) for _ in range(rnd.randint(1, 6))) for _ in range(3)],
                 "label": rnd.randrange(3)} for _ in range(40)]
    else:
        rows = _rows(40, 8)
    base = dict(data=_write(tmp_path / "d.jsonl", rows), task=task, epochs=1, lr=1e-3, classifier_dropout=0.0,
                eval_every=1, device="cpu")  # every step's losses logged
    finetune(FinetuneArgs(out=str(tmp_path / "b8"), batch_size=8, **base), progress=False)
    want = GPTClassifier.from_pretrained(str(tmp_path / "b8")).state_dict()
    log = [json.loads(line) for line in open(tmp_path / "b8" / "log.jsonl")]
    assert len(log) == 4
    for batch, accum in ((4, 2), (2, 4)):
        out = tmp_path / f"b{batch}x{accum}"
        finetune(FinetuneArgs(out=str(out), batch_size=batch, grad_accum=accum, **base), progress=False)
        got = [json.loads(line) for line in open(out / "log.jsonl")]
        for key in ("loss", "task_loss", "lm_loss"):
            assert [e[key] for e in got] == pytest.approx([e[key] for e in log], rel=1e-5), key
        assert_same_weights(GPTClassifier.from_pretrained(str(out)).state_dict(), want, f"(batch {batch} x {accum})",
                            rtol=1e-4, atol=5e-5, key_bias_atol=1e-3 * len(log))  # lr 1e-3: 5% of a step


def test_finetune_bad_inputs(tmp_path):
    good = _write(tmp_path / "good.jsonl", _rows(20, 4))
    out = str(tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--data file not found"):
        finetune(FinetuneArgs(data=str(tmp_path / "nope.jsonl"), out=out), progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        finetune(FinetuneArgs(data=str(tmp_path / "bad.jsonl"), out=out), progress=False)
    _write(tmp_path / "nolabel.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(ValueError, match="row 2 has no 'label'"):
        finetune(FinetuneArgs(data=str(tmp_path / "nolabel.jsonl"), out=out), progress=False)
    _write(tmp_path / "val.jsonl", [{"text": "a", "label": "dusk"}])
    with pytest.raises(ValueError, match=r"row 1: label 'dusk' is not one of the model's labels \['day', 'night'\]"):
        finetune(FinetuneArgs(data=good, val=str(tmp_path / "val.jsonl"), out=out, device="cpu"), progress=False)
    with pytest.raises(ValueError, match=r"--batch-size 64 x --grad-accum 1 x 1 rank\(s\) exceeds the 18 training"):
        finetune(FinetuneArgs(data=good, out=out, batch_size=64, device="cpu"), progress=False)
    with pytest.raises(ValueError, match="--task must be one of"):
        finetune(FinetuneArgs(data=good, out=out, task="regression"), progress=False)
    with pytest.raises(ValueError, match="--lm-coef must be a number >= 0, got -1"):
        finetune(FinetuneArgs(data=good, out=out, lm_coef=-1.0), progress=False)
    _write(tmp_path / "mc.jsonl", [{"context": "a", "choices": ["b"], "label": 0}])
    with pytest.raises(ValueError, match="'choices' must be a list of at least 2 texts, got \\['b'\\]$"):
        finetune(FinetuneArgs(data=str(tmp_path / "mc.jsonl"), out=out, task="choice", device="cpu"), progress=False)
    # the other task's rows: the error says which --task reads them
    _write(tmp_path / "mc3.jsonl", [{"context": "a", "choices": ["b", "c"], "label": i % 2} for i in range(20)])
    with pytest.raises(ValueError, match=r"row \d+: no text: expected a field 'text' or 'sentence' or 'text_a', got "
                                         r"\['choices', 'context', 'label'\]; a row with 'choices' is multiple "
                                         r"choice \(--task choice\)"):
        finetune(FinetuneArgs(data=str(tmp_path / "mc3.jsonl"), out=out, device="cpu"), progress=False)
    with pytest.raises(ValueError, match=r"'choices' must be a list of at least 2 texts, got None \(a row of a text "
                                         r"and its label is classification: --task classification\)"):
        finetune(FinetuneArgs(data=good, out=out, task="choice", device="cpu"), progress=False)


def test_text_pair_without_a_delimiter_says_what_to_do(tmp_path):
    from hf_utils import make_gpt2_tokenizer_files

    make_hf_gpt2(tmp_path, vocab_size=300, n_positions=64)
    text = " ".join(FILLER) * 20
    make_gpt2_tokenizer_files(tmp_path, text.replace(" ", "  "), vocab_size=300)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    spec = TaskSpec(labels=["a", "b"])  # no delimiter
    with pytest.raises(ValueError, match="a text pair needs a delimiter token.*--special-tokens"):
        encode_rows([{"text": "the lord", "text_pair": "said", "label": "a"}], tok, spec, 64, "d.jsonl")


def test_cli_finetune_and_classify(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _rows(64, 5))
    out = str(tmp_path / "o")
    assert main(["finetune", "--data", data, "--out", out, "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                 "--device", "cpu", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 7 and summary["labels"] == ["day", "night"]
    assert main(["classify", "the light of the lord", "--model", out, "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)
    assert set(probs) == {"day", "night"} and abs(sum(probs.values()) - 1) < 1e-5
    assert main(["classify", "--data", data, "--model", out]) == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    unlabelled = _write(tmp_path / "u.jsonl", [{"text": "darkness"}, {"text": "light"}])
    assert main(["classify", "--data", unlabelled, "--model", out]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(r["label"] in ("day", "night") for r in lines)
    assert main(["classify", "--model", out]) == 2
    assert "give either a TEXT" in capsys.readouterr().err


def test_multiple_choice_finetune_learns(tmp_path):
    """Pick the choice that repeats the context's marked word: chance is 1/3."""
    rnd = random.Random(6)
    rows = []
    for _ in range(240):
        key = rnd.choice(["light", "darkness", "water", "earth"])
        others = [w for w in ["light", "darkness", "water", "earth"] if w != key]
        choices = rnd.sample(others, 2)
        label = rnd.randrange(3)
        choices.insert(label, key)
        rows.append({"context": f"{rnd.choice(FILLER)} {key} {rnd.choice(FILLER)}",
                     "choices": [f"the {c}" for c in choices], "label": label})
    args = FinetuneArgs(data=_write(tmp_path / "mc.jsonl", rows), out=str(tmp_path / "o"), task="choice", epochs=3,
                        batch_size=16, lr=1e-3, device="cpu")
    summary = finetune(args, progress=False)
    assert summary["val_accuracy"] >= 0.75, summary


def test_torchrun_two_processes_finetune(tmp_path):
    data = _write(tmp_path / "d.jsonl", _rows(64, 7))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptfast.cli", "finetune", "--data", data, "--out", str(out), "--epochs", "1", "--batch-size", "4",
           "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["world_size"] == 2 and summary["steps"] == 57 // 8
    assert GPTClassifier.from_pretrained(str(out)).spec.labels == ["day", "night"]


def test_forward_bad_arguments(tmp_path):
    make_hf_classifier(tmp_path)
    model = GPTClassifier.from_pretrained(str(tmp_path))
    ids, lengths = _right_padded([5, 3], 5)
    with pytest.raises(ValueError, match=r"a classification head takes input_ids of \[B, T\], got \(2, 1, 5\)"):
        model(ids[:, None], lengths[:, None])
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\), got \(3,\)"):
        model(ids, torch.tensor([5, 3, 1]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\], got \[0, 5\]"):
        model(ids, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[0, 3\]"):
        model(ids, lengths, torch.tensor([0, 3]))


def test_gpt1_checkpoint_finetunes_with_special_tokens(tmp_path):
    """A transformers OpenAIGPT checkpoint with GPT-1's tokenizer (no end-of-text token): text pairs
    need --special-tokens; the result loads as OpenAIGPTForSequenceClassification, same logits."""
    from tokenizers import CharBPETokenizer
    from transformers import AutoModelForSequenceClassification

    from hf_utils import make_hf_gpt1

    base = tmp_path / "gpt1"
    base.mkdir()
    bpe = CharBPETokenizer(unk_token="<unk>", lowercase=True, suffix="</w>")
    bpe.train_from_iterator([" ".join(FILLER + ["light", "darkness", "so", "it", "was"]) * 5], vocab_size=120,
                            special_tokens=["<unk>"], show_progress=False)
    bpe.save_model(str(base))
    tok = Tokenizer.from_pretrained(str(base))
    make_hf_gpt1(base, vocab_size=tok.vocab_size, n_positions=64)
    rows = [{"text": r["text"], "text_pair": "so it was", "label": r["label"]} for r in _rows(48, 8)]
    data = _write(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError, match="a text pair needs a delimiter token"):
        finetune(FinetuneArgs(data=data, out=str(tmp_path / "no"), model=str(base), batch_size=8, device="cpu"),
                 progress=False)
    args = FinetuneArgs(data=data, out=str(tmp_path / "o"), model=str(base), epochs=1, batch_size=8,
                        special_tokens=True, device="cpu")
    finetune(args, progress=False)
    model, tok = GPTClassifier.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    assert not model.config.pre_ln and model.config.activation == "gelu_tanh" and tok.is_gpt1
    assert model.config.vocab_size == tok.vocab_size and model.spec.pad == model.spec.delimiter
    hf = AutoModelForSequenceClassification.from_pretrained(args.out).eval()
    assert type(hf).__name__ == "OpenAIGPTForSequenceClassification"
    ex, _ = encode_rows(rows[:5], tok, model.spec, 64, "t")
    ids, lengths, _ = collate(ex, "classification", model.spec.pad, "cpu")
    with torch.no_grad():
        assert (hf(ids).logits - model(ids, lengths).logits).abs().max() <= 1e-4


@pytest.mark.gpu
def test_finetune_on_cuda_bf16_with_kernels(tmp_path):
    """On a GPU: bf16 autocast through the Triton kernels learns the task, and the fine-tuned
    model gives the reference's logits."""
    import gptfast

    args = FinetuneArgs(data=_write(tmp_path / "t.jsonl", _rows(320, 9)),
                        val=_write(tmp_path / "v.jsonl", _rows(64, 10)), out=str(tmp_path / "o"), epochs=2,
                        batch_size=16, lr=1e-3, device="cuda", dtype="bfloat16")
    with gptfast.use_backend("kernel"):
        summary = finetune(args, progress=False)
    assert summary["val_accuracy"] >= 0.95, summary
    model = GPTClassifier.from_pretrained(args.out, device="cuda")
    tok = Tokenizer.from_pretrained(args.out)
    ex, _ = encode_rows(_rows(8, 11), tok, model.spec, 256, "t")
    ids, lengths, labels = collate(ex, "classification", model.spec.pad, "cuda")
    with torch.no_grad():
        with gptfast.use_backend("kernel"):
            fast = model(ids, lengths, labels, lm_coef=0.5)
        with gptfast.use_backend("torch"):
            ref = model(ids, lengths, labels, lm_coef=0.5)
    assert (fast.logits - ref.logits).abs().max() <= 1e-3
    assert abs(fast.loss.item() - ref.loss.item()) <= 1e-3


def test_transformers_classifier_object_converts(tmp_path):
    hf = make_hf_classifier(tmp_path)
    model = GPTClassifier.from_pretrained(hf)
    ids, lengths = _right_padded([6, 2], 6, seed=5)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids, lengths).logits).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification holds a classification head for labels"):
        GPTClassifier.from_pretrained(hf, spec=TaskSpec(labels=["a", "b"]))


# ---- user audit: resume, valid JSON, argument checks, classify's messages -----------------------

def _strict_json(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_finetune_resume_says_so_refuses_other_runs_and_prints_valid_json(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _rows(48, 12))
    out = str(tmp_path / "o")
    base = ["finetune", "--data", data, "--out", out, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--quiet"]
    assert main(base) == 0
    first = _strict_json(capsys.readouterr().out)
    assert main(base) == 0  # finished: nothing to train, the last logged loss, valid JSON
    captured = capsys.readouterr()
    again = _strict_json(captured.out)
    assert again["steps"] == first["steps"] and again["train_loss"] == first["train_loss"] is not None
    assert f"resuming from step {first['steps']} of --out {out}" in captured.err and "nothing to train" in captured.err
    for flags, words in ((["--special-tokens"], "--special-tokens False there, True now"),
                         (["--task", "choice"], "--task classification there, choice now"),
                         (["--batch-size", "4"], "--batch-size x --grad-accum x ranks 8 there, 4 now"),
                         (["--model", str(tmp_path / "o")], "--model (not given) there")):
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert f"gptfast finetune: error: --out {out} holds a run" in err and words in err, (flags, err)
    assert main(base[:5] + ["--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--device", "cpu",
                            "--quiet"]) == 0  # same examples a step, more epochs: resumes
    captured = capsys.readouterr()
    assert "--epochs 1 -> 2" in captured.err and _strict_json(captured.out)["steps"] == 2 * first["steps"]


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be an int >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["--grad-accum", "-2"], "--grad-accum must be an int >= 1, got -2"),
    (["--eval-every", "-1"], "--eval-every must be an int >= 0 (0: at the end of each epoch), got -1"),
    (["--max-len", "1"], "--max-len must be an int >= 2, got 1"),
    (["--lm-coef", "-1"], "--lm-coef must be a number >= 0, got -1.0"),
    (["--lm-coef", "inf"], "--lm-coef must be a number >= 0, got inf"),
    (["--val-fraction", "1.5"], "--val-fraction must be a number in (0, 1), got 1.5"),
    (["--warmup-fraction", "1"], "--warmup-fraction must be a number in [0, 1), got 1.0"),
    (["--lr", "0"], "--lr must be a number > 0, got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0, got -1.0"),
    (["--grad-clip", "-1"], "--grad-clip must be a number > 0, got -1.0"),
    (["--classifier-dropout", "1"], "--classifier-dropout must be a number in [0, 1), got 1.0"),
    (["--dtype", "int8"], "--dtype must be one of float32, fp32, bfloat16, bf16, float16, fp16, got 'int8'"),
    (["--val", "nonexist.jsonl"], "--val file not found: nonexist.jsonl"),
])
def test_bad_finetune_arguments_are_errors_naming_the_flag(tmp_path, capsys, flags, message):
    data = _write(tmp_path / "d.jsonl", _rows(20, 4))
    assert main(["finetune", "--data", data, "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"] + flags) == 2
    captured = capsys.readouterr()
    assert f"gptfast finetune: error: {message}" in captured.err and captured.out == ""


def test_finetune_device_cuda_without_cuda_is_an_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    data = _write(tmp_path / "d.jsonl", _rows(20, 4))
    assert main(["finetune", "--data", data, "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "gptfast finetune: error: --device cuda: CUDA is not available here" in err and "Traceback" not in err


def test_finetune_bf16_and_fp16_names_train(tmp_path):
    data = _write(tmp_path / "d.jsonl", _rows(16, 5))
    for name in ("bf16", "fp16"):
        out = str(tmp_path / name)
        summary = finetune(FinetuneArgs(data=data, out=out, epochs=1, batch_size=8, device="cpu", dtype=name),
                           progress=False)
        assert summary["steps"] == 1
    state = torch.load(os.path.join(latest_checkpoint(str(tmp_path / "fp16")), "train_state.pt"), weights_only=True)
    assert "scaler" in state  # float16: a GradScaler, saved for the resume


def test_classify_errors_say_what_is_wrong(tuned, tmp_path, capsys):
    args, _ = tuned
    assert main(["classify", "", "--model", args.out]) == 2
    assert "error: input: row 1: the text is empty (field 'text')" in capsys.readouterr().err
    assert main(["classify", "the light", "--pair", "so it was", "--model", args.out]) == 2
    assert "this model was fine-tuned on single texts, but the row has a second text" in capsys.readouterr().err
    unlabelled = _write(tmp_path / "u.jsonl", [{"text": "the light"}, {"text": ""}])
    assert main(["classify", "--data", unlabelled, "--model", args.out]) == 2
    assert f"error: {unlabelled}: row 2: the text is empty" in capsys.readouterr().err
    make_hf_gpt2(tmp_path / "lm")
    Tokenizer.from_pretrained(args.out).save(str(tmp_path / "lm"))
    assert main(["classify", "x", "--model", str(tmp_path / "lm")]) == 2
    err = capsys.readouterr().err
    assert "is a language model, not a fine-tuned classifier" in err and "gptfast finetune --model" in err
    assert "spec=TaskSpec" not in err.split("gptfast finetune")[0]


def test_a_pair_model_wants_pairs(tmp_path):
    rows = [{"text": r["text"], "text_pair": "so it was", "label": r["label"]} for r in _rows(24, 13)]
    args = FinetuneArgs(data=_write(tmp_path / "p.jsonl", rows), out=str(tmp_path / "o"), epochs=1, batch_size=8,
                        device="cpu")
    finetune(args, progress=False)
    model, tok = GPTClassifier.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    assert model.spec.text_pair is True
    with pytest.raises(ValueError, match="fine-tuned on text pairs, but the row has no second text"):
        predict(model, tok, [{"text": "the light"}])
    assert predict(model, tok, [{"text": "the light", "text_pair": "so it was"}]).shape == (1, 2)
