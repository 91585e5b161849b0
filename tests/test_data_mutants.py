"""Token files and the tokenizer, for the bugs the main tests could not see (found by mutation
testing): a vocabulary past uint16, ids at the vocabulary's edge, special tokens skipped on
decode, added tokens in the fingerprint, tokenizers whose ids change at a cut, and what
transformers reads back from a saved GPT-1 tokenizer."""
import json
import random
import shutil

import numpy as np
import pytest

from gptfast import Tokenizer
from gptfast.data import check_tokenizer, open_tokens, prepare, split_text, token_dtype

from hf_utils import make_gpt2_tokenizer_files

WORDS = ["said", " the", " lord", "\n", " ", "\n\n", "é", " 日本", "!", "x", "\t", " 42"]


def _text(rng, n):
    return "".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_gpt2_tokenizer_files(d, _text(random.Random(0), 3000), vocab_size=300)
    return d


def test_token_dtype_is_uint16_up_to_65536_ids():
    """nanoGPT's uint16 holds ids 0..65535: a vocabulary of 65536 still fits, one more does not."""
    assert token_dtype(1 << 16) == np.uint16 and token_dtype(50257) == np.uint16
    assert token_dtype((1 << 16) + 1) == np.uint32


def test_a_vocabulary_past_uint16_writes_and_reads_uint32_ids(tok_dir, tmp_path):
    """Ids over 65535 survive prepare and open_tokens (as uint16 they would wrap silently)."""
    tok = Tokenizer.from_pretrained(str(tok_dir))
    rng = random.Random(int(np.random.randint(1 << 30)))
    n_added = (1 << 16) + rng.randint(5, 300) - tok.vocab_size
    added = tok.add_special_tokens([f"<t{i}>" for i in range(n_added)])
    assert tok.vocab_size > 1 << 16
    high = [f"<t{k}>" for k in rng.sample([k for k, i in enumerate(added) if i >= 1 << 16], 5)]  # ids past 65535
    docs = [_text(rng, rng.randint(5, 40)) + high[k] + _text(rng, 7) for k in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), tok, val_fraction=0.3, progress=False)
    want = [i for d in docs for i in tok.encode(d) + [tok.eos_token_id]]
    assert max(want) > 65535
    train, val, meta2, _ = open_tokens(str(tmp_path / "out"))
    assert meta["dtype"] == meta2["dtype"] == "uint32" and train.dtype == val.dtype == np.uint32
    assert np.concatenate([train, val]).tolist() == want
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["train_tokens"]


def test_check_ids_refuses_the_id_equal_to_vocab_size_and_bools(tok_dir):
    tok = Tokenizer.from_pretrained(str(tok_dir))
    n = tok.vocab_size
    assert tok.check_ids([0, n - 1]) == [0, n - 1]
    with pytest.raises(ValueError, match=rf"ids\[2\] is token id {n}, outside this tokenizer's vocabulary \[0, {n}\)"):
        tok.decode([1, 2, n])
    with pytest.raises(TypeError, match=r"ids\[1\] must be an int token id, got True \(bool\)"):
        tok.decode([1, True])


def test_decode_skips_special_tokens_as_transformers_does(tok_dir):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(tok_dir))
    tok = Tokenizer.from_pretrained(str(tok_dir))
    text = "<|endoftext|>said the lord<|endoftext|>\n日本 x<|endoftext|>"
    ids = tok.encode(text)
    assert ids == hf.encode(text) and ids.count(tok.eos_token_id) == 3
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=True) == "said the lord\n日本 x"


def test_the_fingerprint_covers_added_tokens(tok_dir):
    """Ids written with a tokenizer that has extra tokens are not read with one that lacks them."""
    base = Tokenizer.from_pretrained(str(tok_dir))
    more = Tokenizer.from_pretrained(str(tok_dir))
    more.add_special_tokens(["<pad>"])
    assert base.fingerprint() != more.fingerprint()
    with pytest.raises(ValueError, match="tokenized with another vocabulary"):
        check_tokenizer({"tokenizer_fingerprint": more.fingerprint()}, base, "data/x")


def test_a_normalizer_that_adds_text_is_not_cut(tok_dir, tmp_path):
    """A normalizer that writes at a piece's start (Prepend, as SentencePiece-style tokenizers
    have) changes the ids at every cut: such a tokenizer encodes documents whole."""
    from tokenizers import normalizers

    prepended = Tokenizer.from_pretrained(str(tok_dir))
    prepended._tok.normalizer = normalizers.Prepend("x")
    assert not prepended.splits_at_newlines()
    text = _text(random.Random(5), 600)
    assert [i for p in split_text(text, 50) for i in prepended.encode(p)] != prepended.encode(text)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), prepended, val_fraction=0.0, progress=False,
            piece_chars=50)
    assert open_tokens(str(tmp_path / "out"))[0].tolist() == prepended.encode(text) + [prepended.eos_token_id]


def test_an_added_token_that_vocab_json_numbers_otherwise_is_an_error(tok_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, tmp_path / name)
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    word = next(t for t in vocab if len(t) > 2)
    (tmp_path / "added_tokens.json").write_text(json.dumps({word: vocab[word] + 1}))
    with pytest.raises(ValueError, match=rf"added token .* has id {vocab[word] + 1}, but vocab.json gives it id "
                                         rf"{vocab[word]}"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_a_saved_gpt1_tokenizer_loads_in_transformers_as_gpt1(tmp_path):
    from tokenizers import CharBPETokenizer
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    src.mkdir()
    trainer = CharBPETokenizer(unk_token="<unk>", lowercase=True, suffix="</w>")
    trainer.train_from_iterator(["the quick brown fox jumps over the lazy dog.\n" * 20], vocab_size=120,
                                special_tokens=["<unk>"], show_progress=False)
    trainer.save_model(str(src))
    tok = Tokenizer.from_pretrained(str(src))
    tok.save(str(tmp_path / "out"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert type(hf).__name__.startswith("OpenAIGPTTokenizer") and hf.model_max_length == 512
    assert hf.encode("The lazy FOX.") == tok.encode("The lazy FOX.")


def test_an_added_token_that_strips_the_space_after_it_is_not_cut(tok_dir, tmp_path):
    """An added token with rstrip takes the whitespace after it, a cut point's newline too: a cut
    there would leave that newline as a token of its own, so such a tokenizer encodes whole."""
    from tokenizers import AddedToken

    tok = Tokenizer.from_pretrained(str(tok_dir))
    tok._tok.add_special_tokens([AddedToken("<sep>", rstrip=True, special=True)])
    rng = random.Random(int(np.random.randint(1 << 30)))
    text = "".join(_text(rng, rng.randint(1, 9)) + rng.choice(["<sep>\nsaid", "\nsaid", "<sep>"]) for _ in range(40)) + "x"
    assert [i for p in split_text(text, 30) for i in tok.encode(p)] != tok.encode(text)  # a cut would differ
    assert not tok.splits_at_newlines()
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), tok, val_fraction=0.0, progress=False, piece_chars=30)
    assert open_tokens(str(tmp_path / "out"))[0].tolist() == tok.encode(text) + [tok.eos_token_id]
