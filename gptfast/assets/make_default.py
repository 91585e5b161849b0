"""Recipe of the shipped default model (gptfast/assets/default/): the exact steps that made it.

1. Text: the King James Version of the Bible (1611, public domain; Debian's copyright file
   for the package says "The copyright for the King James Version text of the Bible is
   expired"), from the Debian package bible-kjv-text 4.38, read with its program bible-kjv:
       apt-get install bible-kjv
       bible "Gen1:1-Rev22:21" > kjv_raw.txt
2. Clean: python -m gptfast.assets.make_default clean kjv_raw.txt kjv.txt
   (drops book/chapter headings and verse numbers; one paragraph per chapter).
3. Train (CPU, 2 cores, about 15 minutes):
       python -m gptfast.assets.make_default train kjv.txt
   which runs the `gptfast train` command recorded in TRAIN_CMD below, then copies the model
   and tokenizer into gptfast/assets/default/ with this provenance in config.json.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

TRAIN_ARGS = ["--vocab-size", "4096", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
              "--block-size", "256", "--batch-size", "16", "--steps", "1500", "--lr", "3e-3",
              "--min-lr", "3e-4", "--warmup", "50", "--eval-every", "250", "--seed", "1337", "--device", "cpu"]
HERE = os.path.dirname(os.path.abspath(__file__))


def clean(src: str, dst: str) -> None:
    chapters, verse = [], []
    with open(src, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if re.fullmatch(r"\S.*\s\d+", line):  # "Genesis 1": a new chapter
                if verse:
                    chapters.append(" ".join(verse))
                verse = []
                continue
            text = re.sub(r"^\s+\d+\s", "", line).strip()
            if text:
                verse.append(text)
    if verse:
        chapters.append(" ".join(verse))
    with open(dst, "w", encoding="utf-8") as f:
        f.write("\n\n".join(chapters) + "\n")
    print(f"{len(chapters)} chapters, {os.path.getsize(dst)} bytes -> {dst}")


def train(text: str) -> None:
    import json

    run = os.path.join("runs", "default-kjv")
    cmd = [sys.executable, "-m", "gptfast.cli", "train", "--data", text, "--out", run] + TRAIN_ARGS
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    dst = os.path.join(HERE, "default")
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png"):
        shutil.copy(os.path.join(run, name), os.path.join(dst, name))
    with open(os.path.join(dst, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"), encoding="utf-8")]
    last_val = [e for e in log if "val_loss" in e][-1]
    cfg["gptfast"] = {
        "name": "gptfast-default-kjv",
        "trained_on": "King James Version of the Bible (public domain), Debian package bible-kjv-text 4.38",
        "command": "gptfast train --data kjv.txt --out runs/default-kjv " + " ".join(TRAIN_ARGS),
        "recipe": "gptfast/assets/make_default.py",
        "final_val_loss": round(last_val["val_loss"], 4),
        "final_val_perplexity": round(last_val["val_ppl"], 2),
    }
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    print(f"default model written to {dst}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "clean":
        clean(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "train":
        train(sys.argv[2])
    else:
        sys.exit(__doc__)
