"""Arguments every entry point takes (:mod:`loracc.api.hf`, :mod:`loracc.api.onnx`,
:mod:`loracc.api.combination`): their types, and the one reading of ``--adapter`` lists and
``--weights``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from loracc.errors import ConfigError

__all__ = ["LayoutChoices", "PathLike", "adapter_paths", "check_paths", "parse_weights"]

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


def check_paths(paths: Sequence[Path], initial_adapter: PathLike | None = None) -> None:
    """Refuse adapters merged or combined together that name one folder twice (a typo more
    often than a doubled delta, which ``--weights`` says plainly), or several with
    ``--initial-adapter`` (whose adapter is it?)."""
    seen: dict[Path, Path] = {}
    for path in paths:
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            raise ConfigError(
                f"--adapter: '{path}' is given twice (as '{first}'); to scale an adapter's "
                "delta give it once with --weights"
            )
    if initial_adapter is not None and len(paths) > 1:
        raise ConfigError(
            "--initial-adapter with several --adapter: it is unclear which adapter it belongs "
            "to; merge that adapter alone first"
        )


def parse_weights(weights: str | Sequence[float] | None, count: int) -> tuple[float, ...]:
    """``--weights 1.0,0.5`` (or a list of numbers): one finite number per adapter of the
    ``count`` given; None: 1 each."""
    if weights is None:
        return (1.0,) * count
    try:
        words = weights.split(",") if isinstance(weights, str) else weights
        values = tuple(float(w) for w in words)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--weights: cannot read '{weights}' (comma-separated numbers, e.g. 1.0,0.5)"
        ) from None
    if len(values) != count:
        raise ConfigError(f"--weights: {len(values)} weight(s) for {count} adapter(s)")
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ConfigError(f"--weights: {bad[0]} is not a finite number")
    return values
