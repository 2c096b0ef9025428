"""loracc merge vs PEFT, one feature per test.

Each test merges a tiny seeded base + PEFT adapter (see ``peft_oracle.CASE_SPECS``) with loracc and
compares the result with PEFT, never with loracc itself:

* logits of the merged folder loaded by transformers vs the *unmerged* PeftModel forward
  (fp32: ``max|got - ref| <= 1e-5 * max|ref|``),
* merged tensors vs PEFT ``merge_and_unload()`` (fp32: ``allclose(atol=1e-6, rtol=0)``; bit
  equality for plain Linear), where PEFT's merge is right,
* for low precision, an independent fp32 torch formula rounded once.

Where PEFT's merge is known to be wrong (tied lm_head with LoRA, LoRA on a tied embedding,
layer_replication) only the unmerged forward is used, and the test first asserts that PEFT's own
merge really is off, so the test documents why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests.support import peft_oracle as po

LOGITS_RTOL = 1e-5  # relative to max |reference logit|
WEIGHT_ATOL = 1e-6
# The adapter must move the logits far more than the tolerance, or a test proves nothing.
MIN_ADAPTER_EFFECT = 1e-2

CLI_TIMEOUT_S = 300


# --------------------------------------------------------------------------------------------
# Assertions (all against PEFT / transformers / torch, never loracc)


def assert_logits_match_unmerged(case: po.Case, out_dir: Path, *, tol: float = LOGITS_RTOL) -> None:
    """The merged folder, loaded by transformers, reproduces the unmerged PeftModel forward."""
    effect = po.rel_err(case.peft_logits, case.base_logits)
    assert effect > MIN_ADAPTER_EFFECT, (
        f"{case.name}: adapter barely changes the output ({effect:.3g})"
    )
    got = po.model_output(po.load_model(out_dir, case.arch), case.inputs)
    assert got.shape == case.peft_logits.shape
    assert torch.isfinite(got).all()
    err = po.rel_err(got, case.peft_logits)
    assert err <= tol, (
        f"{case.name}: merged logits differ from the unmerged PEFT forward: "
        f"rel err {err:.3g} > {tol:g} "
        f"(base-vs-PEFT {effect:.3g}, PEFT's own merge {case.peft_merge_rel_err})"
    )


def assert_peft_merge_is_wrong(case: po.Case) -> None:
    """Documents that this case cannot use PEFT's merge_and_unload as a reference."""
    err = case.peft_merge_rel_err
    assert err is not None and err > 1e-2, (
        f"{case.name}: PEFT's merge now agrees ({err}); tighten the test"
    )


def assert_weights_match_peft_merge(
    case: po.Case, out: dict[str, torch.Tensor], *, atol: float = WEIGHT_ATOL, exact: bool = False
) -> None:
    """Every output tensor equals PEFT's merge_and_unload tensor of the same name."""
    assert case.merged_state is not None
    bad = []
    for k, got in sorted(out.items()):
        assert k in case.merged_state, (
            f"{case.name}: output tensor {k} is not in PEFT's merged model"
        )
        ref = case.merged_state[k]
        assert got.shape == ref.shape, f"{k}: shape {tuple(got.shape)} != PEFT {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{k}: dtype {got.dtype} != PEFT {ref.dtype}"
        if exact:
            if not torch.equal(got, ref):
                n = int((got != ref).sum())
                bad.append(f"{k}: {n}/{ref.numel()} elements differ in bits")
        elif not torch.allclose(got.float(), ref.float(), atol=atol, rtol=0):
            bad.append(
                f"{k}: max abs diff {float((got.float() - ref.float()).abs().max()):.3g} > {atol:g}"
            )
    assert not bad, f"{case.name}: " + "; ".join(bad)


def assert_layout_like_base(
    case: po.Case,
    out: dict[str, torch.Tensor],
    *,
    extra: set[str] = frozenset(),
    dtype: torch.dtype | None = None,
) -> None:
    """Same key set as the base (plus ``extra``), same shapes, same dtypes (or ``dtype``)."""
    base = case.base_tensors
    assert set(out) == set(base) | set(extra), (
        f"{case.name}: missing {sorted(set(base) | set(extra) - set(out))}, "
        f"unexpected {sorted(set(out) - set(base) - set(extra))}"
    )
    for k, v in base.items():
        assert out[k].shape == v.shape, f"{k}: shape {tuple(out[k].shape)} != base {tuple(v.shape)}"
        assert out[k].dtype == (dtype or v.dtype), (
            f"{k}: dtype {out[k].dtype} != {dtype or v.dtype}"
        )


