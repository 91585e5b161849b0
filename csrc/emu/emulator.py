"""Build and run the CPU emulation of the CUDA sampling kernels (see README.md).

build(build_dir) copies csrc/sampling_common.h, csrc/sampling_kernel.cuh and
csrc/sampling_cluster.cuh into build_dir (the source tree is never written), rewrites the
kernels' ``__shared__`` declarations into calls of the emulator (emu.h) and compiles
emu_sample.cpp against the copies. run() feeds one batch to the executable (one process
per call, so a crash or a detected protocol error cannot take the caller down).

    python3 csrc/emu/emulator.py BUILD_DIR      # builds, prints the executable's path
"""
from __future__ import annotations

import bisect
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

EMU_DIR = Path(__file__).resolve().parent
CSRC = EMU_DIR.parent
KERNEL_HEADERS = ("sampling_kernel.cuh", "sampling_cluster.cuh")  # rewritten
PLAIN_HEADERS = ("sampling_common.h",)                            # copied as they are
CXXFLAGS = ["-std=c++20", "-O2", "-ffp-contract=off"]
DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class ToolchainUnavailable(RuntimeError):
    """No C++ compiler that can build the emulator here (callers may skip)."""


class RewriteError(RuntimeError):
    """A kernel's __shared__ declarations no longer have a shape the rewrite knows."""


class EmulatorError(RuntimeError):
    """The emulated kernel failed: a detected protocol error, a crash or a timeout."""


# Comments and string literals, skipped when looking for __shared__.
_NOT_CODE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.S)
# `[extern] __shared__ TYPE NAME[ARRAY];` on one line (one declarator: see _is_type).
_DECLARATION = re.compile(
    r"(?:(?P<extern>\bextern)[ \t]+)?(?P<keyword>\b__shared__)[ \t]+(?P<type>[A-Za-z_][\w:<>, \t]*?)[ \t]+"
    r"(?P<name>[A-Za-z_]\w*)[ \t]*(?P<array>\[[^\];\n]*\])?[ \t]*;")


def _is_type(text: str) -> bool:
    """Balanced <> and no comma outside them: `Foo<A, B>`, not `float a, b` (two declarators)."""
    depth = 0
    for ch in text:
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if depth < 0 or (ch == "," and depth == 0):
            return False
    return depth == 0


def rewrite_shared(source: str, filename: str, first_id: int = 0) -> tuple[str, int]:
    """Every __shared__ declaration in `source`, rewritten for emu.h; returns (text, count).

    `__shared__ T s;` / `__shared__ T a[N];` -> `auto& s = emu::shared<T, id>();` (the
    running block's own copy; `id` tells the declarations apart), and
    `extern __shared__ T x[];` -> `T* x = emu::dyn_shared<T>();`. Any other use of
    __shared__ in code raises RewriteError naming the line, as does a file without one:
    an edit of a kernel must not silently bypass the emulation of its shared memory.
    """
    skip = [(m.start(), m.end()) for m in _NOT_CODE.finditer(source)]
    starts = [s for s, _ in skip]

    def is_code(pos: int) -> bool:
        i = bisect.bisect_right(starts, pos) - 1
        return i < 0 or pos >= skip[i][1]

    def where(pos: int) -> str:
        line = source.count("\n", 0, pos) + 1
        return f"{filename}:{line}: {source.splitlines()[line - 1].strip()!r}"

    declarations = [m for m in _DECLARATION.finditer(source) if is_code(m.start("keyword")) and _is_type(m["type"])]
    understood = {m.start("keyword") for m in declarations}
    for keyword in re.finditer(r"\b__shared__\b", source):
        if is_code(keyword.start()) and keyword.start() not in understood:
            raise RewriteError(f"{where(keyword.start())}: a use of __shared__ the emulator's rewrite "
                               f"(csrc/emu/emulator.py:rewrite_shared) does not understand; extend it")
    if not declarations:
        raise RewriteError(f"{filename}: no __shared__ declaration found, but the kernels declare their "
                           f"shared memory there: the file has changed shape, check "
                           f"csrc/emu/emulator.py:rewrite_shared")
    pieces, end = [], 0
    for i, m in enumerate(declarations):
        type_, name, array = m["type"].strip(), m["name"], m["array"] or ""
        if m["extern"]:
            if array != "[]":
                raise RewriteError(f"{where(m.start())}: extern __shared__ must be an unsized array")
            new = f"{type_}* {name} = emu::dyn_shared<{type_}>();"
        else:
            new = f"auto& {name} = emu::shared<{type_}{array}, {first_id + i}>();"
        pieces += [source[end:m.start()], new]
        end = m.end()
    return "".join(pieces) + source[end:], len(declarations)


