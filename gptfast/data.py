"""Token files for pretraining: a corpus tokenized once, then memory-mapped by every run.

    gptfast prepare corpus/ more.jsonl --out data/corpus --tokenizer path/to/gpt2
    gptfast train --data data/corpus --out runs/mine --init gpt2 --grad-accum 8

A prepared directory holds nanoGPT's layout, so nanoGPT's train.py reads it as it is:
  train.bin, val.bin  the token ids, flat little-endian uint16 (uint32 for a vocabulary over
                      65536 ids), no header; every document is followed by the end-of-text id
                      (when the tokenizer has one)
  tokenizer.json      the tokenizer the ids belong to
  meta.json           dtype, vocabulary size and fingerprint, token and document counts; it is
                      written last, so a directory that has one is complete
A nanoGPT-prepared directory (train.bin + val.bin of GPT-2 ids, no meta.json) trains too, with
the tokenizer given by --tokenizer or --init.

Inputs: text files (.txt, .md: one document each), JSON lines (.jsonl: one document per
line, its "text" field) and Parquet files (.parquet, as Hugging Face datasets ship: one document
per row, its "text" column; needs pyarrow), or directories searched for them. Long texts are encoded in pieces cut
just before a newline with non-space characters on both sides, which for GPT-2's byte-level BPE
(and BERT-style splitters) gives the ids of the whole text (`Tokenizer.splits_at_newlines`);
pieces are encoded in parallel batches. The validation split is the last val_fraction of the
tokens, as `gptfast train` splits a text file.

An interrupted prepare resumes when run again with the same inputs (paths, sizes and modification
times) and tokenizer: after each batch, the ids so far are synced to disk and .prepare-state.json
records how many there are and where in the inputs they end; the next run keeps those ids and
encodes from there, and its files equal an uninterrupted run's byte for byte. Any difference in
the job (or `resume=False`) starts afresh, and says why.
"""
from __future__ import annotations

import codecs
import json
import logging
import math
import os
import time
from typing import Iterator, Optional, Sequence

import numpy as np

FORMAT = "gptfast-tokens"
VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SOURCE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024
PIECE_CHARS = 1 << 18  # a piece handed to the tokenizer: about 256 KB of text
BATCH_CHARS = 16 << 20  # pieces encoded together (in parallel by the tokenizer)
STATE = ".prepare-state.json"  # an unfinished prepare's progress (removed when it completes)
STATE_TOKENIZER = ".prepare-tokenizer.json"  # the tokenizer that unfinished job encodes with
logger = logging.getLogger("gptfast.data")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def find_sources(inputs: Sequence[str]) -> list[str]:
    """The files to read, in a fixed order: files as given, directories searched (sorted) for
    text and JSON-lines files."""
    if not inputs:
        raise ValueError("no input: give text (.txt, .md) or JSON-lines (.jsonl) files, or directories of them")
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith(SOURCE_SUFFIXES))
            if not found:
                raise ValueError(f"{path} holds no {'/'.join(SOURCE_SUFFIXES)} files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def _last_cut(text: str, lo: int = 1, hi: Optional[int] = None) -> int:
    """The last index i in [lo, hi) (hi: len(text) - 1) where text[i] is a newline between two
    non-space characters, or 0 if there is none."""
    end = len(text) - 1 if hi is None else hi
    while True:
        i = text.rfind("\n", max(lo, 1), end)
        if i <= 0:
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        end = i


def _first_cut(text: str, start: int) -> int:
    """The first cut point (as in _last_cut) at or after start, or 0."""
    i = max(start, 1)
    while True:
        i = text.find("\n", i)
        if i < 0 or i + 1 >= len(text):
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i += 1


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """text cut into pieces of about piece_chars (more where no newline cut point comes sooner),
    each cut just before a newline with a non-space character on either side."""
    cuts, pos = [0], 0
    while len(text) - pos > piece_chars:
        cut = _last_cut(text, pos + 1, min(pos + piece_chars + 1, len(text) - 1))
        if cut == 0:  # no cut point in the window: take the first one after it
            cut = _first_cut(text, pos + piece_chars)
            if cut == 0:
                break
        cuts.append(cut)
        pos = cut
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]


