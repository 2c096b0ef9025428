"""Layer layouts: every layout-ambiguous site is decided by the architecture table, the adapter's
fan_in_fan_out (base without config.json), the shape, ``--layout``, or refused (exit 2).

Each case is compared with PEFT's own ``merge_and_unload()`` tensor by tensor and with PEFT's
forward (unmerged), on square shapes where a shape cannot decide: square Linear, square Conv1D
with and without config.json, and square fused experts of every MoE layout in loracc.arch that
the installed transformers builds tiny (GPT-OSS experts-in-out stored fused, Llama 4 stored
fused, Mixtral and Qwen3-MoE stored per expert).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import loracc
from loracc import arch
from loracc._model_types import TRANSFORMERS_MODEL_TYPES
from loracc.arch import Layout
from loracc.cli import main
from loracc.errors import ConfigError, UnsupportedError
from loracc.io.layout import parse_layouts
from loracc.ir import SiteKind
from tests.support import peft_oracle as po

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
Conv1D = transformers.pytorch_utils.Conv1D

TOL = 1e-6


def _randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)


# -- tiny transformers MoE models with square experts ------------------------------------------


def _gpt_oss() -> Any:
    return transformers.GptOssConfig(
        **{**po.TINY_DECODER, "intermediate_size": 32},
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )


def _mixtral() -> Any:
    return transformers.MixtralConfig(
        **{**po.TINY_DECODER, "intermediate_size": 32}, num_local_experts=3, num_experts_per_tok=2
    )


def _qwen3_moe() -> Any:
    return transformers.Qwen3MoeConfig(
        **po.TINY_DECODER,
        moe_intermediate_size=32,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )


def _llama4_text() -> Any:
    return transformers.Llama4TextConfig(
        **{**po.TINY_DECODER, "intermediate_size": 32},
        intermediate_size_mlp=32,
        head_dim=8,
        num_local_experts=3,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
    )


MOE: dict[str, Callable[[], Any]] = {
    "gpt_oss": _gpt_oss,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "llama4_text": _llama4_text,
}


def _build_causal(
    root: Path, config: Any, lora: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Save a tiny base and a PEFT adapter under ``root``; PEFT's merged weights, the inputs and
    PEFT's unmerged logits."""
    po.seed_all(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * po.BASE_STD)
    model.save_pretrained(root / "base")
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **lora)
    )
    _randomize_lora(pm)
    pm.save_pretrained(root / "adapter")
    ids = torch.randint(3, po.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.eval()(ids).logits
        merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return merged, ids, want


def _causal_errors(
    root: Path, merged: dict[str, torch.Tensor], ids: torch.Tensor, want: torch.Tensor
) -> tuple[float, float]:
    """max |loracc - PEFT merge| over all weights, and the forward error against PEFT."""
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "out", dtype=torch.float32)
    got = model.state_dict()
    assert set(got) == set(merged)
    weight_err = max((got[k] - merged[k]).abs().max().item() for k in merged)
    with torch.no_grad():
        forward_err = (model.eval()(ids).logits - want).abs().max().item()
    return weight_err, forward_err


EXPERT_TARGETS = {
    "down": ["mlp.experts.down_proj"],
    "both": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}


@pytest.mark.parametrize("targets", sorted(EXPERT_TARGETS))
@pytest.mark.parametrize("model_type", sorted(MOE))
def test_square_experts_match_peft(tmp_path: Path, model_type: str, targets: str) -> None:
    """Bug: GPT-OSS experts (E, in, out) with intermediate == hidden merged transposed."""
    config = MOE[model_type]()
    assert config.model_type == model_type
    lora = dict(target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS[targets])
    if model_type == "llama4_text":
        lora["target_parameters"] = [
            t.replace("mlp.", "feed_forward.") for t in lora["target_parameters"]
        ]
    merged, ids, want = _build_causal(tmp_path, config, lora)
    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    weight_err, forward_err = _causal_errors(tmp_path, merged, ids, want)
    assert weight_err <= TOL and forward_err <= 1e-4, (weight_err, forward_err)
    sites = loracc.inspect(tmp_path / "adapter", tmp_path / "base")["sites"]
    experts = [s for s in sites if ".experts" in s["module"]]
    assert experts and all(s["layout"] == f"architecture {model_type}" for s in experts)


