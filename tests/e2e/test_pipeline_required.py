"""``--passes`` adds optional passes to the required ones; it never replaces them.

Before, ``--passes 'truncate-rank{rank=4}'`` on a tied GPT-2 adapter ran truncate-rank alone, so
``untie-embeddings`` never ran and the merge failed ("targets 'lm_head.weight', not in the
output"). References are fp64 (a dense SVD of PEFT's delta) or PEFT's unmerged forward.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loracc.cli import main
from loracc.passes import PASSES
from loracc.pipeline import MERGE_REQUIRED, ORDER, convert_pipeline, merge_pipeline
from tests.support import pass_cases as pc
from tests.support import peft_oracle as po

REQUIRED = "expand-layer-replication,reconstruct-residual,untie-embeddings"


def _truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _delta64(case: po.Case, module: str) -> torch.Tensor:
    """s·B·A in fp64, (out, in), from the adapter file and PEFT's loaded scale."""
    a = po.adapter_factor(case, module, "lora_A").double()
    b = po.adapter_factor(case, module, "lora_B").double()
    return case.sites[module]["scale"] * (b @ a)


def _merge(case: po.Case, out, *extra: str) -> dict:
    args = ["merge", "--base", str(case.base_dir), "--adapter", str(case.adapter_dir)]
    res = CliRunner().invoke(main, [*args, "-o", str(out), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.mark.parametrize("rank", [2, 4])
def test_tied_gpt2_with_truncation_merges_exactly(rank, peft_cases, tmp_path):
    """LoRA on c_attn and the tied lm_head (r=4): untied, truncated, equal to the fp64 reference."""
    case = peft_cases.get("gpt2_lmhead_tied")
    report = _merge(case, tmp_path / "out", "--passes", f"truncate-rank{{rank={rank}}}")
    assert [step["pass"] for step in report["passes"]] == [
        *REQUIRED.split(","),
        f"truncate-rank{{rank={rank}}}",
        "fold-dora",
    ]
    assert po.config_json(tmp_path / "out")["tie_word_embeddings"] is False
    got = po.load_folder_tensors(tmp_path / "out")
    base = case.base_tensors
    assert torch.equal(got["transformer.wte.weight"], base["transformer.wte.weight"])
    cut = 0.0
    for module in case.sites:
        delta = _delta64(case, module)
        kept = _truncated(delta, rank)
        cut = max(cut, float((kept - delta).norm() / delta.norm()))
        if module == "lm_head":  # the head starts from the tied embedding
            ref = base["transformer.wte.weight"].double() + kept
        else:  # GPT-2 Conv1D stores (in, out)
            ref = base[f"{module}.weight"].double() + kept.T
        err = float((got[f"{module}.weight"].double() - ref).abs().max() / kept.abs().max())
        assert err <= 1e-6, f"{module}: {err:.3g} from the fp64 truncated merge"
    if rank < 4:
        assert cut > 0.1, "the truncation cut nothing; the test proves nothing"
    else:  # nothing to cut: the model PEFT computes unmerged
        logits = po.model_output(po.load_model(tmp_path / "out", case.arch), case.inputs)
        assert po.rel_err(logits, case.peft_logits) <= 1e-5


def test_dora_is_truncated_before_its_norm(tmp_path, tmp_path_factory):
    """truncate-rank runs before fold-dora: W' = m/‖W + Δ_k‖ ⊙ (W + Δ_k), per output row."""
    case = pc.case("dora_linear", tmp_path_factory)
    _merge(case, tmp_path / "out", "--passes", "truncate-rank{rank=2}")
    got = po.load_folder_tensors(tmp_path / "out")
    for module in case.sites:
        m = case.adapter_tensors[f"base_model.model.{module}.lora_magnitude_vector"].double()
        v = case.base_tensors[f"{module}.weight"].double() + _truncated(_delta64(case, module), 2)
        ref = (m / v.norm(dim=1)).unsqueeze(1) * v
        err = float((got[f"{module}.weight"].double() - ref).abs().max() / ref.abs().max())
        assert err <= 1e-6, f"{module}: {err:.3g}"


def test_compile_emit_ir_shows_the_pipeline_that_ran(peft_cases):
    case = peft_cases.get("gpt2_lmhead_tied")
    adapter = ["compile", "--adapter", str(case.adapter_dir)]
    with_base = [*adapter, "--base", str(case.base_dir), "--passes", "truncate-rank{rank=2}"]
    ran = f"{REQUIRED},truncate-rank{{rank=2}},fold-dora"
    res = CliRunner().invoke(main, with_base)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"// pipeline: {ran}"
    assert "rank=2 " in res.output and "rank=4 " not in res.output
    steps = CliRunner().invoke(main, [*with_base, "--print-after-all"])
    headers = [line[3:] for line in steps.output.splitlines() if line.startswith("// ")]
    passes = [*REQUIRED.split(","), "truncate-rank{rank=2}", "fold-dora"]
    assert headers == [f"pipeline: {ran}", "input", *passes]
    # Without a base nothing is lowered: only the passes asked for run, and the header says so.
    bare = CliRunner().invoke(main, [*adapter, "--passes", "truncate-rank{rank=2}"])
    assert bare.output.splitlines()[0] == "// pipeline: truncate-rank{rank=2}"
    assert CliRunner().invoke(main, adapter).output.splitlines()[0] == "// pipeline: (none)"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fold-dora,untie-embeddings", "'fold-dora' is listed before 'untie-embeddings'"),
        ("fold-scaling,truncate-rank{rank=2}", "'fold-scaling' is listed before 'truncate-rank'"),
        ("truncate-rank{rank=2},truncate-rank{rank=3}", "'truncate-rank' is given 2 times"),
    ],
)
def test_reordering_or_repeating_passes_is_refused(spec, message, peft_cases, tmp_path):
    case = peft_cases.get("gpt2_lmhead_tied")
    args = ["merge", "--base", str(case.base_dir), "--adapter", str(case.adapter_dir)]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out"), "--passes", spec])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"loracc: error: --passes: {message}")
    assert res.output.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_order_is_defined_once():
    assert set(ORDER) == set(PASSES.values())
    assert list(MERGE_REQUIRED) == [cls for cls in ORDER if cls in MERGE_REQUIRED]
    assert [p.name for p in merge_pipeline()] == [*REQUIRED.split(","), "fold-dora"]
    convert = convert_pipeline(base=True, rank=3)
    assert [p.spec() for p in convert] == [
        *REQUIRED.split(",")[:2],
        "truncate-rank{rank=3}",
        "fold-scaling",
    ]
    assert [p.name for p in convert_pipeline(base=False)] == [
        "reconstruct-residual",
        "fold-scaling",
    ]
