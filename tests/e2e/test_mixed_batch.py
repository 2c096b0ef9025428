"""Mixed-adapter batches in one ONNX graph (``export --keep-lora --mixed-batch``, ``pack
--mixed-batch``) vs PEFT's mixed-batch forward (``model(ids, adapter_names=[...])``), row by row.

Tiny Llama, Qwen2 and GPT-2 bases exported by TorchScript (``ts``: ids, positions, mask) and the
dynamo exporter (``dyn``: ids only), at a fixed batch of 5 rows. The adapters differ in rank,
targets (some modules in one adapter only), alpha, rsLoRA, and lora_bias on Qwen2's biased q/k/v;
GPT-2's are Conv1D (fan_in_fan_out). References come from PEFT only, reloaded from disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import loracc
from loracc.errors import ConfigError, FormatError, UnsupportedError
from tests.support import onnx_oracle as oo
from tests.support import peft_oracle as po
from tests.support.golden_onnx import invoke


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**po.TINY_DECODER)


po.ARCHS.setdefault("qwen2", po.Arch("qwen2", _qwen2, "causal"))

ATOL = 1e-4  # absolute, onnxruntime fp32 vs torch
BATCH, SEQ = 5, 12
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# adapter name -> LoraConfig kwargs per arch; the first three go into the export's slots
ADAPTERS: dict[str, dict[str, dict[str, Any]]] = {
    "a0": {
        "llama": dict(r=4, lora_alpha=8, target_modules=_DECODER),
        "qwen2": dict(r=4, lora_alpha=8, target_modules=_DECODER),
        "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    },
    "a1": {
        "llama": dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"]),
        "qwen2": dict(
            r=2, lora_alpha=5, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"]
        ),
        "gpt2": dict(r=2, lora_alpha=5, target_modules=["c_attn"]),
    },
    "a2": {
        "llama": dict(r=8, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "up_proj"]),
        "qwen2": dict(r=8, lora_alpha=6, use_rslora=True, target_modules=_DECODER),
        "gpt2": dict(r=8, lora_alpha=6, use_rslora=True, target_modules=["c_fc", "c_proj"]),
    },
    # a second set, packed later: a3 fits every slot of a0's targets at a lower rank
    "a3": {
        "llama": dict(r=3, lora_alpha=4, target_modules=["k_proj", "gate_proj", "up_proj"]),
        "qwen2": dict(r=3, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"]),
        "gpt2": dict(r=3, lora_alpha=4, target_modules=["c_proj", "c_attn"]),
    },
    # DoRA: Llama's bias-free MatMuls, Qwen2's q (MatMul + Add bias) and o, GPT-2's Gemm (C moved)
    "dora": {
        "llama": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "down_proj"]),
        "qwen2": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"]),
        "gpt2": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["c_attn", "c_fc"]),
    },
    "rank16": {"llama": dict(r=16, lora_alpha=16, target_modules=["q_proj"])},
    "embed": {"llama": dict(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"])},
}
SLOTS = ["a0", "a1", "a2"]
ROWS = ["a1", "__base__", "a0", "a2", "a1"]  # PEFT's adapter_names for the 5 rows


@dataclass
class Arch:
    name: str
    base_dir: Path
    inputs: torch.Tensor
    adapters: dict[str, Path]
    exports: dict[str, Path]

    def _peft(self, loaded: Sequence[str]) -> Any:
        from peft import PeftModel

        base = po.load_model(self.base_dir, self.name)
        model = PeftModel.from_pretrained(
            base, str(self.adapters[loaded[0]]), adapter_name=loaded[0]
        )
        for name in loaded[1:]:
            model.load_adapter(str(self.adapters[name]), adapter_name=name)
        return model.eval()

    def peft_rows(self, loaded: Sequence[str], rows: Sequence[str]) -> torch.Tensor:
        """PEFT's mixed-batch logits: ``loaded`` adapters reloaded from disk, ``rows`` names."""
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = self._peft(loaded)
            out = model(input_ids=self.inputs, adapter_names=list(rows), use_cache=False)
        return out.logits.detach().float()

    def peft_each(self, loaded: Sequence[str], rows: Sequence[str]) -> torch.Tensor:
        """Row i of PEFT's forward with adapter ``rows[i]`` active (its adapters disabled for
        ``__base__``): PEFT refuses ``adapter_names`` when an adapter uses DoRA."""
        out = torch.empty(0)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = self._peft(loaded)
            for name in dict.fromkeys(rows):
                if name == "__base__":
                    with model.disable_adapter():
                        logits = model(input_ids=self.inputs, use_cache=False).logits
                else:
                    model.set_adapter(name)
                    logits = model(input_ids=self.inputs, use_cache=False).logits
                if out.numel() == 0:
                    out = torch.empty_like(logits)
                for i, row in enumerate(rows):
                    if row == name:
                        out[i] = logits[i]
        return out.float()


