"""Building wizardchat's wheel: what `pip install .` shows before llama.cpp compiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_building_the_wheel_prints_no_deprecation_banner(tmp_path: Path) -> None:
    # A copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    # --no-build-isolation uses the setuptools of this venv (the dev extra pins the one pip's
    # isolated build would fetch), so the test needs no network.
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "deprecated" not in log.lower(), log[-3000:]
    (wheel,) = tmp_path.glob("wizardchat-*.whl")
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
        assert any(n.endswith("licenses/LICENSE") for n in z.namelist())
    assert "License-Expression: MIT" in metadata
