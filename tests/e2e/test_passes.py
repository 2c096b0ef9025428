"""The passes of issue 3 against PEFT and fp64 references, never against loracc itself.

* fold-dora: merged tensors vs PEFT's ``merge_and_unload`` (bit-identical in fp32 and bf16) and
  merged logits vs the unmerged DoRA forward, for Linear, Conv1D, Embedding and Conv2d.
* reconstruct-residual: pissa / olora adapters merged onto the *original* base vs PEFT's
  residual-base model (PEFT re-runs these inits on reload, exactly); pissa_niter vs the model as
  trained (in memory), since PEFT's reload re-draws the random SVD.
* expand-layer-replication: the merged 4-layer checkpoint vs the unmerged PEFT forward (PEFT's
  own merge is wrong here) and vs ``W[map[j]] + s·B_j·A_j`` per tensor.
* truncate-rank: the factored truncation vs a dense fp64 SVD of the delta.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import loracc
from loracc.errors import ConfigError, NonFiniteError, UnsupportedError
from loracc.io.checkpoint import Checkpoint
from loracc.passes import parse_pipeline
from tests.support import pass_cases as pc
from tests.support import peft_oracle as po

LOGITS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def _merge(case_dirs: tuple[Path, Path], out: Path, **kw) -> dict[str, torch.Tensor]:
    loracc.merge(str(case_dirs[0]), str(case_dirs[1]), str(out), **kw)
    return po.load_folder_tensors(out)


def _assert_logits(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, tol: float) -> None:
    effect = po.rel_err(ref, base)
    assert effect > 1e-2, f"the adapter barely changes the output ({effect:.3g})"
    err = po.rel_err(got, ref)
    assert err <= tol, f"logits rel err {err:.3g} > {tol:g}"


def _assert_like_peft_merge(case: po.Case, out: dict[str, torch.Tensor], *, exact: bool) -> None:
    assert case.merged_state is not None
    assert set(out) <= set(case.merged_state)  # PEFT's state dict also lists a tied lm_head
    for key, got in out.items():
        ref = case.merged_state[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        if exact:
            assert torch.equal(got, ref), f"{key}: differs from PEFT's merge"
        else:
            assert torch.allclose(got, ref, atol=WEIGHT_ATOL, rtol=0), key


# --------------------------------------------------------------------------------------------
# fold-dora


@pytest.mark.parametrize(
    "name", ["dora_linear", "dora_conv1d", "dora_embedding", "dora_conv2d", "dora_rslora_bf16"]
)
def test_dora_merge_equals_peft(name, tmp_path, tmp_path_factory):
    case = pc.case(name, tmp_path_factory)
    assert any(k.endswith("lora_magnitude_vector") for k in case.adapter_tensors)
    out = _merge((case.base_dir, case.adapter_dir), tmp_path / "out")
    _assert_like_peft_merge(case, out, exact=True)
    got = po.model_output(po.load_model(tmp_path / "out", case.arch), case.inputs)
    # bf16: the merged weights are rounded once, the unmerged forward is not.
    tol = 2e-2 if case.spec.base_dtype == torch.bfloat16 else LOGITS_RTOL
    _assert_logits(got, case.peft_logits, case.base_logits, tol)


def test_dora_folds_to_a_channel_scale(tmp_path_factory):
    """After fold-dora: plain factors plus m/‖W + s·B·A‖ per output row (fp64 reference)."""
    case = pc.case("dora_linear", tmp_path_factory)
    base = Checkpoint(case.base_dir)
    adapter = loracc.load_adapter(case.adapter_dir, case.base_dir)
    result = loracc.compile_adapter(adapter, base, check=True)
    folded = {s.module: s for s in result.adapter.sites}
    base_t = case.base_tensors
    for module in case.sites:
        site = folded[module]
        assert site.magnitude is None and site.channel_scale is not None
        a = po.adapter_factor(case, module, "lora_A").double()
        b = po.adapter_factor(case, module, "lora_B").double()
        m = case.adapter_tensors[f"base_model.model.{module}.lora_magnitude_vector"].double()
        v = base_t[f"{module}.weight"].double() + case.sites[module]["scale"] * (b @ a)
        ref = m / v.norm(dim=1)
        assert torch.allclose(site.channel_scale.double(), ref, rtol=1e-6, atol=0), module


def test_dora_zero_norm_refused(tmp_path, tmp_path_factory):
    """A zero row of W + ΔW makes m/‖W + ΔW‖ infinite: refused, naming the module."""
    case = pc.case("dora_linear", tmp_path_factory)
    base = tmp_path / "base"
    shutil.copytree(case.base_dir, base)
    tensors = po.load_folder_tensors(base)
    module = "model.layers.0.self_attn.q_proj"
    a = po.adapter_factor(case, module, "lora_A")
    b = po.adapter_factor(case, module, "lora_B")
    row = -(b @ a * case.sites[module]["scale"])[3]
    tensors[f"{module}.weight"][3] = row
    from safetensors.torch import save_file

    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"{module}.*channel 3"):
        loracc.merge(str(base), str(case.adapter_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# reconstruct-residual


@pytest.mark.parametrize("name", ["pissa", "pissa_conv1d", "olora"])
def test_residual_init_merges_onto_original_base(name, tmp_path, tmp_path_factory):
    case = pc.case(name, tmp_path_factory)
    assert case.adapter_config["init_lora_weights"] == name.split("_")[0]
    out = _merge((case.base_dir, case.adapter_dir), tmp_path / "out")
    # PEFT re-runs pissa/olora on the original base when it loads the adapter, so its merge is
    # W_res + s·B·A: the reference. loracc merges W + s·(B·A − B0·A0) from the original base.
    _assert_like_peft_merge(case, out, exact=False)
    got = po.model_output(po.load_model(tmp_path / "out", case.arch), case.inputs)
    _assert_logits(got, case.peft_logits, case.base_logits, LOGITS_RTOL)


def test_pissa_niter_needs_initial_adapter(tmp_path, tmp_path_factory):
    nc = pc.build_niter(tmp_path_factory)
    with pytest.raises(UnsupportedError, match=r"pissa_niter_4.*--initial-adapter"):
        loracc.merge(str(nc.base_dir), str(nc.adapter_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    refusals = loracc.inspect(str(nc.adapter_dir), str(nc.base_dir))["refusals"]
    assert any("pissa_niter_4" in r and "--initial-adapter" in r for r in refusals)


def test_pissa_niter_with_initial_adapter(tmp_path, tmp_path_factory):
    nc = pc.build_niter(tmp_path_factory)
    # Why loracc does not follow PEFT's reload: it re-draws the randomized SVD.
    drift = po.rel_err(nc.reloaded_logits, nc.trained_logits)
    assert drift > 1e-2, f"PEFT's pissa_niter reload now reproduces training ({drift:.3g})"
    out = tmp_path / "out"
    loracc.merge(str(nc.base_dir), str(nc.adapter_dir), str(out), initial_adapter=nc.initial_dir)
    got = po.model_output(po.load_model(out, "llama"), nc.inputs)
    _assert_logits(got, nc.trained_logits, nc.base_logits, LOGITS_RTOL)


def test_pissa_niter_peft_converted_merges_as_plain(tmp_path, tmp_path_factory):
    nc = pc.build_niter(tmp_path_factory)
    config = json.loads((nc.converted_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    out = tmp_path / "out"
    loracc.merge(str(nc.base_dir), str(nc.converted_dir), str(out))
    got = po.model_output(po.load_model(out, "llama"), nc.inputs)
    _assert_logits(got, nc.trained_logits, nc.base_logits, LOGITS_RTOL)


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("corda", r"corda.*--initial-adapter"),
        ("lora_ga", r"lora_ga.*--initial-adapter"),
        ("loftq", r"loftq.*quantized"),
    ],
)
def test_unreproducible_inits_refused(init, message, peft_cases, tmp_path):
    case = peft_cases.get("llama_linear")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=message):
        loracc.merge(str(case.base_dir), str(adapter), str(tmp_path / "out"))


def test_plain_inits_pass_through(peft_cases, tmp_path):
    """eva / orthogonal / mica / gaussian do not change the base: merged like init=True (PEFT)."""
    case = peft_cases.get("llama_linear")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "orthogonal"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = _merge((case.base_dir, adapter), tmp_path / "out")
    _assert_like_peft_merge(case, out, exact=True)


# --------------------------------------------------------------------------------------------
# expand-layer-replication


def test_layer_replication_3_to_4_layers(tmp_path, tmp_path_factory):
    """[[0, 2], [1, 3]] on 3 layers -> [0, 1, 1, 2]: each copy cloned, with its own LoRA."""
    case = pc.case("replication", tmp_path_factory)
    assert case.peft_merge_rel_err is not None and case.peft_merge_rel_err > 1e-2  # PEFT: wrong
    out = _merge((case.base_dir, case.adapter_dir), tmp_path / "out")
    got = po.model_output(po.load_model(tmp_path / "out", case.arch), case.inputs)
    _assert_logits(got, case.peft_logits, case.base_logits, LOGITS_RTOL)
    assert po.config_json(tmp_path / "out")["num_hidden_layers"] == 4
    base = case.base_tensors
    mapping = [0, 1, 1, 2]
    expected_keys = {k for k in base if not k.startswith("model.layers.")}
    for j, i in enumerate(mapping):
        for k in base:
            if k.startswith(f"model.layers.{i}."):
                expected_keys.add(k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1))
    assert set(out) == expected_keys
    for key, tensor in out.items():
        parts = key.split(".")
        src = key
        if key.startswith("model.layers."):
            src = ".".join([*parts[:2], str(mapping[int(parts[2])]), *parts[3:]])
        module = key.removesuffix(".weight")
        expected = base[src] + (po.linear_delta(case, module) if module in case.sites else 0)
        assert torch.allclose(tensor, expected, atol=WEIGHT_ATOL, rtol=0), key
    assert len({m for m in case.sites if m.startswith("model.layers.3.")}) == 3


def test_layer_replication_reindexes_layer_types(tmp_path, tmp_path_factory):
    """Qwen2 checks len(layer_types) == num_hidden_layers; PEFT leaves layer_types stale."""
    qc = pc.build_qwen_replication(tmp_path_factory)
    assert "IndexError" in qc.stale_error  # PEFT's own forward breaks on the stale list
    out = tmp_path / "out"
    loracc.merge(str(qc.base_dir), str(qc.adapter_dir), str(out))
    config = po.config_json(out)
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    got = po.model_output(po.load_model(out, "qwen2_3"), qc.inputs)
    _assert_logits(got, qc.peft_logits, qc.base_logits, LOGITS_RTOL)


def test_layer_replication_range_outside_base(peft_cases, tmp_path):
    case = peft_cases.get("llama_layer_replication")
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["layer_replication"] = [[0, 2], [1, 3]]  # the base has 2 layers
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"\[1, 3\).*2 layers"):
        loracc.merge(str(case.base_dir), str(adapter), str(tmp_path / "out"))


# --------------------------------------------------------------------------------------------
# truncate-rank


def _dense_truncation(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


def _site_delta64(site) -> torch.Tensor:
    """s·B·A as (out, in·k…), fp64, from the IR's factors (PEFT's formula, independent)."""
    return site.scale * (site.lora_B.double().flatten(1) @ site.lora_A.double().flatten(1))


@pytest.mark.parametrize(("name", "rank"), [("llama_patterns", 3), ("conv2d", 2)])
def test_truncate_rank_equals_dense_svd(name, rank, peft_cases):
    case = peft_cases.get(name)
    before = loracc.load_adapter(case.adapter_dir, case.base_dir)
    result = loracc.compile_adapter(
        before, None, parse_pipeline(f"truncate-rank{{rank={rank}}}"), check=True
    )
    after = {s.module: s for s in result.adapter.sites}
    details = dict(d.split(": ", 1) for d in result.steps[0][1].details)
    for site in before.sites:
        delta = _site_delta64(site)
        k = min(rank, site.rank)
        ref, S = _dense_truncation(delta, k)
        got = _site_delta64(after[site.module])
        assert after[site.module].rank == k
        assert after[site.module].scale == site.scale
        rel = float((got - ref).norm() / delta.norm())
        assert rel <= 1e-5, f"{site.module}: factored vs dense truncation {rel:.3g}"
        if k < site.rank:
            reported = float(details[site.module].rsplit(" ", 1)[1])
            dense_err = float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())
            assert math.isclose(reported, dense_err, rel_tol=1e-3), site.module


def test_truncate_energy_keeps_the_smallest_sufficient_rank(peft_cases):
    case = peft_cases.get("llama_linear")
    before = loracc.load_adapter(case.adapter_dir, case.base_dir)
    passes = parse_pipeline("truncate-rank{energy=0.8}")
    after = {s.module: s for s in loracc.compile_adapter(before, None, passes).adapter.sites}
    kept = set()
    for site in before.sites:
        _, S = _dense_truncation(_site_delta64(site), 1)
        energy = S.square().cumsum(0) / S.square().sum()
        k = int((energy < 0.8).sum()) + 1
        assert after[site.module].rank == k, site.module
        kept.add(k)
    assert kept != {8}, "the energy target truncated nothing; the test proves nothing"


def test_truncate_at_full_rank_is_exact(peft_cases, tmp_path):
    """Rank r on a rank-r adapter leaves it alone: the merge stays bit-identical to PEFT's."""
    case = peft_cases.get("llama_linear")
    out = _merge(
        (case.base_dir, case.adapter_dir),
        tmp_path / "out",
        passes=parse_pipeline("truncate-rank{rank=8}"),
    )
    _assert_like_peft_merge(case, out, exact=True)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    r=st.integers(1, 12),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_truncate_factors_property(m, n, r, k, seed):
    from loracc.passes.truncate_rank import truncate_factors

    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=gen)
    B = torch.randn(m, r, generator=gen)
    t = truncate_factors(A, B, rank=k)
    delta = B.double() @ A.double()
    kk = min(k, r, m, n)
    ref, _ = _dense_truncation(delta, kk)
    got = t.B.double() @ t.A.double()
    assert t.rank <= kk
    assert float((got - ref).norm()) <= 1e-5 * float(delta.norm()) + 1e-6


