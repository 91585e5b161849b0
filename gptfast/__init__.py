"""gptfast: a fast, correct GPT-1/GPT-2 runtime in PyTorch.

    import gptfast
    model = gptfast.GPT.from_pretrained("path/to/hf-gpt2-dir")
    tok = gptfast.Tokenizer.from_pretrained("path/to/hf-gpt2-dir")
    out = model.generate(tok.encode("Hello"), max_new_tokens=20)
"""
from . import ops
from .config import GPTConfig
from .ops import backends, use_backend

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "KVCache", "PromptLookup", "Tokenizer", "ops", "backends", "use_backend",
           "patch_transformers", "unpatch_transformers", "__version__"]


def __getattr__(name):  # lazy: keep `import gptfast` light for the CLI
    if name in ("GPT", "KVCache"):
        from . import model
        return getattr(model, name)
    if name == "PromptLookup":
        from .speculative import PromptLookup
        return PromptLookup
    if name in ("patch_transformers", "unpatch_transformers"):
        from . import hf_patch
        return getattr(hf_patch, name)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
