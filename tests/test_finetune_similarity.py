"""GPT-1's similarity transformation (Radford et al. 2018, section 3.3): a text pair is read in
both orders and the head reads the sum of the two last-token states, so the order of the texts
does not matter. Encoding, forward, training, save/load (gptfast and transformers), classify."""
import json
import random

import pytest
import torch

from gptfast import Tokenizer
from gptfast.checkpoint import default_model_path
from gptfast.cli import main
from gptfast.finetune import (Example, FinetuneArgs, GPTClassifier, TaskSpec, collate, encode_rows, finetune,
                              predict)

from hf_utils import make_hf_gpt2
from test_finetune import FILLER, _write


def _seed():
    return int(torch.randint(0, 2**31, ()))


def _texts(n, rnd):
    return [" ".join(rnd.choice(FILLER) for _ in range(rnd.randint(1, 9))) for _ in range(n)]


@pytest.mark.parametrize("special", [False, True], ids=["eos-delimiter", "start-delim-extract"])
def test_logits_are_the_head_of_the_summed_states_of_both_orders(tmp_path, special):
    """logits = score(h(a $ b)[last] + h(b $ a)[last]), computed by hand from the body's hidden
    states of each order alone; swapping the texts gives the same logits; a ragged batch gives
    each row what it gets alone."""
    tok = Tokenizer.from_pretrained(default_model_path())
    make_hf_gpt2(tmp_path, vocab_size=tok.vocab_size + 3, n_positions=64)
    marks = dict(start=4096, delimiter=4097, extract=4098) if special else dict(delimiter=tok.eos_token_id)
    spec = TaskSpec(labels=["x", "y", "z"], pad=marks["delimiter"], similarity=True, text_pair=True, **marks)
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=spec).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    rnd = random.Random(_seed())
    rows = [{"text": a, "text_pair": b} for a, b in zip(_texts(7, rnd), _texts(7, rnd))]
    swapped = [{"text": r["text_pair"], "text_pair": r["text"]} for r in rows]
    ex, _ = encode_rows(rows, tok, spec, 64, "t", labelled=False)
    start, end = ([spec.start], [spec.extract]) if special else ([], [])
    with torch.no_grad():
        ids, lengths, _ = collate(ex, "similarity", 999, "cpu")  # padding: any id
        got = model(ids, lengths).logits
        for i, r in enumerate(rows):
            a, b = tok.encode(r["text"]), tok.encode(r["text_pair"])
            ab = start + a + [spec.delimiter] + b + end
            ba = start + b + [spec.delimiter] + a + end
            assert ex[i].seqs == [ab, ba]
            h = [model.hidden_states(torch.tensor([s]))[0, -1] for s in (ab, ba)]
            torch.testing.assert_close(got[i], model.score(h[0] + h[1]), rtol=0, atol=1e-5)
            alone = model(*collate(ex[i:i + 1], "similarity", 0, "cpu")[:2]).logits[0]
            torch.testing.assert_close(got[i], alone, rtol=0, atol=1e-5)
            assert (got[i] - model.score(h[0])).abs().max() > 1e-2  # not one order
    assert len(set(lengths[:, 0].tolist())) > 1 and torch.equal(lengths[:, 0], lengths[:, 1])  # ragged
    torch.testing.assert_close(predict(model, tok, swapped, batch_size=3), got.softmax(-1), rtol=0, atol=1e-6)


def test_both_orders_are_cut_alike():
    """A pair too long for max_len loses the same tokens in both orders, and in the swapped pair
    (also when the two texts are equally long, where 'the longest part' is a tie)."""
    tok = Tokenizer.from_pretrained(default_model_path())
    spec = TaskSpec(labels=["x", "y"], delimiter=0, similarity=True)
    for text, pair in ((" and" * 8, " the" * 8), (" the" * 8, " and" * 8), ("and " * 10, "the lord " * 5),
                       ("the " * 3, "was " * 30)):
        a, b = tok.encode(text), tok.encode(pair)
        ex, cut = encode_rows([{"text": text, "text_pair": pair}, {"text": pair, "text_pair": text}], tok, spec,
                              13, "t", labelled=False)
        ab, ba = ex[0].seqs
        assert cut == 2 and len(ab) == len(ba) == 13
        n = ab.index(0)
        assert ba == ab[n + 1:] + [0] + ab[:n]
        assert ab[:n] == a[:n] and ab[n + 1:] == b[:12 - n]
        assert ex[1].seqs == [ba, ab]  # swapped: the same two sequences


