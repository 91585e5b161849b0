"""Streaming detokenization and the stop-string check decode a window per token, not the whole
text: the same pieces and the same stopping token as decoding every id at each token (kept here
as the reference), and a linear number of ids decoded."""
import random

import pytest

from gptfast import Tokenizer
from gptfast.generation import _Stops

from hf_utils import make_gpt2_tokenizer_files

CORPUS = ("The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🚀 and  double  spaces.\n"
          "中文 한국어 日本語 café naïve 👨\u200d👩\u200d👧 e\u0301\n"
          "def f(x):\n    return x ** 2  # code\t tabs\n") * 30
# most of these are no token of a small vocabulary: their bytes land in several tokens
POOL = list("abc XYZ09.,'!\n\t") + ["🚀", "👨\u200d👩\u200d👧", "中", "文", "한", "é", "e\u0301", "\xa0", "\ufffd",
                                    "\U0010ffff", "  ", " the", " fox", "<|endoftext|>"]


class OldStreamDecoder:
    """The quadratic StreamDecoder this replaced: decode every id at each push."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, ids):
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        return self._emit(hold=True)

    def flush(self):
        return self._emit(hold=False)

    def _emit(self, hold):
        text = self.tokenizer._tok.decode(self.ids, skip_special_tokens=False)
        if hold and text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class OldStops:
    """The quadratic stop check this replaced: decode the row's every id at each token."""

    def __init__(self, batch, eos, stop_strings, tokenizer):
        self.eos, self.strings, self.tokenizer = set(eos), stop_strings, tokenizer
        self.texts = [[] for _ in range(batch)] if stop_strings else None

    def push(self, row, token):
        if token in self.eos:
            return True
        if self.texts is None:
            return False
        if token < self.tokenizer.vocab_size:
            self.texts[row].append(token)
        return any(s in self.tokenizer.decode(self.texts[row]) for s in self.strings)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """GPT-2 byte-level BPE (vocab.json + merges.txt, and its tokenizer.json round trip) and
    GPT-1 BPE ("</w>" word ends), trained on CORPUS: small vocabularies, so that many characters
    are split across tokens."""
    from tokenizers import CharBPETokenizer

    d2, d1, dj = (tmp_path_factory.mktemp(n) for n in ("gpt2", "gpt1", "json"))
    make_gpt2_tokenizer_files(d2, CORPUS, vocab_size=420)
    trainer = CharBPETokenizer(unk_token="<unk>", lowercase=True, suffix="</w>")
    trainer.train_from_iterator([CORPUS.lower()], vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    trainer.save_model(str(d1))
    gpt2 = Tokenizer.from_pretrained(str(d2))
    gpt2.save(str(dj))
    gpt1 = Tokenizer.from_pretrained(str(d1))
    assert gpt1.is_gpt1 and not gpt2.is_gpt1
    return {"gpt2": gpt2, "gpt2-json": Tokenizer.from_pretrained(str(dj)), "gpt1": gpt1}


KINDS = ["gpt2", "gpt2-json", "gpt1"]


def random_stream(tok, rnd, n):
    """n ids: encoded runs of random text (characters split across tokens, special tokens) mixed
    with random ids of the whole vocabulary (bytes that never complete a character)."""
    ids = []
    while len(ids) < n:
        if rnd.random() < 0.6:
            ids += tok.encode("".join(rnd.choice(POOL) for _ in range(rnd.randint(1, 12))))
        else:
            ids += [rnd.randrange(tok.vocab_size) for _ in range(rnd.randint(1, 6))]
        if tok.eos_token_id is not None and rnd.random() < 0.1:
            ids.append(tok.eos_token_id)
    return ids[:n]


def chunks(ids, rnd):
    """ids cut into pushes of 1 to 3 ids (an int for one), with some empty pushes."""
    out, i = [], 0
    while i < len(ids):
        k = rnd.choice([0, 1, 1, 1, 1, 2, 3])
        out.append(ids[i] if k == 1 else ids[i:i + k])
        i += k
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_pieces_equal_the_whole_decode_at_each_push(tokenizers, kind, seed):
    tok = tokenizers[kind]
    rnd = random.Random(seed * 31 + KINDS.index(kind))
    ids = random_stream(tok, rnd, rnd.randint(1, 300))
    stream, old = tok.stream_decoder(), OldStreamDecoder(tok)
    assert not stream.whole
    pieces = []
    for step, push in enumerate(chunks(ids, rnd)):
        piece = stream.push(push)
        assert piece == old.push(push), (step, push)
        pieces.append(piece)
    end = stream.flush()
    assert end == old.flush()
    assert "".join(pieces) + end == tok.decode(ids)
    assert stream.flush() == "" and stream.ids == ids


@pytest.mark.parametrize("kind", KINDS)
def test_pushes_after_a_flush_inside_a_character_are_as_before(tokenizers, kind):
    """A flush that gave U+FFFD for a character cut short, then more ids (the rest of that
    character among them): the same pieces as decoding every id."""
    tok = tokenizers[kind]
    for seed in range(20):
        rnd = random.Random(seed)
        ids = random_stream(tok, rnd, 60)
        stream, old = tok.stream_decoder(), OldStreamDecoder(tok)
        for push in chunks(ids, rnd):
            assert stream.push(push) == old.push(push)
            if rnd.random() < 0.3:
                assert stream.flush() == old.flush()
        assert stream.flush() == old.flush()


def test_characters_split_across_tokens_are_held_then_whole(tokenizers):
    tok = tokenizers["gpt2"]
    ids = tok.encode("a🚀b中文")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some character is split
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "a🚀b中文"
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids[:cut]) + stream.flush() == tok.decode(ids[:cut])


