"""PEFT-side oracle for the loracc merge tests.

Everything here is computed by PEFT and transformers (or by plain torch formulas taken from
/work/shared/ref/peft-lora-semantics.md). Nothing here imports loracc: the tests compare loracc's
output against these references, never against loracc itself.

A :class:`Case` is one tiny, seeded base model saved as a Hugging Face folder, one PEFT adapter
saved with ``save_pretrained`` (random, non-zero factors), and the reference results:

* ``base_logits``: the base model alone (used to check that the adapter matters),
* ``peft_logits``: the *unmerged* PeftModel forward in eval mode (the ground truth),
* ``merged_state``: PEFT's ``merge_and_unload()`` state dict (valid only where PEFT merges right),
* ``sites``: per LoRA layer, PEFT's resolved ``r``, ``lora_alpha`` and ``scaling``.

The reference is always recomputed from the folders on disk (fresh base load +
``PeftModel.from_pretrained``), so anything the adapter file does not carry cannot leak in.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "ARCHS",
    "CASE_SPECS",
    "TRAINABLE_IDS",
    "VOCAB",
    "Case",
    "CaseSpec",
    "TinyConvNet",
    "build_case",
    "config_json",
    "folder_key_files",
    "load_folder_tensors",
    "load_model",
    "model_output",
    "rel_err",
    "seed_all",
]

VOCAB = 128
# Token rows touched by the trainable-token cases; they are forced into the input ids.
TRAINABLE_IDS = [3, 7, 11]
ADAPTER_STD = 0.05  # noise added to every trainable adapter parameter
BASE_STD = 0.02  # noise added to every base parameter (biases and norms are not left at 0 / 1)


# --------------------------------------------------------------------------------------------
# Determinism


def seed_all(seed: int) -> None:
    """Seeds python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Tiny models


# The sizes every tiny decoder (Llama, Qwen2, Mistral, ...) shares; callers override by keyword.
TINY_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def llama_config(*, tie: bool = False, num_labels: int | None = None) -> Any:
    from transformers import LlamaConfig

    kw: dict[str, Any] = {}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    return LlamaConfig(**{**TINY_DECODER, "tie_word_embeddings": tie, **kw})


def gpt2_config(*, tie: bool = True) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def qwen3moe_config() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **TINY_DECODER, moe_intermediate_size=16, head_dim=8, num_experts=4, num_experts_per_tok=2
    )


def mixtral_config() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**TINY_DECODER, num_local_experts=3, num_experts_per_tok=2)


