"""Seeded random byte flips in the header of a generated model: every case ends with a clean
one-line error or a working load, never a signal, an abort or "unexpected error".

Most cases are checked in-process with the header reader alone (milliseconds each); a seeded
subset of those the reader lets through is loaded by the real `wizardchat ask` in a subprocess.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import WIZARDCHAT, Models

from wizardchat.errors import ExitCode, WizardchatError
from wizardchat.gguf_file import inspect_model, read_header

SEED = int(os.environ.get("GGUF_FUZZ_SEED", "20261201"))  # another seed explores more cases
CASES = 400  # header-reader cases: ~6 s
LOADED = 16  # of which this many (that pass the reader) are loaded by llama.cpp: ~3 s each
LOAD_TIMEOUT = 60
# Exit codes a bad model may end with; 1 is "unexpected error" and never acceptable.
CLEAN_CODES = {ExitCode.OK, ExitCode.BAD_MODEL, ExitCode.LOAD_FAILED, ExitCode.CONTEXT}


def structural_offsets(path: Path) -> list[int]:
    """Byte offsets of the header outside the long vocabulary arrays' items: lengths, types,
    counts, scalar values and tensor descriptions, where a flip changes the file's structure."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    offsets: list[int] = []
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    for field in fields:
        parts = field.parts if len(field.parts) < 64 else field.parts[:5]  # the array's head
        for part in parts:
            start = part.ctypes.data - base
            offsets.extend(range(start, start + part.nbytes))
    return offsets


def mutate(data: bytes, rng: random.Random, header_end: int, structural: list[int]) -> bytes:
    """Flip 1-3 bytes: mostly in the header's structure, sometimes anywhere in the header."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.choice(structural) if rng.random() < 0.75 else rng.randrange(header_end)
        out[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.6 else rng.randrange(1, 256)
    return bytes(out)


def one_clean_line(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("wizardchat: error: ")


def test_random_header_flips_end_cleanly(models: Models, tmp_path: Path) -> None:
    original = models.scripted.read_bytes()
    header_end = read_header(models.scripted).data_offset
    structural = [o for o in structural_offsets(models.scripted) if o < header_end]
    rng = random.Random(SEED)
    passed: list[Path] = []
    refused = 0
    for case in range(CASES):
        path = tmp_path / f"case{case:03d}.gguf"
        path.write_bytes(mutate(original, rng, header_end, structural))
        try:
            inspect_model(path)
        except WizardchatError as e:
            assert e.exit_code == ExitCode.BAD_MODEL, f"case {case}: {e!r}"
            assert "\n" not in str(e)
            refused += 1
            path.unlink()
            continue
        passed.append(path)
    assert refused > CASES // 4  # the flips do hit the structure

    results = []
    for path in rng.sample(passed, min(LOADED, len(passed))):
        try:
            proc = subprocess.run(
                [WIZARDCHAT, "ask", "-m", str(path), "-c", "256", "-n", "4", "Hi"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=LOAD_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{path.name}: no answer within {LOAD_TIMEOUT} s")
        results.append((path.name, proc.returncode, proc.stderr))
        assert proc.returncode in CLEAN_CODES, (path.name, proc.returncode, proc.stderr[-2000:])
        assert "internal error" not in proc.stderr, (path.name, proc.stderr)
        if proc.returncode != 0:
            assert one_clean_line(proc.stderr), (path.name, proc.stderr[-2000:])
            assert proc.stdout == ""
    assert results
