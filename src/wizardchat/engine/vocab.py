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

from wizardchat.engine.context import ModelContext
from wizardchat.engine.llama_lib import lib


def adds_bos(llm: ModelContext) -> bool:
    """Whether llama.cpp puts BOS before a prompt tokenized with this vocabulary."""
    return bool(lib.llama_vocab_get_add_bos(llm.vocab))


def token_text(llm: ModelContext, token: int) -> str:
    """A special token's text (`</s>`, `<|im_end|>`): what a prompt writes for it."""
    return llm.piece(token, special=True).decode("utf-8", errors="replace")


def adds_space_prefix(llm: ModelContext) -> bool:
    """Whether llama.cpp puts a space before a fragment that starts a prompt or follows a
    special token: found by tokenizing `a` and reading back what the tokens spell.

    The C API does not expose the vocabulary's add_space_prefix, and the GGUF key may be
    absent (llama.cpp's default for the tokenizer applies): the tokenizer itself says it."""
    return llm.detokenize(llm.tokenize(b"a", add_bos=False)) == b" a"
