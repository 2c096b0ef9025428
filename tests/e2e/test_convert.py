"""``loracc convert`` against PEFT: the written adapter is loaded by peft itself.

Every test loads the converted folder with ``PeftModel.from_pretrained`` on the *original* base
and compares its forward with PEFT's forward of the original adapter (rsLoRA, patterns, PiSSA,
OLoRA, pissa_niter + initial adapter, modules_to_save, trainable tokens, biases, layer
replication). Truncated outputs are compared with a dense fp64 SVD truncation of the delta.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import loracc
from loracc.errors import InputError, OutputError, UnsupportedError
from tests.support import pass_cases as pc
from tests.support import peft_oracle as po

# Folding s into B rounds once per element of B: the outputs agree to rounding, not bits.
LOGITS_RTOL = 1e-5


def _peft_logits(arch: str | po.Arch, base_dir: Path, adapter_dir: Path, inputs: torch.Tensor):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # missing or unexpected adapter keys
        model = PeftModel.from_pretrained(po.load_model(base_dir, arch), str(adapter_dir))
    return po.model_output(model.eval(), inputs)


def _assert_plain_config(out: Path) -> dict:
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["init_lora_weights"] is True
    assert config["lora_alpha"] == config["r"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    top = max(t.shape[0] for k, t in tensors.items() if k.endswith(("lora_A.weight", "_A")))
    assert config["r"] == top
    return config


@pytest.mark.parametrize(
    "name",
    [
        "llama_rslora",
        "llama_patterns",
        "llama_mts_lm_head",
        "llama_tt_list",
        "llama_tt_dict",
        "llama_embed",
        "gpt2_lora_bias",
        "gpt2_bias_lora_only",
        "gpt2_wte_tied",
        "conv2d",
        "llama_target_param_2d",
        "llama_layer_replication",
    ],
)
def test_convert_reproduces_peft(name, peft_cases, tmp_path):
    case = peft_cases.get(name)
    out = tmp_path / "out"
    loracc.convert(case.adapter_dir, out)
    _assert_plain_config(out)
    got = _peft_logits(case.arch, case.base_dir, out, case.inputs)
    err = po.rel_err(got, case.peft_logits)
    assert po.rel_err(case.peft_logits, case.base_logits) > 1e-2
    assert err <= LOGITS_RTOL, f"{name}: converted adapter in PEFT differs by {err:.3g}"


def test_convert_folds_patterns_into_alpha_equals_r(peft_cases, tmp_path):
    case = peft_cases.get("llama_patterns")
    out = tmp_path / "out"
    loracc.convert(case.adapter_dir, out)
    config = _assert_plain_config(out)
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.q_proj": 4 for i in range(2)
    } | {r"model\.layers\.1\.mlp\.up_proj": 2}


@pytest.mark.parametrize("name", ["pissa", "olora", "pissa_conv1d"])
def test_convert_residual_init(name, tmp_path, tmp_path_factory):
    """PiSSA/OLoRA become a plain rank-2r adapter on the original base (PEFT's conversion)."""
    case = pc.case(name, tmp_path_factory)
    with pytest.raises(InputError, match="--base"):
        loracc.convert(case.adapter_dir, tmp_path / "nobase")
    out = tmp_path / "out"
    loracc.convert(case.adapter_dir, out, base_dir=case.base_dir)
    config = _assert_plain_config(out)
    assert config["r"] == 2 * case.adapter_config["r"]
    got = _peft_logits(case.arch, case.base_dir, out, case.inputs)
    assert po.rel_err(got, case.peft_logits) <= LOGITS_RTOL


def test_convert_pissa_niter_with_initial_adapter(tmp_path, tmp_path_factory):
    nc = pc.build_niter(tmp_path_factory)
    with pytest.raises(UnsupportedError, match="--initial-adapter"):
        loracc.convert(nc.adapter_dir, tmp_path / "refused", base_dir=nc.base_dir)
    out = tmp_path / "out"
    loracc.convert(nc.adapter_dir, out, base_dir=nc.base_dir, initial_adapter=nc.initial_dir)
    got = _peft_logits("llama", nc.base_dir, out, nc.inputs)
    assert po.rel_err(got, nc.trained_logits) <= LOGITS_RTOL


def test_convert_refuses_dora(tmp_path, tmp_path_factory):
    case = pc.case("dora_linear", tmp_path_factory)
    with pytest.raises(UnsupportedError, match="DoRA"):
        loracc.convert(case.adapter_dir, tmp_path / "out", base_dir=case.base_dir)
    assert not (tmp_path / "out").exists()


def _written_deltas(out: Path) -> dict[str, torch.Tensor]:
    """s·B·A of every module in a written adapter, scale from its config (fp64)."""
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            alpha = loracc.io.peft_config.resolve_pattern(
                config["alpha_pattern"], module, config["lora_alpha"]
            )
            assert r == loracc.io.peft_config.resolve_pattern(
                config["rank_pattern"], module, config["r"]
            )
            deltas[module] = (alpha / r) * (b.double() @ a.double())
    return deltas


def test_convert_truncated_equals_dense_svd(peft_cases, tmp_path):
    case = peft_cases.get("llama_linear")
    out = tmp_path / "out"
    report = loracc.convert(case.adapter_dir, out, rank=3)
    assert {s["rank"] for s in report.sites} == {3}
    got = _written_deltas(out)
    assert set(got) == set(case.sites)
    for module in case.sites:
        delta = po.linear_delta(case, module).double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        ref = (U[:, :3] * S[:3]) @ Vh[:3]
        rel = float((got[module] - ref).norm() / delta.norm())
        assert rel <= 1e-5, f"{module}: {rel:.3g}"
    logits = _peft_logits(case.arch, case.base_dir, out, case.inputs)
    assert torch.isfinite(logits).all()


def test_convert_energy(peft_cases, tmp_path):
    case = peft_cases.get("llama_linear")
    report = loracc.convert(case.adapter_dir, tmp_path / "out", energy=0.9)
    ranks = {s["module"]: s["rank"] for s in report.sites}
    for module in case.sites:
        S = torch.linalg.svdvals(po.linear_delta(case, module).double())
        energy = S.square().cumsum(0) / S.square().sum()
        assert ranks[module] == int((energy < 0.9).sum()) + 1, module
    details = [d for step in report.passes for d in step["details"] if "Frobenius" in d]
    assert details and all(math.isfinite(float(d.rsplit(" ", 1)[1])) for d in details)


def test_convert_cli(peft_cases, tmp_path):
    from loracc.cli import main

    case = peft_cases.get("llama_rslora")
    out = tmp_path / "out"
    args = ["convert", "--adapter", str(case.adapter_dir), "--base", str(case.base_dir)]
    first = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["output"] == str(out)
    again = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert again.exit_code == OutputError.exit_code and "already exists" in again.output
    both = CliRunner().invoke(
        main, [*args, "-o", str(tmp_path / "x"), "--rank", "2", "--energy", "0.9"]
    )
    assert both.exit_code == 2 and "not both" in both.output


def test_convert_refuses_split_experts(peft_cases, tmp_path):
    """Fused 3-D expert parameters the base stores per expert are not written back (yet)."""
    case = peft_cases.get("qwen3moe_target_param_3d")
    with pytest.raises(UnsupportedError, match="per expert"):
        loracc.convert(case.adapter_dir, tmp_path / "out", base_dir=case.base_dir)
    assert not (tmp_path / "out").exists()
