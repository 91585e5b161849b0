"""README.md's usage, run: every ```python block and every `gptfast ...` command line of its
shell blocks, on CPU, with tiny random models, so that a renamed API, flag or file breaks a test.

How a snippet runs here (everything else is the README's text as it stands):
- It runs in a fresh directory that holds what the README's paths name: `path/to/gpt2` (and
  `path/to/gpt2-xl`, a wider one with the same tokenizer) are Hugging Face GPT-2 checkpoints saved
  by transformers from a random init (tests/hf_utils.py) beside a byte-level BPE trained here;
  `book.txt`, `corpus/`, `eval.txt`, `article.txt`, `hellaswag.jsonl`, `train.jsonl`, `val.jsonl`
  are small files written by the workspace fixture.
- The substitutions for what cannot run here are listed per snippet (`subs`, old -> new, each
  must apply); the names a snippet assumes (`big`, `ids`, `input_ids`, `hf_model`...) are defined
  in its `prelude`; `check` then tests what the snippet's comments claim.
- A command that cannot run here in seconds (a 124M-parameter preset, torch.compile, the
  benchmark suite) is parsed only, and every command's flags are parsed as the README writes them.

Each README block or command is found by a short line or text unique to it (`key`): a moved one is
still found, a deleted one fails `test_every_snippet_is_in_the_readme`, and a new one fails
`test_every_readme_snippet_is_tested` until it is given a spec here. GPTFAST_README=path runs the
tests against another copy of the README.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from hf_utils import make_gpt2_tokenizer_files, make_hf_gpt2

README = os.environ.get("GPTFAST_README") or str(Path(__file__).resolve().parent.parent / "README.md")

# ---- the README's blocks --------------------------------------------------------------------

FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SHELL_LANGS = ("", "bash", "sh", "shell", "console")


def readme_blocks(path: str = README) -> list[tuple[str, str, int]]:
    """(language, text, line number) of each fenced block."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def python_blocks(path: str = README) -> list[tuple[str, int]]:
    return [(body, line) for lang, body, line in readme_blocks(path) if lang == "python"]


def shell_commands(path: str = README) -> list[tuple[str, int]]:
    """Each `gptfast ...` command of the shell blocks (one per line; `a && gptfast ...` gives the
    gptfast part, `echo X | gptfast ...` stays whole), without its trailing comment."""
    found = []
    for lang, body, first in readme_blocks(path):
        if lang not in SHELL_LANGS:
            continue
        for n, line in enumerate(body.splitlines()):
            command = _strip_comment(line.strip())
            if not re.search(r"(^|[|&;]\s*)gptfast(\s|$)", command):  # gptfast as a command word
                continue
            for part in re.split(r"\s&&\s", command):
                if re.match(r"(echo .*\| *)?gptfast(\s|$)", part.strip()):
                    command = part.strip()
            found.append((command, first + n))
    return found


