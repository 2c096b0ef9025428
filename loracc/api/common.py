"""Argument types both halves of the API take (:mod:`loracc.api.hf`, :mod:`loracc.api.onnx`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from loracc.errors import ConfigError

__all__ = ["LayoutChoices", "PathLike", "adapter_paths"]

PathLike = str | os.PathLike[str]
# --layout choices: "MODULE_PATTERN=LAYOUT" strings or {pattern: layout} (loracc.io.layout).
LayoutChoices = Sequence[str] | Mapping[str, str] | None


def adapter_paths(adapters: PathLike | Sequence[PathLike]) -> list[Path]:
    """One adapter folder, or several in order (a stack, or keep-lora's slots), as paths."""
    if isinstance(adapters, str | os.PathLike):
        return [Path(adapters)]
    paths = [Path(a) for a in adapters]
    if not paths:
        raise ConfigError("--adapter: at least one adapter folder is needed")
    return paths
