"""Token files (gptfast prepare): the ids of the whole text, nanoGPT's layout, clear errors; and
training and perplexity on them."""
import json
import os
import random

import numpy as np
import pytest

from gptfast import Tokenizer
from gptfast.cli import main
from gptfast.data import open_tokens, prepare, split_text

from hf_utils import assert_same_weights, make_gpt2_tokenizer_files

PIECES = ["And", " God", " said", ",", "\n", " ", "\n\n", "  ", "\t", "é", " naïve", "日本", "'s", " 123", "\r\n",
          "!", "\n ", " \n", "🚀", "<|endoftext|>", "x"]


def random_text(n, seed):
    rng = random.Random(seed)
    return "".join(rng.choice(PIECES) for _ in range(n))


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_gpt2_tokenizer_files(d, random_text(5000, 0), vocab_size=400)
    return Tokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def gpt1_tok(tmp_path_factory):
    from tokenizers import CharBPETokenizer

    d = tmp_path_factory.mktemp("tok1")
    trainer = CharBPETokenizer(unk_token="<unk>", lowercase=True, suffix="</w>")
    trainer.train_from_iterator([random_text(5000, 1).lower()], vocab_size=300, special_tokens=["<unk>"],
                                show_progress=False)
    trainer.save_model(str(d))
    return Tokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("which", ["gpt2", "gpt1", "default"])
def test_pieces_encode_to_the_whole_texts_ids(which, gpt2_tok, gpt1_tok):
    """The cut rule of split_text keeps every tokenizer we ship or load at the whole text's ids."""
    tok = {"gpt2": gpt2_tok, "gpt1": gpt1_tok, "default": Tokenizer.from_pretrained("gptfast/assets/default")
           if os.path.isdir("gptfast/assets/default") else gpt2_tok}[which]
    assert tok.splits_at_newlines()
    for seed in range(20):
        text = random_text(400, seed)
        whole = tok.encode(text)
        for piece_chars in (1, 5, 40):
            pieces = split_text(text, piece_chars)
            assert "".join(pieces) == text
            assert [i for p in pieces for i in tok.encode(p)] == whole, (seed, piece_chars)


def test_a_cut_elsewhere_would_change_the_ids(gpt2_tok):
    """The rule is needed: a cut after the first newline of a run changes the ids (GPT-2's regex
    keeps "\n\n" together before a space), and split_text does not cut there."""
    text = "said\n\n And"
    assert gpt2_tok.encode("said\n") + gpt2_tok.encode("\n And") != gpt2_tok.encode(text)
    assert split_text(text, 3) == [text]  # no cut point in it: one piece
    assert split_text("said\nAnd\nGod", 3) == ["said", "\nAnd", "\nGod"]


def test_prepare_writes_nanogpt_layout_with_the_whole_texts_ids(gpt2_tok, tmp_path):
    text = random_text(6000, 7)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    meta = prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), gpt2_tok, val_fraction=0.1, progress=False,
                   piece_chars=64)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    want = gpt2_tok.encode(text) + [gpt2_tok.eos_token_id]
    train = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")  # as nanoGPT's train.py reads it
    val = np.memmap(out / "val.bin", dtype=np.uint16, mode="r")
    assert np.concatenate([train, val]).tolist() == want
    assert len(val) == int(np.ceil(len(want) * 0.1))
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["dtype"], meta["vocab_size"], meta["documents"]) == ("uint16", gpt2_tok.vocab_size, 1)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert Tokenizer.from_pretrained(str(out)).fingerprint() == gpt2_tok.fingerprint() == meta["tokenizer_fingerprint"]
    tokens, val2, meta2, _ = open_tokens(str(out))
    assert np.array_equal(tokens, train) and np.array_equal(val2, val) and meta2 == meta