def _strip_comment(command: str) -> str:
    """The command without a trailing `# ...` that is outside quotes."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


# ---- the workspace: what the README's paths name ---------------------------------------------

TEXT = ("In the beginning was the word. Hello, my name is Ada; the sky is blue, and once upon a time a cat "
        "sat by the sea.\nHi there, how are you? What a lovely film, said the critic. \u00e9t\u00e9 \u2014 "
        "caf\u00e9.\nAnd God said, let there be light: and there was light.\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The files every snippet finds, made once."""
    root = tmp_path_factory.mktemp("readme")
    gpt2 = root / "path/to/gpt2"
    gpt2.mkdir(parents=True)
    make_gpt2_tokenizer_files(gpt2, TEXT * 4, vocab_size=300)
    vocab = len(json.loads((gpt2 / "vocab.json").read_text()))
    make_hf_gpt2(str(gpt2), vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2, seed=1)
    xl = root / "path/to/gpt2-xl"
    xl.mkdir()
    make_hf_gpt2(str(xl), vocab_size=vocab, n_positions=256, n_embd=48, n_layer=3, n_head=4, seed=2)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2 / name, xl / name)
    (root / "book.txt").write_text(TEXT * 30, encoding="utf-8")
    (root / "eval.txt").write_text(TEXT * 2, encoding="utf-8")
    (root / "article.txt").write_text(TEXT, encoding="utf-8")
    (root / "corpus").mkdir()
    (root / "corpus/a.txt").write_text(TEXT * 60, encoding="utf-8")
    (root / "corpus/b.jsonl").write_text("".join(json.dumps({"text": TEXT[i:] * 20}) + "\n" for i in range(0, 60, 7)))
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"context": "The sky is", "choices": [" blue", " a cat", " light"], "label": 0},
        {"context": "Hello, my name", "choices": [" is Ada", " sat"], "label": 0},
        {"context": "", "choices": [" Hi", " And"], "label": 1},
    ]))
    films = [("what a lovely film", "pos"), ("the sky is blue", "neg"), ("a cat sat by the sea", "pos"),
             ("hi there, how are you?", "neg"), ("let there be light", "pos"), ("said the critic", "neg")]
    # 36 rows: finetune's default batch is 32
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in films * 6))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in films[:4]))
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second
    thread waiting for a core makes each op wait too (a 20x slower generate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(base, tmp_path, monkeypatch):
    """A fresh copy of the workspace as the working directory (snippets write out/, runs/...)."""
    work = tmp_path / "work"
    shutil.copytree(base, work)
    monkeypatch.chdir(work)
    return work


# ---- the Python blocks ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Snippet:
    key: str  # a line of the block, unique to it in the README
    prelude: str = ""  # defines the names the block assumes
    subs: tuple = ()  # (old, new): what cannot run here; each must apply
    check: str = ""  # runs after the block, in its namespace: the claims of its comments


PRELUDE = "import torch, gptfast\n"

PYTHON = {
    "usage": Snippet(
        key='tok = gptfast.Tokenizer.from_pretrained("path/to/gpt2")',
        prelude=PRELUDE + "import transformers\n"
                          "hf_model = transformers.GPT2LMHeadModel.from_pretrained('path/to/gpt2')\n",
        subs=(('device="cuda"', 'device="cpu"'),  # bf16 runs on CPU: kept
              # the commented alternative, run under a name of its own
              ("# model = gptfast.GPT.from_pretrained(hf_model)",
               "model_of_hf = gptfast.GPT.from_pretrained(hf_model)")),
        check="""
assert model.transformer.wte.weight.dtype == torch.bfloat16
assert model_of_hf.transformer.wte.weight.dtype == torch.float32  # float32 unless dtype= is given
ref = gptfast.GPT.from_pretrained('path/to/gpt2')
x = torch.tensor([ids])
torch.testing.assert_close(model_of_hf(x), ref(x), rtol=0, atol=0)
assert logits.shape == (1, len(ids), model.config.vocab_size)
assert isinstance(rows, list) and len(rows) == 2
for prompt, row in zip(["The sky", "Once"], rows):  # same tokens as one prompt at a time
    assert row == model.generate(tok.encode(prompt), max_new_tokens=20, temperature=0)
assert loss.dim() == 0 and torch.isfinite(loss)
hf = transformers.GPT2LMHeadModel.from_pretrained("out/")  # loadable by transformers
hf_out = hf(x.to(torch.long)).logits
torch.testing.assert_close(hf_out.float(), logits.float(), rtol=0.05, atol=0.05)
saved = [p for p in Path(".").rglob("ckpt.pt")]
assert len(saved) == 1, saved
again = gptfast.GPT.from_pretrained(str(saved[0]))
assert again.config == model.config
"""),
    "speculative": Snippet(
        key='draft = gptfast.GPT.from_pretrained("path/to/gpt2")',
        prelude=PRELUDE + "big = gptfast.GPT.from_pretrained('path/to/gpt2-xl')\n"
                          "ids = gptfast.Tokenizer.from_pretrained('path/to/gpt2').encode('Once upon a time')\n",
        check="""
assert len(out) == len(ids) + 200 and out[:len(ids)] == ids
assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["rounds"] > 0
"""),
    "hf_patch": Snippet(
        key="gptfast.patch_transformers(model)",
        prelude=PRELUDE + "import transformers\ninput_ids = torch.randint(0, 250, (2, 19))\n",
        subs=((".cuda()", ""),),
        check="""
plain = transformers.GPT2LMHeadModel.from_pretrained("path/to/gpt2")
torch.testing.assert_close(loss, plain(input_ids, labels=input_ids).loss)
assert model.config._attn_implementation == "gptfast" and "forward" in vars(model)
assert gptfast.patch_transformers(model) is model  # the same object
gptfast.unpatch_transformers(model)
assert model.config._attn_implementation != "gptfast" and "forward" not in vars(model)
"""),
    "finetune": Snippet(
        key='clf = GPTClassifier.from_pretrained("runs/clf")',
        # runs/clf: a transformers GPT2ForSequenceClassification dir (the comment's alternative) with a tokenizer
        prelude=PRELUDE + """
from hf_utils import make_hf_classifier
make_hf_classifier("runs/clf", num_labels=2)
import shutil
for name in ("vocab.json", "merges.txt"):
    shutil.copy("path/to/gpt2/" + name, "runs/clf/" + name)
input_ids = torch.randint(0, 250, (3, 11))
lengths = torch.tensor([11, 4, 7])
labels = torch.tensor([1, 0, 1])
""",
        check="""
assert probs.shape == (1, 2)
torch.testing.assert_close(probs.sum(-1), torch.ones(1))
assert type(out).__name__ == "ClassifierOutput" and out.logits.shape == (3, 2)
torch.testing.assert_close(out.loss, out.task_loss + 0.5 * out.lm_loss)
"""),
}


def _apply(text: str, subs, where: str) -> str:
    for old, new in subs:
        assert old in text, (f"{where}: the substitution {old!r} -> {new!r} no longer applies; "
                             "update tests/test_readme.py")
        text = text.replace(old, new)
    return text


def _block_of(key: str, blocks) -> tuple[str, int]:
    hits = [(body, line) for body, line in blocks if key in body.splitlines() or key in body]
    assert hits, f"{README}: no ```python block holds the line {key!r} (deleted or changed?)"
    assert len(hits) == 1, f"{README}: {len(hits)} ```python blocks hold {key!r} (lines {[h[1] for h in hits]})"
    return hits[0]


@pytest.mark.parametrize("name", list(PYTHON))
def test_python_block(name, workdir):
    spec = PYTHON[name]
    body, line = _block_of(spec.key, python_blocks())
    where = f"README.md:{line} ({name})"
    namespace = {"__name__": f"readme_{name}", "Path": Path}
    exec(compile(spec.prelude, f"<prelude of {name}>", "exec"), namespace)
    code = "\n" * (line - 1) + _apply(body, spec.subs, where)  # tracebacks give the README's line numbers
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, README, "exec"), namespace)
    if spec.check:
        exec(compile(spec.check, f"<check of {name}>", "exec"), namespace)


