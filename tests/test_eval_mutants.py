"""Zero-shot evaluation, for the bugs the main tests could not see (found by mutation testing):
an empty context with no end-of-text token, ties between choices, and the model's mode."""
import random

import pytest
import torch

from gptfast import GPT, Tokenizer
from gptfast.evaluation import evaluate_zero_shot, score_continuations

from hf_utils import make_gpt2_tokenizer_files, make_hf_gpt2

WORDS = "the lord said unto him and they went into land of city people was upon earth water house light".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_gpt2_tokenizer_files(d, " ".join(WORDS) * 20, vocab_size=300)
    tok = Tokenizer.from_pretrained(str(d))
    hf = make_hf_gpt2(d, vocab_size=tok.vocab_size, n_positions=24, n_embd=32, n_layer=2, n_head=4, seed=3)
    return hf, GPT.from_pretrained(str(d)), tok


def _text(rnd, lo, hi):
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))


def test_an_empty_context_without_end_of_text_scores_from_the_second_token(models):
    """GPT-1 has no end-of-text token: the continuation alone goes in and its first token is no
    target. Checked per row on transformers' model, in batches with longer rows beside it."""
    hf, model, tok = models
    no_eos = Tokenizer(tok._tok, eos_token=None)
    rnd = random.Random(int(torch.randint(0, 2**31, ())))
    rows = [{"context": "", "continuation": _text(rnd, 2, 6)} for _ in range(7)]
    rows += [{"context": _text(rnd, 3, 9), "continuation": _text(rnd, 1, 3)} for _ in range(3)]
    rnd.shuffle(rows)
    want_ll, tokens = 0.0, 0
    for r in rows:
        ctx = no_eos.encode(r["context"])
        cont = no_eos.encode((" " if ctx else "") + r["continuation"])
        ids = ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
        first = len(ctx) if ctx else 1
        want_ll += sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))
        tokens += len(ids) - first
    for batch in (1, 3, 16):
        got = evaluate_zero_shot(model, no_eos, rows, batch_size=batch)
        assert got["tokens"] == tokens
        assert got["perplexity"] == pytest.approx(torch.exp(torch.tensor(-want_ll / tokens)).item(), rel=1e-5)
    pairs = [([], no_eos.encode("the lord said unto him"))]
    (ll, _, n), = score_continuations(model, pairs)
    ids = pairs[0][1]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    assert n == len(ids) - 1 and ll == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))),
                                                     abs=1e-4)


def test_equal_scores_go_to_the_first_choice(models):
    """Identical choices score the same: as lm-evaluation-harness (numpy's argmax), the first wins."""
    _, model, tok = models
    rnd = random.Random(7)
    rows = []
    for _ in range(6):
        c = _text(rnd, 1, 3)
        rows.append({"context": _text(rnd, 2, 6), "choices": [c, c, c], "label": 0})
    got = evaluate_zero_shot(model, tok, rows, batch_size=4)
    assert got["accuracy"] == got["accuracy_norm"] == 1.0
    for r in rows:
        r["label"] = 2
    got = evaluate_zero_shot(model, tok, rows, batch_size=4)
    assert got["accuracy"] == got["accuracy_norm"] == 0.0


def test_the_model_keeps_its_mode(models):
    """Scoring switches dropout off and gives the model back in the mode it came in (a training
    run evaluates between steps)."""
    _, model, tok = models
    rows = [{"context": "the lord", "choices": ["said", "water"], "label": 0}]
    for training in (True, False):
        model.train(training)
        evaluate_zero_shot(model, tok, rows)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
