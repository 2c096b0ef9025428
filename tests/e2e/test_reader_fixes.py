"""PEFT reader fixes, each checked against PEFT itself (its forward, its loader) or its own config.

BD-LoRA convert, resized vocabularies, bare target_parameters names, Conv1D DoRA without a base,
negative trainable-token indices, QALoRA on GPTQ-grouped factors, and the io/ layering.
"""

from __future__ import annotations

import ast
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loracc
from loracc.errors import FormatError, UnsupportedError
from tests.support import peft_oracle as po

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]


def _tiny_llama(path: Path, *, vocab: int = 128):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**po.TINY_DECODER, "vocab_size": vocab})
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def _randomize(pm) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


# -- 1. convert writes BD-LoRA as dense factors peft loads -------------------------------------


def test_convert_bdlora_loads_in_peft_with_the_same_logits(tmp_path) -> None:
    from peft.tuners.lora.config import BdLoraConfig

    model = _tiny_llama(tmp_path / "base")
    bd = BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_bdlora=bd),
    )
    _randomize(pm)
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    want = _logits(pm, ids)

    loracc.convert(tmp_path / "adapter", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_bdlora"] is None
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # missing or unexpected adapter keys
        got_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "out"))
    torch.testing.assert_close(_logits(got_model, ids), want, rtol=1e-5, atol=1e-5)


# -- 2. LoRA on a resized embedding and head --------------------------------------------------


def test_lora_on_resized_embedding_and_head_merges_like_the_forward(tmp_path) -> None:
    model = _tiny_llama(tmp_path / "base", vocab=128)
    model.resize_token_embeddings(136)
    with torch.no_grad():  # new rows: trained values, not the resize's mean
        model.get_input_embeddings().weight[128:].normal_()
        model.get_output_embeddings().weight[128:].normal_()
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"]),
    )
    _randomize(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    ids = torch.randint(0, 136, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor([128, 131, 135])  # new tokens
    want = _logits(pm, ids)

    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 136
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.get_input_embeddings().weight.shape == (136, 32)
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)


# -- 3. a bare parameter name in target_parameters --------------------------------------------


def test_bare_target_parameter_name_inspects_without_base_and_merges(tmp_path) -> None:
    spec = po.CaseSpec(
        "qwen3moe", dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["down_proj"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = po.build_case("qwen3moe_bare_param", tmp_path / "case", spec)
    peft_params = sorted(
        f"{name}.{s['parameter_name']}" for name, s in case.sites.items() if s["parameter_name"]
    )
    assert peft_params == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]

    report = loracc.inspect(case.adapter_dir)  # no base: crashed on t.rsplit(".", 1)
    assert sorted(s["module"] for s in report["sites"]) == peft_params
    assert {s["kind"] for s in report["sites"]} == {"parameter"}

    out = tmp_path / "out"
    loracc.merge(case.base_dir, case.adapter_dir, out)
    got = po.model_output(po.load_model(out, case.arch), case.inputs)
    assert po.rel_err(case.peft_logits, case.base_logits) > 1e-2
    assert po.rel_err(got, case.peft_logits) <= 1e-5


# -- 4. DoRA on GPT-2 Conv1D without a base ---------------------------------------------------


def test_gpt2_dora_conv1d_inspects_without_base(tmp_path) -> None:
    spec = po.CaseSpec("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = po.build_case("gpt2_dora_c_attn", tmp_path / "case", spec)
    assert case.adapter_config["fan_in_fan_out"] is True
    report = loracc.inspect(case.adapter_dir)  # no base: magnitude size check failed
    assert report["sites"] and {s["kind"] for s in report["sites"]} == {"conv1d"}
    assert {s["variant"] for s in report["sites"]} == {"dora"}
    with_base = loracc.inspect(case.adapter_dir, case.base_dir)
    assert [s["kind"] for s in with_base["sites"]] == [s["kind"] for s in report["sites"]]


# -- 5. negative trainable-token indices ------------------------------------------------------


def test_negative_trainable_token_index_is_a_format_error(peft_cases, tmp_path) -> None:
    case = peft_cases.get("llama_tt_list")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [-1, *config["trainable_token_indices"][1:]]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="trainable_token_indices"):
        loracc.merge(case.base_dir, adapter, tmp_path / "out")
    with pytest.raises(FormatError, match="trainable_token_indices"):
        loracc.inspect(adapter)


# -- 6. QALoRA: dense layers merge, GPTQ-grouped factors are refused --------------------------


def _qalora_case(tmp_path: Path) -> po.Case:
    spec = po.CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_qalora=True,
            qalora_group_size=4,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return po.build_case("llama_qalora_dense", tmp_path / "case", spec)


def test_qalora_on_dense_layers_merges_like_the_forward(tmp_path) -> None:
    case = _qalora_case(tmp_path)
    assert loracc.inspect(case.adapter_dir)["sites"]  # dense shapes are not "grouped"
    out = tmp_path / "out"
    loracc.merge(case.base_dir, case.adapter_dir, out)
    got = po.model_output(po.load_model(out, case.arch), case.inputs)
    assert po.rel_err(got, case.peft_logits) <= 1e-5


def test_qalora_gptq_grouped_factors_are_refused(tmp_path) -> None:
    case = _qalora_case(tmp_path)
    adapter = tmp_path / "grouped"
    shutil.copytree(case.adapter_dir, adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    # peft's QALoraLinearVariant on a GPTQ layer: lora_A is Linear(in // group, r).
    tensors = {
        k: (v[:, : v.shape[1] // 4].contiguous() if k.endswith("lora_A.weight") else v)
        for k, v in tensors.items()
    }
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match="QALoRA factors for a GPTQ layer"):
        loracc.merge(case.base_dir, adapter, tmp_path / "out")
    with pytest.raises(UnsupportedError, match="QALoRA factors for a GPTQ layer"):
        loracc.inspect(adapter)


# -- 8, 9. layering and one definition of the plain inits -------------------------------------


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_io_does_not_import_passes_or_lowerings() -> None:
    for path in sorted((REPO / "loracc" / "io").glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(("loracc.passes", "loracc.lower"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_plain_inits_are_defined_once_in_the_ir() -> None:
    from loracc import ir
    from loracc.passes import fold_dora, reconstruct_residual, truncate_rank

    for module in (fold_dora, reconstruct_residual, truncate_rank):
        assert module.PLAIN_INITS is ir.PLAIN_INITS
    literal = '"gaussian", "orthogonal"'
    holders = [p.name for p in (REPO / "loracc").rglob("*.py") if literal in p.read_text()]
    assert holders == ["ir.py"]
