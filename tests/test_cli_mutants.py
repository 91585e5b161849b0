"""The command line passes what it parses on: each generate/perplexity/eval/train flag reaches the
call it is for, the defaults are those --help names, the bounds accept their lowest value, and the
streamed text holds back exactly the start of a stop string, no more and no less."""
import argparse
import io
import json
import random
import sys

import pytest
import torch

import gptfast
from gptfast.checkpoint import default_model_path
from gptfast.cli import build_parser, main

DEFAULT = default_model_path()
needs_default = pytest.mark.skipif(DEFAULT is None, reason="the shipped default model is not built in this checkout")


@pytest.fixture
def tok():
    return gptfast.Tokenizer.from_pretrained(DEFAULT)


def _fake_stream(monkeypatch, ids, seen=None, each=None):
    """GPT.generate_stream yields `ids`, one a step, and records its keyword arguments in `seen`;
    each(i) runs before the i-th id is yielded (what the command printed by then is final)."""
    def stream(self, prompt, **kwargs):
        if seen is not None:
            seen.update(kwargs, prompt=prompt)
        for i, t in enumerate(ids):
            if each is not None:
                each(i)
            yield [t]
        if each is not None:
            each(len(ids))

    monkeypatch.setattr(gptfast.GPT, "generate_stream", stream)


@needs_default
def test_generate_passes_every_sampling_flag_on(monkeypatch, capsys, tok):
    rng = random.Random()
    t, p, m = round(rng.uniform(0.1, 2.0), 3), round(rng.uniform(0.05, 0.99), 3), round(rng.uniform(0.01, 0.5), 3)
    k, n, seed = rng.randint(1, 50), rng.randint(2, 60), rng.randint(0, 10**6)
    seen = {}
    _fake_stream(monkeypatch, tok.encode(" so"), seen)
    assert main(["generate", "And", "-n", str(n), "-t", str(t), "--top-k", str(k), "--top-p", str(p),
                 "--min-p", str(m), "--seed", str(seed), "--ignore-eos", "--no-cuda-graph"]) == 0
    got = {key: seen[key] for key in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                                      "ignore_eos", "cuda_graph")}
    assert got == {"max_new_tokens": n, "temperature": t, "top_k": k, "top_p": p, "min_p": m, "seed": seed,
                   "ignore_eos": True, "cuda_graph": False}, (got, capsys.readouterr().err)
    assert seen["prompt"] == tok.encode("And")