def test_prepare_reads_directories_and_json_lines(gpt2_tok, tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    docs = [random_text(50, s) for s in range(4)]
    (src / "a.txt").write_text(docs[0])
    (src / "sub" / "b.jsonl").write_text(json.dumps({"text": docs[1]}) + "\n\n" + json.dumps({"text": docs[2], "id": 3})
                                         + "\n")
    (src / "c.md").write_text(docs[3])
    (src / "notes.csv").write_text("not,read\n")
    meta = prepare([str(src)], str(tmp_path / "out"), gpt2_tok, val_fraction=0.0, progress=False)
    eos = gpt2_tok.eos_token_id
    want = [i for d in (docs[0], docs[3], docs[1], docs[2]) for i in gpt2_tok.encode(d) + [eos]]  # sorted paths
    train, val, _, _ = open_tokens(str(tmp_path / "out"))
    assert train.tolist() == want and meta["documents"] == 4 and meta["sources"]["files"] == 3
    assert val is None and not (tmp_path / "out" / "val.bin").exists()  # val_fraction 0: no split


def test_a_tokenizer_that_cannot_be_cut_encodes_documents_whole(gpt2_tok, tmp_path):
    from tokenizers import pre_tokenizers

    from tokenizers import Tokenizer as HFTokenizer

    prefixed = Tokenizer(HFTokenizer.from_str(gpt2_tok._tok.to_str()))
    prefixed._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not prefixed.splits_at_newlines()
    text = random_text(3000, 3)
    pieces = split_text(text, 64)
    assert [i for p in pieces for i in prefixed.encode(p)] != prefixed.encode(text)  # cutting would differ
    (tmp_path / "a.txt").write_text(text)
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), prefixed, val_fraction=0.0, progress=False,
            piece_chars=64)
    assert open_tokens(str(tmp_path / "out"))[0].tolist() == prefixed.encode(text) + [prefixed.eos_token_id]


