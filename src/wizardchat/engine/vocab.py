"""What a llama.cpp vocabulary does to a whole prompt: BOS or not, the EOS text, the space prefix.

llama.cpp tokenizes a prompt in fragments split at special tokens (llama-vocab.cpp,
`llama_vocab::impl::tokenize`). A SentencePiece vocabulary with `add_space_prefix` (Llama's,
WizardLM-2's) puts a space before a fragment that starts the text or follows a special token; a
BPE vocabulary (Llama 3's, SmolLM2's) never does. BOS comes first only when the vocabulary says
so (the file's `tokenizer.ggml.add_bos_token`, else llama.cpp's default for its tokenizer). The
chat's history is built from these facts so that it is, token for token, what llama.cpp makes of
the prompt as it is shown.
"""

from __future__ import annotations

import ctypes
from typing import Any

from wizardchat.engine.llama_lib import lib


def adds_bos(vocab: Any) -> bool:
    """Whether llama.cpp puts BOS before a prompt tokenized with this vocabulary."""
    return bool(lib.llama_vocab_get_add_bos(vocab))


def piece(vocab: Any, token: int, *, special: bool) -> bytes:
    """A token's bytes as llama.cpp writes it (`special`: control tokens as their text)."""
    size = 32
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_token_to_piece(vocab, token, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n  # too small: llama.cpp says how much it needs


def token_text(vocab: Any, token: int) -> str:
    """A special token's text (`</s>`, `<|im_end|>`): what a prompt writes for it."""
    return piece(vocab, token, special=True).decode("utf-8", errors="replace")


def tokenize(vocab: Any, text: str) -> list[int]:
    """`text` tokenized as llama.cpp tokenizes a prompt alone: no BOS, special text kept text."""
    data = text.encode("utf-8")
    n_max = len(data) + 8  # never more tokens than bytes, plus a space prefix
    out = (lib.llama_token * n_max)()
    n = lib.llama_tokenize(vocab, data, len(data), out, n_max, False, False)
    if n < 0:
        raise ValueError(f"tokenization of {len(data)} bytes gave over {n_max} tokens")
    return list(out[:n])


def adds_space_prefix(vocab: Any) -> bool:
    """Whether llama.cpp puts a space before a fragment that starts a prompt or follows a
    special token: found by tokenizing `a` and reading back what the tokens spell.

    The C API does not expose the vocabulary's add_space_prefix, and the GGUF key may be
    absent (llama.cpp's default for the tokenizer applies): the tokenizer itself says it."""
    spelled = b"".join(piece(vocab, t, special=False) for t in tokenize(vocab, "a"))
    return spelled == b" a"