def test_unknown_moe_square_experts_refused_then_chosen(tmp_path: Path) -> None:
    """Square experts of a model_type the table does not know: refused, then --layout decides."""
    merged, ids, want = _build_causal(
        tmp_path,
        _gpt_oss(),
        dict(target_modules=["q_proj"], target_parameters=EXPERT_TARGETS["down"]),
    )
    cfg_path = tmp_path / "base" / "config.json"
    config = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**config, "model_type": "my_moe"}))
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--layout down_proj=experts-out-in or --layout down_proj=experts-in-out" in (
        result.output
    )
    assert not (tmp_path / "out").exists()
    # my_moe's square q_proj is unknown too: the table knows no module of it.
    chosen = ["--layout", "down_proj=experts-in-out", "--layout", "q_proj=linear"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out"), *chosen])
    assert result.exit_code == 0, result.output
    cfg_path.write_text(json.dumps(config))  # transformers knows gpt_oss, not my_moe
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert max(_causal_errors(tmp_path, merged, ids, want)) <= 1e-4


def test_square_linear_with_config_follows_architecture(tmp_path: Path) -> None:
    """Square q_proj/o_proj of a Llama: the table says nn.Linear."""
    config = transformers.LlamaConfig(**po.TINY_DECODER)
    merged, ids, want = _build_causal(tmp_path, config, dict(target_modules=["q_proj", "o_proj"]))
    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    weight_err, forward_err = _causal_errors(tmp_path, merged, ids, want)
    assert weight_err <= TOL and forward_err <= 1e-4
    sites = loracc.inspect(tmp_path / "adapter", tmp_path / "base")["sites"]
    assert {s["layout"] for s in sites} == {"architecture llama"}


def test_square_conv1d_with_config_follows_architecture(tmp_path: Path) -> None:
    """GPT-2's square attn.c_proj is Conv1D by the table, even with fan_in_fan_out false."""
    merged, ids, want = _build_causal(
        tmp_path, po.gpt2_config(tie=False), dict(target_modules=["c_proj"], fan_in_fan_out=False)
    )
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True  # peft flips it on wrapping a Conv1D
    saved["fan_in_fan_out"] = False
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    weight_err, forward_err = _causal_errors(tmp_path, merged, ids, want)
    assert weight_err <= TOL and forward_err <= 1e-4
    sites = loracc.inspect(tmp_path / "adapter", tmp_path / "base")["sites"]
    assert {(s["kind"], s["layout"]) for s in sites} == {("conv1d", "architecture gpt2")}


# -- custom modules without config.json --------------------------------------------------------


class _Square(nn.Module):
    """One square transformers Conv1D (outside the GPT-2 family) and optional Linear layers."""

    def __init__(self, linear: tuple[int, int] | None = None, conv1d: bool = True) -> None:
        super().__init__()
        if linear is not None:
            self.lin = nn.Linear(*linear)
        if conv1d:
            self.c = Conv1D(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


def _build_custom(
    root: Path, model: nn.Module, targets: list[str], fan_in_fan_out: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A base folder with no config.json, a PEFT adapter, PEFT's merged weights, inputs and
    PEFT's unmerged outputs."""
    po.seed_all(0)
    (root / "base").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(root / "base" / "model.safetensors"),
    )
    lora = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        init_lora_weights=False,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
    )
    pm = peft.get_peft_model(model, lora)
    _randomize_lora(pm)
    pm.save_pretrained(root / "adapter")
    x = torch.randn(3, 5)
    with torch.no_grad():
        want = pm(x)
        merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return merged, x, want


def _custom_errors(
    root: Path,
    model: nn.Module,
    merged: dict[str, torch.Tensor],
    x: torch.Tensor,
    want: torch.Tensor,
) -> tuple[float, float]:
    got = load_file(str(root / "out" / "model.safetensors"))
    weight_err = max((got[k] - merged[k]).abs().max().item() for k in merged)
    model.load_state_dict(got)
    with torch.no_grad():
        forward_err = (model(x) - want).abs().max().item()
    return weight_err, forward_err


REMOTE_CODE = {"model_type": "my_gpt", "auto_map": {"AutoModel": "modeling_my_gpt.MyGPT"}}


@pytest.mark.parametrize("config", [None, REMOTE_CODE], ids=["no-config", "remote-code"])
def test_square_conv1d_without_config_uses_fan_in_fan_out(
    tmp_path: Path, config: dict[str, Any] | None
) -> None:
    """Bug: a square Conv1D(5, 5) of a base without config.json was merged as nn.Linear."""
    model = _Square()
    merged, x, want = _build_custom(tmp_path, model, ["c"], fan_in_fan_out=True)
    if config is not None:
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    weight_err, forward_err = _custom_errors(tmp_path, _Square(), merged, x, want)
    assert weight_err <= TOL and forward_err <= TOL, (weight_err, forward_err)
    report = loracc.inspect(tmp_path / "adapter", tmp_path / "base")
    (site,) = report["sites"]
    assert site["kind"] == "conv1d" and site["layout"].startswith("fan_in_fan_out=true")
    text = (
        CliRunner()
        .invoke(main, ["inspect", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")])
        .output
    )
    assert "fan_in_fan_out=true" in text and "conv1d" in text


@pytest.mark.parametrize("drop_flag", [False, True])
def test_square_site_without_config_or_hint_is_refused(tmp_path: Path, drop_flag: bool) -> None:
    """A square nn.Linear, no config.json, fan_in_fan_out false or absent: nothing decides."""
    model = _Square(linear=(5, 5), conv1d=False)
    merged, x, want = _build_custom(tmp_path, model, ["lin"], fan_in_fan_out=False)
    config = tmp_path / "adapter" / "adapter_config.json"
    if drop_flag:
        config.write_text(
            json.dumps(
                {k: v for k, v in json.loads(config.read_text()).items() if k != "fan_in_fan_out"}
            )
        )
    args = [
        "merge",
        "--base",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        "-o",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "'lin'" in result.output
    assert "--layout lin=linear or --layout lin=conv1d" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, [*args, "--layout", "lin=linear"])
    assert result.exit_code == 0, result.output
    weight_err, forward_err = _custom_errors(tmp_path, _Square((5, 5), False), merged, x, want)
    assert weight_err <= TOL and forward_err <= TOL
    site = loracc.inspect(tmp_path / "adapter", tmp_path / "base", layout=["lin=linear"])
    assert site["sites"][0]["layout"] == "--layout lin=linear"


def test_fan_in_fan_out_contradicted_by_a_linear_is_refused(tmp_path: Path) -> None:
    """peft saves fan_in_fan_out of the last layer it wrapped: with an nn.Linear that is Linear by
    its shape (5 -> 7) beside the square Conv1D, the flag cannot decide the square site."""
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(5, 7))
    model.add_module("proj", nn.Linear(7, 5))
    model.add_module("c", Conv1D(5, 5))
    _build_custom(tmp_path, model, ["lin", "c"], fan_in_fan_out=True)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True  # c was wrapped last
    with pytest.raises(UnsupportedError, match="mixes both"):
        loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", layout={"c": "conv1d"})


def test_layout_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        parse_layouts(["q_proj=sideways"])
    with pytest.raises(ConfigError, match="MODULE_PATTERN=LAYOUT"):
        parse_layouts(["q_proj"])
    model = _Square()
    _build_custom(tmp_path, model, ["c"], fan_in_fan_out=True)
    with pytest.raises(ConfigError, match="matches no adapted module"):
        loracc.inspect(tmp_path / "adapter", tmp_path / "base", layout=["nothing=linear"])


# -- the table ---------------------------------------------------------------------------------


def test_arch_lookups() -> None:
    gpt2 = {"model_type": "gpt2"}
    assert arch.weight_layout(gpt2, "transformer.h.0.attn.c_proj") is Layout.CONV1D
    assert arch.weight_layout(gpt2, "lm_head") is Layout.LINEAR
    assert arch.weight_layout({"model_type": "llama"}, "model.layers.0.self_attn.q_proj") is (
        Layout.LINEAR
    )
    assert arch.weight_layout({}, "c_proj") is None
    # Not a model_type transformers builds: remote code or a custom class, nothing is known.
    assert arch.weight_layout({"model_type": "my_gpt", "auto_map": {}}, "c_proj") is None
    assert arch.weight_layout({"model_type": "custom"}, "q_proj") is None
    assert arch.expert_layout({"model_type": "gpt_oss"}) == ("gpt_oss", Layout.EXPERTS_IN_OUT)
    assert arch.expert_layout({"model_type": "mixtral"}) == ("mixtral", Layout.EXPERTS_OUT_IN)
    wrapped = {"model_type": "llama4", "text_config": {"model_type": "llama4_text"}}
    assert arch.expert_layout(wrapped) == ("llama4", Layout.EXPERTS_OUT_IN)
    assert arch.expert_layout({"model_type": "llama"}) is None
    assert arch.expert_layout({}) is None


def _modeling(model_type: str) -> Any:
    for name in (model_type, model_type.removesuffix("_text")):
        try:
            return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ModuleNotFoundError:
            continue
    return None


def test_expert_table_matches_transformers() -> None:
    """Each EXPERT_LAYOUTS entry agrees with its experts class's is_transposed (what PEFT reads)."""
    checked = 0
    for model_type, layout in arch.EXPERT_LAYOUTS.items():
        module = _modeling(model_type)
        if module is None:
            continue
        source = inspect.getsource(module)
        assert re.search(r"class \w+Experts\(", source), model_type
        decorators = re.findall(r"@use_experts_implementation(?:\(([^)]*)\))?", source)
        transposed = any("is_transposed=True" in args for args in decorators)
        assert (layout is Layout.EXPERTS_IN_OUT) == transposed, model_type
        checked += 1
    assert checked >= 10


def test_model_types_are_transformers_own() -> None:
    """The generated list names only model_types the installed transformers builds."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert arch.CONV1D_MODEL_TYPES <= TRANSFORMERS_MODEL_TYPES
    assert set(arch.EXPERT_LAYOUTS) <= TRANSFORMERS_MODEL_TYPES
    missing = TRANSFORMERS_MODEL_TYPES - set(CONFIG_MAPPING_NAMES)
    assert not missing, f"run scripts/gen_model_types.py: {sorted(missing)[:5]}"


def test_conv1d_table_matches_transformers() -> None:
    """transformers' Conv1D is used only by the CONV1D_MODEL_TYPES families' modeling code."""
    models = Path(transformers.__file__).parent / "models"
    users = {
        p.parent.name
        for p in models.glob("*/modeling_*.py")
        if re.search(r"\bConv1D\(", p.read_text(encoding="utf-8"))
    }
    names = {"openai": "openai-gpt"}
    assert {names.get(u, u) for u in users} <= arch.CONV1D_MODEL_TYPES


def test_onnx_graph_does_not_overrule_the_table() -> None:
    from loracc.passes.apply_graph_layout import graph_layout

    site = loracc.Site(
        "m",
        "m.weight",
        SiteKind.LINEAR,
        torch.zeros(1, 2),
        torch.zeros(2, 1),
        1.0,
        1.0,
        layout_source="architecture llama",
    )
    assert graph_layout(site, SiteKind.CONV1D, "graph") is site
    guessed = graph_layout(
        site.__class__(
            "m",
            "m.weight",
            SiteKind.LINEAR,
            site.lora_A,
            site.lora_B,
            1.0,
            1.0,
            layout_source="fan_in_fan_out",
        ),
        SiteKind.CONV1D,
        "graph",
    )
    assert guessed.kind is SiteKind.CONV1D and guessed.layout_source == "graph"