def test_truncate_rank_options_checked():
    with pytest.raises(ConfigError, match="rank=R and/or energy=E"):
        parse_pipeline("truncate-rank")
    with pytest.raises(ConfigError, match="energy"):
        parse_pipeline("truncate-rank{energy=1.5}")


# --------------------------------------------------------------------------------------------
# compile --emit ir


def test_compile_emit_ir_cli(peft_cases):
    from loracc.cli import main

    case = peft_cases.get("llama_layer_replication")
    args = ["compile", "--adapter", str(case.adapter_dir), "--base", str(case.base_dir)]
    first = CliRunner().invoke(main, [*args, "--emit", "ir"])
    second = CliRunner().invoke(main, [*args, "--emit", "ir"])
    assert first.exit_code == 0, first.output
    assert first.output == second.output  # deterministic
    assert "source model.layers.2.self_attn.q_proj.weight <- model.layers.1." in first.output
    assert "config num_hidden_layers = 3" in first.output
    spec = "expand-layer-replication,truncate-rank{rank=2}"
    steps = CliRunner().invoke(main, [*args, "--passes", spec, "--print-after-all"])
    assert steps.exit_code == 0, steps.output
    headers = [line for line in steps.output.splitlines() if line.startswith("// ")]
    ran = [
        "expand-layer-replication",
        "reconstruct-residual",
        "untie-embeddings",
        "truncate-rank{rank=2}",
        "fold-dora",
    ]  # --passes adds to the required passes (tests/e2e/test_pipeline_required.py)
    assert headers == [f"// pipeline: {','.join(ran)}", "// input", *(f"// {p}" for p in ran)]
    assert "rank=2 " in steps.output.split("// truncate-rank{rank=2}")[1]
    bad = CliRunner().invoke(main, [*args, "--passes", "no-such-pass"])
    assert bad.exit_code == 2 and "unknown pass" in bad.output


def test_residual_init_on_a_shared_replicated_layer_refused(tmp_path):
    """layer_replication copies share Parameters; peft's pissa rewrites the shared one in place."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    q = "model.layers.{}.self_attn.q_proj"
    weights = {f"{q.format(i)}.weight": torch.randn(4, 4, generator=gen) for i in range(2)}
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    factors = {}
    for j in (0, 2):
        factors[f"base_model.model.{q.format(j)}.lora_A.weight"] = torch.randn(2, 4, generator=gen)
        factors[f"base_model.model.{q.format(j)}.lora_B.weight"] = torch.randn(4, 2, generator=gen)
    save_file(factors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "init_lora_weights": "pissa",
        "layer_replication": [[0, 2], [1, 2]],
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"layers\.2\.self_attn\.q_proj.*2 layers share"):
        loracc.merge(str(base), str(adapter), str(tmp_path / "out"))
