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


def _interrupted(monkeypatch, args: TrainArgs, losses: int) -> None:
    """train(args) stopped by a KeyboardInterrupt in the loss computation after `losses` losses
    (training micro-batches and evaluation batches alike), as a Ctrl-C would stop it."""
    import gptfast.train as train_mod

    real, calls = train_mod._shifted_loss, []

    def dies(*a):
        calls.append(1)
        if len(calls) > losses:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train_mod, "_shifted_loss", dies)
    with pytest.raises(KeyboardInterrupt):
        train(args, progress=False)
    monkeypatch.setattr(train_mod, "_shifted_loss", real)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Kill a run mid-way, run the same command again: the result equals the uninterrupted run."""

    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    base = dict(data=str(data), vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                steps=6, eval_every=3, eval_batches=2, warmup=2, device="cpu")
    train(TrainArgs(out=str(tmp_path / "whole"), **base), progress=False)

    _interrupted(monkeypatch, TrainArgs(out=str(tmp_path / "cut"), **base), losses=5)  # steps 1-3, 2 eval batches
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
    assert not (out / "tokenizer-init").exists()  # the tokenizer rank 0 trained for the others is not left behind


def test_loss_plot_without_matplotlib_says_so(tmp_path, monkeypatch, caplog):
    from gptfast.train import plot_losses
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with caplog.at_level("WARNING", logger="gptfast"):
        assert plot_losses([{"step": 1, "loss": 2.0}], str(tmp_path / "loss.png")) is None
    assert any("no loss plot" in r.getMessage() and "matplotlib" in r.getMessage() for r in caplog.records)


# ---- user audit: resume, dtypes, devices, argument checks, progress, --init ----------------------

TINY = dict(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, steps=4, eval_every=2,
            eval_batches=1, warmup=1, device="cpu")


def _tiny_cli(data, out, **flags):
    args = ["train", "--data", str(data), "--out", str(out), "--quiet"]
    for k, v in {**TINY, **flags}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _strict_json(text):
    """json.loads that refuses NaN and Infinity (which are not JSON)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def book(tmp_path):
    data = tmp_path / "book.txt"
    data.write_text(TEXT)
    return data


def test_resume_says_so_and_refuses_flags_that_define_another_run(book, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tiny_cli(book, out)) == 0
    first = _strict_json(capsys.readouterr().out)
    assert main(_tiny_cli(book, out, n_embd=48, block_size=64, steps=8)) == 2
    err = capsys.readouterr().err
    assert f"gptfast train: error: --out {out} holds a run (at step 4) made with other settings" in err
    assert "--block-size 32 there, 64 now" in err and "--n-embd 32 there, 48 now" in err
    assert "new --out" in err and "Traceback" not in err
    assert GPT.from_pretrained(str(out)).config.n_embd == 32  # untouched
    # --steps, --eval-every and --lr may change: it resumes and says from where
    assert main(_tiny_cli(book, out, steps=6, eval_every=3, lr=1e-3)) == 0
    captured = capsys.readouterr()
    assert f"resuming from step 4 of --out {out}" in captured.err
    assert "--steps 4 -> 6" in captured.err and "--eval-every 2 -> 3" in captured.err
    assert _strict_json(captured.out)["steps"] == 6
    # a finished run run again: valid JSON, the last logged loss, and it says there is nothing to do
    assert main(_tiny_cli(book, out, steps=6, eval_every=3, lr=1e-3)) == 0
    captured = capsys.readouterr()
    again = _strict_json(captured.out)
    last = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert again["steps"] == 6 and again["train_loss"] == last["loss"] and first["train_loss"] is not None
    assert "nothing to train" in captured.err


