"""Stacking adapters (``merge --adapter A1 --adapter A2 ...``) against PEFT's sequential merge.

The oracle merges A1 with ``merge_and_unload``, loads A2 on the merged model, merges again, and
so on (a weight ``w`` is PEFT's ``scale_layer(w)`` before the merge). In fp32 loracc must match it
to rounding noise; in bf16 both are compared with the same sequential merge done in fp64 and
rounded once, and loracc (fp32 accumulation, one rounding) must be at least as close as PEFT (a
rounding per merge). DoRA takes its norm on the weight it is merged into, so the order matters:
both orders are checked, and checked to differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import loracc
from loracc.errors import ConfigError, UnsupportedError
from tests.support import peft_oracle as po
from tests.support.peft_oracle import Case

REPO = Path(__file__).resolve().parents[2]
ATTN = ["q_proj", "v_proj"]
MLP = ["up_proj", "down_proj"]


def make_adapter(case: Case, folder: Path, seed: int, **lora: Any) -> Path:
    """A PEFT adapter on ``case``'s base with random non-zero factors (as the oracle's cases).
    With targeted embeddings peft also saves their whole (unchanged) weights; ``<folder>-lean``
    gets the same adapter without them."""
    from peft import LoraConfig, get_peft_model

    if not folder.exists():
        po.seed_all(seed)
        model = po._load_base(case.arch, case.base_dir, case.spec.base_dtype)
        lora.setdefault("init_lora_weights", False)
        peft_model = get_peft_model(model, LoraConfig(**lora))
        po._randomize_adapter(peft_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(str(folder))
            peft_model.save_pretrained(str(lean(folder)), save_embedding_layers=False)
    return folder


def lean(folder: Path) -> Path:
    return folder.with_name(folder.name + "-lean")


def peft_stack(
    case: Case, adapters: list[Path], weights: list[float] | None = None, *, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PEFT's sequential merge of ``adapters`` on ``case``'s base, computed in ``dtype``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = po._load_base(case.arch, case.base_dir, dtype)
    for adapter, w in zip(adapters, weights or [1.0] * len(adapters), strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(adapter)).to(dtype)
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(w)
        model = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loracc_stack(
    case: Case, adapters: list[Path], out: Path, weights: list[float] | None = None, **kw: Any
) -> dict[str, torch.Tensor]:
    loracc.merge(str(case.base_dir), [str(a) for a in adapters], str(out), weights=weights, **kw)
    return po.load_folder_tensors(out)


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest per-tensor max |got - want| / max |want| over the output's tensors."""
    assert set(got) <= set(want), sorted(set(got) - set(want))
    return max(po.rel_err(got[k], want[k]) for k in got)


ERRORS: dict[str, float] = {}  # case -> error vs PEFT, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, err in ERRORS.items():
        print(f"\nstacking {name}: {err:.3g}", end="")


FP32_TOL = 1e-6  # PEFT and loracc add the same fp32 deltas in the same order


