"""GPT-2 byte-level BPE through Hugging Face `tokenizers`: the same ids as GPT2TokenizerFast.

Reads tokenizer.json, or vocab.json + merges.txt (with the tokens transformers added beyond
them: added_tokens.json, or tokenizer_config.json's added_tokens_decoder), from a checkpoint
directory. A vocab.json whose words end in "</w>" is GPT-1's BPE (lower-cased, BERT
pre-tokenizer, end-of-word suffix), built as transformers' OpenAIGPTTokenizer builds it.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
from typing import Iterable, Optional, Sequence, Union


_NEWLINE_SAFE_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_NEWLINE_SAFE_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}


class Tokenizer:
    def __init__(self, backend, eos_token: Optional[str] = "<|endoftext|>"):
        self._tok = backend
        self.eos_token = eos_token if eos_token is not None and backend.token_to_id(eos_token) is not None else None
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        from .checkpoint import resolve_path

        path = resolve_path(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        tok_json = os.path.join(directory, "tokenizer.json")
        vocab = os.path.join(directory, "vocab.json")
        merges = os.path.join(directory, "merges.txt")
        try:
            if os.path.isfile(tok_json):
                return cls.from_file(tok_json)
            if os.path.isfile(vocab) and os.path.isfile(merges):
                backend = _gpt1_bpe(vocab, merges) if _is_gpt1_vocab(vocab) else _byte_level_bpe(vocab, merges)
                _add_saved_tokens(backend, directory)
                return cls(backend)
        except Exception as exc:  # noqa: BLE001 - a parse error is a corrupt file to the user
            raise ValueError(f"cannot read the tokenizer in {directory} (corrupt file?): {exc}") from exc
        raise FileNotFoundError(f"no tokenizer in {directory}: expected tokenizer.json, or vocab.json + merges.txt")

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        """A tokenizer saved by `to_json` (Hugging Face tokenizers' tokenizer.json)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(path))

    def to_json(self) -> str:
        """The whole tokenizer as tokenizer.json text (`from_file` reads it back)."""
        return self._tok.to_str()

    @property
    def is_gpt1(self) -> bool:
        """GPT-1's BPE (words end in "</w>") rather than GPT-2's byte-level one."""
        return getattr(self._tok.model, "end_of_word_suffix", None) == "</w>"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text; a special token written in it ("<|endoftext|>") is that token, as
        GPT2TokenizerFast encodes it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_utf8(text, "text")
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for n, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"texts[{n}] must be a str, got {type(text).__name__}") from None
                _check_utf8(text, f"texts[{n}]")
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids; ValueError naming the first id outside [0, vocab_size) (the backend
        would drop it silently, or overflow on a negative one)."""
        return self._tok.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int], name: str = "ids") -> list[int]:
        """ids as a list of ints, each in [0, vocab_size); else a TypeError / ValueError naming
        name[position], its value and the vocabulary range."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"{name} must be a sequence of token ids (ints), got {type(ids).__name__}")
        out = []
        for pos, i in enumerate(ids):
            try:
                if isinstance(i, bool):
                    raise TypeError
                out.append(operator.index(i))
            except TypeError:
                raise TypeError(f"{name}[{pos}] must be an int token id, got {i!r} "
                                f"({type(i).__name__})") from None
        if out:
            n = self.vocab_size
            lo, hi = min(out), max(out)
            if lo < 0 or hi >= n:
                pos = next(p for p, i in enumerate(out) if not 0 <= i < n)
                raise ValueError(f"{name}[{pos}] is token id {out[pos]}, outside this tokenizer's "
                                 f"vocabulary [0, {n})")
        return out

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add tokens that are never split or merged (fine-tuning markers); returns their ids."""
        self._tok.add_special_tokens(list(tokens))
        return [self._tok.token_to_id(t) for t in tokens]

    def save(self, directory: str) -> None:
        from .checkpoint import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "tokenizer.json"), self.to_json())
        if self.is_gpt1:
            special = {"unk_token": "<unk>", "model_max_length": 512, "tokenizer_class": "OpenAIGPTTokenizer"}
        else:
            special = {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token,
                       "model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}
        atomic_write_text(os.path.join(directory, "tokenizer_config.json"), json.dumps(special, indent=2) + "\n")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary (token -> id): token files record it, so ids are never
        read with a tokenizer that gives them other meanings."""
        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]

    def splits_at_newlines(self) -> bool:
        """True when encoding a text in pieces cut just before a newline that has a non-space
        character on each side gives the same ids as encoding it whole. That holds where the
        pre-tokenizer never joins such a newline to a neighbour (GPT-2's byte-level regex, the
        BERT and whitespace splitters) and the normalizer works character by character; a prefix
        space or a Metaspace pre-tokenizer would add a token at each piece's start, and an added
        token with rstrip would lose the newline after it to the next piece."""
        spec = json.loads(self._tok.to_str())

        def parts(node):
            if node is None:
                return []
            if node.get("type") == "Sequence":
                return [p for child in node.get("pretokenizers", node.get("normalizers", [])) for p in parts(child)]
            return [node]

        pre = parts(spec.get("pre_tokenizer"))
        norm = parts(spec.get("normalizer"))
        pre_ok = bool(pre) and all(
            (p["type"] == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True))
            or p["type"] in _NEWLINE_SAFE_PRE_TOKENIZERS for p in pre)
        return (pre_ok and all(n["type"] in _NEWLINE_SAFE_NORMALIZERS for n in norm)
                and not any(t.get("rstrip") for t in spec.get("added_tokens") or []))


