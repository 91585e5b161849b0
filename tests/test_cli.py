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