def assert_merge_matches_peft(case: po.Case, out_dir: Path) -> dict[str, torch.Tensor]:
    """The usual three checks of a merged folder: logits as PEFT's unmerged forward, the base's
    layout, every tensor as PEFT's merge_and_unload. Returns the folder's tensors."""
    assert_logits_match_unmerged(case, out_dir)
    tensors = po.load_folder_tensors(out_dir)
    assert_layout_like_base(case, tensors)
    assert_weights_match_peft_merge(case, tensors)
    return tensors


def lora_modules(case: po.Case, kind: str | None = None) -> list[str]:
    return sorted(m for m, s in case.sites.items() if kind is None or s["type"] == kind)


def run_cli(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return subprocess.run(
        [sys.executable, "-m", "loracc", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {proc.stderr!r}"
    assert re.search(pattern, lines[0], re.IGNORECASE), f"{pattern!r} not in {lines[0]!r}"


def _merge(case: po.Case, out: Path, **kw: Any) -> Any:
    import loracc

    return loracc.merge(str(case.base_dir), str(case.adapter_dir), str(out), **kw)


# --------------------------------------------------------------------------------------------
# Linear (Llama), fp32


def test_linear_llama_fp32_logits(merged):
    case, out = merged.get("llama_linear")
    assert len(lora_modules(case, "Linear")) == 14  # 7 projections x 2 layers
    assert_logits_match_unmerged(case, out)


def test_linear_llama_fp32_weights_close(merged):
    case, out = merged.get("llama_linear")
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors)
    assert_weights_match_peft_merge(case, tensors)


def test_linear_llama_fp32_weights_bit_identical(merged):
    """PEFT computes W + (B @ A) * s in fp32, one rounding; loracc promises the same bits."""
    case, out = merged.get("llama_linear")
    tensors = po.load_folder_tensors(out)
    assert_weights_match_peft_merge(case, tensors, exact=True)
    # Untargeted tensors are copied bit for bit.
    base = case.base_tensors
    targeted = {m + ".weight" for m in case.sites}
    for k in set(base) - targeted:
        assert torch.equal(tensors[k], base[k]), k


def test_config_and_side_files_copied(merged):
    case, out = merged.get("llama_linear")
    assert (out / "config.json").is_file()
    cfg, base_cfg = po.config_json(out), po.config_json(case.base_dir)
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size"):
        assert cfg.get(key) == base_cfg.get(key), key
    if (case.base_dir / "generation_config.json").exists():
        assert (out / "generation_config.json").is_file()


# --------------------------------------------------------------------------------------------
# Low precision


def test_bf16_base_single_rounding(merged):
    """bf16 base + fp32 adapter: W' = round_bf16(W.float() + (B @ A) * s), computed in torch."""
    case, out = merged.get("llama_bf16")
    assert all(v.dtype == torch.float32 for v in case.adapter_tensors.values())  # PEFT autocasts
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors, dtype=torch.bfloat16)
    base = case.base_tensors
    targeted = {m + ".weight": m for m in lora_modules(case, "Linear")}
    assert len(targeted) == 8
    for k, v in tensors.items():
        if k in targeted:
            expected = (base[k].float() + po.linear_delta(case, targeted[k])).to(torch.bfloat16)
        else:
            expected = base[k]
        n = int((v != expected).sum())
        assert n == 0, f"{k}: {n}/{v.numel()} bf16 elements differ from round_bf16(W + (B@A)*s)"
    # PEFT's (unsafe, default) merge rounds once too, so it must agree bit for bit.
    assert_weights_match_peft_merge(case, tensors, exact=True)


def test_dtype_option_bf16_from_fp32_base(merged):
    """fp32 base merged with dtype=bfloat16: every tensor is bf16, targeted ones rounded once."""
    case, out = merged.get("llama_linear", dtype="bfloat16")
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors, dtype=torch.bfloat16)
    base = case.base_tensors
    for m in lora_modules(case, "Linear"):
        k = m + ".weight"
        expected = (base[k] + po.linear_delta(case, m)).to(torch.bfloat16)
        n = int((tensors[k] != expected).sum())
        assert n == 0, f"{k}: {n} elements differ from round_bf16(W + (B@A)*s)"
    for k in set(base) - {m + ".weight" for m in case.sites}:
        assert torch.equal(tensors[k], base[k].to(torch.bfloat16)), k


