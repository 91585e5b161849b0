"""The command line's argument checks (generate, perplexity, eval): a bad flag is an error that
names it, before anything is printed or loaded."""
import shutil

import pytest
import torch

import gptfast
from gptfast.checkpoint import default_model_path
from gptfast.cli import main

DEFAULT = default_model_path()
needs_default = pytest.mark.skipif(DEFAULT is None, reason="the shipped default model is not built in this checkout")


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--num-samples", "0"], "argument --num-samples: must be >= 1, got 0"),
    (["generate", "hi", "-n", "-5"], "argument --max-new-tokens/-n: must be >= 1, got -5"),
    (["generate", "hi", "-n", "x"], "argument --max-new-tokens/-n: invalid int value: 'x'"),
    (["generate", "hi", "--stop", ""], "argument --stop: must not be empty"),
    (["perplexity", "f.txt", "--stride", "0"], "argument --stride: must be >= 1, got 0"),
    (["perplexity", "f.txt", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["eval", "f.jsonl", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
    (["eval", "f.jsonl", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["classify", "x", "--model", "m", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.parametrize("device, message", [
    ("foo", "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    ("cuda:x", "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_bad_device_is_named(device, message, capsys, tmp_path):
    for argv in (["generate", "hi"], ["perplexity", str(tmp_path / "f.txt")], ["eval", str(tmp_path / "f.jsonl")]):
        assert main(argv + ["--device", device]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_an_error(capsys):
    assert main(["generate", "hi", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert "gptfast generate: error: --device cuda: CUDA is not available here (" in captured.err
    assert captured.out == ""


@needs_default
def test_draft_with_a_shorter_context_caps_the_output_before_printing(tmp_path, capsys):
    """A draft reads the same tokens as the model: generation stops where the shorter context
    is full (said on stderr), instead of failing after the prompt is printed."""
    model = gptfast.GPT.from_pretrained(DEFAULT)
    cfg = model.config
    draft = gptfast.GPT(gptfast.GPTConfig(vocab_size=cfg.vocab_size, n_positions=24, n_embd=32, n_layer=1,
                                          n_head=2, eos_token_id=cfg.eos_token_id))
    d = tmp_path / "draft"
    draft.save_pretrained(str(d))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{DEFAULT}/{name}", d / name)
    prompt = "And God said"
    n_prompt = len(gptfast.Tokenizer.from_pretrained(DEFAULT).encode(prompt))
    assert main(["generate", prompt, "--draft", str(d), "-n", "100", "-t", "0", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert (f"generating {24 - n_prompt} tokens: the draft model's context (24) is full after that"
            in captured.err)
    assert captured.out.startswith(prompt)
    long_prompt = " ".join(["And God said"] * 12)
    assert main(["generate", long_prompt, "--draft", str(d)]) == 2
    captured = capsys.readouterr()
    assert "the draft model's context is 24" in captured.err and captured.out == ""


@needs_default
def test_generate_api_rejects_an_empty_prompt_and_an_empty_stop_string():
    model, tok = gptfast.GPT.from_pretrained(DEFAULT), gptfast.Tokenizer.from_pretrained(DEFAULT)
    with pytest.raises(ValueError, match="input_ids is empty: a prompt needs at least one token"):
        model.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"stop_strings must not hold an empty string .*got \['\\n', ''\]"):
        model.generate(tok.encode("hi"), max_new_tokens=2, stop_strings=["\n", ""], tokenizer=tok)
    with pytest.raises(TypeError, match="stop_strings must be a list of strings, got 'stop'"):
        model.generate(tok.encode("hi"), max_new_tokens=2, stop_strings="stop", tokenizer=tok)


@needs_default
def test_ids_past_the_tokenizers_vocabulary_have_no_text_in_stop_checks():
    """A model may have a larger (padded) vocabulary than its tokenizer (nanoGPT's 50304 over
    GPT-2's 50257): a sampled extra id adds no text to the stop-string check, and raises nothing
    (the tokenizer's decode refuses such ids)."""
    from gptfast.generation import _Stops

    tok = gptfast.Tokenizer.from_pretrained(DEFAULT)
    with pytest.raises(ValueError, match=f"ids\\[0\\] is token id {tok.vocab_size + 3}, outside"):
        tok.decode([tok.vocab_size + 3])
    stops = _Stops(1, [], ["God"], tok)
    assert not stops.push(0, tok.vocab_size + 3)
    ids = tok.encode(" God")
    assert [stops.push(0, i) for i in ids][-1]


@needs_default
def test_generate_prints_what_a_stream_ended_inside_a_character_holds_back(monkeypatch, capsys):
    """A stream that ends inside a multi-byte character (max tokens reached mid-emoji) prints its
    held-back bytes as decode gives them, so the output is the prompt and decode of the ids."""
    tok = gptfast.Tokenizer.from_pretrained(DEFAULT)
    ids = tok.encode(" ab\U0001F680")[:-1]
    assert tok.decode(ids).endswith("\ufffd")  # the last character is cut

    def stream(self, *args, **kwargs):
        yield from ([i] for i in ids)

    monkeypatch.setattr(gptfast.GPT, "generate_stream", stream)
    assert main(["generate", "And", "-n", str(len(ids)), "-t", "0"]) == 0
    assert capsys.readouterr().out == "And" + tok.decode(ids) + "\n"


@needs_default
@pytest.mark.parametrize("flag, stop", [("\\n", "\n"), ("\\t", "\t"), ("x\\\\n", "x\\n"), ("\\q", "\\q")])
def test_stop_flag_reads_escapes(flag, stop, monkeypatch, capsys):
    """`--stop "\\n"` (the README's example) passes backslash and n through the shell: it means a
    newline, as it does to echo -e and printf; `\\\\` is a backslash, other backslashes stay as written."""
    tok = gptfast.Tokenizer.from_pretrained(DEFAULT)
    text = " and it was so" + stop + " And God saw"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    seen = {}

    def stream(self, prompt, **kwargs):
        seen.update(kwargs)
        yield from ([i] for i in ids)

    monkeypatch.setattr(gptfast.GPT, "generate_stream", stream)
    assert main(["generate", "And", "--stop", flag, "-n", str(len(ids)), "-t", "0"]) == 0
    assert seen["stop_strings"] == [stop]
    assert capsys.readouterr().out == "And and it was so\n"


@needs_default
@pytest.mark.parametrize("stop", [" And God", "so\n\n", "it was", " was so"])
def test_generate_prints_no_part_of_a_stop_string_that_spans_tokens(stop, monkeypatch, capsys):
    """A stop string made of several tokens: the tokens of its start wait until the next ones
    show whether it follows, so nothing of it is printed (and nothing after it)."""
    tok = gptfast.Tokenizer.from_pretrained(DEFAULT)
    text = " and it was so\n\n And God saw"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces) and stop in text  # several tokens

    def stream(self, prompt, **kwargs):
        yield from ([i] for i in ids)

    monkeypatch.setattr(gptfast.GPT, "generate_stream", stream)
    assert main(["generate", "And", "--stop", stop, "--stop", "never", "-n", str(len(ids))]) == 0
    assert capsys.readouterr().out == "And" + text[:text.index(stop)] + "\n"
    # a start of a stop string that the text does not go on to is printed in the end
    assert main(["generate", "And", "--stop", text[-3:] + "!", "-n", str(len(ids))]) == 0
    assert capsys.readouterr().out == "And" + text + "\n"


@needs_default
def test_generate_prints_the_prompt_after_the_fallback_lines(monkeypatch):
    """On a terminal stdout and stderr interleave: the prompt and text go out only after the
    prefill and the first decode step, so the lines of the ops that fall back (each logged once,
    on the first call) come before the text, not inside it."""
    import io
    import sys

    from gptfast.ops import _dispatch
    events = []

    class Out(io.StringIO):
        def write(self, s):
            if s:
                events.append(("out", len(lines)))
            return super().write(s)
    out = Out()
    monkeypatch.setattr(sys, "stdout", out)
    with _dispatch.fallbacks_logged() as lines:
        assert main(["generate", "And", "-n", "6", "-t", "0", "--device", "cpu"]) == 0  # ops fall back on CPU
    assert any("decode_attention" in ln for ln in lines), lines  # the first decode step's line
    assert out.getvalue().startswith("And") and len(out.getvalue()) > 6
    assert events and all(n == len(lines) for _, n in events), (events, lines)


def test_stop_cut_searches_only_past_the_text_before_and_finds_the_first_stop():
    """The CLI's stop cut looks for each stop string from len(s) - 1 characters before the new
    piece on (linear in the stream): on random streams it stops at the same piece and cuts at the
    same place as a search of the whole text, stops that span pieces included."""
    import random

    from gptfast.cli import _stop_cut
    rng = random.Random(0)
    spans = 0
    for _ in range(2000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(1, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) + [len(text)]
        seen, want, got = "", None, None
        for a, b in zip([0] + cuts, cuts):
            seen += text[a:b]
            hits = [seen.find(s) for s in stops if s in seen]
            want = min(hits) if hits else None
            got = _stop_cut(seen, stops, a)
            assert got == want, (text, stops, cuts, seen)
            if want is not None:
                spans += want < a
                break
    assert spans > 50  # stops that began in an earlier piece were among them


def test_training_help_shows_the_defaults(capsys):
    """train/finetune --help name each numeric flag's default, read from TrainArgs / FinetuneArgs."""
    from gptfast.finetune import FinetuneArgs
    from gptfast.train import TrainArgs
    for command, cls, flags in (("train", TrainArgs, ("warmup", "weight-decay", "steps")),
                                ("finetune", FinetuneArgs, ("lm-coef", "epochs", "lr"))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            default = cls.__dataclass_fields__[flag.replace("-", "_")].default
            assert f"--{flag} {flag.replace('-', '_').upper()} default: {default}" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--min-lr MIN_LR default: --lr / 10" in " ".join(capsys.readouterr().out.split())
