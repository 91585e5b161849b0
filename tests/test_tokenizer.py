"""Tokenizer: identical ids to transformers' GPT2TokenizerFast on real GPT-2-format files."""
import pytest

from gptfast import Tokenizer

from hf_utils import make_gpt2_tokenizer_files

CORPUS = ("The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🚀 and  double  spaces.\n"
          "def f(x):\n    return x ** 2  # code\t tabs\n") * 30
SAMPLES = ["Hello world", " leading space", "trailing space ", "Ünïcödé 🚀🚀", "a\n\nb\t c",
           "<|endoftext|>Once upon a time<|endoftext|>", "", "12345 67.89", "'s 't 're 've 'm 'll 'd"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_gpt2_tokenizer_files(d, CORPUS, vocab_size=400)
    return d


def test_ids_match_gpt2_tokenizer_fast(files):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(files))  # reads vocab.json + merges.txt
    assert len(hf) == Tokenizer.from_pretrained(str(files)).vocab_size
    tok = Tokenizer.from_pretrained(str(files))
    for text in SAMPLES:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_json_roundtrip(files, tmp_path):
    tok = Tokenizer.from_pretrained(str(files))
    tok.save(str(tmp_path))
    again = Tokenizer.from_pretrained(str(tmp_path))
    assert [again.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    assert again.eos_token_id == tok.eos_token_id == tok.encode("<|endoftext|>")[0]


def test_stream_decoder_holds_partial_characters(files):
    tok = Tokenizer.from_pretrained(str(files))
    ids = tok.encode("Ünïcödé 🚀 ok")
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "Ünïcödé 🚀 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_missing_and_corrupt_tokenizer(tmp_path, files):
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*expected tokenizer.json, or vocab.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read the tokenizer .*corrupt"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_encode_rejects_non_text(files):
    tok = Tokenizer.from_pretrained(str(files))
    with pytest.raises(TypeError, match="text must be a str, got list"):
        tok.encode(["a"])


@pytest.fixture(scope="module")
def gpt1_files(tmp_path_factory):
    """GPT-1-format vocab.json + merges.txt (words end in "</w>"), trained on CORPUS."""
    from tokenizers import CharBPETokenizer

    d = tmp_path_factory.mktemp("tok1")
    trainer = CharBPETokenizer(unk_token="<unk>", lowercase=True, suffix="</w>")
    trainer.train_from_iterator([CORPUS.lower()], vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    trainer.save_model(str(d))
    return d


def test_gpt1_ids_match_openai_gpt_tokenizer(gpt1_files, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gpt1_files), tokenizer_type="openai-gpt")
    assert type(hf).__name__.startswith("OpenAIGPTTokenizer")
    tok = Tokenizer.from_pretrained(str(gpt1_files))
    assert tok.is_gpt1 and tok.eos_token_id is None and tok.vocab_size == len(hf)
    texts = [t for t in SAMPLES if t] + ["The QUICK, brown fox's lazy-dog! ~zebra~"]
    for text in texts:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text)), text
    tok.save(str(tmp_path))  # tokenizer.json keeps the GPT-1 pipeline
    again = Tokenizer.from_pretrained(str(tmp_path))
    assert again.is_gpt1 and [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert not Tokenizer.from_pretrained(str(tmp_path)).eos_token


@pytest.mark.parametrize("kind", ["gpt2", "gpt1"])
def test_decode_rejects_ids_outside_the_vocabulary(kind, files, gpt1_files):
    """The backend returns '' for an id past the vocabulary and overflows on a negative one:
    decode says which id, where, and the range."""
    tok = Tokenizer.from_pretrained(str(files if kind == "gpt2" else gpt1_files))
    n = tok.vocab_size
    ok = tok.encode("the fox")
    assert tok.decode(ok + [n - 1])  # the last id is fine
    with pytest.raises(ValueError, match=rf"ids\[0\] is token id 99999, outside this tokenizer's vocabulary \[0, {n}\)"):
        tok.decode([99999])
    with pytest.raises(ValueError, match=rf"ids\[{len(ok)}\] is token id -1, outside .*\[0, {n}\)"):
        tok.decode(ok + [-1])
    with pytest.raises(ValueError, match=rf"ids\[1\] is token id {n},"):
        tok.decode([ok[0], n, -5])
    with pytest.raises(TypeError, match=r"ids\[1\] must be an int token id, got 1.5"):
        tok.decode([ok[0], 1.5])
    with pytest.raises(TypeError, match="ids must be a sequence of token ids"):
        tok.decode(7)


def test_decode_takes_tensors_and_arrays(files):
    import numpy as np
    import torch

    tok = Tokenizer.from_pretrained(str(files))
    ids = tok.encode("Hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "Hello world"


def test_stream_decoder_rejects_bad_ids_and_keeps_going(files):
    import torch

    tok = Tokenizer.from_pretrained(str(files))
    ids = tok.encode("Hello world")
    stream = tok.stream_decoder()
    assert stream.push(ids[0]) == tok.decode(ids[:1])
    with pytest.raises(ValueError, match=rf"ids is token id 99999, outside this tokenizer's vocabulary \[0, {tok.vocab_size}\)"):
        stream.push(99999)
    with pytest.raises(ValueError, match=r"ids\[1\] is token id -1"):
        stream.push([ids[1], -1])
    assert stream.ids == ids[:1]  # nothing of a refused push is kept
    rest = "".join(stream.push(torch.tensor(i)) for i in ids[1:])
    assert tok.decode(ids[:1]) + rest == "Hello world"


# emoji (with a ZWJ sequence), CJK, Hangul, combining marks, controls, NBSP, U+2028, BOM, U+FFFD,
# private use and the last code point: most of them are no token of the vocabulary, so their
# bytes land in several tokens
UNICODE_POOL = list("abc XYZ09.,'!\n\t\r") + ["🚀", "👨\u200d👩\u200d👧", "中", "文", "한", "e\u0301", "\u0308", "\x00",
                                               "\xa0", "\u2028", "\ufeff", "\ufffd", "\ue000", "\U0010ffff", "  "]


def test_arbitrary_unicode_matches_gpt2_tokenizer_fast_and_round_trips(files):
    import random

    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(files))
    tok = Tokenizer.from_pretrained(str(files))
    rnd = random.Random(5)
    for _ in range(300):
        text = "".join(rnd.choice(UNICODE_POOL) for _ in range(rnd.randint(1, 25)))
        ids = tok.encode(text)
        assert ids == hf.encode(text), repr(text)
        assert tok.decode(ids) == text, repr(text)
    texts = ["中文 🚀", "", "e\u0301\u0308"]
    assert tok.encode_batch(texts) == [hf.encode(t) for t in texts]


def test_lone_surrogates_are_refused_by_name(files):
    """A Python str may hold a lone surrogate, which has no UTF-8 bytes: the error says where (the
    backend's own says only that its input is not a str)."""
    tok = Tokenizer.from_pretrained(str(files))
    with pytest.raises(ValueError, match=r"text holds a lone surrogate '\\ud800' at index 2"):
        tok.encode("ab\ud800c")
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate '\\udfff' at index 0"):
        tok.encode_batch(["fine", "\udfff"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok.encode_batch(["fine", 3])


def test_stream_decoder_on_characters_split_across_tokens_and_flush(files):
    """Characters whose bytes are in several tokens come out whole; a stream that stops inside one
    (max_new_tokens reached mid-character) gives the rest, U+FFFD as decode gives it, on flush."""
    tok = Tokenizer.from_pretrained(str(files))
    text = "中文 한 👨\u200d👩\u200d👧 e\u0301 ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some character is split across tokens
    for cut in range(len(ids) + 1):
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids[:cut]]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + stream.flush() == tok.decode(ids[:cut])
        assert stream.flush() == ""
    assert "".join(pieces) == text


@pytest.mark.parametrize("layout", ["added_tokens.json", "added_tokens_decoder"])
def test_tokens_added_beside_vocab_and_merges_keep_their_ids(files, tmp_path, layout):
    """A directory of vocab.json + merges.txt as transformers' slow tokenizer saves it after tokens
    were added (a pad token, markers): the added tokens keep their ids, as in transformers."""
    import json
    import shutil

    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(files))
    hf.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<sep>"]})
    hf.add_tokens(["<new>", " newword"])
    n = len(hf) - 4
    ids = {"<pad>": n, "<sep>": n + 1, "<new>": n + 2, " newword": n + 3}
    assert all(hf.convert_tokens_to_ids(t) == i for t, i in ids.items())
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(files / name, tmp_path / name)
    if layout == "added_tokens.json":
        (tmp_path / "added_tokens.json").write_text(json.dumps(ids))
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(
            {"eos_token": "<|endoftext|>", "pad_token": {"content": "<pad>", "normalized": False},
             "additional_special_tokens": [{"content": "<sep>"}]}))
    else:
        decoder = {str(i): {"content": t, "lstrip": False, "rstrip": False, "single_word": False,
                            "normalized": not t.startswith("<"), "special": t in ("<pad>", "<sep>")}
                   for t, i in ids.items()}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.vocab_size == len(hf)
    for text in ["a<pad><pad> b<sep>c", "the newword<new>x newword", "<|endoftext|>newword"] + SAMPLES:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    bad = {**ids, "<new>": n + 7}
    (tmp_path / "tokenizer_config.json").unlink(missing_ok=True)
    (tmp_path / "added_tokens.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"added token ' newword' has id .*the next free id .* is "):
        Tokenizer.from_pretrained(str(tmp_path))


def test_transformers_saved_tokenizer_directory(files, tmp_path):
    """What GPT2TokenizerFast.save_pretrained writes (tokenizer.json and, with transformers 4.x,
    vocab.json + merges.txt beside it), added tokens included, loads with the same ids."""
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(files))
    hf.add_special_tokens({"pad_token": "<pad>"})
    hf.add_tokens(["<new>"])
    hf.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.vocab_size == len(hf) and tok.eos_token_id == hf.eos_token_id
    for text in ["x<pad>y<new>", "中文 🚀"] + SAMPLES:
        assert tok.encode(text) == hf.encode(text), text
