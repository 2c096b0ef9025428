"""The merged folder carries the base's side files (tokenizer, generation config), links followed
only where they stay inside the folder or the hub cache's blobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loracc
from loracc.errors import FormatError


def _layout(root: Path) -> tuple[Path, Path]:
    """A hub-cache-like base (<repo>/snapshots/<rev>, files linked into <repo>/blobs) + adapter."""
    blobs = root / "repo" / "blobs"
    snap = root / "repo" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({"lin.weight": torch.randn(6, 4)}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"model_type": "custom"}))
    (blobs / "f00d").write_text('{"tokenizer": true}')
    (snap / "tokenizer.json").symlink_to(Path("../../blobs/f00d"))
    (snap / "generation_config.json").write_text('{"max_length": 5}')
    adapter = root / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.lin.lora_A.weight": torch.randn(2, 4),
            "base_model.model.lin.lora_B.weight": torch.randn(6, 2),
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]})
    )
    return snap, adapter


def test_linked_side_files_are_copied_with_their_content(tmp_path: Path) -> None:
    base, adapter = _layout(tmp_path)
    loracc.merge(base, adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"tokenizer": true}'
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "generation_config.json").read_text() == '{"max_length": 5}'


def test_a_side_file_linking_outside_is_refused(tmp_path: Path) -> None:
    base, adapter = _layout(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("not for the output")
    (base / "notes.txt").symlink_to(tmp_path / "elsewhere" / "secret.txt")
    with pytest.raises(FormatError, match=r"notes\.txt"):
        loracc.merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