def gpt_oss_config() -> Any:
    """GPT-OSS: experts ``is_transposed`` (stored (E, in, out)), with biases."""
    from transformers import GptOssConfig

    return GptOssConfig(
        **{**TINY_DECODER, "intermediate_size": 16},
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


class TinyConvNet(nn.Module):
    """A custom (non-transformers) model: Conv2d 3x3, 1x1 and strided 3x3, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=1)
        self.conv3 = nn.Conv2d(8, 4, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


@dataclass(frozen=True)
class Arch:
    """How to build, save and load one family of tiny models."""

    name: str
    make_config: Callable[..., Any] | None  # None: custom nn.Module (TinyConvNet)
    auto_class: str  # "causal", "seqcls" or "custom"


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", llama_config, "causal"),
    "llama_tied": Arch("llama_tied", lambda: llama_config(tie=True), "causal"),
    "llama_seqcls": Arch("llama_seqcls", lambda: llama_config(num_labels=3), "seqcls"),
    "gpt2": Arch("gpt2", gpt2_config, "causal"),  # tied wte / lm_head (GPT-2 default)
    "gpt2_untied": Arch("gpt2_untied", lambda: gpt2_config(tie=False), "causal"),
    "qwen3moe": Arch("qwen3moe", qwen3moe_config, "causal"),
    "gpt_oss": Arch("gpt_oss", gpt_oss_config, "causal"),
    "mixtral": Arch("mixtral", mixtral_config, "causal"),
    "conv": Arch("conv", None, "custom"),
}


def _auto_cls(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal": AutoModelForCausalLM, "seqcls": AutoModelForSequenceClassification}[kind]


def _new_model(arch: Arch) -> nn.Module:
    if arch.auto_class == "custom":
        return TinyConvNet()
    assert arch.make_config is not None
    return _auto_cls(arch.auto_class).from_config(arch.make_config(), dtype=torch.float32)


def save_base(
    arch: Arch, base_dir: Path, *, dtype: torch.dtype, max_shard_size: str | None
) -> None:
    """Builds a seeded random base and saves it as a HF folder (safetensors)."""
    model = _new_model(arch)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are yielded once, so they stay tied
            p.add_(torch.randn_like(p) * BASE_STD)
    model = model.to(dtype)
    base_dir.mkdir(parents=True, exist_ok=True)
    if arch.auto_class == "custom":
        assert max_shard_size is None
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
        (base_dir / "config.json").write_text(json.dumps({"model_type": "custom"}))
        return
    kw: dict[str, Any] = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(str(base_dir), **kw)


def load_model(folder: Path, arch: Arch | str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Loads a HF folder (base or merged output) in eval mode with the right Auto class.

    Fails when transformers reports missing, unexpected or mismatched keys (transformers would
    otherwise silently initialise a missing tensor at random). The custom conv model is rebuilt
    from its class and filled from the folder's safetensors with ``strict=True``.
    """
    if isinstance(arch, str):
        arch = ARCHS[arch]
    if arch.auto_class == "custom":
        model = TinyConvNet()
        state = load_folder_tensors(folder)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return model.to(dtype).eval()
    model, info = _auto_cls(arch.auto_class).from_pretrained(
        str(folder), dtype=dtype, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not problems and not info.get("error_msgs"), f"loading {folder}: {info}"
    return model.eval()


def model_output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits (or the plain output of the custom model), fp32, no KV cache."""
    with torch.no_grad():
        if inputs.is_floating_point():  # the custom conv model (plain or PEFT-wrapped)
            out = model(inputs)
        else:
            out = model(input_ids=inputs, use_cache=False).logits
    return out.detach().float().clone()


def make_inputs(arch: Arch) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    if arch.auto_class == "custom":
        return torch.randn(2, 3, 8, 8, generator=gen)
    ids = torch.randint(
        1, VOCAB, (2, 12), generator=gen
    )  # no pad id 0 (seq-cls uses the last token)
    ids[0, : len(TRAINABLE_IDS)] = torch.tensor(TRAINABLE_IDS)
    return ids


# --------------------------------------------------------------------------------------------
# Folder helpers (plain safetensors reads, no loracc)


def folder_key_files(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index if there is one, else model.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return {k: single.name for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors folder."""
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(folder_key_files(folder).values())):
        for k, v in load_file(str(folder / fname)).items():
            assert k not in out, f"tensor {k} appears in two shards"
            out[k] = v
    return out


def config_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class CaseSpec:
    arch: str
    lora: Mapping[str, Any]
    base_dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None
    seed: int = 0
    # The oracle checks PEFT's own merge against its unmerged forward when this is True. Set it to
    # False for the cases where PEFT's merge_and_unload is known to be wrong.
    peft_merge_ok: bool = True
    # Skip building the merge reference (e.g. aLoRA cannot be merged by PEFT).
    merge: bool = True


# LoRA on both fused expert parameters of every MoE layer (PEFT nests the two wrappers).
FUSED_EXPERTS_LORA: dict[str, Any] = dict(
    r=2,
    lora_alpha=4,
    target_modules=[],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)

# Every Linear of a Llama decoder layer.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASE_SPECS: dict[str, CaseSpec] = {
    # Plain Linear on every Llama projection.
    "llama_linear": CaseSpec(
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=LLAMA_PROJECTIONS,
        ),
    ),
    "llama_bf16": CaseSpec(
        "llama",
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        base_dtype=torch.bfloat16,
        seed=1,
    ),
    # alpha/sqrt(r) = 3 instead of alpha/r = 1.5 (r=4, alpha=6).
    "llama_rslora": CaseSpec(
        "llama",
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    # q_proj -> r 4 (scale 4), layer-1 up_proj -> r 2 (scale 8), down_proj -> alpha 24 (scale 3),
    # others r 8, alpha 16 (scale 2).
    "llama_patterns": CaseSpec(
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            target_modules=LLAMA_PROJECTIONS,
            rank_pattern={"q_proj": 4, "model.layers.1.mlp.up_proj": 2},
            alpha_pattern={"down_proj": 24},
        ),
    ),
    # GPT-2 Conv1D (stored (in, out)).
    "gpt2_conv1d": CaseSpec(
        "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    ),
    # The saved fan_in_fan_out is False although c_attn is a transposed Conv1D (untied, so PEFT's
    # merge of lm_head is valid too).
    "gpt2_fifo_misleading": CaseSpec(
        "gpt2_untied", dict(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"])
    ),
    "gpt2_lora_bias": CaseSpec(
        "gpt2",
        dict(r=4, lora_alpha=12, lora_bias=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
    "gpt2_bias_all": CaseSpec(
        "gpt2", dict(r=4, lora_alpha=8, bias="all", target_modules=["c_attn"])
    ),
    "gpt2_bias_lora_only": CaseSpec(
        "gpt2", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["c_attn", "c_fc"])
    ),
    # Embedding LoRA on an untied model: PEFT's merge is right.
    "llama_embed": CaseSpec(
        "llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ),
    # Embedding LoRA on a tied model: PEFT's merge moves lm_head too (wrong).
    "gpt2_wte_tied": CaseSpec(
        "gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]), peft_merge_ok=False
    ),
    # LoRA on a tied lm_head: PEFT's merge moves the input embedding too (wrong).
    "gpt2_lmhead_tied": CaseSpec(
        "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"]), peft_merge_ok=False
    ),
    "conv2d": CaseSpec(
        "conv", dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "conv3", "fc"])
    ),
    "llama_mts_lm_head": CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    # task_type SEQ_CLS adds "classifier" and "score" to modules_to_save.
    "llama_seqcls_score": CaseSpec(
        "llama_seqcls",
        dict(r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]),
    ),
    "llama_tt_list": CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            trainable_token_indices=list(TRAINABLE_IDS),
        ),
    ),
    "llama_tt_dict": CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            trainable_token_indices={"embed_tokens": [3, 7], "lm_head": [5, 9, 11]},
        ),
    ),
    # Tied GPT-2: the rows land in the shared wte / lm_head weight (PEFT keeps it tied; correct).
    "gpt2_tt_tied": CaseSpec(
        "gpt2",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn"],
            trainable_token_indices=list(TRAINABLE_IDS),
        ),
    ),
    "llama_target_param_2d": CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=[],
            target_parameters=["model.layers.0.mlp.down_proj.weight"],
        ),
    ),
    # Fused 3-D expert parameters (E, out, in); on disk transformers 5.24 writes per-expert keys.
    "qwen3moe_target_param_3d": CaseSpec("qwen3moe", FUSED_EXPERTS_LORA),
    # Transposed experts (E, in, out), stored fused: gate_up_proj (4, 32, 32), down_proj
    # (4, 16, 32).
    "gpt_oss_target_param_3d": CaseSpec("gpt_oss", FUSED_EXPERTS_LORA),
    # Experts next to 2-D sites (q_proj, the router's gate).
    "mixtral_target_param_3d": CaseSpec(
        "mixtral", {**FUSED_EXPERTS_LORA, "target_modules": ["q_proj", "gate"]}
    ),
    # One 3-D parameter per module (no nesting): isolates the per-expert on-disk layout.
    "qwen3moe_target_param_3d_single": CaseSpec(
        "qwen3moe",
        dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.down_proj"]),
        seed=2,
    ),
    "llama_sharded": CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        max_shard_size="20KB",
    ),
    # 2 layers -> [0, 1, 1] (3 layers), each copy with its own LoRA; PEFT's merge piles deltas into
    # the shared tensors (wrong).
    "llama_layer_replication": CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            layer_replication=[[0, 2], [1, 2]],
        ),
        peft_merge_ok=False,
    ),
    # aLoRA: PEFT refuses to merge; loracc must refuse.
    "llama_alora": CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj"],
            alora_invocation_tokens=[5, 6],
        ),
        merge=False,
    ),
}


