"""A byte-level tokenizer of 256 tokens, the tiny model's vocabulary: what a command that needs a tokenizer (a GGUF
export, generate) runs the tiny model with."""

import pytest

from reffuse.formats.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    """One token per byte, no merges, no special tokens and no chat template."""
    tk = pytest.importorskip("tokenizers")
    alphabet = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    backend = tk.Tokenizer(tk.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk.decoders.ByteLevel()
    return Tokenizer(backend, None, None, None, False, "bytes")
