"""llama-cpp-python's ctypes bindings to llama.cpp, without the rest of its package.

`import llama_cpp` runs the package's __init__, which imports its high-level `Llama` and with it
numpy, jinja2, the chat formats, the grammar and the tokenizer wrappers: 0.13 to 0.2 s before a
model can load, against 0.03 s for the bindings module alone. wizardchat drives llama.cpp
through the bindings (engine/context.py, engine/decoder.py), so it loads only them: the package
module is created from its spec without running its __init__, and runs it the first time
anything asks it for a name the bindings module lacks (`llama_cpp.Llama`, `from llama_cpp
import Llama`, `import llama_cpp.server`), so other users of llama_cpp in the same process see
the whole package as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

PACKAGE = "llama_cpp"
__all__ = ["VERSION", "lib"]


def _version_of(package: ModuleType) -> str:
    """`__version__` as the package's __init__ sets it, read without running it."""
    init = getattr(package, "__file__", None) or ""
    try:
        with open(init, encoding="utf-8") as f:
            m = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        m = None
    return m.group(1) if m else "unknown"


def _package_without_init() -> ModuleType:
    """The `llama_cpp` package module, its __init__ deferred to the first missing name."""
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError("llama-cpp-python is not installed (pip install llama-cpp-python)")
    package = importlib.util.module_from_spec(spec)
    package.__version__ = _version_of(package)  # type: ignore[attr-defined]
    loader = spec.loader

    def complete(name: str) -> Any:
        # PEP 562: called only for names the module does not have yet.
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        del package.__dict__["__getattr__"]
        loader.exec_module(package)  # the real __init__: `from .llama import *` and the rest
        return getattr(package, name)

    package.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules[PACKAGE] = package
    return package


def _bindings() -> ModuleType:
    _package_without_init()
    return importlib.import_module(f"{PACKAGE}.llama_cpp")


if TYPE_CHECKING:
    import llama_cpp.llama_cpp as lib
else:
    lib = _bindings()

VERSION: str = str(sys.modules[PACKAGE].__version__)
