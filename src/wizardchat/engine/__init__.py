"""The only package that imports llama_cpp: loading, expert placement and token generation."""

import os

# Before aborting, ggml runs gdb on the process and prints its backtrace (to stdout, in the
# middle of a reply). wizardchat reports ggml's aborts in one line instead (engine.model's abort
# handler); a user who set the switch either way keeps it. ggml reads it at abort time.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")
