"""The sampler settings and the cost figures of one reply: plain data, no llama_cpp, so a
client of `wizardchat serve` (serve/client.py) uses the very same types without loading it."""

from __future__ import annotations

from dataclasses import dataclass

from wizardchat.settings import Settings


@dataclass(frozen=True)
class Sampling:
    """Sampler settings for one reply (llama.cpp's names and meanings)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0

    @classmethod
    def of(cls, settings: Settings) -> Sampling:
        """The sampler settings a run's Settings give."""
        return cls(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            min_p=settings.min_p,
            repeat_penalty=settings.repeat_penalty,
        )


@dataclass
class GenerationStats:
    """What one reply cost; filled in while the stream runs."""

    prompt_tokens: int = 0
    evaluated_tokens: int = 0  # prompt tokens the KV cache lacked and llama.cpp evaluated
    completion_tokens: int = 0
    prompt_seconds: float = 0.0  # from the call to the first token
    decode_seconds: float = 0.0  # from the first token to the last
    finish: str = ""  # "eos", "length", "stop" or "interrupted"

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second after the first one."""
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def timings(self) -> dict[str, float]:
        """The timing figures as plain numbers (for --json)."""
        prompt_tps = self.evaluated_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        return {
            "prompt_seconds": round(self.prompt_seconds, 4),
            "prompt_tokens_per_second": round(prompt_tps, 2),
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
        }