# ---- the command lines ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Command:
    key: str  # text unique to the command in the README
    subs: tuple = ()  # (old, new) on the command text: what cannot run here; each must apply
    run: bool = True  # False: too slow for CPU in seconds, its flags are parsed only
    needs: tuple = ()  # commands (names) whose output it reads, run before it in the same directory
    check: object = None  # callable(stdout, stderr, directory, argv)
    exact: bool = False  # the key is the whole command (else: a part of it)


def _printed_prompt(prompt):
    def check(out, err, work, argv):
        assert out.startswith(prompt), out[:200]
    return check


def _check_stop_at_newline(out, err, work, argv):
    from gptfast.cli import build_parser
    assert build_parser().parse_args(argv).stop == ["\n"]  # "\n" in the shell: backslash and n
    generated = out[len("And God said\n"):]
    assert out.startswith("And God said\n") and "\n" not in generated.rstrip("\n"), repr(out)
    assert "[gptfast] loaded path/to/gpt2" in err and "tokens/s" in err  # -v


def _check_speculative(out, err, work, argv):
    assert "speculative:" in err and "drafts accepted" in err, err


def _check_info(out, err, work, argv):
    assert "GPT-2 (pre-LN)" in out and "layers 2, heads 2, width 32" in out and "files:" in out, out