@dataclass
class Case:
    """One base folder + one PEFT adapter folder + PEFT's reference results."""

    name: str
    spec: CaseSpec
    arch: Arch
    base_dir: Path
    adapter_dir: Path
    inputs: torch.Tensor
    base_logits: torch.Tensor
    peft_logits: torch.Tensor  # unmerged PeftModel forward, eval mode: the ground truth
    peft_merged_logits: torch.Tensor | None  # PEFT merge_and_unload forward (informational)
    merged_state: dict[str, torch.Tensor] | None  # PEFT merge_and_unload state dict
    sites: dict[str, dict[str, Any]]  # PEFT LoRA layers: name -> {"r", "alpha", "scale", "type"}
    adapter_config: dict[str, Any] = field(default_factory=dict)
    adapter_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_tensors(self) -> dict[str, torch.Tensor]:
        return load_folder_tensors(self.base_dir)

    @property
    def peft_merge_rel_err(self) -> float | None:
        if self.peft_merged_logits is None:
            return None
        return rel_err(self.peft_merged_logits, self.peft_logits)


def _randomize_adapter(peft_model: nn.Module) -> None:
    """Adds noise to every trainable parameter of a fresh PeftModel.

    That covers lora_A / lora_B (and lora_B.bias), lora_embedding_A / B, ParamWrapper factors,
    modules_to_save copies, trainable_tokens_delta and, with bias="all" / "lora_only", the saved
    biases. Whatever PEFT does not save is harmless: the reference is recomputed from disk.
    """
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * ADAPTER_STD)


