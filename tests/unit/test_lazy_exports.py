"""``loracc`` and ``loracc.api`` load their names on first use: each exported name resolves to
the object of the module that defines it, and importing the packages imports no torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Any

import pytest

import loracc
import loracc.api
from loracc import _lazy


@pytest.mark.parametrize("package", [loracc, loracc.api])
def test_every_exported_name_resolves(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert names and set(names) <= set(dir(package))
    for name in names:
        value = getattr(package, name)
        assert value is not None and getattr(package, name) is value


@pytest.mark.parametrize("package", [loracc, loracc.api])
def test_no_exported_name_is_a_submodule(package: Any) -> None:
    """Importing a submodule binds its name on the package: a submodule named as an exported
    function (``loracc.api.pack``) would replace the function once anything imports it."""
    clashes = [n for n in package.__all__ if importlib.util.find_spec(f"{package.__name__}.{n}")]
    assert clashes == []


def test_loracc_inspect_is_the_api_function() -> None:
    from loracc.api.hf import inspect_adapter

    assert loracc.inspect is inspect_adapter


def test_submodules_are_attributes() -> None:
    """As before the names were lazy: ``import loracc`` alone, then ``loracc.api.hf``."""
    code = "import loracc; print(loracc.api.hf.merge.__module__, loracc.pipeline.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["loracc.api.hf", "loracc.pipeline"], done.stderr


def test_unknown_name_is_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = loracc.nope  # type: ignore[attr-defined]


def test_lazy_module_imports_on_first_use() -> None:
    code = (
        "import sys; from loracc._lazy import lazy_module; m = lazy_module('loracc.api.hf'); "
        "before = 'torch' in sys.modules; m.merge; print(before, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr
    assert _lazy.lazy_module("loracc.errors").LoraccError is loracc.LoraccError
