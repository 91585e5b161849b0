"""Zero-shot evaluation (gptfast eval): continuation log-likelihoods equal transformers', and the
accuracies are the argmaxes of them."""
import json
import math
import random

import pytest
import torch

from gptfast import GPT, Tokenizer
from gptfast.cli import main
from gptfast.evaluation import evaluate_zero_shot, score_continuations

from hf_utils import make_gpt2_tokenizer_files, make_hf_gpt2

WORDS = "the lord said unto him and they went into land of city people was upon earth water house light".split()


def _text(rnd, lo, hi):
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A transformers GPT2LMHeadModel (random init, context 32) and its tokenizer, saved; gptfast's copy."""
    d = tmp_path_factory.mktemp("m")
    make_gpt2_tokenizer_files(d, " ".join(WORDS) * 20, vocab_size=300)
    tok = Tokenizer.from_pretrained(str(d))
    hf = make_hf_gpt2(d, vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return hf, GPT.from_pretrained(str(d)), tok, d


def _hf_loglik(hf, ctx, cont):
    """lm-evaluation-harness's window: the last n_positions + 1 tokens, all but the last read."""
    ids = (ctx + cont)[-(hf.config.n_positions + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    n = len(cont)
    targets = torch.tensor(ids[-n:])
    picked = logp[len(ids) - n - 1:len(ids) - 1]
    return float(picked.gather(1, targets[:, None]).sum()), bool((picked.argmax(-1) == targets).all())


def test_continuation_scores_match_transformers(models):
    hf, model, tok, _ = models
    rnd = random.Random(0)
    pairs = [(tok.encode(_text(rnd, 1, 12)), tok.encode(" " + _text(rnd, 1, 5))) for _ in range(13)]
    pairs.append((tok.encode(_text(rnd, 40, 60)), tok.encode(" " + _text(rnd, 2, 4))))  # context cut at the front
    assert len(pairs[-1][0]) + len(pairs[-1][1]) > 33
    long_cont = tok.encode(" " + _text(rnd, 40, 60))[:32]  # as long as the context: one context token read
    assert len(long_cont) == 32
    pairs.append((tok.encode(_text(rnd, 3, 5)), long_cont))
    pairs.append(([], tok.encode(_text(rnd, 40, 60))[:32]))  # no context: the first token is no target
    ctx = tok.encode("they went")
    with torch.no_grad():  # a continuation that is the model's argmax, so is_greedy is exercised
        greedy = [int(hf(torch.tensor([ctx])).logits[0, -1].argmax())]
    pairs.append((ctx, greedy))
    for batch in (1, 4, 64):
        got = score_continuations(model, pairs, batch_size=batch)
        for (ctx, cont), (ll, is_greedy, n) in zip(pairs, got):
            want_ll, want_greedy = _hf_loglik(hf, ctx, cont) if ctx else _hf_loglik(hf, cont[:1], cont[1:])
            assert n == len(cont) - (not ctx) and ll == pytest.approx(want_ll, abs=1e-4) and is_greedy == want_greedy
    assert got[-1][1] is True


@pytest.mark.parametrize("context, delimiter", [("they went into the ", " "), ("the lord said\n\n", " "),
                                                ("the lord sai", ""), ("the lord said unto", " ")])
def test_requests_are_encoded_as_lm_evaluation_harness_encodes_them(models, context, delimiter):
    """lm-evaluation-harness's _encode_pair: the context's trailing whitespace goes to the front of
    the continuation (delimiter + choice), whose ids are those of the whole text past the context's
    own ids; the scores are transformers' log-likelihoods of exactly those ids."""
    from gptfast.evaluation import prepare_requests
    hf, model, tok, _ = models
    choices = ["land", "d unto him", "water house"]
    task, [pairs] = prepare_requests([{"context": context, "choices": choices, "label": 0}], tok, delimiter)
    stripped = context.rstrip()
    ctx = tok.encode(stripped)
    for (got_ctx, got_cont), c in zip(pairs, choices):
        whole = tok.encode(stripped + context[len(stripped):] + delimiter + c)
        assert got_ctx == ctx and got_cont == whole[len(ctx):], (context, c)
        assert tok.decode(got_ctx + got_cont) == context + delimiter + c
    if context != stripped:  # tokenized apart, the context would end in a whitespace token of its own
        assert ctx != tok.encode(context)
    result = evaluate_zero_shot(model, tok, [{"context": context, "choices": choices, "label": 1}],
                                delimiter=delimiter)
    ll = [_hf_loglik(hf, ctx, cont)[0] for _, cont in pairs]
    assert result["accuracy"] == float(max(range(3), key=ll.__getitem__) == 1)
    assert [x[0] for x in score_continuations(model, pairs)] == pytest.approx(ll, abs=1e-4)


def test_multiple_choice_accuracies_are_the_argmaxes(models):
    hf, model, tok, _ = models
    rnd = random.Random(1)
    rows = [{"context": _text(rnd, 3, 10), "choices": [_text(rnd, 1, 6) for _ in range(rnd.randint(2, 4))]}
            for _ in range(24)]
    for r in rows:
        r["label"] = rnd.randrange(len(r["choices"]))
    result = evaluate_zero_shot(model, tok, rows, batch_size=5)
    correct = correct_norm = 0
    for r in rows:
        ll = [_hf_loglik(hf, tok.encode(r["context"]), tok.encode(" " + c))[0] for c in r["choices"]]
        correct += max(range(len(ll)), key=ll.__getitem__) == r["label"]
        norm = [v / len(c) for v, c in zip(ll, r["choices"])]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == r["label"]
    assert result == {"task": "choice", "examples": 24, "accuracy": correct / 24, "accuracy_norm": correct_norm / 24}


def test_completion_accuracy_and_perplexity(models):
    hf, model, tok, _ = models
    rnd = random.Random(2)
    rows = [{"context": _text(rnd, 3, 10), "continuation": _text(rnd, 1, 2)} for _ in range(10)]
    with torch.no_grad():  # one row whose continuation is the greedy token
        ctx = tok.encode(rows[0]["context"])
        rows[0]["continuation"] = tok.decode([int(hf(torch.tensor([ctx])).logits[0, -1].argmax())]).lstrip(" ")
    result = evaluate_zero_shot(model, tok, rows, batch_size=3)
    scored = [_hf_loglik(hf, tok.encode(r["context"]), tok.encode(" " + r["continuation"])) for r in rows]
    tokens = sum(len(tok.encode(" " + r["continuation"])) for r in rows)
    assert result["task"] == "completion" and result["tokens"] == tokens
    assert result["accuracy"] == sum(g for _, g in scored) / 10
    assert result["perplexity"] == pytest.approx(math.exp(-sum(s for s, _ in scored) / tokens), rel=1e-5)


def test_cli_eval_and_bad_rows(models, tmp_path, capsys):
    _, _, _, d = models
    rows = [{"context": "the lord said", "choices": ["unto him", "water house"], "label": 0},
            {"context": "they went", "choices": ["into the land", "light"], "label": 1}]
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(f), "--model", str(d), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "choice" and result["examples"] == 2
    assert main(["eval", str(f), "--model", str(d), "--limit", "1"]) == 0
    assert "on 1 examples" in capsys.readouterr().out
    model, tok = GPT.from_pretrained(str(d)), Tokenizer.from_pretrained(str(d))
    bad = [({"context": "a", "choices": ["b", "c"], "label": 2}, r"row 1: 'label' must be an index into its 2 choices"),
           ({"context": 3, "continuation": "b"}, "row 1 needs a string 'context', got int"),
           ({"context": "a", "choices": []}, r"row 1 needs 'choices' \(a list of non-empty strings\)"),
           ({"context": "a", "continuation": ""}, "row 1 needs a non-empty 'continuation'")]
    for row, message in bad:
        with pytest.raises(ValueError, match=message):
            evaluate_zero_shot(model, tok, [row], source="x.jsonl")
    with pytest.raises(ValueError, match="mixes multiple-choice rows"):
        evaluate_zero_shot(model, tok, [rows[0], {"context": "a", "continuation": "b"}])
    with pytest.raises(ValueError, match="pair 0: the continuation is 33 tokens: it must fit in the "
                                         "model's context of 32"):
        score_continuations(model, [([1], list(range(1, 34)))])
    # the file and the row, not an internal index (the second choice of the second row is too long)
    long_rows = [rows[0], {"context": "a", "choices": ["b", " the lord" * 40], "label": 0}]
    with pytest.raises(ValueError, match=r"x.jsonl: row 2: choice 1 is \d+ tokens: it must fit in the "
                                         r"model's context of 32"):
        evaluate_zero_shot(model, tok, long_rows, source="x.jsonl")
    one = tok.encode("b")
    assert len(one) == 1
    no_eos = Tokenizer(tok._tok, eos_token=None)  # as GPT-1's: an empty context is no token at all
    with pytest.raises(ValueError, match="x.jsonl: row 1: the continuation is a single token with no context"):
        evaluate_zero_shot(model, no_eos, [{"context": "", "continuation": "b"}], source="x.jsonl")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        score_continuations(model, [([1], [2])], batch_size=0)


def test_an_empty_context_is_the_end_of_text_token(models):
    """lm-evaluation-harness scores a row with an empty context after the end-of-text token, so
    every token of each choice counts (the first one too), the delimiter in front as in any row."""
    hf, model, tok, _ = models
    rnd = random.Random(3)
    rows = [{"context": "", "choices": [_text(rnd, 1, 4) for _ in range(3)], "label": i % 3} for i in range(9)]
    rows.append({"context": "", "choices": ["b", "the"], "label": 1})  # single-token choices are scorable
    result = evaluate_zero_shot(model, tok, rows, batch_size=4)
    correct = correct_norm = 0
    for r in rows:
        ll = [_hf_loglik(hf, [tok.eos_token_id], tok.encode(" " + c))[0] for c in r["choices"]]
        correct += max(range(len(ll)), key=ll.__getitem__) == r["label"]
        correct_norm += max(range(len(ll)), key=lambda i: ll[i] / len(r["choices"][i])) == r["label"]
    assert result == {"task": "choice", "examples": 10, "accuracy": correct / 10, "accuracy_norm": correct_norm / 10}
    completion = [{"context": "", "continuation": _text(rnd, 1, 3)} for _ in range(4)]
    got = evaluate_zero_shot(model, tok, completion, batch_size=3)
    conts = [tok.encode(" " + r["continuation"]) for r in completion]
    want = [_hf_loglik(hf, [tok.eos_token_id], c) for c in conts]
    assert got["tokens"] == sum(map(len, conts))
    assert got["perplexity"] == pytest.approx(math.exp(-sum(s for s, _ in want) / got["tokens"]), rel=1e-5)


def test_strided_perplexity_equals_transformers_documented_method(models):
    """gptfast.train.perplexity against the sliding-window loop of transformers' "Perplexity of
    fixed-length models" on the transformers model itself: windows of n_positions starting every
    stride tokens, each scoring the tokens no earlier window scored (the first window all but its
    first token, the last one however short it is). The sum is taken per token, so the count is
    exact where the documented loop weights each window's mean by its targets less one."""
    from gptfast.train import perplexity

    hf, model, _, _ = models
    ctx = hf.config.n_positions
    for n, stride in [(20, 8), (32, 8), (33, 16), (97, 16), (101, 7), (130, 31), (64, 1)]:
        ids = torch.randint(0, hf.config.vocab_size, (1, n))
        nll_sum, tokens, prev_end = 0.0, 0, 0
        with torch.no_grad():
            for begin in range(0, n, stride):
                end = min(begin + ctx, n)
                trg_len = end - prev_end
                x = ids[:, begin:end]
                labels = x.clone()
                labels[:, :-trg_len] = -100
                logits = hf(x).logits[:, :-1].double()
                shifted = labels[:, 1:]
                nll_sum += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), shifted, reduction="sum"))
                tokens += int((shifted != -100).sum())
                prev_end = end
                if end == n:
                    break
        got = perplexity(model, ids[0].tolist(), stride=stride, progress=False, batch_size=3)
        assert got["tokens"] == tokens == n - 1, (n, stride)
        assert got["nll"] == pytest.approx(nll_sum / tokens, rel=1e-5), (n, stride)