def _check_utf8(text: str, name: str) -> None:
    """ValueError naming the first lone surrogate of text (a str can hold one; UTF-8 cannot,
    and the backend only says its input is not a str)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} holds a lone surrogate {text[exc.start]!r} at index {exc.start}: it has no UTF-8 "
                         "bytes to encode") from None


# Decoders whose text for ids[p:] is, from the start of a complete character on, the text those
# ids have inside the whole stream: ByteLevel maps each token to bytes and decodes them as UTF-8,
# BPEDecoder (GPT-1) maps each token alone, but for the last one's "</w>" (dropped, else a space).
_WINDOW_DECODERS = {"ByteLevel", "BPEDecoder"}


class StreamDecoder:
    """Turns a stream of ids into text pieces, holding back incomplete UTF-8 sequences; `flush`
    gives what is held back at the end of the stream, so the pieces and the flush join to
    `decode` of every id.

    Each push decodes a short window, not the whole stream: the ids from the last-but-one
    piece's end (`_start`) on, whose text starts with that of the ids up to the last piece's end
    (`_read`); the new piece is the rest. Pieces are those of decoding every id at each push
    (the text past what was returned, held back while it ends in U+FFFD). A decoder not known to
    decode a window as it decodes it in context, or whose window text does not extend the
    window's earlier text, decodes every id at each push (`whole`), and says so once."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = self._read = 0  # window start (a character boundary), end of the last piece
        self._prefix = ""  # the text of ids[_start:_read] decoded alone
        self._read_whole = True  # ids[:_read] end with a complete character
        self.held = ""  # the text of the ids past the last piece, as decode gives it (U+FFFD-ended)
        self._emitted: Optional[int] = None  # in whole mode: characters of decode(ids) returned
        self.text: Optional[str] = None  # in whole mode: decode(ids) at the last push or flush
        decoder = type(getattr(tokenizer._tok, "decoder", None)).__name__
        if decoder not in _WINDOW_DECODERS:
            self._decode_whole(f"its decoder is {decoder}, not one known to decode a window of ids as in "
                               f"context ({', '.join(sorted(_WINDOW_DECODERS))})", decoder)

    @property
    def whole(self) -> bool:
        """True when every push decodes every id so far (the quadratic path, exact for any decoder)."""
        return self._emitted is not None

    def push(self, ids: Union[int, Sequence[int]]) -> str:
        """The text the new id(s) complete; a bad id raises (naming it) and is not kept."""
        if getattr(ids, "ndim", None) == 0 or not isinstance(ids, (Iterable, str, bytes)):  # one id
            try:
                new = self.tokenizer.check_ids([ids], name="ids")
            except (TypeError, ValueError) as exc:
                raise type(exc)(str(exc).replace("ids[0]", "ids", 1)) from None
        else:
            new = self.tokenizer.check_ids(ids, name="ids")
        self.ids.extend(new)
        return self._emit(hold=True)

    def flush(self) -> str:
        """The text held back at the end of the stream: an incomplete UTF-8 sequence (the stream
        stopped inside a character) decodes to U+FFFD, as decode gives it."""
        return self._emit(hold=False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer._tok.decode(ids, skip_special_tokens=False)  # checked as they came in

    def _decode_whole(self, why: str, key: str) -> None:
        from .ops._dispatch import log_once

        log_once(f"stream_decoder:{key}", "gptfast: streaming decode decodes every id at each token: %s", why)
        self._emitted = len(self._decode(self.ids[:self._read]))

    def _emit(self, hold: bool) -> str:
        if self._emitted is None:
            n = len(self.ids)
            if n == self._read:
                return ""
            text = self._decode(self.ids[self._start:n])
            # after a flush inside a character, that character's U+FFFD may have become the character
            known = self._prefix if self._read_whole else self._prefix.rstrip("\ufffd")
            if text.startswith(known):
                if hold and text.endswith("\ufffd"):  # a multi-byte character not complete yet
                    self.held = text[len(self._prefix):]
                    return ""
                piece, self.held = text[len(self._prefix):], ""
                if self._read_whole:  # the window moves up to the last piece's end
                    self._start = self._read
                    text = self._decode(self.ids[self._start:n])
                self._read, self._prefix, self._read_whole = n, text, not text.endswith("\ufffd")
                return piece
            self._decode_whole(f"decoding ids {self._start}..{n - 1} gave {text!r}, which does not extend "
                               f"{self._prefix!r}, the text of ids {self._start}..{self._read - 1}",
                               type(self.tokenizer._tok.decoder).__name__ + " (window)")
        self.text = text = self._decode(self.ids)
        if hold and text.endswith("\ufffd"):  # a multi-byte character not complete yet
            self.held = text[self._emitted:]
            return ""
        piece, self._emitted, self.held = text[self._emitted:], len(text), ""
        return piece


def _byte_level_bpe(vocab_path: str, merges_path: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    tok = HFTokenizer(BPE.from_file(vocab_path, merges_path))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _add_saved_tokens(tok, directory: str) -> None:
    """The tokens transformers added beyond vocab.json (a pad token, fine-tuning markers), as its
    save_pretrained writes them beside vocab.json + merges.txt: tokenizer_config.json's
    added_tokens_decoder (id -> the token and its flags), else added_tokens.json (token -> id;
    special where special_tokens_map.json names it). Each keeps its id: one that is neither
    vocab.json's id for it nor the next free id is an error."""
    from tokenizers import AddedToken

    config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
    entries = config.get("added_tokens_decoder")
    if isinstance(entries, dict) and entries:
        added = [(int(i), dict(e)) for i, e in entries.items()]
    else:
        saved = _read_json(os.path.join(directory, "added_tokens.json")) or {}
        named = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
        special = set()
        for value in named.values():
            for v in value if isinstance(value, list) else [value]:
                special.add(v.get("content") if isinstance(v, dict) else v)
        added = [(int(i), {"content": t, "special": t in special}) for t, i in saved.items()]
    for i, entry in sorted(added, key=lambda pair: pair[0]):
        content, is_special = entry["content"], bool(entry.get("special", False))
        token = AddedToken(content, single_word=bool(entry.get("single_word", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           normalized=bool(entry.get("normalized", not is_special)), special=is_special)
        known = tok.token_to_id(content)
        if known is None and i != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"added token {content!r} has id {i}, but the next free id after vocab.json and the "
                             f"tokens added before it is {tok.get_vocab_size(with_added_tokens=True)}")
        if known is not None and known != i:
            raise ValueError(f"added token {content!r} has id {i}, but vocab.json gives it id {known}")
        (tok.add_special_tokens if is_special else tok.add_tokens)([token])


def _is_gpt1_vocab(vocab_path: str) -> bool:
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    return isinstance(vocab, dict) and any(k.endswith("</w>") for k in vocab)


def _gpt1_bpe(vocab_path: str, merges_path: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = HFTokenizer(BPE.from_file(vocab_path, merges_path, dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix="</w>", fuse_unk=False, unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    return tok


def train_byte_level_bpe(files: Sequence[str], vocab_size: int, texts: Optional[Iterable[str]] = None) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on text files (used for the shipped default model), or on
    an iterable of texts (documents) when `texts` is given."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = HFTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if texts is not None:
        tok.train_from_iterator(texts, trainer)
    else:
        tok.train(list(files), trainer)
    return Tokenizer(tok)
