"""Generate tiny Mixtral-architecture GGUF models for tests and benchmarks (nothing is committed).

The layout is WizardLM-2's in miniature: arch `llama`, 8 experts with 2 used, merged
`ffn_{gate,up,down}_exps` tensors, a router per block, and an SPM vocabulary with the 256 byte
tokens so any text tokenizes.

Two flavours:
- "random": random weights; generates arbitrary tokens (load, speed and MoE-placement tests).
- "scripted": attention and expert weights are zero, so each layer passes the token embedding
  through unchanged and the next token depends only on the current one. One-hot embeddings and a
  matching output matrix then make the model follow a fixed successor table, deterministically
  even when sampling: after the prompt's final `:` it answers with `SCRIPT_REPLY` and EOS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BOS, EOS = 1, 2
N_EXPERT, N_EXPERT_USED = 8, 2
_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant The gives helpful "
    "detailed polite answers to the user's questions USER ASSISTANT Hello world Hi Who are you "
    "I am WizardLM What is two plus three The answer five Tell me more about it sure"
)
WORDS = _TEXT.split()
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()"
# The tokens the scripted model answers with; bytes E2 82 AC are the euro sign split over three
# byte tokens, so streaming must carry incomplete UTF-8 from one token to the next.
SCRIPT_PIECES = ("▁Hello", ",", "▁world", "!", "▁", "<0xE2>", "<0x82>", "<0xAC>", "5")
SCRIPT_REPLY = "Hello, world! €5"
# A variant that starts a new user turn instead of stopping: "Hi\nUSER: Hi\nUSER: ..."
USER_TURN_PIECES = ("▁Hi", "<0x0A>", "USER", ":")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the tiny SPM vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # unknown, control, control
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # byte
    pieces: list[str] = ["▁", *CHARS]
    for word in WORDS:
        for piece in ("▁" + word, word):
            # SPM merges pairwise, so every prefix of a piece must be a token too.
            pieces += [piece[:k] for k in range(2, len(piece) + 1)]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(1)  # normal
    # Longer pieces win merges; llama.cpp picks the highest score first.
    scores = [0.0] * 259 + [float(len(t)) for t in tokens[259:]]
    return tokens, scores, types


def write_model(
    path: Path,
    *,
    flavour: str = "scripted",
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    split_max_tensors: int = 0,
    seed: int = 0,
    weight_scale: float = 0.02,
    script: tuple[str, ...] = SCRIPT_PIECES,
    chat_template: str | None = None,
    vocab_only: bool = False,
) -> Path:
    """Write a tiny MoE GGUF (F32) and return the path to load (the first shard when split).

    `chat_template` embeds a tokenizer.chat_template; `vocab_only` writes the header without
    any tensor, as llama.cpp's vocab-only GGUFs are.
    """
    import gguf

    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * weight_scale).astype(np.float32)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    tensors: dict[str, np.ndarray] = {}
    n_embd_kv = n_embd // n_head * n_head_kv
    weights = zeros if flavour == "scripted" else rand
    for i in range(n_layer):
        b = f"blk.{i}"
        tensors[f"{b}.attn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        tensors[f"{b}.attn_q.weight"] = weights(n_embd, n_embd)
        tensors[f"{b}.attn_k.weight"] = weights(n_embd_kv, n_embd)
        tensors[f"{b}.attn_v.weight"] = weights(n_embd_kv, n_embd)
        tensors[f"{b}.attn_output.weight"] = weights(n_embd, n_embd)
        tensors[f"{b}.ffn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        tensors[f"{b}.ffn_gate_inp.weight"] = weights(N_EXPERT, n_embd)
        tensors[f"{b}.ffn_gate_exps.weight"] = weights(N_EXPERT, n_ff, n_embd)
        tensors[f"{b}.ffn_up_exps.weight"] = weights(N_EXPERT, n_ff, n_embd)
        tensors[f"{b}.ffn_down_exps.weight"] = weights(N_EXPERT, n_embd, n_ff)
    tensors["output_norm.weight"] = np.ones(n_embd, dtype=np.float32)
    if flavour == "scripted":
        embd, out = _successor_table(tokens, n_embd, script)
    else:
        embd, out = rand(n_vocab, n_embd) * 50, rand(n_vocab, n_embd) * 50
    tensors["token_embd.weight"] = embd
    tensors["output.weight"] = out

    writer = gguf.GGUFWriter(
        str(path), "llama", split_max_tensors=split_max_tensors, small_first_shard=False
    )
    writer.add_name(f"tiny-wizardlm-{flavour}")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(1e6)
    writer.add_expert_count(N_EXPERT)
    writer.add_expert_used_count(N_EXPERT_USED)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, data in {} if vocab_only else tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        first = sorted(path.parent.glob(path.stem + "-00001-of-*.gguf"))
        return first[0]
    return path


def _successor_table(
    tokens: list[str], n_embd: int, script: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and output rows so that after `:` the model says `script`, then EOS.

    State 0 is shared by every token outside the script and leads to `script[0]` when it is
    the prompt's `:` (which has its own state) or to EOS otherwise; state k+1 is script[k].
    """
    index = {t: i for i, t in enumerate(tokens)}
    n_vocab = len(tokens)
    if len(script) + 2 > n_embd:
        raise ValueError("script longer than the embedding can encode")
    state = np.zeros(n_vocab, dtype=np.int64)  # everything else: state 0
    colon_state = 1
    state[index[":"]] = colon_state
    successor: dict[int, int] = {0: EOS, colon_state: index[script[0]]}
    for k, piece in enumerate(script):
        s = k + 2
        if state[index[piece]] != 0 and piece != ":":
            raise ValueError(f"piece {piece!r} appears twice in the script")
        if piece != ":":
            state[index[piece]] = s
            successor[s] = index[script[k + 1]] if k + 1 < len(script) else EOS
    embd = np.zeros((n_vocab, n_embd), dtype=np.float32)
    embd[np.arange(n_vocab), state] = 1.0
    out = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for s, tok in successor.items():
        # RMS-normed one-hot is sqrt(n_embd) on its axis; 4 * 8 = a logit of 32 over the rest.
        out[tok, s] = 4.0
    return embd, out