# --------------------------------------------------------------------------------------------
# Scaling


def test_rslora(merged):
    case, out = merged.get("llama_rslora")
    assert {s["scale"] for s in case.sites.values()} == {3.0}  # 6 / sqrt(4), not 6 / 4
    assert_logits_match_unmerged(case, out)
    assert_weights_match_peft_merge(case, po.load_folder_tensors(out))


def test_rank_and_alpha_pattern(merged):
    case, out = merged.get("llama_patterns")
    s = case.sites
    assert s["model.layers.0.self_attn.q_proj"]["r"] == 4
    assert s["model.layers.1.mlp.up_proj"]["r"] == 2 and s["model.layers.0.mlp.up_proj"]["r"] == 8
    assert s["model.layers.0.mlp.down_proj"]["scale"] == 3.0
    assert s["model.layers.0.self_attn.k_proj"]["scale"] == 2.0
    assert_logits_match_unmerged(case, out)
    assert_weights_match_peft_merge(case, po.load_folder_tensors(out))


# --------------------------------------------------------------------------------------------
# Biases (GPT-2 has biases everywhere)


def test_lora_bias(merged):
    case, out = merged.get("gpt2_lora_bias")
    assert any(k.endswith("lora_B.bias") for k in case.adapter_tensors)
    tensors = assert_merge_matches_peft(case, out)
    base = case.base_tensors
    assert not torch.equal(
        tensors["transformer.h.0.attn.c_attn.bias"], base["transformer.h.0.attn.c_attn.bias"]
    )


@pytest.mark.parametrize("name", ["gpt2_bias_all", "gpt2_bias_lora_only"])
def test_bias_all_and_lora_only(merged, name):
    case, out = merged.get(name)
    bias_keys = [k for k in case.adapter_tensors if k.endswith(".bias")]
    assert bias_keys, "PEFT saved no bias"
    if name == "gpt2_bias_all":
        assert any("ln_1.bias" in k for k in bias_keys)  # norms too
    assert_merge_matches_peft(case, out)


# --------------------------------------------------------------------------------------------
# GPT-2 Conv1D


def test_gpt2_conv1d(merged):
    case, out = merged.get("gpt2_conv1d")
    assert_logits_match_unmerged(case, out)
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors)  # tied: no lm_head.weight needed
    assert_weights_match_peft_merge(case, tensors)
    # The Conv1D delta is transposed: stored (in, out).
    k = "transformer.h.0.attn.c_attn"
    expected = case.base_tensors[k + ".weight"] + po.linear_delta(case, k).T
    assert torch.allclose(tensors[k + ".weight"], expected, atol=WEIGHT_ATOL, rtol=0)


def test_gpt2_conv1d_misleading_fan_in_fan_out(merged):
    """["c_attn", "lm_head"] makes PEFT save fan_in_fan_out=False although c_attn is transposed."""
    case, out = merged.get("gpt2_fifo_misleading")
    assert case.adapter_config["fan_in_fan_out"] is False
    assert_logits_match_unmerged(case, out)
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors)  # untied: lm_head.weight is in the base already
    assert_weights_match_peft_merge(case, tensors)


# --------------------------------------------------------------------------------------------
# Embeddings


def test_embedding_lora_untied_llama(merged):
    case, out = merged.get("llama_embed")
    assert case.sites["model.embed_tokens"]["type"] == "Embedding"
    assert_merge_matches_peft(case, out)