def test_prepare_errors_name_the_input(gpt2_tok, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="input not found: .*missing.txt"):
        prepare([str(tmp_path / "missing.txt")], out, gpt2_tok, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a string 'text' field, got int"):
        prepare([str(tmp_path / "bad.jsonl")], out, gpt2_tok, progress=False)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not a JSON object"):
        prepare([str(tmp_path / "broken.jsonl")], out, gpt2_tok, progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3\)"):
        prepare([str(tmp_path / "latin1.txt")], out, gpt2_tok, progress=False)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        prepare([str(tmp_path / "latin1.txt")], out, gpt2_tok, val_fraction=1.5, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt/.md"):
        prepare([str(tmp_path / "empty")], out, gpt2_tok, progress=False)


def test_an_interrupted_prepare_leaves_no_complete_looking_directory(gpt2_tok, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(random_text(3000, 5))
    out = tmp_path / "out"
    prepare([str(tmp_path / "a.txt")], str(out), gpt2_tok, progress=False)
    before = (out / "train.bin").read_bytes()
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    (out / "val.bin").write_bytes(b"")  # what a crash in an earlier write could have left

    def dies(texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt2_tok, "encode_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "a.txt")], str(out), gpt2_tok, progress=False)
    # no meta.json and no ids: nothing to mistake for data; the hidden state is for a resume
    left = sorted(os.listdir(out))
    assert [n for n in left if not n.startswith(".")] == ["tokenizer.json", "tokenizer_config.json"], left
    monkeypatch.undo()
    prepare([str(tmp_path / "a.txt")], str(out), gpt2_tok, progress=False)
    assert (out / "train.bin").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # a finished prepare leaves no state


def _corpus_files(tmp_path, seed=0):
    """Three text files and a JSON-lines file: many batches at the tests' small batch size."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for k in range(3):
        (src / f"doc{k}.txt").write_text(random_text(900 + 400 * k, seed + k))
    (src / "rows.jsonl").write_text("".join(json.dumps({"text": random_text(150, seed + 10 + k)}) + "\n"
                                            for k in range(12)))
    return src


def _prepared(out):
    meta = json.loads((out / "meta.json").read_text())
    del meta["seconds"]
    return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes(), meta


class _Counted:
    """encode_batch that counts its calls and raises KeyboardInterrupt at call number `die_at`."""

    def __init__(self, tok, die_at=None):
        self.encode, self.die_at, self.calls = tok.encode_batch, die_at, 0

    def __call__(self, texts):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        return self.encode(texts)


@pytest.fixture
def small_batches(monkeypatch):
    import gptfast.data

    monkeypatch.setattr(gptfast.data, "BATCH_CHARS", 400)
    return {"progress": False, "piece_chars": 300, "val_fraction": 0.1}


@pytest.mark.parametrize("die_at", [1, 2, 7, "last"])
def test_an_interrupted_prepare_resumes_to_the_same_files(gpt2_tok, tmp_path, monkeypatch, small_batches, caplog,
                                                          die_at):
    src = _corpus_files(tmp_path)
    counted = _Counted(gpt2_tok)
    monkeypatch.setattr(gpt2_tok, "encode_batch", counted)
    prepare([str(src)], str(tmp_path / "whole"), gpt2_tok, **small_batches)
    total = counted.calls
    assert total > 10
    die_at = total if die_at == "last" else die_at
    counted.calls, counted.die_at = 0, die_at
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], str(tmp_path / "out"), gpt2_tok, **small_batches)
    assert not (tmp_path / "out" / "meta.json").exists()
    counted.calls, counted.die_at = 0, None
    with caplog.at_level("WARNING", logger="gptfast.data"):
        prepare([str(src)], str(tmp_path / "out"), gpt2_tok, **small_batches)
    assert counted.calls == total - die_at + 1  # only what the interrupted run had not finished
    assert "resuming an interrupted run" in caplog.text
    assert _prepared(tmp_path / "out") == _prepared(tmp_path / "whole")
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]


def test_a_crash_between_the_ids_and_their_record_resumes_exactly(gpt2_tok, tmp_path, monkeypatch, small_batches):
    """The ids of a batch reach the disk before the state that counts them: ids the state does
    not count (a crash between the two writes) are cut off and encoded again."""
    import gptfast.checkpoint

    src = _corpus_files(tmp_path, seed=3)
    prepare([str(src)], str(tmp_path / "whole"), gpt2_tok, **small_batches)
    write, writes = gptfast.checkpoint.atomic_write_text, []

    def crashes_on_the_fourth_state(path, text):
        if os.path.basename(path) == ".prepare-state.json":
            writes.append(path)
            if len(writes) == 4:
                raise KeyboardInterrupt
        write(path, text)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(gptfast.checkpoint, "atomic_write_text", crashes_on_the_fourth_state)
        prepare([str(src)], str(tmp_path / "out"), gpt2_tok, **small_batches)
    out = tmp_path / "out"
    recorded = json.loads((out / ".prepare-state.json").read_text())["done"]["tokens"]
    assert os.path.getsize(out / ".tmp-all.bin") > recorded * 2  # a batch's ids on disk, not counted
    prepare([str(src)], str(out), gpt2_tok, **small_batches)
    assert _prepared(out) == _prepared(tmp_path / "whole")


def test_a_changed_job_starts_afresh_and_says_why(gpt2_tok, tmp_path, monkeypatch, small_batches, caplog):
    src = _corpus_files(tmp_path, seed=5)
    out = tmp_path / "out"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(gpt2_tok, "encode_batch", _Counted(gpt2_tok, die_at=5))
        prepare([str(src)], str(out), gpt2_tok, **small_batches)
    (src / "doc1.txt").write_text(random_text(1000, 99))  # an input changed since
    with caplog.at_level("WARNING", logger="gptfast.data"):
        prepare([str(src)], str(out), gpt2_tok, **small_batches)
    assert "not resuming" in caplog.text and "sources changed" in caplog.text
    prepare([str(src)], str(tmp_path / "whole"), gpt2_tok, **small_batches)
    assert _prepared(out) == _prepared(tmp_path / "whole")

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(gpt2_tok, "encode_batch", _Counted(gpt2_tok, die_at=5))
        prepare([str(src)], str(out), gpt2_tok, **small_batches)
    counted = _Counted(gpt2_tok)
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="gptfast.data"):
        m.setattr(gpt2_tok, "encode_batch", counted)
        prepare([str(src)], str(out), gpt2_tok, resume=False, **small_batches)  # asked to start afresh
    assert "starting afresh" in caplog.text and counted.calls > 10
    assert _prepared(out) == _prepared(tmp_path / "whole")


def test_cli_prepare_resumes_with_the_tokenizer_it_trained(tmp_path, monkeypatch, capsys, small_batches):
    import gptfast.tokenizer

    src = _corpus_files(tmp_path, seed=7)
    args = ["prepare", str(src), "--vocab-size", "300", "--val-fraction", "0.1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    train, trained = gptfast.tokenizer.train_byte_level_bpe, []

    def counted_training(*a, **k):
        tok = train(*a, **k)
        trained.append(tok)
        if len(trained) == 1:  # the first run is interrupted
            monkeypatch.setattr(tok, "encode_batch", _Counted(tok, die_at=3))
        return tok

    monkeypatch.setattr(gptfast.tokenizer, "train_byte_level_bpe", counted_training)
    assert main(args + ["--out", str(tmp_path / "out")]) == 130  # interrupted
    assert len(trained) == 1
    assert "interrupted" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "out")]) == 0  # resumes: no second training
    assert len(trained) == 1
    assert _prepared(tmp_path / "out") == _prepared(tmp_path / "whole")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "whole" / "tokenizer.json").read_text()
    assert main(args + ["--out", str(tmp_path / "out"), "--restart"]) == 0  # trains again
    assert len(trained) == 2
    assert _prepared(tmp_path / "out") == _prepared(tmp_path / "whole")


def _write_parquet(path, texts, column="text", **extra):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, **extra}), str(path), row_group_size=3)


def test_prepare_reads_parquet_rows(gpt2_tok, tmp_path, monkeypatch):
    import gptfast.data

    monkeypatch.setattr(gptfast.data, "PARQUET_BATCH_ROWS", 2)  # rows over several batches and row groups
    texts = [random_text(n, 40 + n) for n in (30, 1, 900, 55, 7, 300, 12)]
    rows = texts[:3] + [None] + texts[3:]  # a null text is no document
    _write_parquet(tmp_path / "shard.parquet", rows, id=list(range(len(rows))))
    meta = prepare([str(tmp_path)], str(tmp_path / "out"), gpt2_tok, progress=False, piece_chars=200,
                   val_fraction=0)
    want = [i for t in texts for i in gpt2_tok.encode(t) + [gpt2_tok.eos_token_id]]
    got, _, _, _ = open_tokens(str(tmp_path / "out"))
    assert got.tolist() == want
    assert meta["documents"] == len(texts) and meta["sources"]["files"] == 1
    read = sum(n for _, _, n in gptfast.data.iter_documents(str(tmp_path / "shard.parquet"), "text", 200))
    assert read == os.path.getsize(tmp_path / "shard.parquet")  # the progress bar ends at the file's size

    _write_parquet(tmp_path / "other.parquet", texts, column="content")
    prepare([str(tmp_path / "other.parquet")], str(tmp_path / "content"), gpt2_tok, progress=False,
            text_field="content", val_fraction=0)
    assert open_tokens(str(tmp_path / "content"))[0].tolist() == want


def test_parquet_errors_name_the_file_and_column(gpt2_tok, tmp_path):
    _write_parquet(tmp_path / "a.parquet", ["x"], column="body")
    with pytest.raises(ValueError, match=r"a\.parquet: no 'text' column \(columns: body\).*--text-field"):
        prepare([str(tmp_path / "a.parquet")], str(tmp_path / "o"), gpt2_tok, progress=False)
    _write_parquet(tmp_path / "b.parquet", [1, 2], column="text")
    with pytest.raises(ValueError, match="column 'text' must hold strings, got int64"):
        prepare([str(tmp_path / "b.parquet")], str(tmp_path / "o"), gpt2_tok, progress=False)
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"c\.parquet: not a Parquet file"):
        prepare([str(tmp_path / "c.parquet")], str(tmp_path / "o"), gpt2_tok, progress=False)


def test_an_interrupted_parquet_prepare_resumes(gpt2_tok, tmp_path, monkeypatch, small_batches):
    import gptfast.data

    monkeypatch.setattr(gptfast.data, "PARQUET_BATCH_ROWS", 3)
    _write_parquet(tmp_path / "s.parquet", [random_text(120, 60 + k) for k in range(20)])
    prepare([str(tmp_path / "s.parquet")], str(tmp_path / "whole"), gpt2_tok, **small_batches)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(gpt2_tok, "encode_batch", _Counted(gpt2_tok, die_at=4))
        prepare([str(tmp_path / "s.parquet")], str(tmp_path / "out"), gpt2_tok, **small_batches)
    counted = _Counted(gpt2_tok)
    with monkeypatch.context() as m:
        m.setattr(gpt2_tok, "encode_batch", counted)
        prepare([str(tmp_path / "s.parquet")], str(tmp_path / "out"), gpt2_tok, **small_batches)
    assert _prepared(tmp_path / "out") == _prepared(tmp_path / "whole")
    whole = _Counted(gpt2_tok)
    with monkeypatch.context() as m:
        m.setattr(gpt2_tok, "encode_batch", whole)
        prepare([str(tmp_path / "s.parquet")], str(tmp_path / "again"), gpt2_tok, **small_batches)
    assert counted.calls == whole.calls - 3  # the three batches done before the interruption


def test_cli_prepare(tmp_path, capsys):
    text = random_text(4000, 9)
    (tmp_path / "a.txt").write_text(text)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "bpe"), "--vocab-size", "300",
                 "--val-fraction", "0.05", "--quiet"]) == 0
    meta = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_pretrained(str(tmp_path / "bpe"))  # trained on the inputs, saved beside the ids
    assert tok.vocab_size == meta["vocab_size"] == 300
    train, val, _, _ = open_tokens(str(tmp_path / "bpe"))
    assert np.concatenate([train, val]).tolist() == tok.encode(text) + [tok.eos_token_id]
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "give --tokenizer DIR" in capsys.readouterr().err


def test_token_files_are_checked_when_opened(gpt2_tok, tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="odd.bin has 3 bytes, not a whole number of uint16"):
        open_tokens(str(tmp_path / "odd.bin"))
    with pytest.raises(FileNotFoundError, match="token file not found: .*train.bin .*gptfast prepare"):
        open_tokens(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other", "version": 1}))
    (tmp_path / "train.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="not a gptfast-tokens v1 description"):
        open_tokens(str(tmp_path))


# ---- training and perplexity on token files ----------------------------------------------------

TRAIN = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, eval_every=3, eval_batches=2, warmup=2, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gpt2_tok):
    """A text, its tokenizer's directory, and the text prepared into token files."""
    d = tmp_path_factory.mktemp("corpus")
    text = random_text(8000, 11)
    (d / "book.txt").write_text(text)
    gpt2_tok.save(str(d / "tok"))
    prepare([str(d / "book.txt")], str(d / "prepared"), gpt2_tok, val_fraction=0.1, progress=False)
    return d, text


def _weights(path):
    from gptfast import GPT
    return GPT.from_pretrained(str(path)).state_dict()


def _log(path):
    return [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]


def test_training_on_a_token_file_equals_training_on_its_text(corpus, tmp_path):
    from gptfast.train import TrainArgs, train

    d, text = corpus
    np.asarray(Tokenizer.from_pretrained(str(d / "tok")).encode(text), dtype=np.uint16).tofile(tmp_path / "book.bin")
    base = dict(TRAIN, tokenizer=str(d / "tok"), batch_size=4, steps=4)
    train(TrainArgs(data=str(d / "book.txt"), out=str(tmp_path / "text"), **base), progress=False)
    train(TrainArgs(data=str(tmp_path / "book.bin"), out=str(tmp_path / "bin"), **base), progress=False)
    a, b = _weights(tmp_path / "text"), _weights(tmp_path / "bin")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_grad_accum_equals_one_larger_batch(corpus, tmp_path):
    """A step of batch 8 = 4 x 2 = 2 x 4 micro-batches: the same rows, losses and (up to the order
    of the float sums) weights."""
    from gptfast.train import TrainArgs, train

    d, _ = corpus
    base = dict(TRAIN, data=str(d / "prepared"), steps=3, eval_every=1, eval_batches=1)
    train(TrainArgs(out=str(tmp_path / "b8"), batch_size=8, **base), progress=False)
    ref_w, ref_loss = _weights(tmp_path / "b8"), [e["loss"] for e in _log(tmp_path / "b8")]
    for batch, accum in ((4, 2), (2, 4)):
        out = tmp_path / f"b{batch}x{accum}"
        summary = train(TrainArgs(out=str(out), batch_size=batch, grad_accum=accum, **base), progress=False)
        assert summary["tokens_per_step"] == 8 * 32
        assert [e["loss"] for e in _log(out)] == pytest.approx(ref_loss, rel=1e-6)
        assert_same_weights(_weights(out), ref_w, f"(batch {batch} x {accum})")


def test_training_reports_throughput(corpus, tmp_path):
    from gptfast.bench.accounting import train_flops_per_token
    from gptfast.train import TrainArgs, train

    d, _ = corpus
    args = TrainArgs(data=str(d / "prepared"), out=str(tmp_path / "run"), batch_size=2, grad_accum=2, steps=3,
                     **{**TRAIN, "eval_every": 3})
    summary = train(args, progress=False)
    assert summary["tokens_per_step"] == 2 * 2 * 32 and summary["first_step_s"] > 0
    assert summary["tokens_per_s"] > 0 and "mfu" not in summary  # no known peak for a CPU
    last = _log(tmp_path / "run")[-1]
    from gptfast import GPT
    model = GPT.from_pretrained(str(tmp_path / "run"))
    fpt = train_flops_per_token(model.num_parameters(non_embedding=True), 1, 2, 16, 32)
    assert last["model_tflops"] == pytest.approx(last["tokens_per_s"] * fpt / 1e12)
    summary = train(TrainArgs(**{**vars(args), "out": str(tmp_path / "peak"), "peak_tflops": 0.5}), progress=False)
    assert summary["mfu"] == pytest.approx(summary["model_tflops"] / 0.5)
    assert _log(tmp_path / "peak")[-1]["mfu"] == pytest.approx(_log(tmp_path / "peak")[-1]["model_tflops"] / 0.5)


def test_compiled_training_step_matches_eager(corpus, tmp_path):
    import torch

    from gptfast.train import TrainArgs, train

    d, _ = corpus
    base = dict(TRAIN, data=str(d / "prepared"), batch_size=2, grad_accum=2, steps=2, eval_every=2)
    train(TrainArgs(out=str(tmp_path / "eager"), **base), progress=False)
    train(TrainArgs(out=str(tmp_path / "compiled"), compile="aot_eager", **base), progress=False)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_checkpointed_training_matches(corpus, tmp_path):
    from gptfast.train import TrainArgs, train

    d, _ = corpus
    base = dict(TRAIN, data=str(d / "prepared"), n_layer=2, batch_size=2, grad_accum=2, steps=2, eval_every=2)
    train(TrainArgs(out=str(tmp_path / "plain"), **base), progress=False)
    train(TrainArgs(out=str(tmp_path / "recompute"), grad_checkpoint=True, **base), progress=False)
    assert_same_weights(_weights(tmp_path / "recompute"), _weights(tmp_path / "plain"))


def test_zero_shot_rows_are_scored_at_every_evaluation(corpus, tmp_path):
    from gptfast import GPT
    from gptfast.evaluation import evaluate_zero_shot
    from gptfast.train import TrainArgs, train

    d, _ = corpus
    rng = random.Random(4)
    choice = [{"context": random_text(8, rng.random()), "choices": [random_text(3, rng.random()) for _ in range(3)],
               "label": rng.randrange(3)} for _ in range(12)]
    completion = [{"context": random_text(8, rng.random()), "continuation": random_text(2, rng.random()) + "x"}
                  for _ in range(6)]
    for name, rows, keys in (("choice", choice, ("eval_accuracy", "eval_accuracy_norm")),
                             ("completion", completion, ("eval_accuracy", "eval_perplexity"))):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / name
        train(TrainArgs(data=str(d / "prepared"), out=str(out), batch_size=2, steps=4, eval_data=str(f),
                        eval_limit=10, **{**TRAIN, "eval_every": 2}), progress=False)
        evals = [e for e in _log(out) if "val_loss" in e]
        assert [e["step"] for e in evals] == [2, 4] and all(k in e for e in evals for k in keys)
        final = evaluate_zero_shot(GPT.from_pretrained(str(out)), Tokenizer.from_pretrained(str(out)), rows[:10])
        assert evals[-1]["eval_accuracy"] == final["accuracy"]
        assert evals[-1][keys[1]] == pytest.approx(final[keys[1].removeprefix("eval_")], rel=1e-6)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "a", "choices": ["b"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"--eval-data .*bad.jsonl: row 1: 'label' must be an index"):
        train(TrainArgs(data=str(d / "prepared"), out=str(tmp_path / "bad"), batch_size=2, steps=2,
                        eval_data=str(tmp_path / "bad.jsonl"), **TRAIN), progress=False)


def test_nanogpt_token_directory_trains_with_a_given_tokenizer(corpus, tmp_path):
    from gptfast.train import TrainArgs, train

    d, text = corpus
    ids = np.asarray(Tokenizer.from_pretrained(str(d / "tok")).encode(text), dtype=np.uint16)
    nano = tmp_path / "nano"
    nano.mkdir()
    ids[:-500].tofile(nano / "train.bin")  # nanoGPT's prepare.py: raw uint16, no header, no meta
    ids[-500:].tofile(nano / "val.bin")
    base = dict(TRAIN, data=str(nano), batch_size=2, steps=2, eval_every=2)
    with pytest.raises(FileNotFoundError, match="holds token ids but .* has no tokenizer: pass --tokenizer"):
        train(TrainArgs(out=str(tmp_path / "a"), **base), progress=False)
    summary = train(TrainArgs(out=str(tmp_path / "b"), tokenizer=str(d / "tok"), **base), progress=False)
    assert summary["steps"] == 2 and summary["val_loss"] is not None


def test_token_data_errors_name_the_problem(corpus, tmp_path):
    from gptfast.train import TrainArgs, train

    d, _ = corpus
    base = dict(TRAIN, batch_size=2, steps=2, eval_every=2)
    with pytest.raises(ValueError, match="tokenized with another vocabulary"):
        train(TrainArgs(data=str(d / "prepared"), out=str(tmp_path / "a"), tokenizer="gptfast/assets/default",
                        **base), progress=False)
    big = tmp_path / "big"
    big.mkdir()
    np.full(400, 60000, dtype=np.uint16).tofile(big / "train.bin")
    np.full(100, 7, dtype=np.uint16).tofile(big / "val.bin")
    with pytest.raises(ValueError, match="holds token id 60000, outside the model's vocab_size 400"):
        train(TrainArgs(data=str(big), out=str(tmp_path / "b"), tokenizer=str(d / "tok"), **base), progress=False)
    with pytest.raises(ValueError, match=r"the validation split has 100 tokens; need at least 130 for "
                                         r"--block-size 128 \(its val.bin: prepare the data again with a larger "
                                         r"--val-fraction"):  # this run's --val-fraction does not apply to it
        train(TrainArgs(data=str(big), out=str(tmp_path / "c"), tokenizer=str(d / "tok"),
                        **{**base, "block_size": 128}), progress=False)
    with pytest.raises(ValueError, match="--grad-accum must be an int >= 1, got 0"):
        train(TrainArgs(data=str(d / "prepared"), out=str(tmp_path / "d"), grad_accum=0, **base), progress=False)


def test_torchrun_on_token_files_with_grad_accum(corpus, tmp_path):
    """Two gloo ranks, two micro-batches each (DDP synchronises on the second only)."""
    import subprocess
    import sys

    d, _ = corpus
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptfast.cli", "train", "--data", str(d / "prepared"), "--out", str(out), "--n-layer", "1",
           "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--grad-accum", "2",
           "--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["world_size"] == 2 and summary["tokens_per_step"] == 2 * 2 * 2 * 32
    assert Tokenizer.from_pretrained(str(out)).fingerprint() == Tokenizer.from_pretrained(str(d / "tok")).fingerprint()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    from gptfast.train import TrainArgs, train

    d, _ = corpus
    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainArgs(data=str(d / "prepared"), out=str(out), batch_size=4, steps=3, **TRAIN), progress=False)
    return out


def test_batched_perplexity_equals_one_window_at_a_time(trained):
    import torch

    from gptfast import GPT
    from gptfast.train import perplexity

    model = GPT.from_pretrained(str(trained))
    rng = np.random.default_rng(0)
    for n in (20, 95, 97, 160):  # one window; a short last window; last window full (n = 32 + 4 * 16 + 1)
        ids = rng.integers(0, model.config.vocab_size, n)
        for stride in (7, 16, 32):
            ref = perplexity(model, ids.tolist(), stride=stride, progress=False)
            assert ref["tokens"] == n - 1
            for batch in (2, 3, 64):
                got = perplexity(model, ids, stride=stride, batch_size=batch, progress=False)
                assert got["tokens"] == ref["tokens"] and got["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, 63))
    with torch.no_grad():  # stride = context: windows [0, 32) and [31, 63), no shared targets, no token left out
        direct = torch.cat([torch.nn.functional.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="none")
                            for w in (ids[:32], ids[31:])]).mean()
    got = perplexity(model, ids.numpy(), stride=32, batch_size=4, progress=False)
    assert got["tokens"] == 62 and got["nll"] == pytest.approx(float(direct), rel=1e-6)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        perplexity(model, ids, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="token id 5000 is outside the model's vocab_size"):
        perplexity(model, [1, 5000], progress=False)


def test_cli_perplexity_on_token_files(trained, corpus, capsys):
    from gptfast import GPT
    from gptfast.train import perplexity

    d, _ = corpus
    assert main(["perplexity", str(d / "prepared"), "--model", str(trained), "--json", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    val = open_tokens(str(d / "prepared"), split="val")[0]
    want = perplexity(GPT.from_pretrained(str(trained)), val, progress=False)
    assert result["tokens"] == len(val) - 1 and result["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert main(["perplexity", str(d / "prepared" / "val.bin"), "--model", str(trained), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nll"] == pytest.approx(want["nll"], rel=1e-6)
    if os.path.isdir("gptfast/assets/default"):  # the shipped model's vocabulary is another one
        assert main(["perplexity", str(d / "prepared")]) == 2
        assert "tokenized with another vocabulary" in capsys.readouterr().err


@pytest.mark.gpu
def test_compiled_bf16_training_on_cuda_with_kernels(corpus, tmp_path):
    """On a GPU: token files, two micro-batches, bf16 autocast, torch.compile (inductor) through
    the Triton kernels; the loss falls, and the summary has throughput, MFU and peak memory."""
    import torch

    import gptfast
    from gptfast.train import TrainArgs, peak_tflops, train

    d, _ = corpus
    args = TrainArgs(data=str(d / "prepared"), out=str(tmp_path / "run"), n_layer=2, n_head=2, n_embd=64,
                     block_size=64, batch_size=8, grad_accum=2, steps=30, eval_every=15, eval_batches=4, warmup=5,
                     lr=3e-3, device="cuda", dtype="bfloat16", compile="inductor")
    with gptfast.use_backend("kernel"):
        summary = train(args, progress=False)
    vals = [e["val_loss"] for e in _log(args.out) if "val_loss" in e]
    assert vals[-1] < np.log(400) - 1.0, vals  # well below a uniform guess over the vocabulary
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_gb"] > 0
    if peak_tflops(torch.device("cuda"), torch.bfloat16, None) is not None:  # an A100, H100 or H200
        assert 0 < summary["mfu"] < 1


# ---- gptfast train on a text file: prepare's reading, encoding and progress -----------------------

@pytest.mark.parametrize("which", ["gpt2", "gpt1"])
def test_a_text_file_encodes_in_pieces_to_the_whole_texts_ids(which, gpt2_tok, gpt1_tok, tmp_path, monkeypatch):
    import gptfast.data
    from gptfast.data import encode_text_file

    tok = gpt2_tok if which == "gpt2" else gpt1_tok
    monkeypatch.setattr(gptfast.data, "PIECE_CHARS", 200)  # many pieces, several batches
    monkeypatch.setattr(gptfast.data, "BATCH_CHARS", 700)
    for seed in range(3):
        text = random_text(3000, 100 + seed)
        path = tmp_path / f"t{seed}.txt"
        path.write_bytes(text.encode("utf-8"))  # \r\n kept as it is
        ids = encode_text_file(str(path), tok, progress=False)
        assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text)
    (tmp_path / "empty.txt").write_text("")
    assert encode_text_file(str(tmp_path / "empty.txt"), tok, progress=False).size == 0


def test_train_on_text_reads_and_trains_as_prepare_does(tmp_path, capsys):
    from gptfast.data import encode_text_file, texts_of, train_tokenizer_on_text
    from gptfast.tokenizer import train_byte_level_bpe

    path = tmp_path / "book.txt"
    path.write_text(random_text(6000, 21))
    tok = train_tokenizer_on_text(str(path), 300, progress=True)
    assert tok.fingerprint() == train_byte_level_bpe((), 300, texts=texts_of([str(path)])).fingerprint()
    encode_text_file(str(path), tok, progress=True)
    err = capsys.readouterr().err
    assert "tokenizer: 100%" in err and "encode: 100%" in err
    bad = tmp_path / "bad.txt"
    bad.write_bytes("fine text\n".encode() * 10 + b"\xc3\x28 more")
    for call in (lambda: train_tokenizer_on_text(str(bad), 300, progress=False, source="--data "),
                 lambda: encode_text_file(str(bad), tok, progress=False, source="--data ")):
        with pytest.raises(ValueError, match=rf"^--data {bad}: not UTF-8 text \(byte 100\)"):
            call()
