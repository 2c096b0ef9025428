"""LoraConfig lookups: a field name loracc misspells is an error, not a silent None."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import loracc
from loracc.io.peft_config import _LEGACY, FIELDS, read_config


def _config(tmp_path: Path, data: dict[str, object]):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    return read_config(path)


def test_unknown_name_is_a_key_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"r": 4})
    with pytest.raises(KeyError, match="use_rslor"):
        cfg["use_rslor"]  # a typo of use_rslora: read as None (so False) before


def test_known_field_defaults_and_written_values(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"r": 4, "some_future_flag": 0})
    assert cfg["r"] == 4
    assert cfg["lora_alpha"] == 8  # peft's default
    assert cfg["layer_replication"] is None  # a field without a default
    assert cfg["some_future_flag"] == 0  # written, though unknown to loracc: as written


def test_every_key_loracc_reads_is_a_field() -> None:
    """``cfg["..."]`` / ``self.cfg["..."]`` with a literal key, anywhere in loracc."""
    root = Path(loracc.__file__).parent
    read: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)):
                continue
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name == "cfg" and isinstance(node.slice.value, str):
                read.add(node.slice.value)
    assert len(read) > 10
    assert sorted(read - set(FIELDS) - set(_LEGACY)) == []
