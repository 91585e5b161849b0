"""Triton kernels of gptfast, installed as gptfast.kernels.

A kernel file holds kernels and their autotune configs only; launchers, autograd
and torch.library registration live in gptfast/ops/. Importing this package
imports nothing from Triton: each kernel module does, when it is used.
"""