@needs_default
def test_generate_defaults_are_those_help_names(monkeypatch, capsys, tok):
    """No flags: 100 tokens, temperature 0.8, top-p 0.95, no top-k or min-p, unseeded, stopping
    at the end-of-text token, a CUDA graph where one pays; --help says so."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    generate = commands.choices["generate"]
    defaults = {a.dest: a.default for a in generate._actions
                if a.default is not None and a.default is not False and a.default != argparse.SUPPRESS}
    assert defaults == {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "min_p": 0.0,
                        "num_samples": 1, "device": "auto", "dtype": "float32", "draft_tokens": 4}
    for action in generate._actions:  # the help text, as argparse expands it
        if action.dest in defaults:
            assert f"default: {defaults[action.dest]}" in (action.help or "") % vars(action), action.option_strings
    assert "default: 0.95" in generate.format_help()
    seen = {}
    _fake_stream(monkeypatch, tok.encode(" so"), seen)
    assert main(["generate", "And"]) == 0
    got = {key: seen[key] for key in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                                      "ignore_eos", "cuda_graph", "stop_strings", "num_draft_tokens")}
    assert got == {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "min_p": 0.0, "seed": None,
                   "ignore_eos": False, "cuda_graph": None, "stop_strings": None, "num_draft_tokens": 4}


@needs_default
@pytest.mark.parametrize("with_draft", [False, True])
def test_generate_loads_on_the_device_dtype_and_backend_asked_for(with_draft, monkeypatch, capsys, tok):
    real, loads, backends = gptfast.GPT.from_pretrained, [], []

    def from_pretrained(path, device=None, dtype=None):
        loads.append((device, dtype))
        return real(path, device=device, dtype=dtype)

    monkeypatch.setattr(gptfast.GPT, "from_pretrained", from_pretrained)
    monkeypatch.setattr(gptfast, "use_backend", backends.append)
    _fake_stream(monkeypatch, tok.encode(" so"))
    backend, dtype = random.choice(["torch", "kernel", "auto"]), random.choice(["bfloat16", "float16"])
    argv = ["generate", "And", "--device", "cpu", "--dtype", dtype, "--backend", backend]
    assert main(argv + (["--draft", DEFAULT] if with_draft else [])) == 0, capsys.readouterr().err
    assert loads == [(torch.device("cpu"), getattr(torch, dtype))] * (2 if with_draft else 1)
    assert backends == [backend]


@pytest.mark.parametrize("argv, dest", [
    (["generate", "hi", "-n", "1"], "max_new_tokens"),
    (["generate", "hi", "--num-samples", "1"], "num_samples"),
    (["perplexity", "f.txt", "--stride", "1"], "stride"),
    (["perplexity", "f.txt", "--batch-size", "1"], "batch_size"),
    (["eval", "f.jsonl", "--limit", "1"], "limit"),
    (["eval", "f.jsonl", "--batch-size", "1"], "batch_size"),
    (["classify", "x", "--model", "m", "--batch-size", "1"], "batch_size"),
])
def test_size_flags_accept_their_lowest_value(argv, dest):
    assert getattr(build_parser().parse_args(argv), dest) == 1


def test_stop_escapes_all_four():
    args = build_parser().parse_args(["generate", "--stop", "a\\rb\\tc\\nd\\\\e\\x", "--stop", "\\r\\n",
                                      "--stop", "\\\\n\\\\\\r"])
    assert args.stop == ["a\rb\tc\nd\\e\\x", "\r\n", "\\n\\\r"]  # an escaped backslash, then n


@needs_default
def test_stop_at_a_carriage_return(monkeypatch, capsys, tok):
    ids = tok.encode(" and\r it was")
    _fake_stream(monkeypatch, ids)
    assert main(["generate", "And", "--stop", "\\r", "-n", str(len(ids))]) == 0
    assert capsys.readouterr().out == "And and\n"


def _held(text: str, stops) -> int:
    """Length of the longest end of text that begins (and is not) a stop string: the earliest
    position from which the rest of text starts a stop string."""
    return next((len(text) - i for i in range(len(text)) if any(s.startswith(text[i:]) and s != text[i:]
                                                                 for s in stops)), 0)


@needs_default
@pytest.mark.parametrize("stops", [["never", " And God"], ["zzz", "so\n\n A"], ["d saw!", "x"], ["q", "saw!"]])
def test_streamed_text_holds_back_exactly_the_start_of_a_stop_string(stops, monkeypatch, tok):
    """While tokens come, what is printed is the text so far less the longest end that begins
    any stop string (the last one given too): not less (output as it comes), not more. Nothing
    goes out before the second token (the first decode step, whose fallback lines come first)."""
    text = " and it was so\n\n And God saw"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text
    out = io.StringIO()
    printed = []
    _fake_stream(monkeypatch, ids, each=lambda i: printed.append(out.getvalue()))
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "And"] + [a for s in stops for a in ("--stop", s)] + ["-n", str(len(ids))]) == 0
    cut = min((text.find(s) for s in stops if s in text), default=None)
    for i, got in enumerate(printed[1:], 1):  # after the i-th token
        so_far = "".join(pieces[:i])
        if cut is not None and any(s in so_far for s in stops):
            break
        assert got == ("" if i == 1 else "And" + so_far[:len(so_far) - _held(so_far, stops)]), (i, got)
    assert out.getvalue() == "And" + (text if cut is None else text[:cut]) + "\n"


@needs_default
def test_the_first_of_two_stop_strings_a_token_completes_cuts(monkeypatch, capsys, tok):
    """' was' completes 'wa' and 'as' at once: the text stops before the earlier one."""
    ids = tok.encode(" and it was so")
    assert tok.decode(ids[2:3]) == " was"
    _fake_stream(monkeypatch, ids)
    assert main(["generate", "And", "--stop", "as", "--stop", "wa", "-n", str(len(ids))]) == 0
    assert capsys.readouterr().out == "And and it \n"


@needs_default
def test_ids_past_the_tokenizers_vocabulary_print_nothing(monkeypatch, capsys, tok):
    so, it = tok.encode(" so"), tok.encode(" it")
    ids = so + [tok.vocab_size, tok.vocab_size + random.randint(1, 40)] + it
    _fake_stream(monkeypatch, ids)
    assert main(["generate", "And", "-n", str(len(ids))]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == "And so it\n"


@needs_default
def test_samples_are_seeded_one_after_another(capsys):
    """--num-samples N --seed S: sample i is what --seed S+i-1 gives alone."""
    seed = random.randint(0, 10**6)
    base = ["generate", "And God said", "-n", "10", "-t", "1.5", "--top-p", "1", "--ignore-eos"]
    assert main(base + ["--seed", str(seed), "--num-samples", "2"]) == 0
    both = capsys.readouterr().out
    alone = []
    for s in (seed, seed + 1):
        assert main(base + ["--seed", str(s)]) == 0
        alone.append(capsys.readouterr().out)
    assert alone[0] != alone[1]
    assert both == f"\n===== sample 1 =====\n{alone[0]}\n===== sample 2 =====\n{alone[1]}"


@needs_default
def test_a_prompt_that_fills_the_context_is_an_error(monkeypatch, capsys, tok):
    ctx = gptfast.GPT.from_pretrained(DEFAULT).config.n_positions
    word = tok.encode(" sheep")
    assert len(word) == 1
    full = "And" + " sheep" * (ctx - 1)
    assert len(tok.encode(full)) == ctx
    assert main(["generate", full]) == 2
    captured = capsys.readouterr()
    assert f"the prompt has {ctx} tokens; the model's context is {ctx}" in captured.err and captured.out == ""
    seen = {}
    _fake_stream(monkeypatch, word, seen)
    assert main(["generate", full[:-len(" sheep")]]) == 0  # one token left
    assert seen["max_new_tokens"] == 1
    assert f"generating 1 tokens: the model's context ({ctx}) is full after that" in capsys.readouterr().err


@needs_default
def test_perplexity_passes_stride_and_batch_size_on(monkeypatch, capsys, tmp_path, tok):
    import gptfast.train as train_mod

    real, seen = train_mod.perplexity, {}

    def perplexity(model, ids, **kwargs):
        seen.update(kwargs)
        return real(model, ids, **kwargs)

    monkeypatch.setattr(train_mod, "perplexity", perplexity)
    words = ["And", "God", "said", "let", "there", "be", "light", "sheep", "and", "it", "was", "so"]
    f = tmp_path / "eval.txt"
    f.write_text(" ".join(random.choice(words) for _ in range(700)))
    stride, batch = random.randint(20, 120), random.randint(2, 5)
    assert main(["perplexity", str(f), "--model", DEFAULT, "--stride", str(stride), "--batch-size", str(batch),
                 "--json"]) == 0
    assert seen == {"stride": stride, "batch_size": batch}
    got = json.loads(capsys.readouterr().out)
    model = gptfast.GPT.from_pretrained(DEFAULT)
    want = real(model, tok.encode(f.read_text()), stride=stride, progress=False)
    assert got["tokens"] == want["tokens"] and abs(got["nll"] - want["nll"]) < 1e-5


@needs_default
def test_eval_passes_limit_and_delimiter_on(monkeypatch, capsys, tmp_path):
    from gptfast import evaluation

    real, seen = evaluation.evaluate_zero_shot, {}

    def evaluate_zero_shot(model, tok, rows, **kwargs):
        seen.update(kwargs, rows=len(rows))
        return real(model, tok, rows, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_zero_shot", evaluate_zero_shot)
    n = random.randint(3, 6)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"context": f"And God said {i}", "choices": ["light", "sheep"], "label": i % 2})
                         + "\n" for i in range(n)))
    limit = random.randint(1, n - 1)
    assert main(["eval", str(f), "--model", DEFAULT, "--limit", str(limit), "--delimiter", ":", "--json"]) == 0
    assert seen["rows"] == limit and seen["delimiter"] == ":"
    assert json.loads(capsys.readouterr().out)["examples"] == limit


@pytest.mark.parametrize("command, flags, field", [
    ("train", ["--weight-decay", "0"], "weight_decay"),
    ("train", ["--warmup", "0"], "warmup"),
    ("train", ["--seed", "0"], "seed"),
    ("finetune", ["--lm-coef", "0"], "lm_coef"),
    ("finetune", ["--weight-decay", "0"], "weight_decay"),
])
def test_a_zero_on_the_command_line_is_not_the_default(command, flags, field, monkeypatch, capsys, tmp_path):
    """--weight-decay 0 (no decay) and --lm-coef 0 (task loss only) are values, not "not given"."""
    import gptfast.finetune as finetune_mod
    import gptfast.train as train_mod

    seen = []
    mod, name = (train_mod, "train") if command == "train" else (finetune_mod, "finetune")
    monkeypatch.setattr(mod, name, lambda args, progress: seen.append(args) or {"ok": True})
    assert main([command, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--quiet"] + flags) == 0
    assert getattr(seen[0], field) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True}


@pytest.fixture(scope="module")
def split_char_model(tmp_path_factory):
    """A tiny model whose byte-level BPE has a token that ends inside a character: ' ' and the
    first byte of an accented letter (as GPT-2's ' \\xf0\\x9f' starts an emoji)."""
    from gptfast.tokenizer import train_byte_level_bpe

    rng = random.Random(0)
    letters = [chr(c) for c in range(0xE0, 0x100)]  # two bytes each, the same first byte
    tok = train_byte_level_bpe((), 258, texts=[" ".join(rng.choice(letters) for _ in range(3000))])
    ids = tok.encode(" \u00e9")
    assert len(ids) == 2 and tok.decode(ids[:1]) == " \ufffd"
    d = tmp_path_factory.mktemp("split") / "model"
    gptfast.GPT(gptfast.GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  eos_token_id=0)).save_pretrained(str(d))
    tok.save(str(d))
    return str(d), tok