def test_embedding_lora_tied_gpt2(merged):
    """LoRA on wte of a tied model: wte gets the delta, lm_head must keep the base weight."""
    case, out = merged.get("gpt2_wte_tied")
    assert_peft_merge_is_wrong(case)
    assert_logits_match_unmerged(case, out)
    cfg = po.config_json(out)
    assert cfg.get("tie_word_embeddings") is False
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors, extra={"lm_head.weight"})
    base_wte = case.base_tensors["transformer.wte.weight"]
    assert torch.equal(tensors["lm_head.weight"], base_wte)
    a = case.adapter_tensors["base_model.model.transformer.wte.lora_embedding_A"]
    b = case.adapter_tensors["base_model.model.transformer.wte.lora_embedding_B"]
    expected = base_wte + (b @ a).T * case.sites["transformer.wte"]["scale"]
    assert torch.allclose(tensors["transformer.wte.weight"], expected, atol=WEIGHT_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Conv2d on a custom (non-transformers) model


def test_conv2d_custom_model(merged):
    case, out = merged.get("conv2d")
    assert {s["type"] for s in case.sites.values()} == {"Conv2d", "Linear"}
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors)
    assert_weights_match_peft_merge(case, tensors)
    # And the merged weights, loaded into the model class, reproduce the unmerged PEFT forward.
    assert_logits_match_unmerged(case, out)


# --------------------------------------------------------------------------------------------
# modules_to_save and trainable tokens


def test_modules_to_save_lm_head(merged):
    case, out = merged.get("llama_mts_lm_head")
    tensors = assert_merge_matches_peft(case, out)
    assert torch.equal(
        tensors["lm_head.weight"], case.adapter_tensors["base_model.model.lm_head.weight"]
    )


def test_modules_to_save_score_seq_cls(merged):
    case, out = merged.get("llama_seqcls_score")
    assert "score" in case.adapter_config["modules_to_save"]
    assert "base_model.model.score.weight" in case.adapter_tensors
    assert_merge_matches_peft(case, out)


@pytest.mark.parametrize("name", ["llama_tt_list", "llama_tt_dict"])
def test_trainable_token_indices(merged, name):
    case, out = merged.get(name)
    assert_merge_matches_peft(case, out)


def test_trainable_token_indices_tied_gpt2(merged):
    """Rows replace the shared wte / lm_head weight; PEFT's merge is right here."""
    case, out = merged.get("gpt2_tt_tied")
    assert_logits_match_unmerged(case, out)
    tensors = po.load_folder_tensors(out)
    extra = {"lm_head.weight"} if "lm_head.weight" in tensors else set()
    assert_layout_like_base(case, tensors, extra=extra)
    assert_weights_match_peft_merge(case, tensors)
    delta = case.adapter_tensors[
        "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
    ]
    assert torch.equal(tensors["transformer.wte.weight"][po.TRAINABLE_IDS], delta)


# --------------------------------------------------------------------------------------------
# Tied lm_head with LoRA


def test_tied_lm_head_lora_is_untied(merged):
    case, out = merged.get("gpt2_lmhead_tied")
    assert_peft_merge_is_wrong(case)
    assert_logits_match_unmerged(case, out)
    assert po.config_json(out).get("tie_word_embeddings") is False
    tensors = po.load_folder_tensors(out)
    assert "lm_head.weight" in tensors
    assert_layout_like_base(case, tensors, extra={"lm_head.weight"})
    base_wte = case.base_tensors["transformer.wte.weight"]
    assert torch.equal(tensors["transformer.wte.weight"], base_wte)  # input embedding unchanged
    expected = base_wte + po.linear_delta(case, "lm_head")
    assert torch.allclose(tensors["lm_head.weight"], expected, atol=WEIGHT_ATOL, rtol=0)
    # c_attn is merged as PEFT does.
    for m in lora_modules(case):
        if m != "lm_head":
            ref = case.merged_state[m + ".weight"]
            assert torch.allclose(tensors[m + ".weight"], ref, atol=WEIGHT_ATOL, rtol=0), m


# --------------------------------------------------------------------------------------------
# target_parameters


def test_target_parameters_2d(merged):
    case, out = merged.get("llama_target_param_2d")
    assert case.sites["model.layers.0.mlp.down_proj"]["type"] == "ParamWrapper"
    assert_merge_matches_peft(case, out)


