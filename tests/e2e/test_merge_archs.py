"""loracc merge vs PEFT on more architectures (BERT seq-cls, Qwen2 biases, Mistral, ViT) + bf16.

Each case is a tiny seeded base built from a transformers config class (no hub) and a PEFT adapter
with random non-zero factors (``peft_oracle``). For each case:

* (a) every merged tensor equals PEFT's ``merge_and_unload()`` tensor within 1e-6 relative
  (``max|got - ref| <= 1e-6 * max|ref|``, fp32), with the base's key set, shapes and dtypes;
* (b) the merged folder, loaded by transformers with the right Auto class (missing / unexpected
  keys fail), reproduces the *unmerged* PeftModel forward within 1e-5 relative, and the adapter
  moves the logits by more than 1e-2 relative (so the test can fail).

The bf16 test checks the single-rounding criterion against an fp64 reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support import peft_oracle as po

LOGITS_RTOL = 1e-5
WEIGHT_RTOL = 1e-6
MIN_ADAPTER_EFFECT = 1e-2

_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)


# --------------------------------------------------------------------------------------------
# Tiny architectures (registered in peft_oracle by setdefault, as pass_cases.py does)


def _bert_seqcls() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=po.VOCAB, max_position_embeddings=64, num_labels=3, pad_token_id=0, **_TINY
    )


def _qwen2_bias() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**po.TINY_DECODER)


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**po.TINY_DECODER)


def _vit() -> Any:
    from transformers import ViTConfig

    return ViTConfig(image_size=32, patch_size=16, num_channels=3, num_labels=3, **_TINY)


po.ARCHS.setdefault("bert_seqcls", po.Arch("bert_seqcls", _bert_seqcls, "seqcls"))
po.ARCHS.setdefault("qwen2_bias", po.Arch("qwen2_bias", _qwen2_bias, "causal"))
po.ARCHS.setdefault("mistral", po.Arch("mistral", _mistral, "causal"))

SPECS: dict[str, po.CaseSpec] = {
    # task_type SEQ_CLS: PEFT adds "classifier" / "score" to modules_to_save itself.
    "bert_seqcls": po.CaseSpec(
        "bert_seqcls",
        dict(
            r=4,
            lora_alpha=8,
            task_type="SEQ_CLS",
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
    ),
    "qwen2_lora_bias": po.CaseSpec(
        "qwen2_bias",
        dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    ),
    "qwen2_bias_lora_only": po.CaseSpec(
        "qwen2_bias",
        dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj", "k_proj", "v_proj"]),
        seed=1,
    ),
    "mistral_all_linear": po.CaseSpec(
        "mistral", dict(r=4, lora_alpha=8, target_modules="all-linear")
    ),
}


# --------------------------------------------------------------------------------------------
# ViT: peft_oracle.build_case only knows token inputs, so the image case is built here, the same
# way (seeded base + noise, PEFT adapter + noise, oracle recomputed from disk).


@dataclass
class ImageCase:
    name: str
    base_dir: Path
    adapter_dir: Path
    inputs: torch.Tensor
    base_logits: torch.Tensor
    peft_logits: torch.Tensor
    merged_state: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]]
    adapter_config: dict[str, Any]

    @property
    def base_tensors(self) -> dict[str, torch.Tensor]:
        return po.load_folder_tensors(self.base_dir)


def _load_vit(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not problems and not info.get("error_msgs"), f"loading {folder}: {info}"
    return model.eval()


def _vit_output(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits.detach().float().clone()


VIT_TARGETS = {
    "vit_imgcls": ["q_proj", "v_proj"],
    # Every renamed linear (k_proj / o_proj / fc1 / fc2 are stored as key / output.dense / ...).
    "vit_imgcls_all": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
}


def build_vit_case(name: str, root: Path, seed: int = 0) -> ImageCase:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageClassification

    base_dir, adapter_dir = root / "base", root / "adapter"
    po.seed_all(seed)
    model = AutoModelForImageClassification.from_config(_vit(), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * po.BASE_STD)
    model.save_pretrained(str(base_dir))

    po.seed_all(seed + 1000)
    # transformers 5 names ViT's query / value q_proj / v_proj in memory (the checkpoint keeps
    # the legacy ``vit.encoder.layer.N.attention.attention.query`` names).
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=VIT_TARGETS[name],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(_load_vit(base_dir), lora)
    po._randomize_adapter(peft_model)
    peft_model.eval()
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    trained = _vit_output(peft_model, inputs)
    peft_model.save_pretrained(str(adapter_dir))
    del peft_model

    base_logits = _vit_output(_load_vit(base_dir), inputs)
    ref = PeftModel.from_pretrained(_load_vit(base_dir), str(adapter_dir)).eval()
    sites = po._peft_sites(ref)
    peft_logits = _vit_output(ref, inputs)
    assert po.rel_err(peft_logits, trained) <= 1e-6, "PEFT save/load round trip drifted"
    # PEFT's merge, written by transformers: the in-memory names differ from the checkpoint's, so
    # the reference tensors are read back from the folder save_pretrained writes.
    merged = ref.merge_and_unload().eval()
    merged.save_pretrained(str(root / "peft_merged"))
    merged_state = po.load_folder_tensors(root / "peft_merged")
    return ImageCase(
        name=name,
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        inputs=inputs,
        base_logits=base_logits,
        peft_logits=peft_logits,
        merged_state=merged_state,
        sites=sites,
        adapter_config=json.loads((adapter_dir / "adapter_config.json").read_text()),
    )


# --------------------------------------------------------------------------------------------
# Fixtures: one build + one loracc merge per case, shared by the tests of the module.


def _merge(base_dir: Path, adapter_dir: Path, out: Path, **kw: Any) -> None:
    import loracc

    loracc.merge(str(base_dir), str(adapter_dir), str(out), **kw)


@pytest.fixture(scope="module")
def arch_cases(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            if name in VIT_TARGETS:
                case: Any = build_vit_case(name, root, seed=list(VIT_TARGETS).index(name))
            else:
                case = po.build_case(name, root, SPECS[name])
            out = root / "merged"
            _merge(case.base_dir, case.adapter_dir, out)
            cache[name] = (case, out)
        return cache[name]

    return get


def _logits(case: Any, out: Path) -> torch.Tensor:
    if isinstance(case, ImageCase):
        return _vit_output(_load_vit(out), case.inputs)
    return po.model_output(po.load_model(out, case.arch), case.inputs)


def check_weights(case: Any, out: Path) -> float:
    """(a): base key set / shapes / dtypes; every tensor == PEFT merge_and_unload (1e-6 rel)."""
    got = po.load_folder_tensors(out)
    base = case.base_tensors
    assert set(got) == set(base), (
        f"{case.name}: missing {sorted(set(base) - set(got))}, "
        f"unexpected {sorted(set(got) - set(base))}"
    )
    worst, bad = 0.0, []
    for k, v in sorted(got.items()):
        assert v.shape == base[k].shape, f"{k}: shape {tuple(v.shape)} != {tuple(base[k].shape)}"
        assert v.dtype == base[k].dtype, f"{k}: dtype {v.dtype} != {base[k].dtype}"
        assert k in case.merged_state, f"{case.name}: {k} not in PEFT's merged state"
        ref = case.merged_state[k]
        assert ref.shape == v.shape and ref.dtype == v.dtype, k
        scale = float(ref.float().abs().max())
        err = float((v.float() - ref.float()).abs().max()) / (scale if scale > 0 else 1.0)
        worst = max(worst, err)
        if err > WEIGHT_RTOL:
            bad.append(f"{k}: rel err {err:.3g}")
    assert not bad, f"{case.name}: " + "; ".join(bad)
    return worst


def check_logits(case: Any, out: Path) -> tuple[float, float]:
    """(b): merged logits == unmerged PEFT forward (1e-5 rel); adapter effect > 1e-2."""
    effect = po.rel_err(case.peft_logits, case.base_logits)
    assert effect > MIN_ADAPTER_EFFECT, f"{case.name}: adapter barely matters ({effect:.3g})"
    got = _logits(case, out)
    assert got.shape == case.peft_logits.shape and torch.isfinite(got).all()
    err = po.rel_err(got, case.peft_logits)
    assert err <= LOGITS_RTOL, f"{case.name}: merged vs unmerged PEFT rel err {err:.3g}"
    return err, effect


ALL = [*SPECS, *VIT_TARGETS]


@pytest.mark.parametrize("name", ALL)
def test_arch_weights_match_peft_merge(arch_cases, name):
    case, out = arch_cases(name)
    err = check_weights(case, out)
    print(f"{name}: max weight rel err {err:.3g}")


@pytest.mark.parametrize("name", ALL)
def test_arch_logits_match_unmerged_peft(arch_cases, name):
    case, out = arch_cases(name)
    err, effect = check_logits(case, out)
    print(f"{name}: logits rel err {err:.3g}, adapter effect {effect:.3g}")


# --------------------------------------------------------------------------------------------
# What the cases actually exercise (so a PEFT default change cannot hollow them out)


def test_bert_case_shape(arch_cases):
    case, _ = arch_cases("bert_seqcls")
    assert sorted(case.sites) == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")
    ]
    assert "classifier" in (case.adapter_config.get("modules_to_save") or [])
    saved = set(case.adapter_tensors)
    assert any("classifier" in k for k in saved), sorted(saved)
    base = case.base_tensors
    assert not torch.equal(case.merged_state["classifier.weight"], base["classifier.weight"])


def test_qwen2_bias_cases_move_biases(arch_cases):
    saved_bias = {
        "qwen2_lora_bias": ".lora_B.bias",
        "qwen2_bias_lora_only": "_proj.base_layer.bias",
    }
    for name, suffix in saved_bias.items():
        case, _ = arch_cases(name)
        assert sum(k.endswith(suffix) for k in case.adapter_tensors) == 6, sorted(
            case.adapter_tensors
        )
        base = case.base_tensors
        for i in (0, 1):
            for p in ("q_proj", "k_proj", "v_proj"):
                k = f"model.layers.{i}.self_attn.{p}.bias"
                assert k in base, k
                assert not torch.equal(case.merged_state[k], base[k]), f"{name}: {k} unchanged"


def test_mistral_all_linear_targets_every_projection(arch_cases):
    case, _ = arch_cases("mistral_all_linear")
    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(case.sites) == 14 and all(s.rsplit(".", 1)[1] in projs for s in case.sites)


def test_vit_case_shape(arch_cases):
    """PEFT names the ViT sites by transformers 5's module paths; the checkpoint keeps legacy keys.

    loracc must map ``vit.layers.N.attention.q_proj`` to the stored
    ``vit.encoder.layer.N.attention.attention.query`` (if this starts failing because PEFT or
    transformers changed naming, the weight / logits tests above still decide correctness).
    """
    case, _ = arch_cases("vit_imgcls")
    assert sorted(case.sites) == [
        f"vit.layers.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    base = case.base_tensors
    assert "vit.encoder.layer.0.attention.attention.query.weight" in base
    assert not any(k.startswith("vit.layers.") for k in base)
    case_all, _ = arch_cases("vit_imgcls_all")
    assert len(case_all.sites) == 12
    assert not torch.equal(case.merged_state["classifier.weight"], base["classifier.weight"])


# --------------------------------------------------------------------------------------------
# bf16 base + fp32 adapter: one rounding of the exact sum


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as a monotonic integer line (sign-magnitude -> two's complement)."""
    i = t.contiguous().view(torch.int16).to(torch.int32)
    mag = i & 0x7FFF
    return torch.where(i < 0, -mag, mag)