@pytest.mark.parametrize("stop", ["said ", "id "])
def test_a_stop_string_the_held_back_bytes_complete_is_not_printed(stop, split_char_model, monkeypatch, capsys):
    """The last token ends inside a character after the stop string's last character: the
    generation stops there (the decoder's held-back text completes the stop string), and the
    command prints the text before the stop string, not the stop string and a U+FFFD."""
    from gptfast.generation import _Stops

    path, tok = split_char_model
    ids = tok.encode("and it was said \u00e9")[:-1]  # ends with ' ' + the first byte of the letter
    stops = _Stops(1, [], [stop], tok)
    assert [stops.push(0, i) for i in ids][-1]  # generate_stream stops after the last id
    _fake_stream(monkeypatch, ids)
    assert main(["generate", "And ", "--model", path, "--stop", stop, "-n", str(len(ids))]) == 0
    text = "and it was said "
    assert capsys.readouterr().out == "And " + text[:text.index(stop)] + "\n"


@needs_default
def test_a_stop_string_cuts_real_generation_where_it_first_appears(capsys):
    """End to end (sampling, streaming decode, stop check, printing): with the same seed, the
    output with --stop X is the output without it, cut before X's first occurrence."""
    rng = random.Random()
    seed, prompt = rng.randint(0, 10**6), "And God said"
    base = ["generate", prompt, "-n", "40", "-t", "1", "--top-p", "1", "--ignore-eos", "--seed", str(seed)]
    assert main(base) == 0
    out = capsys.readouterr().out
    generated = out[len(prompt):-1]
    assert out == prompt + generated + "\n" and len(generated) > 20
    for _ in range(3):
        at, size = rng.randrange(len(generated) - 6), rng.randint(1, 6)
        stop = generated[at:at + size]
        assert main(base + ["--stop", stop.replace("\\", "\\\\")]) == 0
        assert capsys.readouterr().out == prompt + generated[:generated.index(stop)] + "\n", repr(stop)


@needs_default
def test_output_into_a_pipe_closed_early_stops_quietly():
    """`gptfast generate ... | head -c 5`: the reader leaves; generation stops with no error
    message and no traceback, and the status a shell gives a writer on a closed pipe."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "gptfast.cli", "generate", "And", "-n", "250", "-t", "0",
                             "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(3) == b"And"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err, err