def stop_strings_of(text, rnd, count=3):
    """Substrings of text of 2 to 8 characters (spaces, multibyte characters, U+FFFD included
    where the text has them)."""
    out = []
    for _ in range(count):
        k = rnd.randint(2, min(8, len(text)))
        i = rnd.randrange(len(text) - k + 1)
        out.append(text[i:i + k])
    return out


def stop_index(stops, row, stream):
    return next((n for n, t in enumerate(stream) if stops.push(row, t)), None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(8))
def test_stop_strings_stop_on_the_same_token(tokenizers, kind, seed):
    tok = tokenizers[kind]
    rnd = random.Random(1000 + seed * 31 + KINDS.index(kind))
    rows = [random_stream(tok, rnd, rnd.randint(20, 200)) for _ in range(3)]
    text = tok.decode(rows[rnd.randrange(3)])
    strings = [s for s in stop_strings_of(text, rnd) if s.strip(" \ufffd")] or [text[-3:]]
    if seed % 2:  # a padded model vocabulary's extra ids, which have no text
        rows = [[t if rnd.random() < 0.9 else tok.vocab_size + rnd.randrange(5) for t in r] for r in rows]
    eos = [tok.eos_token_id] if seed % 4 == 3 and tok.eos_token_id is not None else []
    new, old = _Stops(3, eos, strings, tok), OldStops(3, eos, strings, tok)
    got, want = [], []
    for b in rnd.sample(range(3), 3):  # rows in any order: each keeps its own text
        got.append(stop_index(new, b, rows[b]))
        want.append(stop_index(old, b, rows[b]))
    assert got == want, strings
    assert any(w is not None for w in want)


@pytest.mark.parametrize("kind", KINDS)
def test_stop_strings_across_tokens_and_at_the_boundary(tokenizers, kind):
    """Multi-character, multibyte stop strings with spaces, which start in the text of earlier
    tokens: the row stops on the token that completes one, as before."""
    tok = tokenizers[kind]
    text = "the fox 中文 🚀 jumps over\tthe lazy 👨\u200d👩\u200d👧 dog. café"
    ids = tok.encode(text)
    decoded = tok.decode(ids)
    for s in ["fox 中", "文 🚀 j", "🚀", " ov", "\tthe l", "👩\u200d👧 d", ". caf", "dog. café", "e fox", "zzz"]:
        s = s.lower() if tok.is_gpt1 else s
        if s not in decoded and s != "zzz":
            continue
        got = stop_index(_Stops(1, [], [s, "never seen"], tok), 0, ids)
        assert got == stop_index(OldStops(1, [], [s, "never seen"], tok), 0, ids), s
        assert (got is None) == (s not in decoded)
        if got is not None:
            assert s in tok.decode(ids[:got + 1]) and s not in tok.decode(ids[:got])