def test_resume_follows_moved_data_and_refuses_other_content_at_the_same_path(book, tmp_path):
    """Path flags are compared by what they hold: data moved elsewhere (another mount, a copy)
    resumes its run; other data under the run's path is refused, saying so."""
    out = str(tmp_path / "run")
    train(TrainArgs(data=str(book), out=out, **TINY), progress=False)
    moved = tmp_path / "elsewhere" / "book.txt"
    moved.parent.mkdir()
    os.replace(book, moved)
    resumed = train(TrainArgs(data=str(moved), out=out, **{**TINY, "steps": 5}), progress=False)
    assert resumed["steps"] == 5
    moved.write_text(TEXT.upper())
    with pytest.raises(ValueError, match=f"--data {moved.resolve()} holds other content than when the run started"):
        train(TrainArgs(data=str(moved), out=out, **{**TINY, "steps": 6}), progress=False)


def test_resume_refuses_another_data_file_tokenizer_size_or_seed(book, tmp_path):
    out = str(tmp_path / "run")
    train(TrainArgs(data=str(book), out=out, **TINY), progress=False)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    for change, words in (({"data": str(other)}, "--data"), ({"vocab_size": 280}, "--vocab-size 300 there, 280 now"),
                          ({"seed": 1}, "--seed 1337 there, 1 now"), ({"val_fraction": 0.1}, "--val-fraction")):
        with pytest.raises(ValueError, match="holds a run") as info:
            train(TrainArgs(**{"data": str(book), "out": out, **TINY, **change}), progress=False)
        assert words in str(info.value)
    # a checkpoint written before train_state.pt recorded the run's identity: compared by its args
    path = os.path.join(latest_checkpoint(out), "train_state.pt")
    state = torch.load(path, weights_only=True)
    del state["identity"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="--n-embd 32 there, 64 now"):
        train(TrainArgs(**{"data": str(book), "out": out, **TINY, "n_embd": 64}), progress=False)
    assert train(TrainArgs(**{"data": str(book), "out": out, **TINY, "steps": 5}), progress=False)["steps"] == 5


def test_summary_and_log_json_have_no_nan():
    from gptfast.train import finite_json
    assert finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": "x", "d": 2}) == \
        {"a": None, "b": [1.0, None], "c": "x", "d": 2}


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                        ("float16", torch.float16)])
def test_dtype_names_are_those_of_generate(name, dtype):
    from gptfast.train import resolve_dtype
    assert resolve_dtype(name) == dtype
    TrainArgs(data="d", out="o", dtype=name)


def test_bad_dtype_and_device_are_errors_naming_the_flag(book, tmp_path, capsys):
    for bad in ("int8", "float64", "bf17"):
        assert main(_tiny_cli(book, tmp_path / "o", dtype=bad)) == 2
        assert f"--dtype must be one of float32, fp32, bfloat16, bf16, float16, fp16, got '{bad}'" in \
            capsys.readouterr().err
    assert main(_tiny_cli(book, tmp_path / "o", device="gpu")) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_tiny_cli(book, tmp_path / "o", device="cuda")) == 2
        err = capsys.readouterr().err
        assert "gptfast train: error: --device cuda: CUDA is not available here" in err and "Traceback" not in err


def test_bf16_trains_on_the_cli(book, tmp_path, capsys):
    assert main(_tiny_cli(book, tmp_path / "o", dtype="bf16", steps=2)) == 0
    assert _strict_json(capsys.readouterr().out)["steps"] == 2