STACKS: dict[str, tuple[str, list[dict[str, Any]], list[float] | None]] = {
    "lora x3": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=8, target_modules=ATTN),
            dict(r=8, lora_alpha=8, target_modules=ATTN + MLP),
            dict(r=2, lora_alpha=16, target_modules=["v_proj", "o_proj", "down_proj"]),
        ],
        None,
    ),
    "rslora + lora": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=6, use_rslora=True, target_modules=ATTN + MLP),
            dict(r=8, lora_alpha=16, target_modules=ATTN),
        ],
        None,
    ),
    "lora then dora": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=8, target_modules=ATTN + MLP),
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=[*ATTN, "o_proj"]),
        ],
        None,
    ),
    "dora then lora": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=[*ATTN, "o_proj"]),
            dict(r=4, lora_alpha=8, target_modules=ATTN + MLP),
        ],
        None,
    ),
    "weights lora 1.0 + dora 0.5": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=8, target_modules=ATTN + MLP),
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=ATTN),
        ],
        [1.0, 0.5],
    ),
    "weights 0.25 + -1.5": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=8, target_modules=ATTN),
            dict(r=8, lora_alpha=8, use_rslora=True, target_modules=ATTN + MLP),
        ],
        [0.25, -1.5],
    ),
    "gpt2 conv1d x2": (
        "gpt2_conv1d",
        [
            dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
            dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
        ],
        None,
    ),
    "gpt2 conv1d dora after lora": (
        "gpt2_conv1d",
        [
            dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
            dict(r=2, lora_alpha=8, use_dora=True, target_modules=["c_attn"]),
        ],
        None,
    ),
    "modules_to_save then lora on it": (
        "llama_linear",
        [
            dict(r=4, lora_alpha=8, target_modules=ATTN, modules_to_save=["lm_head"]),
            dict(r=2, lora_alpha=8, target_modules=["v_proj", "lm_head"]),
        ],
        None,
    ),
    "embeddings x2": (
        "llama_embed",
        [
            dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
            dict(r=2, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),
        ],
        None,
    ),
}


def _adapters(peft_cases, tmp: Path, name: str) -> tuple[Case, list[Path], list[float] | None]:
    base, configs, weights = STACKS[name]
    case = peft_cases.get(base)
    slug = name.replace(" ", "_").replace("+", "p")
    paths = [
        make_adapter(case, tmp / f"{slug}_{i}", 100 + 10 * i + len(name), **lora)
        for i, lora in enumerate(configs)
    ]
    return case, paths, weights


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stacking")


@pytest.mark.parametrize("name", list(STACKS))
def test_fp32_matches_peft_sequential_merge(peft_cases, work: Path, name: str) -> None:
    case, adapters, weights = _adapters(peft_cases, work, name)
    # peft loads an adapter's saved embedding weights over the merged model: the lean copies
    # leave them out (loracc drops such copies in a stack, so both give the same, checked below)
    want = peft_stack(case, [lean(a) for a in adapters], weights, dtype=torch.float32)
    got = loracc_stack(case, adapters, work / f"out_{name}", weights)
    if name.startswith("embeddings"):
        same = loracc_stack(case, [lean(a) for a in adapters], work / f"lean_{name}", weights)
        assert all(torch.equal(got[k], same[k]) for k in same)
    base = po.load_folder_tensors(case.base_dir)
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert changed, "the stack changed nothing"
    err = max_rel_err(got, want)
    ERRORS[f"fp32 {name} (rel err vs PEFT)"] = err
    assert err <= FP32_TOL, f"{name}: rel err {err:.3g} vs PEFT's sequential merge"
    # each adapter's delta is in the stack: none was dropped
    for i, _adapter in enumerate(adapters):
        rest = adapters[:i] + adapters[i + 1 :]
        w_rest = None if weights is None else weights[:i] + weights[i + 1 :]
        without = peft_stack(case, [lean(a) for a in rest], w_rest, dtype=torch.float32)
        assert max_rel_err(got, without) > 1e-4, f"{name}: adapter {i + 1} has no effect"


def test_dora_order_matters(peft_cases, work: Path) -> None:
    """The two orders of a LoRA and a DoRA adapter give different weights (each matched PEFT
    in the test above, with the same adapter folders)."""
    case, ab, _ = _adapters(peft_cases, work, "lora then dora")
    first = loracc_stack(case, ab, work / "order_ab")
    second = loracc_stack(case, ab[::-1], work / "order_ba")
    err = max_rel_err(first, second)
    ERRORS["lora,dora vs dora,lora (rel difference)"] = err
    assert err > 1e-3
    assert max_rel_err(first, peft_stack(case, ab, dtype=torch.float32)) <= FP32_TOL
    assert max_rel_err(second, peft_stack(case, ab[::-1], dtype=torch.float32)) <= FP32_TOL


