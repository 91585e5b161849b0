"""Tests added by mutation testing of gptfast.finetune: each one fails on a bug the other tests
let through (see the names)."""
import random

import torch

import gptfast.finetune as ft
from gptfast.finetune import FinetuneArgs, finetune

from test_finetune import FILLER, _write


def test_the_val_split_holds_out_val_fraction_of_the_rows_once(tmp_path, monkeypatch):
    """Without --val, max(1, int(N x val_fraction)) rows of the file are validation and every
    other row is training, once each, drawn at random."""
    rnd = random.Random(int(torch.randint(0, 2**31, ())))
    n, frac = rnd.randint(23, 61), rnd.choice([0.1, 0.25, 0.3])
    rows = [{"text": f"{' '.join(rnd.choice(FILLER) for _ in range(3))} {i}", "label": rnd.choice("ab")}
            for i in range(n)]
    rows[0]["label"], rows[1]["label"] = "a", "b"
    encoded, trained, validated = [], [], []
    real_encode, real_batch, real_evaluate = ft._encode_rows, ft._batch, ft.evaluate

    def encode(*args, **kwargs):
        out = real_encode(*args, **kwargs)
        encoded.append(out[0])
        return out

    def batch(examples, *args):
        trained.append(examples)
        return real_batch(examples, *args)

    def evaluate(model, examples, *args, **kwargs):
        validated.append(examples)
        return real_evaluate(model, examples, *args, **kwargs)

    monkeypatch.setattr(ft, "_encode_rows", encode)
    monkeypatch.setattr(ft, "_batch", batch)
    monkeypatch.setattr(ft, "evaluate", evaluate)
    finetune(FinetuneArgs(data=_write(tmp_path / "d.jsonl", rows), out=str(tmp_path / "o"), val_fraction=frac,
                          seed=rnd.randrange(1000), device="cpu", batch_size=8, epochs=1), progress=False)
    (whole,) = encoded  # every row encoded once, in file order
    assert [e.label for e in whole] == ["ab".index(r["label"]) for r in rows]
    number = {id(e): k for k, e in enumerate(whole)}
    train, val = [number[id(e)] for e in trained[0]], [number[id(e)] for e in validated[0]]
    assert all(len(t) == len(train) for t in trained) and all(len(v) == len(val) for v in validated)
    assert len(val) == max(1, int(n * frac)), (n, frac)
    assert sorted(train + val) == list(range(n))  # each row once
    assert train != sorted(train)  # shuffled