def _make_adapter(arch: str, base_dir: Path, name: str, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    kw = dict(ADAPTERS[name][arch], init_lora_weights=False)
    if arch == "gpt2":
        kw["fan_in_fan_out"] = True
    po.seed_all(100 + sorted(ADAPTERS).index(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(po.load_model(base_dir, arch), LoraConfig(**kw))
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * po.ADAPTER_STD)
        model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Arch:
    name = request.param
    root = tmp_path_factory.mktemp(f"mixed_{name}")
    po.seed_all(0)
    po.save_base(po.ARCHS[name], root / "base", dtype=torch.float32, max_shard_size=None)
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randint(1, po.VOCAB, (BATCH, SEQ), generator=gen)
    adapters = {
        a: _make_adapter(name, root / "base", a, root / a) for a in ADAPTERS if name in ADAPTERS[a]
    }
    return Arch(name, root / "base", inputs, adapters, {})


def _base_onnx(arch: Arch, mode: str) -> Path:
    if mode not in arch.exports:
        case = SimpleNamespace(base_dir=arch.base_dir, arch=arch.name, inputs=arch.inputs)
        path = arch.base_dir.parent / f"base_{mode}.onnx"
        try:
            if mode == "ts":
                oo.export_torchscript(case, path)
            else:
                _export_dynamo(arch, path)
        except Exception as e:  # the exporter's own failure is the skip reason
            pytest.skip(f"torch.onnx.export ({mode}) failed on {arch.name}: {e!r}"[:300])
        arch.exports[mode] = path
    return arch.exports[mode]


class _Logits(torch.nn.Module):
    """Logits from ids alone, the HF module tree under ``m`` (GPT-2 has no ``model``, so
    onnx_oracle.export_dynamo's wrapper does not fit it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, use_cache=False).logits


def _export_dynamo(arch: Arch, path: Path) -> None:
    model = _Logits(po.load_model(arch.base_dir, arch.name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (arch.inputs,), dynamo=True, input_names=["input_ids"],
            output_names=["logits"], verbose=False,
        )  # fmt: skip
        program.save(str(path))


def _run(model: Path, arch: Arch, ids: Sequence[int], *adapter_files: Path) -> torch.Tensor:
    sess = oo.session(model)
    x = arch.inputs
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    feeds_by_name = {"ids": x, "input_ids": x, "pos": pos, "mask": torch.ones_like(x)}
    feeds = {
        i.name: feeds_by_name[i.name].numpy() for i in sess.get_inputs() if i.name in feeds_by_name
    }
    feeds["lora_ids"] = np.array(ids, dtype=np.int64)
    options = ort.RunOptions()
    keep = []
    for f in adapter_files:
        lora = ort.LoraAdapter()
        lora.Load(str(f))
        options.add_active_adapter(lora)
        keep.append(lora)
    out = sess.run(None, feeds, options)[0]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _ids(rows: Sequence[str], slots: Sequence[str]) -> list[int]:
    return [-1 if r == "__base__" else list(slots).index(r) for r in rows]


ERRORS: dict[str, float] = {}


def _check_rows(got: torch.Tensor, ref: torch.Tensor, rows: Sequence[str], what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    for i, row in enumerate(rows):
        err = float((got[i] - ref[i]).abs().max())
        ERRORS[f"{what} row {i} ({row})"] = err
        assert err <= ATOL, f"{what}: row {i} ({row}) max abs err {err:.3g} > {ATOL:g}"


@pytest.fixture(scope="module", autouse=True)
def _print_errors() -> Any:
    yield
    for what, err in sorted(ERRORS.items()):  # pytest -s shows them
        print(f"\nmax abs err vs PEFT {err:.3g}: {what}", end="")


def _export(arch: Arch, mode: str, names: Sequence[str], out: Path) -> Any:
    adapters = [arch.adapters[n] for n in names]
    return loracc.export_onnx(
        _base_onnx(arch, mode), adapters, out, keep_lora=True, mixed_batch=True
    )


@pytest.mark.parametrize("mode", ["ts", "dyn"])
def test_rows_match_peft_mixed_batch(arch: Arch, mode: str, tmp_path: Path) -> None:
    out = tmp_path / "mixed.onnx"
    report = _export(arch, mode, SLOTS, out)
    assert report.mode == "mixed-batch"
    ref = arch.peft_rows(SLOTS, ROWS)
    base = arch.peft_rows(SLOTS, ["__base__"] * BATCH)
    for i, row in enumerate(ROWS):  # every adapter changes its rows: the check could fail
        if row != "__base__":
            assert float((ref[i] - base[i]).abs().max()) > 1e-3, row
    got = _run(out, arch, _ids(ROWS, SLOTS))
    _check_rows(got, ref, ROWS, f"{arch.name}/{mode}")
    # the defaults hold the export's set: its adapter file gives the same rows
    (file,) = [Path(f["file"]) for f in report.adapter_files]
    torch.testing.assert_close(_run(out, arch, _ids(ROWS, SLOTS), file), got, rtol=0, atol=0)
    # a base row is the base model exactly (its branch adds zeros)
    all_base = _run(out, arch, [-1] * BATCH)
    torch.testing.assert_close(all_base[1], got[1], rtol=0, atol=0)
    _check_rows(all_base, base, ["__base__"] * BATCH, f"{arch.name}/{mode} all base")


@pytest.mark.parametrize("mode", ["ts", "dyn"])
def test_second_set_swapped_in_with_one_file(arch: Arch, mode: str, tmp_path: Path) -> None:
    """Pack a3 and a0 (two adapters into three slots, another order): rows match PEFT for that
    set; the unfilled slot's rows are NaN, the others untouched."""
    out = tmp_path / "mixed.onnx"
    _export(arch, mode, SLOTS, out)
    second = ["a3", "a0"]
    packed = tmp_path / "second.onnx_adapter"
    report = loracc.pack_mixed(out, [arch.adapters[n] for n in second], packed)
    assert "2 of 3 adapter slots filled: lora_ids 2..2 give NaN rows" in report.notes
    rows = ["a0", "a3", "__base__", "a3", "a0"]
    got = _run(out, arch, _ids(rows, second), packed)
    _check_rows(got, arch.peft_rows(second, rows), rows, f"{arch.name}/{mode} second set")
    with_unfilled = _run(out, arch, [1, 2, -1, 0, 2], packed)  # rows 1 and 4: slot 2, unfilled
    assert torch.isnan(with_unfilled[[1, 4]]).all()
    assert torch.equal(with_unfilled[[0, 2, 3]], got[[0, 2, 3]])


@pytest.mark.parametrize("mode", ["ts", "dyn"])
def test_dora_rows_match_peft(arch: Arch, mode: str, tmp_path: Path) -> None:
    """DoRA beside plain adapters: its rows scaled by its m/‖W+ΔW‖, the other rows by ones.
    PEFT's mixed-batch forward refuses DoRA, so each row is PEFT's forward with its adapter."""
    names = ["a0", "dora", "a1"]
    rows = ["dora", "__base__", "a0", "dora", "a1"]
    out = tmp_path / "mixed.onnx"
    report = _export(arch, mode, names, out)
    assert any(n.endswith(".dora_scale_stacked") for s in report.slots for n in s["slots"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        arch.peft_rows(names, rows)
    ref = arch.peft_each(names, rows)
    base = arch.peft_each(names, ["__base__"] * BATCH)
    assert float((ref[0] - base[0]).abs().max()) > 1e-3
    # the oracle agrees with PEFT's mixed-batch forward where that runs
    plain = ["a1", "__base__", "a0", "a0", "a1"]
    torch.testing.assert_close(arch.peft_each(names, plain), arch.peft_rows(names, plain))
    _check_rows(_run(out, arch, _ids(rows, names)), ref, rows, f"{arch.name}/{mode} dora")


def test_ids_outside_the_slots_give_nan_rows(arch: Arch, tmp_path: Path) -> None:
    out = tmp_path / "mixed.onnx"
    _export(arch, "ts", SLOTS, out)
    got = _run(out, arch, [3, -1, -2, 0, 1 << 40])
    assert torch.isnan(got[[0, 2, 4]]).all()
    assert torch.isfinite(got[[1, 3]]).all()
    ref = arch.peft_rows(SLOTS, ["__base__", "__base__", "__base__", "a0", "a0"])
    _check_rows(got[[1, 3]], ref[[1, 3]], ["__base__", "a0"], f"{arch.name}/ts valid rows")


def test_graph_uses_standard_ops_and_adapter_slots(arch: Arch, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "mixed.onnx"
    _export(arch, "ts", SLOTS, out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert {o.domain for o in model.opset_import} == {""}
    assert all(n.domain == "" for n in model.graph.node)
    ids = next(i for i in model.graph.input if i.name == "lora_ids")
    assert ids.type.tensor_type.elem_type == onnx.TensorProto.INT64
    overridable = {i.name: i.shape for i in oo.session(out).get_overridable_initializers()}
    stacked = {k: v for k, v in overridable.items() if k.endswith(".stacked")}
    assert stacked and all(shape[0] == len(SLOTS) + 2 for shape in stacked.values())


# --------------------------------------------------------------------------------------------
# Refusals (llama only: they do not depend on the architecture)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Arch:
    root = tmp_path_factory.mktemp("mixed_refusals")
    po.seed_all(0)
    po.save_base(po.ARCHS["llama"], root / "base", dtype=torch.float32, max_shard_size=None)
    inputs = torch.randint(1, po.VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    names = ["a0", "a1", "dora", "rank16", "embed"]
    adapters = {a: _make_adapter("llama", root / "base", a, root / a) for a in names}
    return Arch("llama", root / "base", inputs, adapters, {})


@pytest.mark.parametrize(
    "names,error,words",
    [
        (["embed"], UnsupportedError, r"this module is an embedding \(Gather\)"),
    ],
)
def test_export_refuses_with_reason(
    llama: Arch, tmp_path: Path, names: list[str], error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        _export(llama, "ts", names, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_mixed_batch_needs_keep_lora(llama: Arch, tmp_path: Path) -> None:
    base = _base_onnx(llama, "ts")
    for kw in ({}, {"keep_lora": True, "empty_slots": True}):
        with pytest.raises(ConfigError, match="--mixed-batch needs --keep-lora"):
            loracc.export_onnx(
                base, llama.adapters["a0"], tmp_path / "x.onnx", mixed_batch=True, **kw
            )


@pytest.mark.parametrize(
    "names,words",
    [
        (["a0", "a1", "a0"], "3 adapters for a mixed-batch graph with 2 adapter slots"),
        (["rank16"], "rank 16 for 'model.layers.0.self_attn.q_proj', whose stacked slot"),
        (["dora"], "uses DoRA; its slot in .* has no DoRA scale"),
        (["embed"], "targets 'model.embed_tokens', which has no adapter slot"),
    ],
)
def test_pack_refuses_what_the_slots_cannot_hold(
    llama: Arch, tmp_path: Path, names: list[str], words: str
) -> None:
    out = tmp_path / "mixed.onnx"
    _export(llama, "ts", ["a0", "a1"], out)
    packed = tmp_path / "x.onnx_adapter"
    with pytest.raises(UnsupportedError, match=words):
        loracc.pack_mixed(out, [llama.adapters[n] for n in names], packed)
    assert not packed.exists()


def test_pack_modes_refuse_the_other_kind_of_model(llama: Arch, tmp_path: Path) -> None:
    mixed, keep = tmp_path / "mixed.onnx", tmp_path / "keep.onnx"
    _export(llama, "ts", ["a0"], mixed)
    loracc.export_onnx(_base_onnx(llama, "ts"), llama.adapters["a0"], keep, keep_lora=True)
    with pytest.raises(ConfigError, match=r"a mixed-batch graph; .* `loracc pack --mixed-batch`"):
        loracc.pack(mixed, llama.adapters["a1"], tmp_path / "x.onnx_adapter")
    with pytest.raises(
        FormatError, match=r"no 'loracc\.mixed' metadata.*pack without --mixed-batch"
    ):
        loracc.pack_mixed(keep, [llama.adapters["a1"]], tmp_path / "x.onnx_adapter")


def test_cli_export_and_pack(llama: Arch, tmp_path: Path) -> None:
    out, packed = tmp_path / "mixed.onnx", tmp_path / "set.onnx_adapter"
    a0, a1 = (str(llama.adapters[n]) for n in ("a0", "a1"))
    base = _base_onnx(llama, "ts")
    argv = ["export", "--onnx", "--keep-lora", "--mixed-batch", "--base", base]
    argv += ["--adapter", a0, "--adapter", a1, "-o", out]
    done = invoke(*argv, "--dry-run")
    assert done.exit_code == 0 and "dry run, nothing written" in done.output, done.output
    assert list(tmp_path.iterdir()) == []
    done = invoke(*argv)
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.onnx", "mixed.onnx_adapter"]
    assert "mixed batch: input 'lora_ids'" in done.output and "0 = " in done.output
    done = invoke("pack", "--mixed-batch", "--model", out, "--adapter", a1, "--adapter", a0,
                  "-o", packed)  # fmt: skip
    assert done.exit_code == 0, done.output
    got = _run(out, llama, [0, 1, -1, 1, 0], packed)
    rows = ["a1", "a0", "__base__", "a0", "a1"]
    _check_rows(got, llama.peft_rows(["a0", "a1"], rows), rows, "llama/ts cli pack")
    done = invoke("pack", "--model", out, "--adapter", a1, "--adapter", a0, "-o", packed)
    assert done.exit_code == 2 and "several need --mixed-batch" in done.output


def test_fused_qkv_rows_match_peft(llama: Arch, tmp_path: Path) -> None:
    """q/k/v fused into one MatMul (onnxruntime-genai's layout): one stacked group whose rank is
    the largest sum over the members (a0: 3 × 4, a1: q and v, 2 × 2), zero for a2 (no q/k/v)."""
    fused = tmp_path / "fused.onnx"
    oo.fuse_qkv(_base_onnx(llama, "ts"), fused)
    names = ["a0", "a1"]
    out = tmp_path / "mixed.onnx"
    report = loracc.export_onnx(
        fused, [llama.adapters[n] for n in names], out, keep_lora=True, mixed_batch=True
    )
    qkv = [s for s in report.slots if s["key"].endswith("attn.qkv_proj")]
    assert qkv and {s["rank"] for s in qkv} == {12}
    rows = ["a1", "a0", "__base__", "a0", "a1"]
    got = _run(out, llama, _ids(rows, names))
    _check_rows(got, llama.peft_rows(names, rows), rows, "llama/ts fused qkv")


def test_quantized_base_is_refused(llama: Arch, tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    int4 = tmp_path / "int4.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(_base_onnx(llama, "ts"))), block_size=16)
    quantizer.process()
    quantizer.model.save_model_to_file(str(int4))
    with pytest.raises(
        UnsupportedError, match=r"--mixed-batch on a quantized weight \(MatMulNBits"
    ):
        loracc.export_onnx(
            int4, llama.adapters["a0"], tmp_path / "x.onnx", keep_lora=True, mixed_batch=True
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4.onnx"]
