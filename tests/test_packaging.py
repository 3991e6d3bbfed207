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


def _third_party_imports() -> set[str]:
    """Top-level modules that src/ imports and that neither the standard library nor
    wizardchat provides."""
    import ast

    found: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    # msvcrt is Windows' standard library: absent from this Linux list, never a package.
    return found - set(sys.stdlib_module_names) - {"wizardchat", "msvcrt"}


def test_every_imported_package_is_declared_and_the_installed_versions_satisfy_it() -> None:
    import importlib.metadata as metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # The serve extra's packages are imported by serve/http_api.py alone (`serve --http`).
    extras = project["optional-dependencies"]["serve"]
    requirements = [Requirement(r) for r in [*project["dependencies"], *extras]]
    names = {canonicalize_name(r.name) for r in requirements}
    providers = metadata.packages_distributions()
    for module in sorted(_third_party_imports()):
        # Installed: the distribution that provides it; not (tomli on 3.11): its own name.
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        assert dists & names, f"src/ imports {module} ({dists}): not a dependency"
    here = [r for r in requirements if r.marker is None or r.marker.evaluate()]
    for requirement in here:
        name = requirement.name
        installed = metadata.version(name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{name} {installed} is installed, outside the declared {requirement.specifier}"
        )