def peft_all_active(case: Case, adapters: list[Path]) -> torch.Tensor:
    """Logits of PEFT's unmerged forward with every adapter loaded and active at once: for plain
    LoRA the sum of the deltas, so an oracle independent of any merge (peft's merge of a tied
    embedding is wrong; its unmerged forward is not)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = po._load_base(case.arch, case.base_dir, torch.float32)
        peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        for i, adapter in enumerate(adapters[1:], 1):
            peft_model.load_adapter(str(adapter), adapter_name=f"a{i}")
        peft_model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return po.model_output(peft_model.eval(), case.inputs)


@pytest.mark.parametrize(
    "configs",
    [
        [
            dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]),
            dict(r=2, lora_alpha=8, target_modules=["wte", "c_fc"]),
        ],
        [
            dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]),
            dict(r=2, lora_alpha=8, target_modules=["lm_head", "c_attn"]),
        ],
        [
            dict(r=2, lora_alpha=8, target_modules=["lm_head", "c_proj"]),
            dict(r=4, lora_alpha=8, target_modules=["wte"]),
        ],
    ],
    ids=["wte+wte", "wte+lm_head", "lm_head+wte"],
)
def test_tied_gpt2_embeddings(peft_cases, tmp_path: Path, configs: list[dict[str, Any]]) -> None:
    """GPT-2 ties wte and lm_head: the first adapter's untying holds for the next ones, and the
    merged model's logits are PEFT's with both adapters active (unmerged)."""
    case = peft_cases.get("gpt2_conv1d")
    adapters = [
        make_adapter(case, tmp_path / f"a{i}", 700 + i, **lora) for i, lora in enumerate(configs)
    ]
    out = tmp_path / "out"
    loracc.merge(str(case.base_dir), [str(a) for a in adapters], str(out))
    model = po.load_model(out, case.arch)
    got = po.model_output(model, case.inputs)
    want = peft_all_active(case, [lean(a) for a in adapters])
    err = po.rel_err(got, want)
    ERRORS[f"tied gpt2 {'+'.join(c['target_modules'][0] for c in configs)}: logits rel err"] = err
    assert err <= 1e-5, err
    assert po.rel_err(got, peft_all_active(case, [lean(adapters[0])])) > 1e-3


def _ulp_errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(max |got - ref|, elements that differ), both in ``ref``'s dtype."""
    diff = (got.double() - ref.double()).abs()
    return float(diff.max()), int((got != ref).sum())


@pytest.mark.parametrize("name", ["lora x3", "lora then dora"])
def test_bf16_one_rounding(peft_cases, work: Path, name: str) -> None:
    """bf16 base: loracc is at least as close as PEFT's bf16 merges to the fp64 merge rounded
    once, tensor by tensor, and over the model strictly closer."""
    _, configs, weights = STACKS[name]
    case = peft_cases.get("llama_bf16")
    slug = name.replace(" ", "_")
    adapters = [
        make_adapter(case, work / f"bf16_{slug}_{i}", 300 + i, **lora)
        for i, lora in enumerate(configs)
    ]
    got = loracc_stack(case, adapters, work / f"bf16_out_{slug}", weights)
    peft = peft_stack(case, adapters, weights, dtype=torch.bfloat16)
    exact = peft_stack(case, adapters, weights, dtype=torch.float64)
    base = po.load_folder_tensors(case.base_dir)
    ours_total = theirs_total = 0
    ours_max = theirs_max = 0.0
    for key, value in got.items():
        assert value.dtype == torch.bfloat16, key
        if torch.equal(value, base[key]) and torch.equal(peft[key], base[key]):
            continue
        ref = exact[key].to(torch.bfloat16)
        ours, ours_n = _ulp_errors(value, ref)
        theirs, theirs_n = _ulp_errors(peft[key], ref)
        assert ours <= theirs and ours_n <= theirs_n, (key, ours, ours_n, theirs, theirs_n)
        ours_total += ours_n
        theirs_total += theirs_n
        ours_max, theirs_max = max(ours_max, ours), max(theirs_max, theirs)
    ERRORS[f"bf16 {name}: loracc elements != fp64-rounded-once"] = ours_total
    ERRORS[f"bf16 {name}: PEFT elements != fp64-rounded-once"] = theirs_total
    ERRORS[f"bf16 {name}: loracc max abs err"] = ours_max
    ERRORS[f"bf16 {name}: PEFT max abs err"] = theirs_max
    assert ours_total < theirs_total


