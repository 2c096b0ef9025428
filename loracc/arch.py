"""What loracc knows about model architectures, in one table (mergekit's ``architecture/`` idea).

Everything here is data, looked up by ``config.json``'s ``model_type`` or by key names; the code
that uses it stays with its format (io/checkpoint.py, io/peft.py, io/replicated.py, the
expand-layer-replication pass, the ONNX binder). Each claim was checked against transformers'
modeling code (5.x) and PEFT's ``ParamWrapper``; ``tests/test_layout.py`` re-checks the Conv1D and
expert tables against the transformers installed next to the tests.

Layouts (docs/FORMATS.md "Layer layouts"):

- 2-D weights: ``linear`` (``nn.Linear``, stored (out, in)) or ``conv1d`` (transformers'
  ``Conv1D``, stored (in, out)).
- 3-D fused expert parameters (``target_parameters``): ``experts-out-in`` (E, out, in) or
  ``experts-in-out`` (E, in, out). PEFT takes the reading from the experts module's
  ``is_transposed`` attribute (``experts-in-out`` when it is true), not from how the model's
  forward uses the tensor, and loracc follows PEFT: Llama 4's experts are used as (E, in, out)
  but have no ``is_transposed``, so PEFT (and this table) read them as (E, out, in).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

from loracc._model_types import TRANSFORMERS_MODEL_TYPES

__all__ = [
    "CONV1D_LEAVES",
    "CONV1D_MODEL_TYPES",
    "EMBEDDING_KEYS",
    "EXPERT_KEY",
    "EXPERT_LAYOUTS",
    "FUSED_EXPERTS",
    "FUSED_PROJECTIONS",
    "HEAD_ARCHITECTURES",
    "LAYER_COUNT_KEYS",
    "LAYER_KEY",
    "LAYER_LIST_PREFERENCE",
    "MODULE_RENAMES",
    "OUTPUT_EMBEDDING_KEYS",
    "PER_LAYER_CONFIG_KEYS",
    "STORED_LAYOUTS",
    "Layout",
    "architecture",
    "expert_layout",
    "has_conv1d",
    "remote_code",
    "weight_layout",
]


class Layout(str, enum.Enum):
    """How a base tensor stores the (out, in) matrix a LoRA delta is added to."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    EXPERTS_OUT_IN = "experts-out-in"
    EXPERTS_IN_OUT = "experts-in-out"

    @property
    def experts(self) -> bool:
        return self in (Layout.EXPERTS_OUT_IN, Layout.EXPERTS_IN_OUT)


# -- embeddings and heads ---------------------------------------------------------------------

# Input-embedding keys of common architectures, tried when lm_head is tied and absent.
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.word_embeddings.weight",
    "gpt_neox.embed_in.weight",
    "embed_tokens.weight",
    "wte.weight",
)
# Key endings of an input embedding when none of EMBEDDING_KEYS is stored.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight")
OUTPUT_EMBEDDING_KEYS = ("lm_head.weight",)
# Class-name endings of transformers models whose output head can share the input embedding.
HEAD_ARCHITECTURES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForConditionalGeneration",
    "ForMaskedLM",
    "WithLMHead",
    "ForPreTraining",
)

# -- 2-D layouts: transformers' Conv1D ---------------------------------------------------------

# model_types whose c_attn/c_proj/c_fc/q_attn layers are transformers' Conv1D (stored (in, out)):
# the only users of pytorch_utils.Conv1D among transformers' models. Every other leaf of these
# models, and every 2-D weight of every other transformers architecture, is nn.Linear (out, in).
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"}
)
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

# -- 3-D expert parameters ---------------------------------------------------------------------

_IN_OUT = Layout.EXPERTS_IN_OUT
_OUT_IN = Layout.EXPERTS_OUT_IN
# Fused expert parameters by model_type, as PEFT reads them (the experts class's is_transposed;
# @use_experts_implementation defaults it to False). The MoE families transformers can build.
EXPERT_LAYOUTS: Mapping[str, Layout] = {
    # @use_experts_implementation(is_transposed=True): gate_up_proj (E, hidden, 2·inter).
    "gpt_oss": _IN_OUT,
    "aria": _IN_OUT,
    "aria_text": _IN_OUT,
    "ergo": _IN_OUT,
    "openai_privacy_filter": _IN_OUT,
    # Llama4TextExperts: (E, hidden, 2·inter) used as (E, in, out), but no is_transposed.
    "llama4": _OUT_IN,
    "llama4_text": _OUT_IN,
    # @use_experts_implementation defaults: gate_up_proj (E, 2·inter, hidden).
    **dict.fromkeys(
        (
            "mixtral",
            "minimax",
            "minimax_m2",
            "phimoe",
            "jamba",
            "qwen2_moe",
            "qwen3_moe",
            "qwen3_next",
            "qwen3_vl_moe",
            "qwen3_vl_moe_text",
            "qwen3_omni_moe",
            "qwen3_5_moe",
            "qwen3_5_moe_text",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "olmoe",
            "flex_olmo",
            "glm4_moe",
            "glm4v_moe",
            "glm4v_moe_text",
            "dots1",
            "ernie4_5_moe",
            "hunyuan_v1_moe",
            "granitemoe",
            "granitemoeshared",
            "granitemoehybrid",
            "lfm2_moe",
            "exaone_moe",
            "longcat_flash",
            "afmoe",
        ),
        _OUT_IN,
    ),
}

