"""gptfast train under torchrun on the CPU (gloo): two ranks equal one rank with their global batch,
a rank that dies ends the run (no hang) with the last checkpoint intact, and that checkpoint resumes
under torchrun bit for bit, or in one process with the same global batch to the same weights."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptfast import GPT
from gptfast.train import TrainArgs, latest_checkpoint, train

from hf_utils import assert_same_weights

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "gptfast", "assets", "default")
SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, steps=4, eval_every=2, eval_batches=2, warmup=2,
             lr=3e-3, device="cpu")
# runs `gptfast train`; with CRASH_AT=N, rank CRASH_RANK dies (SIGKILL, as the OOM killer kills)
# at its Nth loss computation
LAUNCHER = """
import os, signal, sys
import gptfast.train as t
if os.environ.get("CRASH_AT") and os.environ["RANK"] == os.environ["CRASH_RANK"]:
    real, calls = t._shifted_loss, [0]
    def dying(*a):
        calls[0] += 1
        if calls[0] == int(os.environ["CRASH_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a)
    t._shifted_loss = dying
from gptfast.cli import main
sys.exit(main(["train"] + sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(7)
    words = ["And", "God", "said", "light", "the", "waters", "earth", "was", "good", "of", "day", "night"]
    text = "\n".join(" ".join(rng.choice(words, size=int(rng.integers(3, 15)))) for _ in range(700))
    (d / "book.txt").write_text(text)
    (d / "launch.py").write_text(LAUNCHER)
    return d


def _torchrun(book, out, batch_size, grad_accum, crash_at=None, crash_rank=1, timeout=240):
    flags = {**SHAPE, "data": str(book / "book.txt"), "out": str(out), "tokenizer": TOKENIZER,
             "batch_size": batch_size, "grad_accum": grad_accum}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(book / "launch.py"), "--quiet"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if crash_at is not None:
        env.update(CRASH_AT=str(crash_at), CRASH_RANK=str(crash_rank))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _args(book, out, batch_size, grad_accum):
    return TrainArgs(**SHAPE, data=str(book / "book.txt"), out=str(out), tokenizer=TOKENIZER, batch_size=batch_size,
                     grad_accum=grad_accum)


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _weights(out):
    return GPT.from_pretrained(str(out)).state_dict()


def test_two_ranks_train_as_one_with_their_global_batch_and_a_crash_resumes(book, tmp_path, capsys):
    # two ranks x batch 3 x 2 micro-batches = one process x batch 6 x 2: the same rows each step,
    # the gradients averaged over the ranks, so the same losses and (up to float sums) weights
    whole = tmp_path / "whole"
    proc = _torchrun(book, whole, batch_size=3, grad_accum=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints it
    assert summary["world_size"] == 2 and summary["tokens_per_step"] == 2 * 3 * 2 * 32
    single = tmp_path / "single"
    train(_args(book, single, batch_size=6, grad_accum=2), progress=False)
    ddp_log, one_log = _log(whole), _log(single)
    assert [e["step"] for e in ddp_log] == [e["step"] for e in one_log] == [2, 4]  # one writer: no duplicates
    for key in ("loss", "val_loss", "lr"):
        assert [e[key] for e in ddp_log] == pytest.approx([e[key] for e in one_log], rel=1e-5), key
    assert_same_weights(_weights(whole), _weights(single), "(2 ranks x 3 x 2 vs 1 x 6 x 2)")

    # rank 1 is killed in step 3 (its 7th loss: 2 a step, 2 in step 2's evaluation): the run ends (torchrun stops rank 0), and the
    # step-2 checkpoint rank 0 wrote is complete
    cut = tmp_path / "cut"
    proc = _torchrun(book, cut, batch_size=3, grad_accum=2, crash_at=7)
    assert proc.returncode != 0
    assert latest_checkpoint(str(cut)).endswith("step-0000002")
    one = tmp_path / "cut-one-rank"
    shutil.copytree(cut, one)
    # the same command resumes it to the uninterrupted run's weights, bit for bit
    proc = _torchrun(book, cut, batch_size=3, grad_accum=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step 2" in proc.stderr
    a, b = _weights(whole), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in _log(cut)] == [e["loss"] for e in ddp_log]

    # one process with the same global batch resumes it too, on the same rows, and says the ranks changed
    capsys.readouterr()
    summary = train(_args(book, one, batch_size=6, grad_accum=2), progress=False)
    assert summary["world_size"] == 1
    assert ("the run was trained on 2 rank(s), now on 1: the same 12 rows a step (batch x grad_accum x ranks)"
            in capsys.readouterr().err)
    assert_same_weights(_weights(one), a, "(resumed on 1 rank)")


def test_cpu_ranks_use_gloo_on_a_machine_with_a_gpu(monkeypatch):
    """torchrun ... --device cpu on a GPU machine: the process group is gloo's (NCCL cannot reduce
    CPU tensors)."""
    import gptfast.train as t

    started = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: started.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert t.setup_device("cpu") == (1, 2, torch.device("cpu"))
    assert started == ["gloo"]


def test_a_resume_on_other_ranks_says_whether_its_steps_keep_their_rows():
    from gptfast.train import ranks_line

    state = {"world": 4, "args": json.dumps({"batch_size": 3, "grad_accum": 5})}
    same = TrainArgs(data="d", out="o", batch_size=6, grad_accum=5)
    assert ranks_line(state, 2, same) == ("[gptfast] the run was trained on 4 rank(s), now on 2: the same 60 rows a "
                                          "step (batch x grad_accum x ranks), so the same data as before")
    other = TrainArgs(data="d", out="o", batch_size=3, grad_accum=5)
    assert ranks_line(state, 2, other).endswith("30 rows a step (batch x grad_accum x ranks), 60 before: "
                                                "other data from here on")
    assert ranks_line(state, 4, other) is None and ranks_line({"args": state["args"]}, 2, other) is None
