"""Delta kernels against PEFT, one tiny custom model per layer type.

Every case saves a seeded base (safetensors + a ``custom`` config.json) and a PEFT adapter with
random non-zero factors, then compares loracc's merged tensors with PEFT's ``merge_and_unload()``
on the same files (``torch.equal`` where loracc follows PEFT's op order, so fp32 merges are
bit-identical) and the merged model's output with PEFT's unmerged forward. PEFT is the oracle;
nothing is compared with loracc's own output.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loracc
from loracc.errors import FormatError, UnsupportedError
from tests.support import peft_oracle as po

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.config import KasaConfig  # noqa: E402

FORWARD_ATOL = 1e-5  # merged vs unmerged forward: a different but equally exact computation
KASA_WEIGHT_ATOL = 1e-6  # KaSA's truncation as rank-r factors rounds apart from peft's (U·S)@Vh


@dataclass
class Built:
    """One base folder, one adapter folder and PEFT's results on them."""

    root: Path
    make: Callable[[], nn.Module]
    inputs: torch.Tensor
    base_out: torch.Tensor
    peft_out: torch.Tensor  # unmerged PeftModel forward: the ground truth
    peft_merged: dict[str, torch.Tensor] | None  # None where PEFT's merge raises
    peft_merge_error: str | None

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def forward(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.make()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            return model.eval()(self.inputs)


def build(root: Path, make: Callable[[], nn.Module], inputs: torch.Tensor, **lora: Any) -> Built:
    po.seed_all(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * po.BASE_STD)
    (root / "base").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "custom"}))
    with torch.no_grad():
        base_out = model.eval()(inputs)
    lora.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = get_peft_model(model, LoraConfig(**lora))
        with torch.no_grad():
            for p in trained.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * po.ADAPTER_STD)
        trained.save_pretrained(str(root / "adapter"))
        fresh = make()
        fresh.load_state_dict(load_file(str(root / "base" / "model.safetensors")))
        ref = PeftModel.from_pretrained(fresh, str(root / "adapter")).eval()
        with torch.no_grad():
            peft_out = ref(inputs)
        merged: dict[str, torch.Tensor] | None = None
        error = None
        try:
            merged = {k: v.clone() for k, v in ref.merge_and_unload().state_dict().items()}
        except (RuntimeError, NotImplementedError) as e:
            error = f"{type(e).__name__}: {e}"
    return Built(root, make, inputs, base_out, peft_out, merged, error)


def loracc_merge(b: Built, **kw: Any) -> dict[str, torch.Tensor]:
    loracc.merge(str(b.base), str(b.adapter), str(b.root / "out"), **kw)
    return load_file(str(b.root / "out" / "model.safetensors"))


def assert_forward_matches(b: Built, got: dict[str, torch.Tensor]) -> None:
    effect = float((b.peft_out - b.base_out).abs().max())
    assert effect > 1e-2, f"the adapter barely changes the output ({effect:.3g})"
    err = float((b.forward(got) - b.peft_out).abs().max())
    assert err <= FORWARD_ATOL, f"merged forward vs PEFT unmerged: {err:.3g}"


def max_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(ref)
    return max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)


# --------------------------------------------------------------------------------------------
# ConvNd: bit-identical to PEFT for every kernel


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_CASES = [
    (1, 1),
    (1, 3),
    (2, 1),
    (2, (1, 3)),
    (2, 3),
    (3, 3),
    (3, (3, 1, 1)),
]
# peft's 1x1 shortcut tests weight.shape[2:4] == (1, 1), so on these Conv3d kernels it reshapes
# a 5-D factor as if 4-D and its merge raises: the unmerged forward is the only reference.
PEFT_MERGE_CRASHES = [(3, 1), (3, (1, 1, 3))]


def _conv_case(tmp_path: Path, dim: int, kernel: Any, dora: bool) -> Built:
    def make() -> nn.Module:
        return nn.Sequential(_CONV[dim](6, 5, kernel), nn.Tanh(), _CONV[dim](5, 4, kernel))

    inputs = torch.randn(2, 6, *([7] * dim), generator=torch.Generator().manual_seed(1))
    return build(
        tmp_path, make, inputs, r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=dora
    )


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("dim", "kernel"), CONV_CASES)
def test_conv_merge_bit_identical_to_peft(
    tmp_path: Path, dim: int, kernel: Any, dora: bool
) -> None:
    b = _conv_case(tmp_path, dim, kernel, dora)
    assert b.peft_merged is not None, b.peft_merge_error
    got = loracc_merge(b)
    differ = [k for k in b.peft_merged if not torch.equal(got[k], b.peft_merged[k])]
    assert not differ, (
        f"not bit-identical to PEFT: {differ} (max {max_diff(got, b.peft_merged):.3g})"
    )
    assert_forward_matches(b, got)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("dim", "kernel"), PEFT_MERGE_CRASHES)