# transformers >= 5 models hold MoE experts as fused 3-D parameters but save_pretrained writes the
# original per-expert tensors (conversion_mapping.py: "mixtral", "qwen2_moe" and the families
# mapped to them): gate_up_proj[e] = cat(gate[e], up[e]) on rows, down_proj[e] = down[e]. GPT-OSS
# and Llama 4 store the fused tensors as they are. Each fused name lists its per-expert
# projections, one tuple per naming (Qwen/DeepSeek, Mixtral).
EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")
FUSED_EXPERTS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}

# -- module paths and stored names -------------------------------------------------------------

# (module path infix, stored infix): Mixtral's block_sparse_moe is the model's mlp.
MODULE_RENAMES = ((".mlp.", ".block_sparse_moe."),)
# transformers >= 5 also renames whole module layouts in memory while save_pretrained keeps the
# checkpoint's names, and PEFT saves adapters under the in-memory paths. Each layout maps a module
# path to its stored key (all substitutions together); a result counts only if it is stored.
# ViT family: conversion_mapping.py's "ViTModel" renames, reversed.
STORED_LAYOUTS: tuple[tuple[tuple[re.Pattern[str], str], ...], ...] = (
    (
        (re.compile(r"\.layers\.(\d+)\."), r".encoder.layer.\1."),
        (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
        (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
        (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
        (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
        (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
        (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
    ),
)

# Projections exported as one fused weight (ONNX exports, ModelBuilder): the separate modules, in
# the fused weight's row order, and the fused weight's leaf names.
FUSED_PROJECTIONS: Mapping[tuple[str, ...], tuple[str, ...]] = {
    ("q_proj", "k_proj", "v_proj"): ("qkv_proj", "query_key_value", "Wqkv", "qkv", "c_attn"),
    ("query", "key", "value"): ("qkv", "query_key_value", "in_proj"),
    ("gate_proj", "up_proj"): ("gate_up_proj", "gate_up", "w13"),
}

# -- layer lists -------------------------------------------------------------------------------

LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h))\.(?P<index>\d+)\.(?P<rest>.+)$")
# Layer-list prefixes in the order peft's replicate_layers tries them (llama, bert, falcon), then
# the extras.
LAYER_LIST_PREFERENCE = (
    re.compile(r"^(?:model\.)*layers$"),
    re.compile(r"^(?:model\.)*(?:bert\.)?encoder\.layer$"),
    re.compile(r"^(?:model\.)*h$"),
    re.compile(r"^(?:model\.)*decoder\.layers$"),
    re.compile(r"^(?:model\.)*transformer\.h$"),
)
# config.json keys holding the layer count, most common first.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config.json lists with one entry per layer (besides layer_types and *_layer_types).
PER_LAYER_CONFIG_KEYS = frozenset({"no_rope_layers", "num_attention_heads_per_layer"})


# -- lookups -----------------------------------------------------------------------------------


def architecture(config: Mapping[str, Any]) -> str | None:
    """The model's ``model_type``, or None."""
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type else None


def remote_code(config: Mapping[str, Any]) -> bool:
    """Whether the model's modules come with the checkpoint (``auto_map``), not transformers."""
    return "auto_map" in config


def has_conv1d(config: Mapping[str, Any]) -> bool:
    """Whether the architecture uses transformers' Conv1D anywhere."""
    return any(t in CONV1D_MODEL_TYPES for t in _model_types(config))


def _model_types(config: Mapping[str, Any]) -> list[str]:
    """The model's model_type, then its text model's (multimodal wrappers)."""
    found = []
    for scope in (config, config.get("text_config")):
        if isinstance(scope, Mapping) and (t := architecture(scope)) is not None:
            found.append(t)
    return found if architecture(config) is not None else []


def weight_layout(config: Mapping[str, Any], module: str) -> Layout | None:
    """The layout of ``module``'s 2-D weight in a transformers model, or None when unknown.

    Unknown: no model_type, or one transformers does not build (its modules are not in the table).
    """
    types = _model_types(config)
    if not types or types[0] not in TRANSFORMERS_MODEL_TYPES:
        return None
    leaf = module.rsplit(".", 1)[-1]
    if leaf in CONV1D_LEAVES and has_conv1d(config):
        return Layout.CONV1D
    return Layout.LINEAR


def expert_layout(config: Mapping[str, Any]) -> tuple[str, Layout] | None:
    """(model_type, layout) of the model's fused 3-D expert parameters, or None when unknown."""
    for t in _model_types(config):
        if t in EXPERT_LAYOUTS:
            return t, EXPERT_LAYOUTS[t]
    return None