def _compiler() -> str:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolchainUnavailable(f"the emulator's fiber switch is x86-64 Linux only (this is "
                                   f"{sys.platform} {platform.machine()})")
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise ToolchainUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    return path


def _probe(cxx: str, build_dir: Path) -> None:
    """Compiles a trivial C++20 program: tells a missing toolchain from a broken build."""
    src = build_dir / "probe.cpp"
    src.write_text("#include <cstdio>\n#include <vector>\n"
                   "int main() { std::vector<int> v{1}; std::printf(\"%d\", v[0]); }\n")
    proc = subprocess.run([cxx, *CXXFLAGS, str(src), "-o", str(build_dir / "probe")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainUnavailable(f"{cxx} cannot compile a trivial C++20 program:\n{proc.stderr[-2000:]}")


def build(build_dir) -> Path:
    """Builds the emulator into build_dir; returns the executable.

    Raises ToolchainUnavailable when this machine cannot compile C++20 at all, RewriteError
    or RuntimeError (with the compiler's output) when the kernels or the emulator do not build.
    """
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    cxx = _compiler()
    _probe(cxx, build_dir)
    src = build_dir / "src"
    src.mkdir(exist_ok=True)
    for name in PLAIN_HEADERS:
        shutil.copyfile(CSRC / name, src / name)
    next_id = 0
    for name in KERNEL_HEADERS:
        text, n = rewrite_shared((CSRC / name).read_text(), f"csrc/{name}", first_id=next_id)
        next_id += n
        # diagnostics point at the original file (same line numbers: the rewrite keeps lines)
        (src / name).write_text(f'#line 1 "{CSRC / name}"\n{text}')
    exe = build_dir / "emu_sample"
    cmd = [cxx, *CXXFLAGS, "-I", str(EMU_DIR / "stub"), "-I", str(EMU_DIR), "-I", str(src),
           str(EMU_DIR / "emu_sample.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the kernel emulator failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    return exe


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def run(exe, logits, temperature, top_k, top_p, min_p, keys, *, blocks: int, return_probs: bool,
        seed: int = 0, timeout: float = 300.0):
    """The emulated kernels on one batch: `blocks` = 1 (one block per row) or 2, 4, 8 (a cluster).

    Arguments as torch.ops.gptfast.sample, CPU tensors; logits [B, V] need a unit inner stride
    (any row stride: the kernels take it). `seed` picks the schedule and the initial shared
    memory. Returns (tokens int64 [B], probs float32 [B, V] or None) as the kernel left them:
    the executable fills them with -7 and -1 first, so unwritten elements show.
    """
    batch, vocab = logits.shape
    if logits.dtype not in DTYPES:
        raise ValueError(f"logits dtype must be one of {list(DTYPES)}, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have a unit inner stride, got strides {logits.stride()}")
    row_stride = logits.stride(0) if batch > 1 else vocab
    rows = logits.as_strided(((batch - 1) * row_stride + vocab,), (1,))
    payload = b"".join([_raw(rows), _raw(temperature.float()), _raw(top_k.long()), _raw(top_p.float()),
                        _raw(min_p.float()), _raw(keys.long())])
    cmd = [str(exe), DTYPES[logits.dtype], str(blocks), str(batch), str(vocab), str(row_stride),
           str(int(return_probs)), str(seed)]
    try:
        proc = subprocess.run(cmd, input=payload, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulatorError(f"{' '.join(cmd)}: no result after {timeout:.0f} s (a kernel loop that never ends?)")
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        raise EmulatorError(f"{' '.join(cmd)}: {how}\n{proc.stderr.decode(errors='replace')[-4000:]}")
    want = 8 * batch + (4 * batch * vocab if return_probs else 0)
    if len(proc.stdout) != want:
        raise EmulatorError(f"{' '.join(cmd)}: {len(proc.stdout)} bytes of output, expected {want}")
    tokens = torch.frombuffer(bytearray(proc.stdout[:8 * batch]), dtype=torch.int64)
    probs = (torch.frombuffer(bytearray(proc.stdout[8 * batch:]), dtype=torch.float32).view(batch, vocab)
             if return_probs else None)
    return tokens, probs


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} BUILD_DIR")
    print(build(sys.argv[1]))