def test_similarity_spec_and_forward_errors(tmp_path):
    with pytest.raises(ValueError, match=r"similarity reads text pairs .* got task 'choice'"):
        TaskSpec(task="choice", similarity=True)
    with pytest.raises(ValueError, match=r"similarity reads text pairs .* text_pair False"):
        TaskSpec(labels=["a", "b"], similarity=True, text_pair=False)
    with pytest.raises(ValueError, match=r"similarity must be True or False, got 'yes'"):
        TaskSpec(labels=["a", "b"], similarity="yes")
    make_hf_gpt2(tmp_path)
    model = GPTClassifier.from_pretrained(str(tmp_path), spec=TaskSpec(labels=["a", "b"], delimiter=5,
                                                                       similarity=True))
    ids = torch.randint(0, 1001, (2, 3, 6))
    with pytest.raises(ValueError, match=r"a similarity head takes input_ids of \[B, 2, T\] .*got \(2, 6\)"):
        model(ids[:, 0])
    with pytest.raises(ValueError, match=r"a similarity head takes input_ids of \[B, 2, T\] .*got \(2, 3, 6\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 6\], got \[0, 6\]"):
        model(ids[:, :2], torch.tensor([[6, 6], [0, 0]]))
    examples = [Example([[1, 2, 5, 3], [3, 5, 1, 2]], 0)]
    with pytest.raises(ValueError, match=r"one sequence each, got 2; for a similarity model pass task=spec.kind"):
        collate(examples, "classification", 0, "cpu")
    tok = Tokenizer.from_pretrained(default_model_path())
    with pytest.raises(ValueError, match=r"u: row 2: this is a similarity model .* no second text"):
        predict(model, tok, [{"text": "a", "text_pair": "b"}, {"text": "the light"}], source="u")


def test_saved_similarity_model_in_gptfast_and_in_transformers(tmp_path):
    """Saved and loaded, gptfast keeps the similarity head (same logits). transformers loads the
    directory as GPT2ForSequenceClassification and scores one order: its logits summed over both
    orders are gptfast's. A saved model without the field (older gptfast) is a one-order classifier."""
    from transformers import AutoModelForSequenceClassification

    make_hf_gpt2(tmp_path / "lm", vocab_size=1001)
    spec = TaskSpec(labels=["p", "q"], delimiter=7, pad=7, similarity=True, text_pair=True)
    model = GPTClassifier.from_pretrained(str(tmp_path / "lm"), spec=spec).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "sim"))
    gen = torch.Generator().manual_seed(_seed())
    ex = []
    for _ in range(5):
        a, b = (torch.randint(8, 1001, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen).tolist()
                for _ in range(2))
        ex.append(Example([a + [7] + b, b + [7] + a], None))
    ids, lengths, _ = collate(ex, "similarity", 7, "cpu")  # pad = spec.pad, for transformers' rule
    again = GPTClassifier.from_pretrained(str(tmp_path / "sim")).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "sim")).eval()
    assert again.spec == spec and type(hf).__name__ == "GPT2ForSequenceClassification"
    with torch.no_grad():
        want = model(ids, lengths).logits
        torch.testing.assert_close(again(ids, lengths).logits, want, rtol=0, atol=1e-6)
        one_order = hf(ids[:, 0]).logits
        torch.testing.assert_close(one_order + hf(ids[:, 1]).logits, want, rtol=0, atol=1e-4)
        assert (one_order - want).abs().max() > 1e-2
    config = json.load(open(tmp_path / "sim" / "config.json"))
    assert config["gptfast"]["finetune"]["similarity"] is True
    del config["gptfast"]["finetune"]["similarity"]  # as an older gptfast wrote it
    (tmp_path / "sim" / "config.json").write_text(json.dumps(config))
    old = GPTClassifier.from_pretrained(str(tmp_path / "sim")).eval()
    assert old.spec.similarity is False and old.spec.kind == "classification"
    with torch.no_grad():
        torch.testing.assert_close(old(ids[:, 0], lengths[:, 0]).logits, one_order, rtol=0, atol=1e-4)


