"""Argument types both halves of the API take (:mod:`loracc.api.hf`, :mod:`loracc.api.onnx`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["LayoutChoices", "PathLike"]

PathLike = str | os.PathLike[str]
# --layout choices: "MODULE_PATTERN=LAYOUT" strings or {pattern: layout} (loracc.io.layout).
LayoutChoices = Sequence[str] | Mapping[str, str] | None