def _peft_sites(peft_model: nn.Module) -> dict[str, dict[str, Any]]:
    from peft.tuners.lora import LoraLayer

    sites: dict[str, dict[str, Any]] = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "r", {}):
            short = name.removeprefix("base_model.model.")
            sites[short] = {
                "r": int(mod.r["default"]),
                "alpha": float(mod.lora_alpha["default"]),
                "scale": float(mod.scaling["default"]),
                "type": type(mod).__name__,
                "parameter_name": getattr(mod, "parameter_name", None),
            }
    return sites


def _load_base(case_arch: Arch, base_dir: Path, dtype: torch.dtype) -> nn.Module:
    if case_arch.auto_class == "custom":
        model = TinyConvNet()
        model.load_state_dict(load_folder_tensors(base_dir), strict=True)
        return model.to(dtype).eval()
    return load_model(base_dir, case_arch, dtype=dtype)


def build_case(name: str, root: Path, spec: CaseSpec | None = None) -> Case:
    """Writes ``root/base`` and ``root/adapter`` for ``CASE_SPECS[name]``; computes the oracle."""
    from peft import LoraConfig, PeftModel, get_peft_model

    spec = spec or CASE_SPECS[name]
    arch = ARCHS[spec.arch]
    root = Path(root)
    base_dir, adapter_dir = root / "base", root / "adapter"

    seed_all(spec.seed)
    save_base(arch, base_dir, dtype=spec.base_dtype, max_shard_size=spec.max_shard_size)

    # Adapter: created on the base exactly as stored on disk, random non-zero factors.
    seed_all(spec.seed + 1000)
    model = _load_base(arch, base_dir, spec.base_dtype)
    lora_kwargs = dict(spec.lora)
    lora_kwargs.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    _randomize_adapter(peft_model)
    peft_model.eval()
    inputs = make_inputs(arch)
    trained_logits = model_output(peft_model, inputs)
    peft_model.save_pretrained(str(adapter_dir))
    del peft_model, model

    # Oracle, from disk only.
    base_model = _load_base(arch, base_dir, torch.float32)
    base_logits = model_output(base_model, inputs)
    del base_model

    ref_model = PeftModel.from_pretrained(
        _load_base(arch, base_dir, spec.base_dtype), str(adapter_dir)
    )
    ref_model.eval()
    sites = _peft_sites(ref_model)
    peft_logits = model_output(ref_model, inputs)
    # Guard on the oracle itself: PEFT's save / load round trip must reproduce the in-memory model.
    assert rel_err(peft_logits, trained_logits) <= 1e-6, (
        f"{name}: PEFT save/load round trip drifted"
    )
    peft_merged_logits = None
    merged_state = None
    if spec.merge:
        merged = ref_model.merge_and_unload()
        merged.eval()
        merged_state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        if spec.base_dtype == torch.float32:
            peft_merged_logits = model_output(merged, inputs)

    return Case(
        name=name,
        spec=spec,
        arch=arch,
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        inputs=inputs,
        base_logits=base_logits,
        peft_logits=peft_logits,
        peft_merged_logits=peft_merged_logits,
        merged_state=merged_state,
        sites=sites,
        adapter_config=json.loads((adapter_dir / "adapter_config.json").read_text()),
        adapter_tensors=load_file(str(adapter_dir / "adapter_model.safetensors")),
    )


# --------------------------------------------------------------------------------------------
# Independent formulas (from the PEFT reference, computed in fp32 torch)


def adapter_factor(case: Case, module: str, which: str) -> torch.Tensor:
    """``lora_A`` / ``lora_B`` weight of ``module`` from the adapter file (prefix tolerant)."""
    pat = re.compile(rf"^(base_model\.model\.)?{re.escape(module)}\.{which}\.weight$")
    hits = [v for k, v in case.adapter_tensors.items() if pat.match(k)]
    assert len(hits) == 1, f"{module}.{which}: {len(hits)} hits in {sorted(case.adapter_tensors)}"
    return hits[0]


def linear_delta(case: Case, module: str) -> torch.Tensor:
    """``(B @ A) * s`` in fp32, with s taken from PEFT's loaded layer (matmul first, as PEFT)."""
    a = adapter_factor(case, module, "lora_A").float()
    b = adapter_factor(case, module, "lora_B").float()
    return (b @ a) * case.sites[module]["scale"]


def spec_replace(spec: CaseSpec, **kw: Any) -> CaseSpec:
    return dataclasses.replace(spec, **kw)
