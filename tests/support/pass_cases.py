"""PEFT-made cases for the pass and convert tests (DoRA, PiSSA/OLoRA, layer replication).

Built with :func:`peft_oracle.build_case` (PEFT and transformers only, never loracc), once per
session. Adds two tiny 3-layer architectures: Llama (no per-layer config lists) and Qwen2 (with
``layer_types``, which transformers checks against ``num_hidden_layers``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support import peft_oracle as po

__all__ = ["SPECS", "NiterCase", "QwenReplication", "build_niter", "build_qwen_replication", "case"]


def _llama3() -> Any:
    cfg = po.llama_config()
    cfg.num_hidden_layers = 3
    return cfg


def _qwen2_3() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**{**po.TINY_DECODER, "num_hidden_layers": 3})


po.ARCHS.setdefault("llama3", po.Arch("llama3", _llama3, "causal"))
po.ARCHS.setdefault("qwen2_3", po.Arch("qwen2_3", _qwen2_3, "causal"))

_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

SPECS: dict[str, po.CaseSpec] = {
    "dora_linear": po.CaseSpec(
        "llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=[*_ATTN, "down_proj"])
    ),
    "dora_rslora_bf16": po.CaseSpec(
        "llama",
        dict(
            r=4, lora_alpha=6, use_rslora=True, use_dora=True, target_modules=["q_proj", "up_proj"]
        ),
        base_dtype=torch.bfloat16,
        seed=3,
    ),
    "dora_conv1d": po.CaseSpec(
        "gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"])
    ),
    "dora_embedding": po.CaseSpec(
        "llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"])
    ),
    "dora_conv2d": po.CaseSpec(
        "conv", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["conv1", "conv2", "conv3"])
    ),
    "pissa": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=[*_ATTN, "down_proj"]),
    ),
    "pissa_conv1d": po.CaseSpec(
        "gpt2_untied",
        dict(r=4, lora_alpha=6, init_lora_weights="pissa", target_modules=["c_attn", "c_fc"]),
    ),
    "olora": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, init_lora_weights="olora", target_modules=[*_ATTN, "up_proj"]),
    ),
    "replication": po.CaseSpec(
        "llama3",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layer_replication=[[0, 2], [1, 3]],
        ),
        peft_merge_ok=False,
    ),
}

_BUILT: dict[str, Any] = {}


def case(name: str, tmp: pytest.TempPathFactory) -> po.Case:
    """The named case of :data:`SPECS`, built once per session."""
    if name not in _BUILT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BUILT[name] = po.build_case(name, tmp.mktemp(f"pass_{name}"), SPECS[name])
    return _BUILT[name]


@dataclass
class NiterCase:
    """A pissa_niter adapter with what only the training run knows."""

    base_dir: Path
    adapter_dir: Path  # the trained adapter, init_lora_weights="pissa_niter_4"
    initial_dir: Path  # saved right after get_peft_model (A0, B0)
    converted_dir: Path  # peft's path_initial_model_for_weight_conversion output (rank 2r)
    inputs: torch.Tensor
    base_logits: torch.Tensor
    trained_logits: torch.Tensor  # the adapted model as trained, in memory: the ground truth
    reloaded_logits: torch.Tensor  # PeftModel.from_pretrained on the original base (re-inits)


def build_niter(tmp: pytest.TempPathFactory) -> NiterCase:
    """Build the pissa_niter case once per session."""
    if "niter" in _BUILT:
        return _BUILT["niter"]
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp.mktemp("pass_niter")
    arch = po.ARCHS["llama"]
    base_dir = root / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po.seed_all(11)
        po.save_base(arch, base_dir, dtype=torch.float32, max_shard_size=None)
        po.seed_all(1011)
        inputs = po.make_inputs(arch)
        model = po.load_model(base_dir, arch)
        base_logits = po.model_output(model, inputs)
        config = LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="pissa_niter_4", target_modules=[*_ATTN, "up_proj"]
        )
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(str(root / "initial"))
        po._randomize_adapter(peft_model)
        peft_model.eval()
        trained = po.model_output(peft_model, inputs)
        peft_model.save_pretrained(str(root / "adapter"))
        peft_model.save_pretrained(
            str(root / "converted"), path_initial_model_for_weight_conversion=str(root / "initial")
        )
        reloaded = PeftModel.from_pretrained(po.load_model(base_dir, arch), str(root / "adapter"))
        reloaded_logits = po.model_output(reloaded.eval(), inputs)
    _BUILT["niter"] = NiterCase(
        base_dir,
        root / "adapter",
        root / "initial",
        root / "converted",
        inputs,
        base_logits,
        trained,
        reloaded_logits,
    )
    return _BUILT["niter"]


@dataclass
class QwenReplication:
    """layer_replication [[0, 2], [1, 3]] on a 3-layer Qwen2, whose config has ``layer_types``."""

    base_dir: Path
    adapter_dir: Path
    inputs: torch.Tensor
    base_logits: torch.Tensor
    peft_logits: torch.Tensor  # unmerged PEFT forward, layer_types re-indexed by hand
    stale_error: str  # what PEFT's own forward raises with the stale layer_types


def build_qwen_replication(tmp: pytest.TempPathFactory) -> QwenReplication:
    """Build the Qwen2 layer-replication case once per session."""
    if "qwen_replication" in _BUILT:
        return _BUILT["qwen_replication"]
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp.mktemp("pass_qwen_replication")
    arch = po.ARCHS["qwen2_3"]
    base_dir, adapter_dir = root / "base", root / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        po.seed_all(21)
        po.save_base(arch, base_dir, dtype=torch.float32, max_shard_size=None)
        po.seed_all(1021)
        inputs = po.make_inputs(arch)
        base_logits = po.model_output(po.load_model(base_dir, arch), inputs)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            target_modules=["q_proj", "o_proj"],
            layer_replication=[[0, 2], [1, 3]],
        )
        peft_model = get_peft_model(po.load_model(base_dir, arch), config)
        po._randomize_adapter(peft_model)
        peft_model.save_pretrained(str(adapter_dir))
        ref = PeftModel.from_pretrained(po.load_model(base_dir, arch), str(adapter_dir)).eval()
        try:
            po.model_output(ref, inputs)
            stale_error = ""
        except IndexError as e:
            stale_error = repr(e)
        cfg = ref.base_model.model.config
        cfg.layer_types = [cfg.layer_types[i] for i in (0, 1, 1, 2)]
        peft_logits = po.model_output(ref, inputs)
    _BUILT["qwen_replication"] = QwenReplication(
        base_dir, adapter_dir, inputs, base_logits, peft_logits, stale_error
    )
    return _BUILT["qwen_replication"]