@pytest.mark.parametrize("name", ["qwen3moe_target_param_3d_single", "qwen3moe_target_param_3d"])
def test_target_parameters_moe_3d(merged, name):
    """Fused 3-D experts in the model (E, out, in); transformers 5.24 writes per-expert keys.

    ``_single`` targets only ``experts.down_proj``; the other case targets ``gate_up_proj`` and
    ``down_proj`` of the same module (PEFT nests the two ParamWrappers, the first-registered one
    innermost). The comparison goes through transformers' loader (which fuses the per-expert
    tensors again), so it does not depend on how the file splits the experts.
    """
    case, out = merged.get(name)
    assert {s["type"] for s in case.sites.values()} == {"ParamWrapper"}
    assert_logits_match_unmerged(case, out)
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors)
    model = po.load_model(out, case.arch)
    assert case.merged_state is not None
    got_state = model.state_dict()
    assert set(got_state) == set(case.merged_state)
    for k, ref in case.merged_state.items():
        assert torch.allclose(got_state[k], ref, atol=WEIGHT_ATOL, rtol=0), k


# --------------------------------------------------------------------------------------------
# Sharding


def test_sharded_base_and_output(merged):
    case, out = merged.get("llama_sharded", max_shard_size="20KB")
    base_files = set(po.folder_key_files(case.base_dir).values())
    assert len(base_files) > 1  # the base really is sharded
    index_path = out / "model.safetensors.index.json"
    assert index_path.is_file()
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    files = set(weight_map.values())
    assert len(files) > 1
    n = len(files)
    for f in files:
        assert re.fullmatch(rf"model-\d{{5}}-of-{n:05d}\.safetensors", f), f
        assert (out / f).is_file()
    on_disk = {p.name for p in out.glob("*.safetensors")}
    assert on_disk == files, f"stray or missing shard files: {on_disk ^ files}"
    tensors = po.load_folder_tensors(out)
    for f in files:  # every shard holds exactly what the index says
        with safe_open(str(out / f), "pt") as h:
            keys = set(h.keys())
        assert keys == {k for k, v in weight_map.items() if v == f}, f
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert set(tensors) == set(po.folder_key_files(case.base_dir))
    assert_layout_like_base(case, tensors)
    assert_weights_match_peft_merge(case, tensors)
    assert_logits_match_unmerged(case, out)


# --------------------------------------------------------------------------------------------
# layer_replication


def test_layer_replication(merged):
    """[[0, 2], [1, 2]] on 2 layers -> layers [0, 1, 1], each with its own LoRA."""
    case, out = merged.get("llama_layer_replication")
    assert_peft_merge_is_wrong(case)
    assert_logits_match_unmerged(case, out)
    assert po.config_json(out)["num_hidden_layers"] == 3
    tensors = po.load_folder_tensors(out)
    base = case.base_tensors
    # Expanded layer j copies original layer src[j]; each copy has its own LoRA.
    src = {0: 0, 1: 1, 2: 1}
    copies = {
        k.replace("model.layers.1.", "model.layers.2."): k
        for k in base
        if k.startswith("model.layers.1.")
    }
    assert_layout_like_base(case, tensors, extra=set(copies))
    for k, v in tensors.items():
        orig = copies.get(k, k)
        module = k.removesuffix(".weight")
        if module in case.sites:
            assert src[int(k.split(".")[2])] == int(orig.split(".")[2])
            expected = base[orig] + po.linear_delta(case, module)
            assert torch.allclose(v, expected, atol=WEIGHT_ATOL, rtol=0), k
        else:
            assert torch.equal(v, base[orig]), k


# --------------------------------------------------------------------------------------------
# Refusals and overwrite protection


def test_refuse_alora_python(peft_cases, tmp_path):
    import loracc
    from loracc.errors import LoraccError, UnsupportedError

    case = peft_cases.get("llama_alora")
    assert case.adapter_config["alora_invocation_tokens"] == [5, 6]
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match=r"(?i)alora") as info:
        loracc.merge(str(case.base_dir), str(case.adapter_dir), str(out))
    assert isinstance(info.value, LoraccError)
    assert not out.exists()


def test_refuse_alora_cli(peft_cases, tmp_path, repo_root):
    case = peft_cases.get("llama_alora")
    out = tmp_path / "out"
    proc = run_cli(
        repo_root,
        "merge",
        "--base",
        str(case.base_dir),
        "--adapter",
        str(case.adapter_dir),
        "-o",
        str(out),
    )
    assert_one_line_error(proc, r"alora")
    assert not out.exists()