def test_float16_trains_through_a_grad_scaler_and_resumes_to_the_same_weights(book, tmp_path, monkeypatch):
    """fp16 autocast: the loss is scaled (GradScaler), unscaled before the clip, the scale is saved in
    the train state, and an interrupted run resumes to the uninterrupted one's weights."""
    import gptfast.train as train_mod

    base = dict(TINY, data=str(book), steps=6, eval_every=3, dtype="float16")
    train(TrainArgs(out=str(tmp_path / "whole"), **base), progress=False)
    state = torch.load(os.path.join(latest_checkpoint(str(tmp_path / "whole")), "train_state.pt"), weights_only=True)
    assert 0 < state["scaler"]["scale"] <= 65536.0  # a GradScaler ran (and backs off from 2^16 on overflow)
    scaled, real_scaler = [], train_mod.make_scaler

    def counting_scaler(*a):
        scaler = real_scaler(*a)
        real_scale = scaler.scale
        scaler.scale = lambda loss: scaled.append(1) or real_scale(loss)
        return scaler

    monkeypatch.setattr(train_mod, "make_scaler", counting_scaler)
    _interrupted(monkeypatch, TrainArgs(out=str(tmp_path / "cut"), **base), losses=4)  # steps 1-3, 1 eval batch
    assert scaled  # every micro-batch's loss went through the scaler
    train(TrainArgs(out=str(tmp_path / "cut"), **base), progress=False)
    a = GPT.from_pretrained(str(tmp_path / "whole")).state_dict()
    b = GPT.from_pretrained(str(tmp_path / "cut")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,message", [
    ({"eval_every": 0}, "--eval-every must be an int >= 1, got 0"),
    ({"eval_batches": 0}, "--eval-batches must be an int >= 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be an int >= 1, got 0"),
    ({"steps": 0}, "--steps must be an int >= 1, got 0"),
    ({"steps": -3}, "--steps must be an int >= 1, got -3"),
    ({"grad_accum": -1}, "--grad-accum must be an int >= 1, got -1"),
    ({"warmup": -1}, "--warmup must be an int >= 0, got -1"),
    ({"lr": -1}, "--lr must be a number > 0, got -1.0"),
    ({"min_lr": -1}, "--min-lr must be a number >= 0, got -1.0"),
    ({"weight_decay": -0.1}, "--weight-decay must be a number >= 0, got -0.1"),
    ({"grad_clip": 0}, "--grad-clip must be a number > 0, got 0.0"),
    ({"val_fraction": 1.5}, "--val-fraction must be a number in (0, 1), got 1.5"),
    ({"vocab_size": 10}, "--vocab-size must be an int >= 257 (a byte-level BPE holds the 256 bytes"),
    ({"vocab_size": 100}, "--vocab-size must be an int >= 257"),
    ({"eval_limit": -1}, "--eval-limit must be an int >= 1, got -1"),
    ({"n_embd": 30, "n_head": 4}, "--n-embd must be a multiple of --n-head 4, got 30"),
    ({"eval_data": "nonexist.jsonl"}, "--eval-data file not found: nonexist.jsonl"),
])
def test_bad_train_arguments_are_errors_naming_the_flag(book, tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert main(_tiny_cli(book, out, **flags)) == 2
    captured = capsys.readouterr()
    assert f"gptfast train: error: {message}" in captured.err and "Traceback" not in captured.err
    assert captured.out == "" and not os.path.exists(out / "config.json")


def test_non_utf8_data_and_a_too_large_val_fraction_name_the_file_and_flag(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe" + b"hello world " * 100)
    assert main(_tiny_cli(bad, tmp_path / "o")) == 2
    assert f"gptfast train: error: --data {bad}: not UTF-8 text (byte 0)" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text(TEXT[:3000])
    with pytest.raises(ValueError, match=r"the training split has \d+ tokens; need at least 34 .*--val-fraction 0.99"):
        train(TrainArgs(data=str(small), out=str(tmp_path / "v"), **{**TINY, "val_fraction": 0.99}), progress=False)


def test_training_on_a_text_file_shows_the_tokenizer_and_encoding_progress(book, tmp_path, capsys):
    train(TrainArgs(data=str(book), out=str(tmp_path / "o"), **{**TINY, "steps": 1}), progress=True)
    err = capsys.readouterr().err
    assert "tokenizer: 100%" in err and "encode: 100%" in err and "train: " in err
    train(TrainArgs(data=str(book), out=str(tmp_path / "q"), **{**TINY, "steps": 1}), progress=False)
    assert "encode" not in capsys.readouterr().err


def test_vocab_size_where_no_tokenizer_is_trained_is_an_error(book, tmp_path, run_dir):
    args, _ = run_dir
    with pytest.raises(ValueError, match=f"--vocab-size 300 sets the size of a tokenizer trained on a text --data, "
                                         f"and none is trained here: --tokenizer {args.out} is the tokenizer"):
        train(TrainArgs(data=str(book), out=str(tmp_path / "o"), tokenizer=args.out, **TINY), progress=False)
    with pytest.raises(ValueError, match=f"none is trained here: --init {args.out} brings its tokenizer"):
        train(TrainArgs(data=str(book), out=str(tmp_path / "o"), init=args.out, **TINY), progress=False)


def _nanogpt_no_bias(path, vocab_size):
    from gptfast import GPTConfig
    config = GPTConfig(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=1, n_head=2, bias=False,
                       activation="gelu")
    model = GPT(config)
    torch.save({"model_args": dict(n_layer=1, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab_size,
                                   dropout=0.0), "model": model.state_dict()}, path)


def test_init_from_a_bias_free_nanogpt_checkpoint_trains_saves_and_resumes(book, tmp_path, run_dir, capsys):
    """nanoGPT's default bias=False has no Hugging Face GPT-2 equivalent: the run saves nanoGPT-style
    ckpt.pt files (whole config), which load back, resume and generate."""
    args, _ = run_dir
    nano = tmp_path / "nano"
    nano.mkdir()
    Tokenizer.from_pretrained(args.out).save(str(nano))
    _nanogpt_no_bias(nano / "nobias.pt", Tokenizer.from_pretrained(args.out).vocab_size)
    base = {k: v for k, v in TINY.items() if k not in ("vocab_size", "n_layer", "n_head", "n_embd")}
    run = TrainArgs(data=str(book), out=str(tmp_path / "run"), init=str(nano / "nobias.pt"), **{**base, "steps": 4})
    assert train(run, progress=False)["steps"] == 4
    assert "saved as a nanoGPT-style ckpt.pt" in capsys.readouterr().err
    for d in (run.out, latest_checkpoint(run.out)):
        assert os.path.isfile(os.path.join(d, "ckpt.pt")) and not os.path.exists(os.path.join(d, "config.json"))
    model = GPT.from_pretrained(run.out)
    assert model.config.bias is False
    import shutil
    shutil.rmtree(nano)  # the run's checkpoint holds all a resume needs
    assert train(TrainArgs(**{**vars(run), "steps": 6}), progress=False)["steps"] == 6
    tok = Tokenizer.from_pretrained(run.out)
    assert len(GPT.from_pretrained(run.out).generate(tok.encode("In the"), max_new_tokens=3, temperature=0)) == \
        len(tok.encode("In the")) + 3


def test_init_preset_says_it_is_randomly_initialised(monkeypatch):
    import gptfast.train as train_mod
    from gptfast.train import describe_init, resolve_init

    assert resolve_init("gpt2") == ("preset", "gpt2")
    monkeypatch.setattr(train_mod, "_cached_snapshot", lambda name: None)
    assert describe_init("gpt2", "preset", "gpt2") == (
        "[gptfast] --init gpt2: the gpt2 preset, randomly initialised (for gpt2's pretrained weights pass a "
        "checkpoint directory)")
    monkeypatch.setattr(train_mod, "_cached_snapshot", lambda name: f"/cache/{name}/snap")
    assert describe_init("gpt2", "preset", "gpt2").endswith(
        "pass a checkpoint directory; the local Hugging Face cache has them: --init /cache/gpt2/snap)")
    with pytest.raises(FileNotFoundError, match=r"--init no-such-model-x: not a preset \(gpt2, .*\) and no checkpoint"):
        resolve_init("no-such-model-x")