def test_conv3d_where_peft_merge_crashes_matches_unmerged(
    tmp_path: Path, dim: int, kernel: Any, dora: bool
) -> None:
    b = _conv_case(tmp_path, dim, kernel, dora)
    assert b.peft_merged is None, "PEFT merges Conv3d (1, 1, k) now: compare bits instead"
    assert_forward_matches(b, loracc_merge(b))


def test_grouped_conv_refused_with_peft_reason(tmp_path: Path) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(8, 4, 3, groups=2))

    b = build(tmp_path, make, torch.randn(2, 8, 6, 6), r=4, lora_alpha=8, target_modules=["0"])
    assert b.peft_merge_error is not None and "groups > 1" in b.peft_merge_error
    with pytest.raises(UnsupportedError) as info:
        loracc_merge(b)
    assert "grouped convolution (groups=2) is not supported by PEFT's merge either" in str(
        info.value
    )
    assert info.value.exit_code == 2
    assert not (b.root / "out").exists()


# --------------------------------------------------------------------------------------------
# KaSA: lora_diag between the factors, the base truncated by its r smallest singular values


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 7)
    )


KASA_KEYS = ("lora_A.weight", "lora_B.weight", "lora_diag")
KASA = dict(r=3, lora_alpha=6, target_modules=["0", "2", "4"], kasa_config=KasaConfig())


def _kasa_case(tmp_path: Path, **over: Any) -> Built:
    inputs = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    return build(tmp_path, _mlp, inputs, **{**KASA, **over})


def test_kasa_merges_like_peft(tmp_path: Path) -> None:
    b = _kasa_case(tmp_path)
    assert b.peft_merged is not None, b.peft_merge_error
    base = load_file(str(b.base / "model.safetensors"))
    # The truncation matters: W + s·(B·diag)@A alone is far from PEFT's merge.
    assert max_diff(base, b.peft_merged) > 1e-2
    got = loracc_merge(b)
    err = max_diff(got, b.peft_merged)
    assert err <= KASA_WEIGHT_ATOL, f"KaSA merge vs PEFT: {err:.3g}"
    assert_forward_matches(b, got)
    # Against KaSA's formula in fp64, loracc is as close as PEFT's own fp32 merge.
    adapter = load_file(str(b.adapter / "adapter_model.safetensors"))
    for module in ("0", "2", "4"):
        ref = _kasa_fp64(base[f"{module}.weight"], adapter, module, r=3, scale=2.0)
        mine = float((got[f"{module}.weight"].double() - ref).abs().max())
        peft_err = float((b.peft_merged[f"{module}.weight"].double() - ref).abs().max())
        assert mine <= peft_err, f"{module}: loracc {mine:.3g} vs fp64, PEFT {peft_err:.3g}"


