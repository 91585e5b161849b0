"""The trainer's schedule and optimizer across a resume: what a changed flag does, and where an
interruption in the middle of a step's micro-batches leaves the run."""
import math
import os
import random
import shutil

import pytest
import torch

from gptfast import GPT
from gptfast.train import TrainArgs, latest_checkpoint, lr_at, make_optimizer, train
from test_cli_train import _interrupted

WORDS = ("river", "mountain", "sea", "sky", "field", "word", "people", "spoke", "above", "of", "the", "and")


def _text(seed: int, words: int = 2500) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("\n" if rng.random() < 0.05 else "") for _ in range(words))


@pytest.fixture
def book(tmp_path):
    data = tmp_path / "book.txt"
    data.write_text(_text(random.randrange(1 << 30)))
    return data


def _base(book, **kw):
    return dict(data=str(book), vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=24, batch_size=3,
                eval_batches=1, warmup=1, device="cpu", **kw)


def _weights(path):
    return GPT.from_pretrained(str(path)).state_dict()


def test_a_resume_trains_with_the_weight_decay_it_is_given():
    """The checkpoint's optimizer state holds the weight decay the run started with; a resume with
    another --weight-decay (which the resume line reports as changed) must use the new one, and
    keep the no-decay group (biases, LayerNorm) at 0."""
    torch.manual_seed(random.randrange(1 << 30))
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    opt, _, _ = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), None)
    model(torch.randn(3, 5)).square().sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 1, "log": "[]"}
    resumed, step, _ = make_optimizer(model, 1e-3, 0.37, (0.9, 0.95), state)
    assert step == 1
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.37, 0.0]
    assert resumed.state_dict()["state"].keys() == opt.state_dict()["state"].keys()  # the moments are kept


def test_a_resumed_run_with_another_weight_decay_trains_other_weights(book, tmp_path, capsys):
    first = tmp_path / "first"
    train(TrainArgs(out=str(first), steps=2, eval_every=2, weight_decay=0.1, lr=3e-2, min_lr=3e-2,
                    **_base(book)), progress=False)
    shutil.copytree(first, tmp_path / "same")
    shutil.copytree(first, tmp_path / "other")
    capsys.readouterr()
    train(TrainArgs(out=str(tmp_path / "same"), steps=4, eval_every=2, weight_decay=0.1, lr=3e-2, min_lr=3e-2,
                    **_base(book)))
    train(TrainArgs(out=str(tmp_path / "other"), steps=4, eval_every=2, weight_decay=5.0, lr=3e-2, min_lr=3e-2,
                    **_base(book)))
    assert "--weight-decay 0.1 -> 5.0" in capsys.readouterr().err
    same, other = _weights(tmp_path / "same"), _weights(tmp_path / "other")
    # decay shrinks the matrices only: the biases and LayerNorm parameters get no decay
    matrices = [k for k in same if same[k].dim() >= 2]
    assert matrices and all(not torch.equal(same[k], other[k]) for k in matrices)
    assert other["transformer.wte.weight"].norm() < same["transformer.wte.weight"].norm()


def test_a_min_lr_above_lr_is_an_error_naming_both(book, tmp_path):
    """--min-lr above --lr would make the cosine climb; left out, it follows --lr (a tenth of it),
    so a fine-tuning --lr 1e-4 decays to 1e-5, not up to the 3e-4 the default --lr decays to."""
    with pytest.raises(ValueError, match=r"--min-lr must be <= --lr 0.0001 \(the learning rate decays from --lr "
                                         r"to --min-lr\), got 0.0003"):
        TrainArgs(data=str(book), out=str(tmp_path / "o"), lr=1e-4, min_lr=3e-4)
    assert TrainArgs(data=str(book), out=str(tmp_path / "o"), lr=1e-4).min_lr == pytest.approx(1e-5)
    assert TrainArgs(data=str(book), out=str(tmp_path / "o")).min_lr == pytest.approx(3e-4)
    TrainArgs(data=str(book), out=str(tmp_path / "o"), lr=1e-4, min_lr=1e-4)  # a constant rate is fine


@pytest.mark.parametrize("warmup,steps", [(0, 1), (1, 7), (5, 77), (13, 14)])
def test_lr_warms_up_linearly_then_decays_by_a_cosine_to_min_lr(book, tmp_path, warmup, steps):
    lr, min_lr = random.uniform(1e-3, 1e-2), random.uniform(1e-5, 1e-4)
    args = TrainArgs(data=str(book), out=str(tmp_path / "o"), lr=lr, min_lr=min_lr, warmup=warmup, steps=steps)
    rates = [lr_at(s, args) for s in range(steps)]
    assert rates[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    decay = rates[warmup:]
    assert decay[0] == pytest.approx(lr) and all(a >= b for a, b in zip(decay, decay[1:]))
    assert all(min_lr <= r <= lr * (1 + 1e-12) for r in rates)
    for s in range(warmup, steps):
        frac = (s - warmup) / max(1, steps - warmup)
        assert rates[s] == pytest.approx(min_lr + 0.5 * (1 + math.cos(math.pi * frac))
                                         * (lr - min_lr))


def test_an_interruption_between_micro_batches_resumes_to_the_same_weights(book, tmp_path, monkeypatch):
    """grad_accum 3: steps 1-2 (6 micro-batches), the evaluation at step 2 (1 batch), then 2 of
    step 3's micro-batches, and the interruption: the resumed run redoes step 3 whole."""
    base = _base(book, steps=5, eval_every=2, grad_accum=3)
    train(TrainArgs(out=str(tmp_path / "whole"), **base), progress=False)
    _interrupted(monkeypatch, TrainArgs(out=str(tmp_path / "cut"), **base), losses=6 + 1 + 2)
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000002")
    assert not os.path.exists(tmp_path / "cut" / "model.safetensors")
    train(TrainArgs(out=str(tmp_path / "cut"), **base), progress=False)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_warmup_as_long_as_the_run_says_the_rate_never_decays(book, tmp_path, capsys):
    """--steps 3 with --warmup 5 (as a short run with the default --warmup 50): the learning rate
    only ramps up, to 4/5 of --lr; the run says so rather than train silently on another schedule."""
    base = {**_base(book), "warmup": 5}
    train(TrainArgs(out=str(tmp_path / "short"), steps=4, eval_every=4, lr=1e-2, min_lr=1e-3, **base))
    err = capsys.readouterr().err
    assert ("--warmup 5 is not below --steps 4: the learning rate warms up over the whole run, to 0.008 at the "
            "last step (--lr 0.01), and never decays to --min-lr") in err
    train(TrainArgs(out=str(tmp_path / "long"), steps=6, eval_every=6, lr=1e-2, min_lr=1e-3, **base))
    assert "--warmup" not in capsys.readouterr().err