def iter_documents(path: str, text_field: str = "text", piece_chars: Optional[int] = PIECE_CHARS
                   ) -> Iterator[tuple[str, bool, int]]:
    """(piece, ends_document, bytes_read) for one file. A text file is one document, read in
    blocks and cut into pieces as it streams (piece_chars None: one piece, the whole file); a
    JSON-lines file has one document per line, a Parquet file one per row (its text_field column)."""
    if path.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, text_field, piece_chars)
        return
    if path.endswith(JSONL_SUFFIXES):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    yield "", False, len(line)
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object: {exc}") from None
                text = row.get(text_field) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a string {text_field!r} field, "
                                     f"got {type(text).__name__ if isinstance(row, dict) else type(row).__name__}")
                pieces = split_text(text, piece_chars) if piece_chars else [text]
                for k, piece in enumerate(pieces):
                    yield piece, k == len(pieces) - 1, len(line) if k == 0 else 0
        return
    yield from text_pieces(path, piece_chars)


def text_pieces(path: str, piece_chars: Optional[int] = PIECE_CHARS,
                source: str = "") -> Iterator[tuple[str, bool, int]]:
    """iter_documents for a file read as UTF-8 text whatever its name: one document, read in
    blocks and cut into pieces as it streams. A byte that is not UTF-8 is a ValueError naming
    the file (after `source`, e.g. "--data ") and the byte's offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, buf, searched = 0, "", 1  # buf[:searched - 1] holds no cut point
    with open(path, "rb") as f:
        while True:
            block = f.read(piece_chars or (64 << 20))
            try:
                buf += decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{source}{path}: not UTF-8 text (byte {offset + exc.start}): {exc.reason}") from None
            offset += len(block)
            if not block:
                break
            if piece_chars and len(buf) > piece_chars:
                cut = _last_cut(buf, searched - 1)
                if cut > 0:
                    yield buf[:cut], False, len(block)
                    buf, searched = buf[cut:], 1
                    continue
                searched = len(buf)  # a text with no cut point is searched once, not once a block
            yield "", False, len(block)  # progress only
    yield buf, True, 0


def _parquet_documents(path: str, text_field: str, piece_chars: Optional[int]) -> Iterator[tuple[str, bool, int]]:
    """The rows of a Parquet file's text column (Hugging Face datasets' shards: FineWeb, OpenWebText
    ...), read a batch of rows at a time; a null text is no document. Progress counts the file's
    bytes in proportion to the rows read."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a Parquet file: {exc}") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no {text_field!r} column (columns: {', '.join(schema.names)}); "
                         "name the text column with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} must hold strings, got {kind}")
    size, rows, row, counted = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0, 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            step, counted = size * row // rows - counted, size * row // rows
            if text is None:
                yield "", False, step
                continue
            pieces = split_text(text, piece_chars) if piece_chars else [text]
            for k, piece in enumerate(pieces):
                yield piece, k == len(pieces) - 1, step if k == 0 else 0