def _pair_rows(n, seed):
    """'day' when 'light' is in one of the two texts (either one), 'night' when 'darkness' is."""
    rnd = random.Random(seed)
    rows = []
    for a, b in zip(_texts(n, rnd), _texts(n, rnd)):
        label = rnd.choice(["day", "night"])
        texts = [a.split(), b.split()]
        which = rnd.randrange(2)
        texts[which].insert(rnd.randint(0, len(texts[which])), "light" if label == "day" else "darkness")
        rows.append({"text": " ".join(texts[0]), "text_pair": " ".join(texts[1]), "label": label})
    return rows


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    data, val = _write(d / "train.jsonl", _pair_rows(128, 0)), _write(d / "val.jsonl", _pair_rows(32, 1))
    out = str(d / "out")
    assert main(["finetune", "--task", "similarity", "--data", data, "--val", val, "--out", out, "--epochs", "2",
                 "--batch-size", "8", "--lr", "1e-3", "--eval-every", "4", "--special-tokens", "--device", "cpu",
                 "--quiet"]) == 0
    return data, val, out


def test_finetune_similarity_learns_and_saves_the_spec(tuned, capsys):
    data, val, out = tuned
    log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    vals = [e["val_loss"] for e in log if "val_loss" in e]
    assert log[-1]["step"] == 32 and len(vals) == 8 and vals[-1] < 0.5 * vals[0], vals
    assert [e["val_accuracy"] for e in log if "val_accuracy" in e][-1] >= 0.9
    model = GPTClassifier.from_pretrained(out)
    assert model.spec.similarity is True and model.spec.text_pair is True and model.spec.labels == ["day", "night"]
    assert model.spec.start is not None and model.spec.extract is not None
    base = ["finetune", "--task", "similarity", "--data", data, "--val", val, "--out", out, "--epochs", "2",
            "--batch-size", "8", "--special-tokens", "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert main(base) == 0 and json.loads(capsys.readouterr().out)["task"] == "similarity"  # finished run
    assert main([a if a != "similarity" else "classification" for a in base]) == 2
    assert "--task similarity there, classification now" in capsys.readouterr().err


def test_classify_a_similarity_model(tuned, tmp_path, capsys):
    """gptfast classify: the same probabilities in both orders, an error without --pair, label
    names for unlabelled rows, and --data VAL reproduces the run's last validation."""
    data, val, out = tuned
    capsys.readouterr()
    results = []
    for text, pair in (("the people went into the light", "and the lord said"),
                       ("and the lord said", "the people went into the light")):
        assert main(["classify", text, "--pair", pair, "--model", out, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == pytest.approx(results[1], abs=1e-6) and results[0]["day"] > 0.5
    assert main(["classify", "the light", "--model", out]) == 2
    assert "this is a similarity model" in capsys.readouterr().err
    rows = [{"text": "the lord said unto him", "text_pair": "and they went into darkness"},
            {"text": "light upon the earth", "text_pair": "city people"}]
    assert main(["classify", "--data", _write(tmp_path / "u.jsonl", rows), "--model", out]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == ["night", "day"]
    assert main(["classify", "--data", val, "--model", out, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    last = [json.loads(line) for line in open(f"{out}/log.jsonl")][-1]
    assert got["accuracy"] == last["val_accuracy"] and got["loss"] == pytest.approx(last["val_loss"], abs=1e-5)