def _check_train(run):
    def check(out, err, work, argv):
        summary = json.loads(out[out.index("{"):])
        assert summary, out
        for name in ("log.jsonl", "loss.png"):
            assert (work / run / name).is_file(), sorted(os.listdir(work / run))
        assert (work / run / "config.json").is_file() or (work / run / "ckpt.pt").is_file()
        assert (work / run / "checkpoints").is_dir()
    return check


def _check_prepare(out, err, work, argv):
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (work / "data/corpus" / name).is_file(), name


def _check_perplexity(out, err, work, argv):
    assert re.match(r"perplexity [\d.]+ over \d+ tokens", out), out


def _check_eval(out, err, work, argv):
    assert re.match(r"accuracy [\d.]+, accuracy_norm [\d.]+ on 3 examples", out), out


def _check_finetune(out, err, work, argv):
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(str(work / "runs/clf"))
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    for name in ("log.jsonl", "loss.png"):
        assert (work / "runs/clf" / name).is_file(), name


def _check_classify(out, err, work, argv):
    lines = out.strip().splitlines()
    assert len(lines) == 2 and {line.split()[1] for line in lines} == {"pos", "neg"}, out


TINY_TRAIN = " --steps 2 --block-size 32 --batch-size 2 --eval-every 2 --eval-batches 1"

COMMANDS = {
    "setup": Command('gptfast generate "Once upon a time"', exact=True, check=_printed_prompt("Once upon a time")),
    "generate": Command('gptfast generate "Once upon a time" -n 100 --temperature 0.8 --top-p 0.95 --seed 0',
                        check=_printed_prompt("Once upon a time")),
    "stdin": Command('echo "And God said" | gptfast generate --model path/to/gpt2 --stop "\\n" -v',
                     check=_check_stop_at_newline),
    "draft": Command("--model path/to/gpt2-xl --draft path/to/gpt2 -v", check=_check_speculative),
    "prompt-lookup": Command("--draft prompt-lookup -v",
                             subs=(('"$(cat article.txt) TL;DR:"', shlex.quote(TEXT + " TL;DR:")),),
                             check=_check_speculative),
    "backends": Command("gptfast backends", check=lambda out, err, work, argv: "device:" in out and "sample" in out),
    "info": Command("gptfast info [MODEL]", subs=(("[MODEL]", "path/to/gpt2"),), check=_check_info),
    "train": Command("gptfast train --data book.txt --out runs/mine",
                     subs=(("--steps 1000", TINY_TRAIN),), check=_check_train("runs/mine")),
    "prepare": Command("gptfast prepare corpus/ --out data/corpus --tokenizer path/to/gpt2", check=_check_prepare),
    # the 124M preset, torch.compile: parsed as written, run from the tiny checkpoint without compiling
    "train-corpus": Command("gptfast train --data data/corpus --out runs/big --init gpt2",
                            subs=(("--init gpt2", "--init path/to/gpt2"), (" --compile", TINY_TRAIN)),
                            needs=("prepare",), check=_check_train("runs/big")),
    "perplexity": Command("gptfast perplexity eval.txt --model runs/mine", needs=("train",), check=_check_perplexity),
    "perplexity-corpus": Command("gptfast perplexity data/corpus --model runs/big --batch-size 16",
                                 needs=("train-corpus",), check=_check_perplexity),
    "eval": Command("gptfast eval hellaswag.jsonl --model path/to/gpt2", check=_check_eval),
    "finetune": Command("gptfast finetune --data train.jsonl --val val.jsonl --out runs/clf --model path/to/gpt2",
                        check=_check_finetune),
    "classify": Command('gptfast classify "what a lovely film" --model runs/clf', needs=("finetune",),
                        check=_check_classify),
    # the benchmark suite takes minutes; --update-readme would rewrite README.md
    "bench-quick": Command("gptfast bench --quick", run=False, exact=True),
    "bench": Command("gptfast bench", run=False, exact=True),
    "bench-readme": Command("gptfast bench --update-readme", run=False, exact=True),
}


DEVICE_COMMANDS = ("generate", "train", "perplexity", "eval", "finetune", "classify")  # those with --device


def _owners(command: str) -> list[str]:
    return [name for name, c in COMMANDS.items() if (c.key == command if c.exact else c.key in command)]