def test_refuse_arrow_python(peft_cases, tmp_path):
    from peft import ArrowConfig

    import loracc
    from loracc.errors import UnsupportedError

    case = peft_cases.get("llama_rslora")
    adapter = tmp_path / "arrow_adapter"
    shutil.copytree(case.adapter_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["arrow_config"] = dataclasses.asdict(ArrowConfig())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match=r"(?i)arrow"):
        loracc.merge(str(case.base_dir), str(adapter), str(out))
    assert not out.exists()


def test_existing_output_needs_force(peft_cases, tmp_path):
    from loracc.errors import LoraccError

    case = peft_cases.get("llama_rslora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("keep me")
    with pytest.raises(LoraccError):
        _merge(case, out)
    assert (out / "stale.txt").read_text() == "keep me"  # a refusal touches nothing
    _merge(case, out, force=True)
    assert_logits_match_unmerged(case, out)
    assert_weights_match_peft_merge(case, po.load_folder_tensors(out))


# --------------------------------------------------------------------------------------------
# CLI


def _cli_merge_args(case: po.Case, out: Path, *extra: str) -> list[str]:
    return [
        "merge",
        "--base",
        str(case.base_dir),
        "--adapter",
        str(case.adapter_dir),
        "-o",
        str(out),
        *extra,
    ]


def test_cli_merge_json_force_dtype_shards(peft_cases, tmp_path, repo_root):
    """--json prints one JSON document; --force overwrites; --dtype and --max-shard-size apply.

    (Two CLI runs only: each one pays the interpreter + torch start-up.)
    """
    case = peft_cases.get("llama_rslora")
    out = tmp_path / "out"
    proc = run_cli(repo_root, *_cli_merge_args(case, out, "--json"))
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # stdout is one JSON document
    assert_logits_match_unmerged(case, out)
    assert_weights_match_peft_merge(case, po.load_folder_tensors(out))

    # The output exists now; --force overwrites it, here as fp16 shards.
    proc = run_cli(
        repo_root,
        *_cli_merge_args(case, out, "--force", "--dtype", "float16", "--max-shard-size", "20KB"),
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists(), "stale single-file checkpoint left behind"
    tensors = po.load_folder_tensors(out)
    assert_layout_like_base(case, tensors, dtype=torch.float16)
    base = case.base_tensors
    for m in lora_modules(case, "Linear"):
        k = m + ".weight"
        expected = (base[k] + po.linear_delta(case, m)).to(torch.float16)
        assert torch.equal(tensors[k], expected), k
    for k in set(base) - {m + ".weight" for m in case.sites}:
        assert torch.equal(tensors[k], base[k].to(torch.float16)), k


def test_cli_bad_input_exit_2(tmp_path, repo_root):
    missing = tmp_path / "does-not-exist"
    proc = run_cli(
        repo_root,
        "merge",
        "--base",
        str(missing),
        "--adapter",
        str(missing),
        "-o",
        str(tmp_path / "out"),
    )
    assert_one_line_error(proc, r".")
    assert not (tmp_path / "out").exists()


def _inspect_sites(data: Any) -> list[dict[str, Any]]:
    sites = data["sites"] if isinstance(data, dict) else data
    assert isinstance(sites, list) and sites, data
    return sites


def test_cli_inspect_json(peft_cases, repo_root):
    """inspect lists every LoRA site with PEFT's resolved rank, alpha and scale."""
    case = peft_cases.get("llama_patterns")
    proc = run_cli(
        repo_root, "inspect", str(case.adapter_dir), "--base", str(case.base_dir), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    sites = _inspect_sites(json.loads(proc.stdout))
    for s in sites:
        for key in ("module", "kind", "rank", "alpha", "scale"):
            assert key in s, f"site without {key!r}: {s}"
    by_module = {s["module"].removeprefix("base_model.model."): s for s in sites}
    assert len(by_module) == len(sites), "duplicate modules"
    assert set(by_module) == set(case.sites)
    for m, ref in case.sites.items():
        got = by_module[m]
        assert isinstance(got["kind"], str) and got["kind"], got
        assert got["rank"] == ref["r"], (m, got, ref)
        assert float(got["alpha"]) == pytest.approx(ref["alpha"], rel=1e-9), (m, got, ref)
        assert float(got["scale"]) == pytest.approx(ref["scale"], rel=1e-9), (m, got, ref)
