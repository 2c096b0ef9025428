"""Arguments every entry point takes (:mod:`loracc.api.hf`, :mod:`loracc.api.onnx`,
:mod:`loracc.api.combination`): their types, the one reading of ``--adapter`` lists and
``--weights``, and the resolution of the paths users give into the folders and files loracc
reads (a hub-cache folder or hub id, an adapter's own file, an HF folder where ONNX is needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from loracc.errors import ConfigError, InputError
from loracc.io.hub import resolve_model_folder

__all__ = [
    "LayoutChoices",
    "PathLike",
    "adapter_folder",
    "adapter_paths",
    "base_folder",
    "check_paths",
    "onnx_base_file",
    "parse_weights",
]

PathLike = str | os.PathLike[str]
# --layout choices: "MODULE_PATTERN=LAYOUT" strings or {pattern: layout} (loracc.io.layout).
LayoutChoices = Sequence[str] | Mapping[str, str] | None

# Files of a PEFT adapter folder: given one of them, the folder is meant.
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Where docs/ONNX.md says how to make the base ONNX model from a Hugging Face folder.
ONNX_BASE_DOC = 'docs/ONNX.md, "Getting BASE.onnx"'


def base_folder(path: PathLike, flag: str = "--base") -> Path:
    """A base Hugging Face folder: the path, a hub-cache repository folder's ``refs/main``
    snapshot, or a hub id (``org/name``) found in the local cache (:mod:`loracc.io.hub`)."""
    return resolve_model_folder(path, flag)


def adapter_folder(path: PathLike, flag: str = "--adapter") -> Path:
    """A PEFT adapter folder, as :func:`base_folder` resolves it; a path to one of the
    adapter's own files means its folder, any other file is refused naming the flag."""
    given = Path(path)
    if given.is_file():
        if given.name in _ADAPTER_FILES:
            return given.parent
        raise InputError(
            f"{flag} {given}: is a file; give the adapter's folder (the one holding "
            "adapter_config.json)"
        )
    return resolve_model_folder(path, flag)


def onnx_base_file(path: PathLike, flag: str = "--base") -> Path:
    """The base ONNX model of ``export``: the file, or the one ``.onnx`` file in a folder. A
    Hugging Face folder (or hub id) is refused with the way to the command that takes it and to
    making an ONNX model of it."""
    given = Path(path)
    if not given.is_dir() and not given.is_file() and not given.is_symlink():
        try:
            given = resolve_model_folder(path, flag)
        except InputError:
            return Path(path)  # the ONNX reader says "not found"
    if not given.is_dir():
        return given
    found = sorted(given.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found and ((given / "config.json").is_file() or any(given.glob("*.safetensors"))):
        raise InputError(
            f"{flag} {path}: a Hugging Face folder, not an ONNX model; `loracc merge` takes "
            "Hugging Face folders, and export --onnx needs the base exported to ONNX first "
            f"({ONNX_BASE_DOC})"
        )
    return given  # the ONNX reader refuses it


def adapter_paths(adapters: PathLike | Sequence[PathLike]) -> list[Path]:
    """One adapter folder, or several in order (a stack, or keep-lora's slots), each resolved
    by :func:`adapter_folder`."""
    if isinstance(adapters, str | os.PathLike):
        return [adapter_folder(adapters)]
    paths = [adapter_folder(a) for a in adapters]
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