def _command_of(name: str, commands) -> tuple[str, int]:
    """The README's command that COMMANDS[name] is for (the same command may be written twice)."""
    key = COMMANDS[name].key
    hits = [(c, line) for c, line in commands if name in _owners(c)]
    assert hits, f"{README}: no command {'is' if COMMANDS[name].exact else 'holds'} {key!r} (deleted or changed?)"
    texts = sorted({c for c, _ in hits})
    assert len(texts) == 1, f"{README}: several commands hold {key!r}: {texts}"
    return hits[0]


def _argv(command: str) -> tuple[list[str], str | None]:
    """(arguments after `gptfast`, standard input) of `[echo X |] gptfast ARGS`."""
    stdin = None
    words = shlex.split(command)
    if words[0] == "echo":
        bar = words.index("|")
        stdin = " ".join(words[1:bar]) + "\n"
        words = words[bar + 1:]
    assert words[0] == "gptfast", command
    return words[1:], stdin


def _parse(argv: list[str]) -> None:
    """argparse accepts the command's flags (it exits, saying which, if not)."""
    if argv[0] == "bench":
        from gptfast.ops._dispatch import import_source_package
        import_source_package("bench", "bench")
        from gptfast.bench.cli import parse_args
        parse_args(argv[1:])
    else:
        from gptfast.cli import build_parser
        build_parser().parse_args(argv)


def _parses(command: str, argv: list[str], capsys) -> None:
    try:
        _parse(argv)
    except SystemExit as exc:
        raise AssertionError(f"`{command}`: the command line is refused: {capsys.readouterr().err}") from exc


def _run_command(name: str, work: Path, monkeypatch, capsys, done: set) -> None:
    spec = COMMANDS[name]
    for need in spec.needs:
        if need not in done:
            _run_command(need, work, monkeypatch, capsys, done)
    command, line = _command_of(name, shell_commands())
    _parses(command, _argv(command)[0], capsys)  # as written
    if not spec.run:
        return
    argv, stdin = _argv(_apply(command, spec.subs, f"README.md:{line} ({name})"))
    if torch.cuda.is_available() and argv[0] in DEVICE_COMMANDS:
        argv += ["--device", "cpu"]  # as the Python blocks: CPU, not a GPU's first-call autotuning
    from gptfast.cli import main
    capsys.readouterr()
    with monkeypatch.context() as m:
        if stdin is not None:
            m.setattr("sys.stdin", io.StringIO(stdin))
        rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"README.md:{line}: `{command}` exited with {rc}:\n{err[-3000:]}"
    if spec.check is not None:
        assert spec.check(out, err, work, argv) is not False, f"README.md:{line}: `{command}`:\n{out[-2000:]}"
    done.add(name)


@pytest.fixture(scope="module")
def shell(base, tmp_path_factory):
    """One directory for all the commands, as a user runs them one after another (perplexity reads
    the run train wrote); the names of those that ran."""
    work = tmp_path_factory.mktemp("readme-shell") / "work"
    shutil.copytree(base, work)
    return work, set()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command(name, shell, monkeypatch, capsys):
    work, done = shell
    monkeypatch.chdir(work)
    if name not in done:
        _run_command(name, work, monkeypatch, capsys, done)


# ---- coverage: every snippet is keyed, every key is in the README -----------------------------

def test_every_readme_snippet_is_tested():
    blocks = python_blocks()
    untested = [line for body, line in blocks if not any(s.key in body for s in PYTHON.values())]
    assert not untested, f"README.md: the ```python blocks at lines {untested} have no Snippet in tests/test_readme.py"
    commands = shell_commands()
    untested = [(c, line) for c, line in commands if not _owners(c)]
    assert not untested, f"README.md: commands with no Command in tests/test_readme.py: {untested}"
    ambiguous = [(c, _owners(c)) for c, line in commands if len(_owners(c)) > 1]
    assert not ambiguous, f"README.md: commands that several Commands claim: {ambiguous}"


def test_every_snippet_is_in_the_readme():
    blocks = python_blocks()
    for spec in PYTHON.values():
        _block_of(spec.key, blocks)
    commands = shell_commands()
    for name in COMMANDS:
        _command_of(name, commands)
