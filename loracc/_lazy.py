"""Lazy imports: keep torch (and the modules that import it) out of commands that never use it.

``loracc --help``, ``golden check`` and ``run`` on ONNX models must start in a fraction of a
second and work where torch is not installed (``pip install loracc`` without the ``torch``
extra), so the packages and the CLI name what they use without importing it until first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes", "lazy_module"]


class _LazyModule:
    """Stands for a module and imports it on first attribute access. Not an entry of
    ``sys.modules`` (as :class:`importlib.util.LazyLoader` would make it): code that walks every
    loaded module, as torch's ``inspect.getmodule`` does while it loads, must not import it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


def lazy_module(name: str) -> Any:
    """The module ``name``, imported on first attribute access.

    Callers import it for type checkers under ``TYPE_CHECKING`` too, so that the import graph
    (tests/unit/test_layering.py) and mypy see the dependency."""
    return _LazyModule(name)


def lazy_attributes(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) for ``exports``: public name ->
    ``"module"`` or ``"module:attribute"`` (when the attribute has another name there)."""

    def getattr_(name: str) -> Any:
        where = exports.get(name)
        if where is None:  # a submodule, as ``import loracc; loracc.api.hf`` found it before
            if name.startswith("_") or importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(module), attribute or name)
        setattr(sys.modules[package], name, value)  # found once, then an ordinary attribute
        return value

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return getattr_, dir_
