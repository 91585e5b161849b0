"""Tests added by mutation testing of gptfast.finetune: each one fails on a bug the other tests
let through (see the names)."""
import random

import pytest
import torch

import gptfast.finetune as ft
from gptfast.finetune import FinetuneArgs, finetune

from test_finetune import FILLER, _write


class _Stop(Exception):
    pass


def test_the_val_split_holds_out_val_fraction_of_the_rows_once(tmp_path, monkeypatch):
    """Without --val, max(1, int(N x val_fraction)) rows of the file are validation and every
    other row is training: no row in both, none in neither, each with its number in the file."""
    rnd = random.Random(int(torch.randint(0, 2**31, ())))
    n, frac = rnd.randint(23, 61), rnd.choice([0.1, 0.25, 0.3])
    rows = [{"text": f"{' '.join(rnd.choice(FILLER) for _ in range(3))} {i}", "label": rnd.choice("ab")}
            for i in range(n)]
    rows[0]["label"], rows[1]["label"] = "a", "b"
    seen = []

    def capture(split_rows, tokenizer, spec, max_len, source, labelled=True, numbers=None):
        seen.append((list(split_rows), list(numbers)))
        if len(seen) == 2:  # training rows, then validation rows: stop before training
            raise _Stop
        return [], 0

    monkeypatch.setattr(ft, "encode_rows", capture)
    with pytest.raises(_Stop):
        finetune(FinetuneArgs(data=_write(tmp_path / "d.jsonl", rows), out=str(tmp_path / "o"), val_fraction=frac,
                              seed=rnd.randrange(1000), device="cpu"), progress=False)
    (train, train_numbers), (val, val_numbers) = seen
    assert len(val) == max(1, int(n * frac)), (n, frac)
    assert len(train) == n - len(val)
    assert sorted(train_numbers + val_numbers) == list(range(1, n + 1))  # each row once
    assert all(rows[k - 1] == r for k, r in zip(train_numbers + val_numbers, train + val))