def test_bf16_single_rounding_vs_fp64(tmp_path):
    spec = po.CASE_SPECS["llama_bf16"]
    case = po.build_case("llama_bf16", tmp_path, spec)
    assert all(v.dtype == torch.float32 for v in case.adapter_tensors.values())
    out = tmp_path / "merged"
    _merge(case.base_dir, case.adapter_dir, out)
    got = po.load_folder_tensors(out)
    base = case.base_tensors
    assert set(got) == set(base)
    targeted = {m + ".weight": m for m, s in case.sites.items() if s["type"] == "Linear"}
    assert len(targeted) == 8
    total = exact = 0
    worst_ulp = 0
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and v.shape == base[k].shape, k
        if k not in targeted:
            assert torch.equal(v, base[k]), f"{k}: untargeted tensor changed"
            continue
        m = targeted[k]
        a = po.adapter_factor(case, m, "lora_A").double()
        b = po.adapter_factor(case, m, "lora_B").double()
        ref = (base[k].double() + case.sites[m]["scale"] * (b @ a)).to(torch.bfloat16)
        ulps = (_ordered_bits(v) - _ordered_bits(ref)).abs()
        total += v.numel()
        exact += int((ulps == 0).sum())
        worst_ulp = max(worst_ulp, int(ulps.max()))
        assert int(ulps.max()) <= 1, f"{k}: {int(ulps.max())} bf16 ulps from the fp64 reference"
    frac = exact / total
    print(f"bf16: {exact}/{total} = {frac:.6f} exact, worst {worst_ulp} ulp")
    assert frac >= 0.999, f"only {frac:.5f} of merged bf16 elements equal round_bf16(fp64 ref)"