def test_is_greedy_needs_every_continuation_token_greedy(models):
    """A continuation is the greedy output only if each of its tokens is the argmax: one greedy
    token followed by one that is not is no match (a check of any token would say it is)."""
    hf, model, tok, _ = models
    ctx = tok.encode(_text(random.Random(int(torch.randint(0, 2**31, ()))), 2, 9))
    with torch.no_grad():
        first = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
        ranked = hf(torch.tensor([ctx + [first]])).logits[0, -1].argsort(descending=True).tolist()
    pairs = [(ctx, [first, ranked[0]]), (ctx, [first, ranked[1]])]
    got = [g for _, g, _ in score_continuations(model, pairs, batch_size=2)]
    assert got == [True, False]


def test_train_eval_data_checks_continuations_against_the_models_context(models, tmp_path):
    """gptfast train --eval-data: a continuation longer than the model's context is refused before
    training, naming the file and the row (not later, at the first evaluation, by a pair index)."""
    from types import SimpleNamespace

    from gptfast.train import _zero_shot_requests

    _, model, tok, _ = models
    f = tmp_path / "rows.jsonl"
    rows = [{"context": "the lord said", "continuation": "unto him"},
            {"context": "a", "continuation": " the lord" * 40}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(eval_data=str(f), eval_limit=None)
    with pytest.raises(ValueError, match=rf"--eval-data {f}: row 2: the continuation is \d+ tokens: it must fit in "
                                         "the model's context of 32"):
        _zero_shot_requests(args, tok, model.config.n_positions)
    args.eval_limit = 1
    _, task, requests = _zero_shot_requests(args, tok, model.config.n_positions)
    assert task == "completion" and len(requests) == 1
