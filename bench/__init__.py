"""gptfast.bench: the benchmark suite (installed from bench/ by setup.py).

Run it with `gptfast bench` or `python -m gptfast.bench`; see bench/README.md. Importing
this package is light: nothing is timed and nothing touches CUDA until cli.main runs.
"""