def _kasa_fp64(
    weight: torch.Tensor, adapter: dict[str, torch.Tensor], module: str, *, r: int, scale: float
) -> torch.Tensor:
    """peft's KaSA layer in fp64: rank-(k − r) SVD truncation + s·(B·diag)@A."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    keep = min(weight.shape) - r
    factor = {n: adapter[f"base_model.model.{module}.{n}"].double() for n in KASA_KEYS}
    delta = (factor["lora_B.weight"] * factor["lora_diag"]) @ factor["lora_A.weight"] * scale
    return (U[:, :keep] * S[:keep]) @ Vh[:keep] + delta


def test_kasa_rsLoRA_and_alpha_pattern(tmp_path: Path) -> None:
    b = _kasa_case(tmp_path, use_rslora=True, alpha_pattern={"2": 11})
    assert b.peft_merged is not None
    got = loracc_merge(b)
    assert max_diff(got, b.peft_merged) <= KASA_WEIGHT_ATOL
    assert_forward_matches(b, got)


def test_kasa_convert_gives_a_plain_adapter_peft_reads_on_the_original_base(
    tmp_path: Path,
) -> None:
    b = _kasa_case(tmp_path)
    out = tmp_path / "plain"
    loracc.convert(str(b.adapter), str(out), base_dir=str(b.base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("kasa_config")
    assert set(config["rank_pattern"].values()) | {config["r"]} == {6}  # rank 2r
    fresh = _mlp()
    fresh.load_state_dict(load_file(str(b.base / "model.safetensors")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        err = float((plain(b.inputs) - b.peft_out).abs().max())
    assert err <= FORWARD_ATOL, f"converted KaSA adapter in PEFT vs the KaSA model: {err:.3g}"


def _edit_adapter(
    b: Built, *, drop: str | None = None, config: dict[str, Any] | None = None
) -> None:
    path = b.adapter / "adapter_model.safetensors"
    tensors = {
        k: v for k, v in load_file(str(path)).items() if drop is None or not k.endswith(drop)
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    if config is not None:
        cfg_path = b.adapter / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))


@pytest.mark.parametrize(
    ("drop", "config", "message"),
    [
        ("4.lora_diag", None, "kasa_config is set but '4' has no lora_diag"),
        (None, {"kasa_config": None}, "lora_diag without kasa_config"),
        (None, {"use_dora": True}, "KaSA combined with use_dora"),
    ],
    ids=["diag-missing", "no-kasa-config", "with-dora"],
)
def test_kasa_inconsistent_files_refused(
    tmp_path: Path, drop: str | None, config: dict[str, Any] | None, message: str
) -> None:
    b = _kasa_case(tmp_path)
    _edit_adapter(b, drop=drop, config=config)
    with pytest.raises((FormatError, UnsupportedError)) as info:
        loracc_merge(b)
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_kasa_rank_not_below_min_dim_refused(tmp_path: Path) -> None:
    """peft refuses r >= min(out, in); a file claiming it cannot be merged as peft would."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4))

    b = build(tmp_path, make, torch.randn(2, 3), r=2, lora_alpha=4, target_modules=["0"],
              kasa_config=KasaConfig())  # fmt: skip
    path = b.adapter / "adapter_model.safetensors"
    t = load_file(str(path))
    grow = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_diag": 0}
    for k in list(t):
        axis = next(a for suffix, a in grow.items() if k.endswith(suffix))
        t[k] = torch.cat([t[k], t[k].narrow(axis, 0, 1)], dim=axis)  # rank 3 = min(4, 3)
    save_file(t, str(path), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="KaSA rank 3 is not below min"):
        loracc_merge(b)


def test_kasa_on_llama_matches_unmerged_peft(tmp_path: Path) -> None:
    spec = po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
             kasa_config=KasaConfig()),
        seed=3,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = po.build_case("llama_kasa", tmp_path / "case", spec)
    loracc.merge(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "out"))
    got = po.load_folder_tensors(tmp_path / "out")
    assert case.merged_state is not None
    err = max(float((got[k] - case.merged_state[k]).abs().max()) for k in got)
    assert err <= KASA_WEIGHT_ATOL, f"KaSA Llama merge vs PEFT: {err:.3g}"
    logits = po.model_output(po.load_model(tmp_path / "out", case.arch), case.inputs)
    assert po.rel_err(case.peft_logits, case.base_logits) > 1e-2
    assert po.rel_err(logits, case.peft_logits) <= 1e-5


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention: refused (docs/FORMATS.md, "LoRA on nn.MultiheadAttention")


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_refused_with_peft_double_delta(tmp_path: Path) -> None:
    b = build(tmp_path, _Attention, torch.randn(2, 5, 8), r=2, lora_alpha=4,
              target_modules=["attn"])  # fmt: skip
    assert b.peft_merged is not None
    base = load_file(str(b.base / "model.safetensors"))
    t = load_file(str(b.adapter / "adapter_model.safetensors"))
    pre = "base_model.model.attn.base_layer.out_proj."
    delta = (t[pre + "lora_B.weight"] @ t[pre + "lora_A.weight"]) * 2.0
    got = b.peft_merged["attn.out_proj.weight"] - base["attn.out_proj.weight"]
    # What the refusal rests on: PEFT 0.21's merge (and forward) adds the out_proj delta twice.
    assert torch.allclose(got, 2 * delta, atol=1e-6) and not torch.allclose(got, delta, atol=1e-3)
    with pytest.raises(UnsupportedError) as info:
        loracc_merge(b)
    text = str(info.value)
    assert "nn.MultiheadAttention 'attn'" in text and "twice" in text
    assert info.value.exit_code == 2
    # Without a base (inspect, convert) the saved keys alone show the wrapper.
    with pytest.raises(UnsupportedError, match=r"nn\.MultiheadAttention 'attn'"):
        loracc.load_adapter(b.adapter)


def test_kasa_config_empty_object_is_kasa(tmp_path: Path) -> None:
    """peft builds KasaConfig() from ``{}``: KaSA is on (not a falsy, absent variant)."""
    b = _kasa_case(tmp_path)
    _edit_adapter(b, config={"kasa_config": {}})
    assert b.peft_merged is not None
    assert max_diff(loracc_merge(b), b.peft_merged) <= KASA_WEIGHT_ATOL