def prepare(inputs: Sequence[str], out: str, tokenizer, val_fraction: float = 0.005, text_field: str = "text",
            progress: bool = True, piece_chars: int = PIECE_CHARS, resume: bool = True,
            trained_vocab_size: Optional[int] = None) -> dict:
    """Tokenize inputs into out/ (train.bin, val.bin, tokenizer, meta.json); returns meta.
    val_fraction 0 writes no val.bin (gptfast train then holds out the tail of train.bin). Ids
    already in out/ are deleted first, so an interrupted run leaves no stale ids beside a new
    tokenizer, and no meta.json. An interrupted run of the same job resumes (module docstring)
    unless resume is False; trained_vocab_size records that the tokenizer was trained on the
    inputs at that size (see `resumable_tokenizer`)."""
    from tqdm import tqdm

    from .checkpoint import atomic_write_text

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = find_sources(inputs)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    for name in ("meta.json", "train.bin", "val.bin"):  # no stale ids beside a new tokenizer
        if os.path.exists(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_token_id
    if not tokenizer.splits_at_newlines():
        piece_chars = None  # this tokenizer's ids could change at a cut: encode documents whole
    all_path, val_tmp = os.path.join(out, ".tmp-all.bin"), os.path.join(out, ".tmp-val.bin")
    state_path = os.path.join(out, STATE)
    job = {"sources": _source_keys(files), "text_field": text_field, "piece_chars": piece_chars,
           "tokenizer_fingerprint": tokenizer.fingerprint(), "dtype": dtype.name, "eos_token_id": eos,
           "trained_vocab_size": trained_vocab_size}
    done = _resume_point(out, all_path, job, dtype) if resume else None
    if done is None:
        if resume is False and os.path.exists(state_path):
            logger.warning("gptfast prepare: starting afresh in %s (resume=False)", out)
        for tmp in (state_path, all_path):
            if os.path.exists(tmp):
                os.unlink(tmp)
        done = {"file": 0, "items": 0, "tokens": 0, "documents": 0, "bytes": 0}
        atomic_write_text(os.path.join(out, STATE_TOKENIZER), tokenizer.to_json())
        atomic_write_text(state_path, json.dumps({**job, "done": done}) + "\n")
    else:
        logger.warning("gptfast prepare: resuming an interrupted run in %s: %d tokens of %d documents kept, "
                       "%.1f MB of the inputs read", out, done["tokens"], done["documents"], done["bytes"] / 1e6)
    total_bytes = sum(os.path.getsize(f) for f in files)
    documents, tokens, read = done["documents"], done["tokens"], done["bytes"]
    t0 = time.time()
    try:
        with open(all_path, "r+b" if done["tokens"] else "wb") as sink, \
                tqdm(total=total_bytes, initial=read, unit="B", unit_scale=True, desc="prepare",
                     disable=not progress) as bar:
            sink.truncate(tokens * dtype.itemsize)  # ids past the recorded point were never counted
            sink.seek(0, os.SEEK_END)
            for batch, (file_index, items) in _batches(files, text_field, piece_chars, done["file"], done["items"]):
                texts = [t for t, _, _ in batch if t]
                encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
                chunks = []
                for text, ends, _ in batch:
                    if text:
                        chunks.append(next(encoded))
                    if ends:
                        documents += 1
                        if eos is not None:
                            chunks.append([eos])
                if chunks:
                    ids = np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks])
                    if ids.size and int(ids.max()) >= tokenizer.vocab_size:
                        raise ValueError(f"the tokenizer produced id {int(ids.max())} >= its vocab_size "
                                         f"{tokenizer.vocab_size}")
                    ids.astype(dtype).tofile(sink)
                    tokens += ids.size
                step = sum(n for _, _, n in batch)
                read += step
                bar.update(step)
                sink.flush()
                os.fsync(sink.fileno())  # the ids on disk first, then the state that counts them
                atomic_write_text(state_path, json.dumps({**job, "done": {
                    "file": file_index, "items": items, "tokens": tokens, "documents": documents,
                    "bytes": read}}) + "\n")
        n_val = math.ceil(tokens * val_fraction)
        if tokens - n_val < 2:
            raise ValueError(f"the inputs encode to {tokens} tokens; too few to train on")
        os.unlink(state_path)  # the split below changes .tmp-all.bin: a later run starts afresh
        tokenizer.save(out)  # then the ids (val.bin first), then meta.json: each step leaves them consistent
        if n_val:
            _split_tail(all_path, val_tmp, tokens - n_val, dtype)
            os.replace(val_tmp, os.path.join(out, "val.bin"))
        os.replace(all_path, os.path.join(out, "train.bin"))
    finally:
        if os.path.exists(val_tmp):  # .tmp-all.bin stays for a resume while the state counts it
            os.unlink(val_tmp)
        if not os.path.exists(state_path):
            for tmp in (all_path, os.path.join(out, STATE_TOKENIZER)):
                if os.path.exists(tmp):
                    os.unlink(tmp)
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "eos_token_id": eos, "tokenizer_fingerprint": tokenizer.fingerprint(),
            "train_tokens": tokens - n_val, "val_tokens": n_val, "documents": documents,
            "sources": {"files": len(files), "bytes": total_bytes,
                        "first": [os.path.abspath(f) for f in files[:20]]},
            "seconds": round(time.time() - t0, 3)}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta


def _source_keys(files: Sequence[str]) -> list:
    """What identifies the inputs for a resume: each file's path, size and modification time."""
    keys = []
    for path in files:
        st = os.stat(path)
        keys.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return keys


def _read_state(out: str) -> Optional[dict]:
    path = os.path.join(out, STATE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        logger.warning("gptfast prepare: ignoring the unreadable %s (%s)", path, exc)
        return None


def _resume_point(out: str, ids_path: str, job: dict, dtype: np.dtype) -> Optional[dict]:
    """The progress an interrupted run of this same job recorded in out/ (its ids so far in
    ids_path), or None (and why)."""
    state = _read_state(out)
    if state is None:
        return None
    changed = [k for k in job if state.get(k) != job[k]]
    done = state.get("done", {})
    have = os.path.getsize(ids_path) if os.path.isfile(ids_path) else -1
    if changed:
        why = f"its {', '.join(changed)} changed" + (" (an input file was added, removed or modified)"
                                                     if "sources" in changed else "")
    elif have < done.get("tokens", 0) * dtype.itemsize:
        why = f"its ids file holds {max(have, 0)} bytes, fewer than the {done.get('tokens', 0)} ids recorded"
    else:
        return done
    logger.warning("gptfast prepare: not resuming the interrupted run in %s: %s; starting afresh", out, why)
    return None


def resumable_tokenizer(out: str, inputs: Sequence[str], vocab_size: int, text_field: str = "text"):
    """The tokenizer an interrupted `prepare --vocab-size` trained on these same inputs, or None:
    a resumed run encodes with it instead of training another."""
    from .tokenizer import Tokenizer

    state = _read_state(out)
    path = os.path.join(out, STATE_TOKENIZER)
    if (state is None or not os.path.isfile(path) or state.get("trained_vocab_size") != vocab_size
            or state.get("text_field") != text_field or state.get("sources") != _source_keys(find_sources(inputs))):
        return None
    tok = Tokenizer.from_file(path)
    return tok if tok.fingerprint() == state.get("tokenizer_fingerprint") else None


def _batches(files: Sequence[str], text_field: str, piece_chars: Optional[int], start_file: int = 0,
             start_items: int = 0) -> Iterator[tuple[list, tuple[int, int]]]:
    """The pieces of every file, grouped into batches of about BATCH_CHARS characters, each with
    where it ends: (file index, items of that file read). start_file/start_items skip what an
    earlier run already encoded (the items are read again, not encoded)."""
    batch, size, last = [], 0, (start_file, start_items)
    for index in range(start_file, len(files)):
        items = 0
        for item in iter_documents(files[index], text_field, piece_chars):
            items += 1
            if index == start_file and items <= start_items:
                continue
            batch.append(item)
            size += len(item[0])
            if size >= BATCH_CHARS:
                yield batch, (index, items)
                batch, size = [], 0
        last = (index, items)
    if batch:
        yield batch, last


def _split_tail(path: str, tail_path: str, keep: int, dtype: np.dtype) -> None:
    """Move the tokens of path after the first `keep` into tail_path; path keeps the first `keep`."""
    with open(path, "r+b") as src, open(tail_path, "wb") as dst:
        src.seek(keep * dtype.itemsize)
        while True:
            block = src.read(64 << 20)
            if not block:
                break
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(keep * dtype.itemsize)
        src.flush()
        os.fsync(src.fileno())


def is_token_data(path: str) -> bool:
    """A prepared directory or a .bin token file (as opposed to a text file)."""
    return os.path.isdir(path) or path.endswith(".bin")


def read_meta(directory: str) -> dict:
    """meta.json of a prepared directory, or {} (a nanoGPT directory: GPT-2 ids as uint16)."""
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} description (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    return meta


def memmap_tokens(path: str, dtype: np.dtype) -> np.ndarray:
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype.name} token ids")
    if size == 0:
        raise ValueError(f"{path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


def token_directory(path: str) -> str:
    """The directory a token path's meta.json and tokenizer live in: the path itself, or a .bin's folder."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def open_tokens(path: str, split: str = "train") -> tuple[np.ndarray, Optional[np.ndarray], dict, str]:
    """(tokens of `split`, val tokens or None, meta, directory) of a prepared directory or a .bin file.

    For a directory, split names the file (train.bin or val.bin); a .bin file is that split
    itself, with val.bin beside it as the validation split when it is a train.bin."""
    directory = token_directory(path)
    main = os.path.join(path, f"{split}.bin") if os.path.isdir(path) else path
    if not os.path.isfile(main):
        raise FileNotFoundError(f"token file not found: {main}"
                                + (" (a prepared directory holds train.bin and val.bin: see gptfast prepare)"
                                   if os.path.isdir(path) else ""))
    meta = read_meta(directory)
    dtype = np.dtype(meta.get("dtype", "uint16"))
    tokens = memmap_tokens(main, dtype)
    val_path = os.path.join(directory, "val.bin")
    val = (memmap_tokens(val_path, dtype) if os.path.basename(main) == "train.bin" and os.path.isfile(val_path)
           else None)
    return tokens, val, meta, directory


def check_tokenizer(meta: dict, tokenizer, source: str) -> None:
    """Raise when the token file was written with another tokenizer than this one."""
    want = meta.get("tokenizer_fingerprint")
    if want is not None and want != tokenizer.fingerprint():
        raise ValueError(f"{source} was tokenized with another vocabulary (fingerprint {want}) than this "
                         f"tokenizer's ({tokenizer.fingerprint()}): its ids would mean other tokens. Use the "
                         "tokenizer saved beside it, or prepare the data again with this one")


def encode_text_file(path: str, tokenizer, progress: bool = True, source: str = "") -> np.ndarray:
    """The ids of a whole text file (one document; no end-of-text appended) as int32: those of
    tokenizer.encode(text), encoded as prepare encodes, in pieces cut where the ids stay the same
    (one piece where the tokenizer cannot be cut), batches of them in parallel, with a progress
    bar over the bytes read (unless progress is False). Errors name the file after `source`."""
    from tqdm import tqdm

    piece_chars = PIECE_CHARS if tokenizer.splits_at_newlines() else None
    chunks = []
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
        for batch in _text_batches(path, piece_chars, source):
            texts = [t for t, _, _ in batch if t]
            if texts:
                chunks.extend(np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(texts))
            bar.update(sum(n for _, _, n in batch))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _text_batches(path: str, piece_chars: Optional[int], source: str) -> Iterator[list]:
    """The pieces of a text file in batches of about BATCH_CHARS characters."""
    batch, size = [], 0
    for item in text_pieces(path, piece_chars, source):
        batch.append(item)
        size += len(item[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def train_tokenizer_on_text(path: str, vocab_size: int, progress: bool = True, source: str = ""):
    """A byte-level BPE of vocab_size trained on a text file, read as prepare --vocab-size reads
    it (the same tokenizer), with a progress bar over the bytes read (unless progress is False)."""
    from tqdm import tqdm

    from . import tokenizer as tokenizers

    def texts(bar):
        for piece, _, n in text_pieces(path, PIECE_CHARS, source):
            bar.update(n)
            if piece:
                yield piece

    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="tokenizer",
              disable=not progress) as bar:
        return tokenizers.train_byte_level_bpe((), vocab_size, texts=texts(bar))


def texts_of(files: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """The pieces of every document of the files (for training a byte-level BPE on them: its
    pre-tokenizer splits at the cut points anyway, so the pieces count the same words)."""
    for path in files:
        for piece, _, _ in iter_documents(path, text_field, PIECE_CHARS):
            if piece:
                yield piece
