"""BulbaGPT Studio: train small Llama-3-style models and ship them as GGUF."""

import importlib

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` (PEP 562) that imports `exports[name]`'s module on first use, so a
    subpackage can re-export its public names without importing torch or Lightning up front."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