class CountingBackend:
    """A tokenizers.Tokenizer that counts the ids every decode call is given."""

    def __init__(self, backend):
        self._backend, self.decoded, self.calls = backend, 0, 0

    def decode(self, ids, *args, **kwargs):
        self.decoded += len(ids)
        self.calls += 1
        return self._backend.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._backend, name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_long_stream_decodes_a_linear_number_of_ids(tokenizers, kind):
    """2000 tokens, one at a time, through the stream decoder and the stop check: a few ids
    decoded per token, where decoding the whole text at each token is 2000 * 2001 / 2."""
    real = tokenizers[kind]
    rnd = random.Random(7)
    ids = random_stream(real, rnd, 2000)
    n = len(ids)
    limit = 50 * n
    for make in (lambda tok: tok.stream_decoder(), lambda tok: OldStreamDecoder(tok)):
        tok = Tokenizer(CountingBackend(real._tok))
        stream = make(tok)
        text = "".join(stream.push(i) for i in ids) + stream.flush()
        assert text == real.decode(ids)
        if isinstance(stream, OldStreamDecoder):
            assert tok._tok.decoded > limit  # the measure tells the old algorithm apart
        else:
            assert tok._tok.decoded < limit and tok._tok.calls < 3 * n + 2
    strings = ["never in the text", "xyz🚀q"]
    for cls in (_Stops, OldStops):
        tok = Tokenizer(CountingBackend(real._tok))
        stops = cls(2, [], strings, tok)
        assert stop_index(stops, 0, ids) is None and stop_index(stops, 1, ids[::-1]) is None
        if cls is OldStops:
            assert tok._tok.decoded > 2 * limit
        else:
            assert tok._tok.decoded < 2 * limit


class ReversingBackend(CountingBackend):
    """A decoder whose text of a + b does not start with the text of a."""

    def decode(self, ids, *args, **kwargs):
        return super().decode(ids, *args, **kwargs)[::-1]


def test_a_window_that_does_not_extend_its_text_falls_back_to_the_whole_decode(tokenizers):
    from gptfast.ops import _dispatch

    real = tokenizers["gpt2"]
    tok = Tokenizer(ReversingBackend(real._tok))
    ids = [i for c in "abcdef ghij" for i in real.encode(c)]
    stream, old = tok.stream_decoder(), OldStreamDecoder(tok)
    assert not stream.whole
    with _dispatch.fallbacks_logged() as lines:
        pieces = [stream.push(i) for i in ids]
    assert pieces == [old.push(i) for i in ids]
    assert stream.whole and stream.flush() == old.flush() == ""
    assert len(lines) == 1 and "streaming decode decodes every id" in lines[0] and "does not extend" in lines[0]
    strings = ["dc", "hg"]
    assert stop_index(_Stops(1, [], strings, tok), 0, ids) == stop_index(OldStops(1, [], strings, tok), 0, ids) == 3


def test_another_decoder_decodes_the_whole_text_and_says_so(tokenizers):
    """A tokenizer.json with a decoder not known to decode a window as in context (here a
    WordPiece decoder, which joins tokens with spaces and cleans up punctuation): every push
    decodes every id, as before, and the log says why."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders

    backend = HFTokenizer.from_str(tokenizers["gpt2"].to_json())
    backend.decoder = decoders.WordPiece(cleanup=True)
    tok = Tokenizer(backend)
    from gptfast.ops import _dispatch
    with _dispatch.fallbacks_logged() as lines:
        stream = tok.stream_decoder()
    assert stream.whole
    assert lines == ["streaming decode decodes every id at each token: its decoder is WordPiece, not one known to "
                     "decode a window of ids as in context (BPEDecoder, ByteLevel)"]
    rnd = random.Random(3)
    ids = random_stream(tok, rnd, 150)
    old = OldStreamDecoder(tok)
    assert [stream.push(i) for i in ids] == [old.push(i) for i in ids] and stream.flush() == old.flush()
    text = tok.decode(ids)
    strings = stop_strings_of(text, rnd)
    assert stop_index(_Stops(1, [], strings, tok), 0, ids) == stop_index(OldStops(1, [], strings, tok), 0, ids)
    # the stop check reads the text the push decoded: one decode of every id per token, not two
    counting = Tokenizer(CountingBackend(backend))
    assert stop_index(_Stops(1, [], ["never in the text"], counting), 0, ids) is None
    # (and one of no ids as the stream decoder starts)
    assert counting._tok.calls == len(ids) + 1 and counting._tok.decoded == len(ids) * (len(ids) + 1) // 2
