"""The command line (generate, backends, info, perplexity) and the trainer (resume, atomic checkpoints)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gptfast import GPT, Tokenizer
from gptfast.checkpoint import default_model_path
from gptfast.cli import main
from gptfast.train import TrainArgs, latest_checkpoint, perplexity, train

TEXT = ("In the beginning was the word, and the word was with the people who spoke it. "
        "They spoke of rivers and of mountains, of the sea and of the sky above the fields. ") * 60


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    data = d / "data.txt"
    data.write_text(TEXT)
    args = TrainArgs(data=str(data), out=str(d / "out"), vocab_size=300, n_layer=1, n_head=2, n_embd=32,
                     block_size=32, batch_size=4, steps=6, eval_every=3, eval_batches=2, warmup=2, device="cpu")
    summary = train(args, progress=False)
    return args, summary


def test_train_writes_a_loadable_model(run_dir):
    args, summary = run_dir
    assert summary["steps"] == 6 and summary["val_loss"] is not None
    for name in ("config.json", "model.safetensors", "tokenizer.json", "log.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(args.out, name)), name
    model, tok = GPT.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    assert model.config.vocab_size == tok.vocab_size
    assert len(model.generate(tok.encode("In the"), max_new_tokens=5, temperature=0)) == len(tok.encode("In the")) + 5


def test_train_resumes_from_last_checkpoint(run_dir):
    args, _ = run_dir
    ckpt = latest_checkpoint(args.out)
    assert ckpt.endswith("step-0000006")
    state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)
    assert state["step"] == 6
    more = TrainArgs(**{**vars(args), "steps": 9})
    summary = train(more, progress=False)
    assert summary["steps"] == 9
    log = [json.loads(line) for line in open(os.path.join(args.out, "log.jsonl"))]
    evals = [e["step"] for e in log if "val_loss" in e]
    assert evals == [3, 6, 9]  # continued, not restarted
    assert sorted(os.listdir(os.path.join(args.out, "checkpoints"))) == ["latest", "step-0000009"]


def test_train_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data file not found"):
        train(TrainArgs(data=str(tmp_path / "nope.txt"), out=str(tmp_path / "o"), vocab_size=300), progress=False)
    (tmp_path / "small.txt").write_text("tiny text " * 20)
    with pytest.raises(ValueError, match="--data has .* tokens; need at least"):
        train(TrainArgs(data=str(tmp_path / "small.txt"), out=str(tmp_path / "o2"), vocab_size=300, block_size=64),
              progress=False)


def test_perplexity_matches_direct_computation(run_dir):
    args, _ = run_dir
    model, tok = GPT.from_pretrained(args.out), Tokenizer.from_pretrained(args.out)
    ids = tok.encode(TEXT[:300])[:30]  # shorter than the context: one window
    result = perplexity(model, ids, progress=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert result["tokens"] == len(ids) - 1
    assert abs(result["nll"] - nll) < 1e-5
    long_ids = tok.encode(TEXT)[:200]  # several sliding windows: every token scored once
    ctx, stride, total, prev_end = model.config.n_positions, 16, 0.0, 0
    with torch.no_grad():  # each window's logits; its targets from the first one no window before scored
        for begin in range(0, len(long_ids) - 1, stride):
            end = min(begin + ctx, len(long_ids))
            window = torch.tensor([long_ids[begin:end]])
            per_token = torch.nn.functional.cross_entropy(model(window)[0, :-1], window[0, 1:], reduction="none")
            total += per_token[max(prev_end - begin - 1, 0):].double().sum().item()
            prev_end = end
            if end == len(long_ids):
                break
    for batch_size in (1, 3):
        got = perplexity(model, long_ids, stride=stride, progress=False, batch_size=batch_size)
        assert got["tokens"] == len(long_ids) - 1
        assert abs(got["nll"] - total / (len(long_ids) - 1)) < 1e-5, (got, batch_size)


def test_cli_generate_on_tiny_model(run_dir, capsys):
    args, _ = run_dir
    assert main(["generate", "In the beginning", "--model", args.out, "-n", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("In the beginning") and len(out) > len("In the beginning\n")
    assert main(["generate", "In the beginning", "--model", args.out, "-n", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out  # seeded: reproducible


def test_cli_generate_with_a_draft(run_dir, capsys):
    """--draft: the model as its own draft accepts every draft; greedy text is the plain text."""
    args, _ = run_dir
    base = ["generate", "In the beginning", "--model", args.out, "-n", "9", "-t", "0", "--ignore-eos"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--draft", args.out, "--draft-tokens", "3", "-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "speculative: 2 rounds, 6/6 drafts accepted (100%)" in captured.err  # 1 + 2 x 4 = 9 tokens
    assert main(base + ["--draft", "prompt-lookup", "-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "speculative: " in captured.err
    assert main(base + ["--draft", args.out, "--draft-tokens", "0"]) == 2
    assert "num_draft_tokens must be an int in [1, 16], got 0" in capsys.readouterr().err


def test_cli_generate_reads_stdin():
    default = default_model_path()
    if default is None:
        pytest.skip("the shipped default model is not built in this checkout")
    proc = subprocess.run([sys.executable, "-m", "gptfast.cli", "generate", "-n", "5", "--seed", "0"],
                          input="And God said", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("And God said")


def test_default_model_generates_and_is_documented(capsys):
    default = default_model_path()
    if default is None:
        pytest.skip("the shipped default model is not built in this checkout")
    assert main(["generate", "Once upon a time", "-n", "12", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    provenance = info["config"]["extra"]
    assert "public domain" in provenance["trained_on"] and provenance["command"].startswith("gptfast train")


def test_cli_errors_are_for_humans(capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "gptfast generate: error: checkpoint not found" in capsys.readouterr().err
    default = default_model_path()
    if default is not None:
        assert main(["generate", "hi", "--top-p", "1.5"]) == 2
        captured = capsys.readouterr()
        assert "top_p must be in (0, 1]" in captured.err and "got 1.5" in captured.err
        assert captured.out == ""  # arguments are checked before anything is printed
    assert main(["perplexity", str(tmp_path / "none.txt"), "--model", str(tmp_path / "missing")]) == 2


def test_cli_backends_and_info(run_dir, capsys):
    args, _ = run_dir
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for op in ("attention", "decode_attention", "layer_norm", "bias_gelu", "sample"):
        assert op in out
    assert main(["backends", "--json"]) == 0
    assert "attention" in json.loads(capsys.readouterr().out)
    assert main(["info", args.out]) == 0
    assert "GPT-2 (pre-LN)" in capsys.readouterr().out


def test_cli_perplexity(run_dir, capsys, tmp_path):
    args, _ = run_dir
    f = tmp_path / "eval.txt"
    f.write_text(TEXT[:2000])
    assert main(["perplexity", str(f), "--model", args.out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["tokens"] > 100


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Kill a run mid-way, run the same command again: the result equals the uninterrupted run."""
    import gptfast.train as train_mod

    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    base = dict(data=str(data), vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                steps=6, eval_every=3, eval_batches=2, warmup=2, device="cpu")
    train(TrainArgs(out=str(tmp_path / "whole"), **base), progress=False)

    real, calls = train_mod._shifted_loss, []

    def dies_at_step_4(*a):
        calls.append(1)
        if len(calls) == 6:  # steps 1-3, two eval batches at step 3, then step 4
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train_mod, "_shifted_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(out=str(tmp_path / "cut"), **base), progress=False)
    monkeypatch.setattr(train_mod, "_shifted_loss", real)
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000003")
    train(TrainArgs(out=str(tmp_path / "cut"), **base), progress=False)
    a = GPT.from_pretrained(str(tmp_path / "whole")).state_dict()
    b = GPT.from_pretrained(str(tmp_path / "cut")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes(tmp_path):
    """DDP on CPU (gloo) under torchrun: two ranks train one model, rank 0 writes it."""
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptfast.cli", "train", "--data", str(data), "--out", str(out), "--vocab-size", "300",
           "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
           "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone prints it
    assert summary["world_size"] == 2 and summary["steps"] == 4
    model = GPT.from_pretrained(str(out))
    assert model.config.n_layer == 1
    assert latest_checkpoint(str(out)).endswith("step-0000004")


def test_loss_plot_without_matplotlib_says_so(tmp_path, monkeypatch, caplog):
    from gptfast.train import plot_losses
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with caplog.at_level("WARNING", logger="gptfast"):
        assert plot_losses([{"step": 1, "loss": 2.0}], str(tmp_path / "loss.png")) is None
    assert any("no loss plot" in r.getMessage() and "matplotlib" in r.getMessage() for r in caplog.records)