def test_single_adapter_list_is_the_single_merge(peft_cases, work: Path) -> None:
    case = peft_cases.get("llama_linear")
    one = loracc_stack(case, [case.adapter_dir], work / "list1")
    loracc.merge(str(case.base_dir), str(case.adapter_dir), str(work / "plain"))
    plain = po.load_folder_tensors(work / "plain")
    assert all(torch.equal(one[k], plain[k]) for k in plain)
    weighted = loracc_stack(case, [case.adapter_dir], work / "list1w", [1.0])
    assert all(torch.equal(weighted[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", ["lora then dora", "modules_to_save then lora on it"])
def test_onnx_merged_export_stacks(peft_cases, work: Path, name: str) -> None:
    """``export --onnx`` merged with two adapters (DoRA second; a LoRA on a tensor the first
    replaced): the logits of PEFT's sequential merge."""
    from tests.support import onnx_oracle as oo

    case, adapters, _ = _adapters(peft_cases, work, name)
    base_onnx = work / "base.onnx"
    if not base_onnx.exists():
        oo.export_torchscript(case, base_onnx)
    slug = name.replace(" ", "_")
    out = work / f"stacked_{slug}.onnx"
    loracc.export_onnx(str(base_onnx), [str(a) for a in adapters], str(out))
    model = po.load_model(case.base_dir, case.arch)
    state = peft_stack(case, [lean(a) for a in adapters], dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    want = po.model_output(model.eval(), case.inputs)
    got = oo.run(out, case)
    err = po.rel_err(got, want)
    ERRORS[f"onnx merged {name}: logits rel err vs PEFT"] = err
    oo.assert_close(got, want, "stacked ONNX vs PEFT sequential merge")
    single = work / f"first_only_{slug}.onnx"
    loracc.export_onnx(str(base_onnx), [str(adapters[0])], str(single))
    assert po.rel_err(oo.run(single, case), want) > 1e-4  # the second adapter did something


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "loracc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_merge_stack_with_weights(peft_cases, work: Path) -> None:
    case, adapters, weights = _adapters(peft_cases, work, "weights lora 1.0 + dora 0.5")
    out = work / "cli_out"
    args = ["merge", "--base", str(case.base_dir), "--json", "-o", str(out)]
    for a in adapters:
        args += ["--adapter", str(a)]
    done = _cli(*args, "--weights", "1.0,0.5")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {step.get("adapter") for step in report["passes"]} == {str(a) for a in adapters}
    got = load_file(str(out / "model.safetensors"))
    assert max_rel_err(got, peft_stack(case, adapters, weights, dtype=torch.float32)) <= FP32_TOL


# Refusals: (stack case, adapter kwargs per position, merge kwargs, error, message pattern)
REFUSED: dict[str, tuple[list[dict[str, Any]], dict[str, Any], type, str]] = {
    "weights count": (
        [dict(r=2, target_modules=["q_proj"])] * 2,
        dict(weights=[1.0]),
        ConfigError,
        r"--weights: 1 weight\(s\) for 2 adapter\(s\)",
    ),
    "weights not a number": (
        [dict(r=2, target_modules=["q_proj"])] * 2,
        dict(weights="1,x"),
        ConfigError,
        r"--weights: cannot read '1,x'",
    ),
    "weight on modules_to_save": (
        [dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])],
        dict(weights=[0.5]),
        UnsupportedError,
        r"adapter0: --weights 0.5: the adapter replaces 'lm_head.weight'",
    ),
    "later replacement discards an earlier change": (
        [
            dict(r=2, target_modules=["q_proj", "lm_head"]),
            dict(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]),
        ],
        {},
        UnsupportedError,
        r"adapter1: replaces it \(modules_to_save\), but an adapter before it in the stack "
        r"changed 'lm_head.weight'",
    ),
    "later trainable tokens on a changed embedding": (
        [
            dict(r=2, target_modules=["q_proj", "embed_tokens"]),
            dict(r=2, target_modules=["v_proj"], trainable_token_indices=[3, 5]),
        ],
        {},
        UnsupportedError,
        r"adapter1: sets rows of it \(trainable tokens\), but an adapter before it",
    ),
    "layer_replication in a stack": (
        [
            dict(r=2, target_modules=["q_proj"]),
            dict(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]),
        ],
        {},
        UnsupportedError,
        r"adapter1: layer_replication in a stack of 2 adapters",
    ),
    "residual init after the first": (
        [
            dict(r=2, target_modules=["q_proj"]),
            dict(r=2, target_modules=["q_proj"], init_lora_weights="olora"),
        ],
        {},
        UnsupportedError,
        r"adapter1: '.*q_proj' has init_lora_weights='olora' \(a residual base\) and is adapter 2",
    ),
    "initial adapter with a stack": (
        [dict(r=2, target_modules=["q_proj"])] * 2,
        dict(initial_adapter="adapter0"),
        ConfigError,
        r"--initial-adapter with several --adapter",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals(peft_cases, tmp_path: Path, name: str) -> None:
    configs, kwargs, error, pattern = REFUSED[name]
    case = peft_cases.get("llama_linear")
    adapters = [
        make_adapter(case, tmp_path / f"adapter{i}", 500 + i, **lora)
        for i, lora in enumerate(configs)
    ]
    if "initial_adapter" in kwargs:
        kwargs = {**kwargs, "initial_adapter": str(tmp_path / kwargs["initial_adapter"])}
    before = {p: p.stat().st_mtime_ns for a in adapters for p in a.iterdir()}
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        loracc.merge(str(case.base_dir), [str(a) for a in adapters], str(out), **kwargs)
    assert not out.exists()
    assert {p: p.stat().st_mtime_ns for a in adapters for p in a.iterdir()} == before


def test_onnx_refusals(peft_cases, work: Path) -> None:
    _case, adapters, _ = _adapters(peft_cases, work, "lora x3")
    with pytest.raises(ConfigError, match="--weights scales adapters merged together"):
        loracc.export_onnx("missing.onnx", [str(a) for a in adapters], None, keep_lora=True,
                           dry_run=True, weights=[1, 1, 1])  # fmt: skip
    with pytest.raises(ConfigError, match="--initial-adapter with several --adapter"):
        loracc.export_onnx("missing.onnx", [str(a) for a in adapters], None, dry_run=True,
                           initial_adapter=str(adapters[0]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"--weights: 2 weight\(s\) for 3 adapter\(s\)"):
        loracc.export_onnx("missing.onnx", [str(a) for a in adapters], None, dry_run=True,
                           weights=[1, 1])  # fmt: skip


def test_stack_memory_grows_with_the_adapters_not_the_model(tmp_path: Path) -> None:
    """scripts/bench_stack.py on the 0.1B synthetic Llama (191 MiB bf16): stacking 3 adapters
    instead of 1 adds about their size to the peak RSS, far less than the model."""
    rows_json = tmp_path / "rows.json"
    cmd = [sys.executable, str(REPO / "scripts/bench_stack.py"), "--size", "0.1B"]
    cmd += ["--adapters", "1,3", "--workdir", str(tmp_path / "w"), "--json", str(rows_json)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    one, three = json.loads(rows_json.read_text())
    growth = three["peak_anon_mib"] - one["peak_anon_mib"]
    extra = three["adapters_mib"] - one["adapters_mib"]
    ERRORS["RSS growth 1 -> 3 adapters (MiB)"] = growth
    assert growth < 2 * extra + 16, (growth, extra)
    assert growth < one["base_mib"] / 4, (growth, one["base_mib"])
