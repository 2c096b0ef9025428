"""Overlapping rank_pattern / alpha_pattern keys: loracc uses what PEFT's reload uses, and says so.

peft picks the first matching pattern key in its config's key order. At training that is the
order the user wrote; ``save_pretrained`` writes the keys sorted, so with
``{"lin0": 3, "blk.lin0": 11}`` training gives ``blk.lin0`` alpha 3 and every reload alpha 11.
The file cannot tell which was trained: loracc must follow the file (as PEFT's reload does, the
oracle here is PEFT's own ``merge_and_unload`` of the reloaded adapter) and name the ambiguity in
a note of every report, human and ``--json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from loracc.cli import main
from tests.support import peft_oracle as po

ALPHAS = {"lin0": 3, "blk.lin0": 11}  # as written at training: "lin0" first
RANK = 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(5, 4)


class TwoLevels(nn.Module):
    """``lin0`` and ``blk.lin0``: both alpha_pattern keys match ``blk.lin0``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 5)
        self.blk = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk.lin0(torch.relu(self.lin0(x)))


def _base(folder: Path) -> TwoLevels:
    model = TwoLevels()
    model.load_state_dict(po.load_folder_tensors(folder))
    return model.eval()


@pytest.fixture(scope="module")
def overlap(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("pattern_overlap")
    base_dir, adapter_dir = root / "base", root / "adapter"
    base_dir.mkdir()
    po.seed_all(0)
    state = {k: v.contiguous() for k, v in TwoLevels().state_dict().items()}
    save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    (base_dir / "config.json").write_text(json.dumps({"model_type": "custom"}))

    config = LoraConfig(
        r=RANK,
        lora_alpha=8,
        target_modules=["lin0"],
        alpha_pattern=dict(ALPHAS),
        init_lora_weights=False,
    )
    trained = get_peft_model(_base(base_dir), config)
    trained_alpha = float(trained.base_model.model.blk.lin0.lora_alpha["default"])
    trained.save_pretrained(str(adapter_dir))

    reloaded = PeftModel.from_pretrained(_base(base_dir), str(adapter_dir))
    reload_alpha = float(reloaded.base_model.model.blk.lin0.lora_alpha["default"])
    merged = reloaded.merge_and_unload().state_dict()
    return {
        "base": base_dir,
        "adapter": adapter_dir,
        "trained_alpha": trained_alpha,
        "reload_alpha": reload_alpha,
        "merged": {k: v.detach().clone() for k, v in merged.items()},
        "saved": json.loads((adapter_dir / "adapter_config.json").read_text()),
    }


def test_the_case_is_ambiguous_in_peft_itself(overlap):
    """The premise: peft saved the keys sorted, and its reload uses another alpha than training."""
    assert list(overlap["saved"]["alpha_pattern"]) == ["blk.lin0", "lin0"]
    assert overlap["trained_alpha"] == ALPHAS["lin0"]
    assert overlap["reload_alpha"] == ALPHAS["blk.lin0"]


def _one_note(notes: list[str], field: str) -> str:
    hits = [n for n in notes if f"{field} keys" in n]
    assert len(hits) == 1, notes
    return hits[0]


def _check_alpha_note(note: str) -> None:
    assert note.startswith("blk.lin0: alpha_pattern keys 'blk.lin0' (11), 'lin0' (3)")
    assert "lora_alpha 11 from 'blk.lin0' is used" in note
    assert "cannot be known from the file" in note


def test_merge_uses_peft_reload_alpha_and_says_so(overlap, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", "--base", str(overlap["base"]), "--adapter", str(overlap["adapter"])]
    res = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    notes = json.loads(res.output)["notes"]
    _check_alpha_note(_one_note(notes, "alpha_pattern"))
    assert not [n for n in notes if "rank_pattern" in n]
    got = po.load_folder_tensors(out)
    for key, ref in overlap["merged"].items():
        assert torch.equal(got[key], ref), f"{key}: differs from PEFT's merge of the reload"

    text = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "human")])
    assert text.exit_code == 0, text.output
    lines = [line.strip() for line in text.output.splitlines() if "alpha_pattern keys" in line]
    assert len(lines) == 1
    _check_alpha_note(lines[0].removeprefix("note: "))


def test_inspect_shows_the_alpha_used_and_the_note(overlap):
    args = ["inspect", str(overlap["adapter"]), "--base", str(overlap["base"])]
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    sites = {s["module"]: s for s in report["sites"]}
    assert sites["blk.lin0"]["alpha"] == overlap["reload_alpha"]
    assert sites["lin0"]["alpha"] == ALPHAS["lin0"]  # one key matches: nothing to say
    _check_alpha_note(_one_note(report["notes"], "alpha_pattern"))
    assert not [n for n in report["notes"] if n.startswith("lin0:")]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    notes = [line for line in text.output.splitlines() if line.startswith("note: ")]
    _check_alpha_note(_one_note([n.removeprefix("note: ") for n in notes], "alpha_pattern"))


def test_convert_carries_the_note(overlap, tmp_path):
    args = ["convert", "--adapter", str(overlap["adapter"]), "-o", str(tmp_path / "plain")]
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    _check_alpha_note(_one_note(json.loads(res.output)["notes"], "alpha_pattern"))


def test_keys_with_one_value_are_not_ambiguous(tmp_path):
    from loracc.io.peft_config import pattern_overlap_notes, read_config

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"alpha_pattern": {"lin0": 3, "blk.lin0": 3}}))
    assert pattern_overlap_notes(read_config(path), "blk.lin0", 2) == []
    path.write_text(json.dumps({"alpha_pattern": {"lin0": 3, "blk.lin0": 4, "other": 5}}))
    notes = pattern_overlap_notes(read_config(path), "blk.lin0", 2)
    assert len(notes) == 1 and "'other'" not in notes[0]


def test_overlapping_rank_keys_say_the_rank_comes_from_the_shapes(tmp_path):
    """peft's reload of such a file may pick a rank that does not fit the tensors; loracc reads
    the rank from the shapes, which is the trained one whatever the key order."""
    from loracc.io.peft_config import pattern_overlap_notes, read_config

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"rank_pattern": {"blk.lin0": 1, "lin0": 2}}))
    (note,) = pattern_overlap_notes(read_config(path), "blk.lin0", 2)
    assert note.startswith("blk.lin0: rank_pattern keys 'blk.lin0' (1), 'lin0' (2) all match")
    assert "rank 2 is read from the tensor shapes" in note
    assert "peft's reload takes 'blk.lin0' (1)" in note


def test_export_carries_the_note(overlap, tmp_path):
    pytest.importorskip("onnx")
    onnx_path = tmp_path / "base.onnx"
    torch.onnx.export(
        _base(overlap["base"]), (torch.randn(2, 6),), str(onnx_path), dynamo=False, opset_version=17
    )
    args = ["export", "--onnx", "--base", str(onnx_path), "--adapter", str(overlap["adapter"])]
    res = CliRunner().invoke(main, [*args, "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert sorted(b["module"] for b in report["bindings"]) == ["blk.lin0", "lin0"]
    _check_alpha_note(_one_note(report["notes"], "alpha_pattern"))
