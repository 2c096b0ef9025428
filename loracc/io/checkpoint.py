"""A Hugging Face checkpoint folder read lazily, one tensor at a time.

The folder holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Only headers are read when the folder is opened; every shard
name in the index must stay inside the folder (no ``..``, absolute paths or links out). Pickle
checkpoints (``pytorch_model.bin``) are refused: loracc never unpickles.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracc.arch import (
    EMBEDDING_KEYS,
    EMBEDDING_SUFFIXES,
    EXPERT_KEY,
    FUSED_EXPERTS,
    HEAD_ARCHITECTURES,
    MODULE_RENAMES,
    OUTPUT_EMBEDDING_KEYS,
    STORED_LAYOUTS,
)
from loracc.errors import ConfigError, FormatError, InputError, shorten
from loracc.io.inputs import inside, read_json
from loracc.io.safetensors import SafetensorsFile, TensorInfo, read_tensor
from loracc.weights import ExpertSplit

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "WEIGHT_SUFFIXES",
    "Checkpoint",
    "inside",
    "open_safetensors",
    "read_json",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# config.json keys loracc reads, and the JSON type each must have when present.
_CONFIG_TYPES: Mapping[str, tuple[type | tuple[type, ...], str]] = {
    "model_type": (str, "a string"),
    "tie_word_embeddings": (bool, "true or false"),
    "text_config": (dict, "an object"),
}


def open_safetensors(path: Path) -> SafetensorsFile:
    """Open and check a safetensors header; any failure to parse it is a FormatError."""
    try:
        return SafetensorsFile(path)
    except RecursionError as e:
        raise FormatError(f"{path}: malformed safetensors header (nested too deeply)") from e
    except (TypeError, ValueError, OverflowError) as e:  # a hostile header the reader missed
        raise FormatError(f"{path}: malformed safetensors header ({e})") from e


class Checkpoint:
    """The tensors of a Hugging Face folder: names, dtypes, shapes, and reads on demand."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: base checkpoint folder not found")
        config_path = self.folder / "config.json"
        if config_path.exists() or config_path.is_symlink():
            self.config: dict[str, Any] = read_json(
                inside(self.folder, "config.json", str(self.folder))
            )
        else:
            self.config = {}
        if not isinstance(self.config, dict):
            raise ConfigError(f"{config_path}: not a JSON object")
        for key, (types, expected) in _CONFIG_TYPES.items():
            value = self.config.get(key)
            if value is not None and not isinstance(value, types):
                raise ConfigError(
                    f"{config_path}: '{key}' must be {expected}, got {shorten(value)}"
                )
        self.files: list[SafetensorsFile] = []
        self._info: dict[str, TensorInfo] = {}
        index = self.folder / INDEX_NAME
        if index.exists():
            self._open_index(index)
        elif (self.folder / SINGLE_NAME).exists():
            self._add_file(inside(self.folder, SINGLE_NAME, str(self.folder)))
        elif any((self.folder / n).exists() for n in PICKLE_NAMES):
            raise InputError(
                f"{self.folder}: only a pickle checkpoint (pytorch_model.bin) is present; loracc "
                "never unpickles. Convert it on a trusted machine: load it with transformers and "
                "save_pretrained(..., safe_serialization=True)"
            )
        else:
            raise InputError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}")
        self.expert_splits = self._scan_experts()

    def _scan_experts(self) -> dict[str, ExpertSplit]:
        found: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        for key in self._info:
            m = EXPERT_KEY.match(key)
            if m:
                found[m["prefix"]][m["proj"]][int(m["e"])] = key
        splits = {}
        for prefix, projs in found.items():
            logical = prefix
            for module_name, stored_name in MODULE_RENAMES:
                logical = logical.replace(stored_name, module_name)
            for fused, options in FUSED_EXPERTS.items():
                names = next((o for o in options if all(n in projs for n in o)), None)
                if names is None:
                    continue
                count = len(projs[names[0]])
                if any(sorted(projs[n]) != list(range(count)) for n in names):
                    continue
                keys = tuple(tuple(projs[n][e] for n in names) for e in range(count))
                parts = [self._info[k].shape for k in keys[0]]
                rows = sum(p[0] for p in parts)
                splits[f"{logical}.{fused}"] = ExpertSplit(keys, (count, rows, parts[0][1]))
        return splits

    def resolve(self, key: str) -> str | None:
        """The stored name of a module-path key (renamed modules), or None."""
        if key in self._info:
            return key
        for module_name, stored_name in MODULE_RENAMES:
            renamed = key.replace(module_name, stored_name)
            if renamed in self._info:
                return renamed
        for layout in STORED_LAYOUTS:
            renamed = key
            for pattern, stored in layout:
                renamed = pattern.sub(stored, renamed)
            if renamed in self._info:
                return renamed
        return None

    def _open_index(self, index: Path) -> None:
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ConfigError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for shard in dict.fromkeys(weight_map.values()):
            self._add_file(inside(self.folder, shard, str(index)))
        listed = set(weight_map)
        missing = listed - set(self._info)
        if missing:
            raise FormatError(f"{index}: tensor '{sorted(missing)[0]}' is not in its shard")
        for name, info in self._info.items():
            if weight_map.get(name) != info.path.name:
                raise FormatError(f"{index}: tensor '{name}' is in {info.path.name}, not listed")

    def _add_file(self, path: Path) -> None:
        if not path.exists():  # anything else that is not a file: open_input says what
            raise InputError(f"{path}: shard not found")
        f = open_safetensors(path)
        for name in f.keys():  # noqa: SIM118  (file order)
            if name in self._info:
                raise FormatError(f"{path}: tensor '{name}' also in {self._info[name].path.name}")
            self._info[name] = f.tensors[name]
        self.files.append(f)

    def keys(self) -> list[str]:
        """Tensor names in storage order (shard by shard, offset order)."""
        return list(self._info)

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and location of a stored tensor."""
        try:
            return self._info[key]
        except KeyError:
            raise InputError(f"{self.folder}: base has no tensor '{key}'") from None

    def read(self, key: str) -> torch.Tensor:
        """Read one stored tensor (a fresh CPU tensor)."""
        return read_tensor(self.info(key))

    @property
    def infos(self) -> Mapping[str, TensorInfo]:
        return self._info

    @property
    def tied_embeddings(self) -> tuple[str, str] | None:
        """(output key, input-embedding key) when the output embedding is tied and not stored."""
        text = self.config.get("text_config")
        tie = self.config.get("tie_word_embeddings")
        if tie is None and isinstance(text, dict):
            tie = text.get("tie_word_embeddings")
        if tie is False or not self._has_output_head(tie):
            return None
        out = next((k for k in OUTPUT_EMBEDDING_KEYS if k not in self._info), None)
        if out is None:
            return None
        emb = next((k for k in EMBEDDING_KEYS if k in self._info), None)
        if emb is None:
            emb = next(
                (k for k in self._info if k.endswith(EMBEDDING_SUFFIXES)),
                None,
            )
        return (out, emb) if emb is not None else None

    def _has_output_head(self, tie: object) -> bool:
        """Whether the model has an LM head at all (a classifier or a bare encoder has none)."""
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs:
            return any(isinstance(a, str) and a.endswith(HEAD_ARCHITECTURES) for a in archs)
        return tie is True

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of ``key``: stored, renamed, a fused expert parameter, or a tied head."""
        stored = self.resolve(key)
        if stored is not None:
            return self._info[stored].shape
        if key in self.expert_splits:
            return self.expert_splits[key].shape
        tied = self.tied_embeddings
        if tied and key == tied[0]:
            return self._info[tied[1]].shape
        return None
