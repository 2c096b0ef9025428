"""onnxruntime-genai model folders: the files beside the decoder that ``og.Model`` reads.

A base model inside a genai folder (``genai_config.json`` naming it as ``model.decoder.filename``)
exported to another folder takes the folder with it: ``genai_config.json`` (its decoder file
name set to the output's) and every other plain file of the folder (tokenizer, chat template,
processor configs), copied byte for byte. ONNX models, their external data and adapter files
are not copied: the export writes its own. A config that names other models (a vision or speech
encoder) is left alone with a note, since loracc writes only the decoder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracc.errors import FormatError

__all__ = ["CONFIG", "GenaiFiles", "genai_files"]

CONFIG = "genai_config.json"
_NOT_COPIED = (".onnx", ".onnx_adapter", ".data")


@dataclass
class GenaiFiles:
    """What a genai folder adds to an export: (destination, writer) pairs, the source files
    (inputs no output may overwrite) and a note when the folder is not carried over."""

    files: list[tuple[Path, Callable[[Path], None]]] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)
    note: str | None = None


def _filenames(config: Any, where: str = "") -> list[tuple[str, str]]:
    """Every ``filename`` value in the config, with its dotted key path."""
    if isinstance(config, dict):
        found = []
        for key, value in config.items():
            path = f"{where}.{key}" if where else key
            if key == "filename" and isinstance(value, str):
                found.append((path, value))
            else:
                found += _filenames(value, path)
        return found
    return []


def _copy(src: Path) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        shutil.copyfile(src, tmp)

    return write


def _config_writer(config: dict[str, Any]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")

    return write


def genai_files(base: Path, output: Path, model_files: Sequence[Path]) -> GenaiFiles:
    """The genai folder files an export of ``base`` to ``output`` writes beside it.

    ``model_files`` are the base model's own files (the ``.onnx`` and its external data).
    """
    config_path = base.parent / CONFIG
    if not config_path.is_file():
        return GenaiFiles()
    if output.parent.resolve() == base.parent.resolve():
        return GenaiFiles(note=f"{CONFIG} not written: the output is in the base's genai folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        named = decoder["filename"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{config_path}: not an onnxruntime-genai config ({e!r})") from e
    if named != base.name:
        return GenaiFiles(note=f"{CONFIG} not written: its decoder is '{named}', not {base.name}")
    others = [f"{k}={v}" for k, v in _filenames(config) if k != "model.decoder.filename"]
    if others:
        return GenaiFiles(
            note=f"{CONFIG} not written: it names other models ({', '.join(others)}) and loracc "
            "writes only the decoder; copy the folder's files by hand"
        )
    decoder["filename"] = output.name
    out = GenaiFiles([(output.parent / CONFIG, _config_writer(config))], [config_path])
    skip = {p.resolve() for p in model_files}
    for src in sorted(base.parent.iterdir()):
        if src.name == CONFIG or src.name.startswith(".") or not src.is_file():
            continue
        if src.resolve() in skip or src.name.endswith(_NOT_COPIED):
            continue
        out.files.append((output.parent / src.name, _copy(src)))
        out.sources.append(src)
    return out
