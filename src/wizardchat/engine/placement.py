"""The C array of expert placement: plan/placement.py's overrides as tensor_buft_overrides.

llama-cpp-python 0.3.36 declares `llama_model_params.tensor_buft_overrides` as an unused
c_void_p and has no parameter for it, so wizardchat builds the C array itself: a NULL-terminated
array of `{const char *pattern; ggml_backend_buffer_type_t buft;}`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from wizardchat.errors import UsageError
from wizardchat.plan.placement import Override


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class OverrideArray:
    """The C array for llama_model_params.tensor_buft_overrides; keep it alive with the model."""

    def __init__(self, overrides: Sequence[Override], buffers: dict[str, int]) -> None:
        self.overrides = list(overrides)
        # The pattern bytes must outlive the array: llama.cpp reads them while loading.
        self._patterns = [o.pattern.encode() for o in self.overrides]
        self._array = (_BuftOverride * (len(self.overrides) + 1))()
        for i, (o, pattern) in enumerate(zip(self.overrides, self._patterns, strict=True)):
            if o.buffer not in buffers:
                raise UsageError(
                    f"unknown buffer type '{o.buffer}' in {o.pattern}={o.buffer}; "
                    f"available here: {', '.join(sorted(buffers)) or 'none'}"
                )
            self._array[i].pattern = pattern
            self._array[i].buft = buffers[o.buffer]
        # The last element stays zeroed: the NULL pattern that ends the list.

    @property
    def address(self) -> int | None:
        """Pointer to pass in the params, or None (NULL) when there are no overrides."""
        return ctypes.addressof(self._array) if self.overrides else None
