"""Issue 7: property-based tests (hypothesis).

1. Random valid LoRA configurations (ranks, alphas, alpha_pattern, rsLoRA, targets, Linear,
   GPT-2 Conv1D and Embedding layers, fp32/fp16/bf16 bases, input and output sharding, with and
   without peft's key prefix) on tiny models: every merged tensor equals the independent fp64
   reference ``W.double() + s * B.double() @ A.double()`` rounded once to the base dtype, within
   one unit in the last place plus the fp32 accumulation bound.
2. Random corruptions of a valid base + adapter (truncation, byte flips and splices, hostile
   safetensors header fields, hostile JSON values in adapter_config.json, config.json and the
   shard index): the command line exits 0 or 2, never with a traceback or an internal error; on
   exit 2 the message is one line and no output or temporary is left; the inputs are unchanged.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import loracc
from loracc.cli import main
from tests.support import make_corpus as mc

# CI runs 25 fixed examples; LORACC_HYPOTHESIS_EXAMPLES=2000 hunts with fresh random ones.
_HUNT = int(os.environ.get("LORACC_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=_HUNT or 25,
    deadline=None,
    derandomize=not _HUNT,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------
# 1. merge == fp64 reference


@dataclass(frozen=True)
class Module:
    name: str  # module path; its base tensor is f"{name}.weight"
    stored: tuple[int, int]  # base tensor shape as stored
    kind: str  # "linear" (out, in), "conv1d" (in, out) or "embedding" (num, dim)

    @property
    def fan(self) -> tuple[int, int]:
        """(in, out) of the LoRA factors: A is (r, in), B is (out, r)."""
        a, b = self.stored
        return (b, a) if self.kind == "linear" else (a, b)

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@st.composite
def models(draw: st.DrawFn) -> tuple[str, list[Module]]:
    arch = draw(st.sampled_from(["llama", "gpt2"]))
    layers = draw(st.integers(1, 2))
    h = draw(st.integers(1, 10))
    inter = draw(st.integers(1, 10))
    vocab = draw(st.integers(2, 12))
    mods: list[Module] = []
    if arch == "llama":
        kv = draw(st.integers(1, h))
        mods.append(Module("model.embed_tokens", (vocab, h), "embedding"))
        for i in range(layers):
            p = f"model.layers.{i}."
            mods += [
                Module(p + "self_attn.q_proj", (h, h), "linear"),
                Module(p + "self_attn.k_proj", (kv, h), "linear"),
                Module(p + "self_attn.v_proj", (kv, h), "linear"),
                Module(p + "self_attn.o_proj", (h, h), "linear"),
                Module(p + "mlp.up_proj", (inter, h), "linear"),
                Module(p + "mlp.down_proj", (h, inter), "linear"),
            ]
        mods.append(Module("lm_head", (vocab, h), "linear"))
    else:
        mods.append(Module("transformer.wte", (vocab, h), "embedding"))
        for i in range(layers):
            p = f"transformer.h.{i}."
            mods += [
                Module(p + "attn.c_attn", (h, 3 * h), "conv1d"),
                Module(p + "attn.c_proj", (h, h), "conv1d"),
                Module(p + "mlp.c_fc", (h, inter), "conv1d"),
                Module(p + "mlp.c_proj", (inter, h), "conv1d"),
            ]
    return arch, mods


@st.composite
def lora_setups(draw: st.DrawFn) -> dict[str, object]:
    arch, mods = draw(models())
    leaves = sorted({m.leaf for m in mods})
    targets = draw(st.lists(st.sampled_from(leaves), min_size=1, unique=True))
    sites = [m for m in mods if m.leaf in targets]
    r = draw(st.integers(1, 6))
    alpha = draw(st.one_of(st.integers(1, 64), st.floats(0.25, 64.0, allow_nan=False)))
    ranks = {m.name: draw(st.one_of(st.just(r), st.integers(1, 6))) for m in sites}
    alpha_pattern = {
        m.name: draw(st.integers(1, 32)) for m in sites if draw(st.booleans()) and len(sites) > 1
    }
    return {
        "arch": arch,
        "modules": mods,
        "sites": sites,
        "targets": targets,
        "r": r,
        "alpha": alpha,
        "ranks": ranks,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": alpha_pattern,
        "rslora": draw(st.booleans()),
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "in_shards": draw(st.integers(1, 3)),
        "out_shard_size": draw(st.sampled_from(["5GB", "300", "1KB"])),
        "prefix": draw(st.sampled_from([PREFIX, ""])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _write_setup(root: Path, s: dict[str, object]) -> tuple[Path, Path, dict[str, float]]:
    g = torch.Generator().manual_seed(s["seed"])  # type: ignore[arg-type]
    dtype = DTYPES[s["dtype"]]  # type: ignore[index]
    mods: list[Module] = s["modules"]  # type: ignore[assignment]
    base_t = {
        f"{m.name}.weight": (torch.randn(m.stored, generator=g) * 0.5).to(dtype) for m in mods
    }
    config = {
        **mc.BASE_CONFIG,
        "model_type": s["arch"],
        "torch_dtype": s["dtype"],
        "tie_word_embeddings": False,
    }
    base, adapter = root / "base", root / "adapter"
    mc.write_base(base, base_t, shards=s["in_shards"], config=config)  # type: ignore[arg-type]
    factors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for m in s["sites"]:  # type: ignore[attr-defined]
        rank = s["ranks"][m.name]  # type: ignore[index]
        fan_in, fan_out = m.fan
        a = torch.randn(rank, fan_in, generator=g) * 0.5
        b = torch.randn(fan_out, rank, generator=g) * 0.5
        key = f"{s['prefix']}{m.name}"
        if m.kind == "embedding":
            factors[f"{key}.lora_embedding_A"], factors[f"{key}.lora_embedding_B"] = a, b
        else:
            factors[f"{key}.lora_A.weight"], factors[f"{key}.lora_B.weight"] = a, b
        alpha = s["alpha_pattern"].get(m.name, s["alpha"])  # type: ignore[attr-defined]
        scales[m.name] = alpha / (math.sqrt(rank) if s["rslora"] else rank)
    cfg = {
        **mc.ADAPTER_CONFIG,
        "r": s["r"],
        "lora_alpha": s["alpha"],
        "target_modules": s["targets"],
        "rank_pattern": s["rank_pattern"],
        "alpha_pattern": s["alpha_pattern"],
        "use_rslora": s["rslora"],
    }
    mc.write_adapter(adapter, factors, cfg)
    return base, adapter, scales


def _reference(
    base: dict[str, torch.Tensor],
    factors: dict[str, torch.Tensor],
    s: dict[str, object],
    scales: dict[str, float],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{key: (exact fp64, rounded once, error bound of an fp32 computation)} per base tensor."""
    eps32 = torch.finfo(torch.float32).eps
    out = {}
    by_name = {m.name: m for m in s["sites"]}  # type: ignore[attr-defined]
    for key, w in base.items():
        name = key.removesuffix(".weight")
        m = by_name.get(name)
        wd = w.double()
        if m is None:
            out[key] = (wd, w, torch.zeros_like(wd))
            continue
        pre = f"{s['prefix']}{name}"
        if m.kind == "embedding":
            a, b = factors[f"{pre}.lora_embedding_A"], factors[f"{pre}.lora_embedding_B"]
        else:
            a, b = factors[f"{pre}.lora_A.weight"], factors[f"{pre}.lora_B.weight"]
        scale = scales[name]
        delta = scale * (b.double() @ a.double())
        mag = abs(scale) * (b.double().abs() @ a.double().abs())
        if m.kind != "linear":  # Conv1D and Embedding store the transpose
            delta, mag = delta.T, mag.T
        exact = wd + delta
        bound = (a.shape[0] + 3) * eps32 * (wd.abs() + mag)
        out[key] = (exact, exact.to(w.dtype), bound)
    return out


@SETTINGS
@given(setup=lora_setups())
def test_merge_equals_fp64_reference(setup: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base, adapter, scales = _write_setup(root, setup)
        out = root / "out"
        report = loracc.merge(base, adapter, out, max_shard_size=setup["out_shard_size"])
        assert report.sites == len(setup["sites"])  # type: ignore[arg-type]
        got: dict[str, torch.Tensor] = {}
        for f in out.glob("*.safetensors"):
            got.update(load_file(f))
        base_t: dict[str, torch.Tensor] = {}
        for f in base.glob("*.safetensors"):
            base_t.update(load_file(f))
        factors = load_file(adapter / "adapter_model.safetensors")
        ref = _reference(base_t, factors, setup, scales)
        assert set(got) == set(ref)
        dtype = DTYPES[setup["dtype"]]  # type: ignore[index]
        fi = torch.finfo(dtype)
        for key, (exact, rounded, bound) in ref.items():
            g = got[key]
            assert g.dtype == dtype and g.shape == rounded.shape, key
            # one ulp (double rounding) + the fp32 computation's own error
            tol = fi.eps * exact.abs() + fi.tiny + bound
            err = (g.double() - rounded.double()).abs()
            worst = (err - tol).max().item()
            assert worst <= 0, f"{key}: error {err.max().item():.3g} beyond tolerance"


# ------------------------------------------------------------------------------------------------
# 2. random corruptions never give a traceback or a partial output

JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["../x", "/etc/passwd", "", ".", "q_proj(", "(a+)+$", "LORA", "0.99.0"])
)
JSON = st.recursive(
    JSON_LEAF,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = [
    "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "bias", "lora_bias", "modules_to_save", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "layer_replication", "trainable_token_indices",
    "target_parameters", "use_bdlora", "use_qalora", "qalora_group_size", "peft_version",
    "peft_type", "fan_in_fan_out", "alora_invocation_tokens", "arrow_config", "kasa_config",
    "megatron_config", "loftq_config", "eva_config", "runtime_config", "task_type",
    "ensure_weight_tying", "enable_lora", "merge_weights", "unknown_field",
]  # fmt: skip
BASE_KEYS = ["model_type", "tie_word_embeddings", "text_config", "torch_dtype", "vocab_size"]
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I8", "U8", "BOOL", "F8_E4M3", "I64", "X", ""]


def _files(lay: mc.Layout) -> dict[str, Path]:
    return {
        "adapter.safetensors": lay.adapter / "adapter_model.safetensors",
        "adapter.config": lay.adapter / "adapter_config.json",
        "base.shard1": lay.base / "model-00001-of-00002.safetensors",
        "base.shard2": lay.base / "model-00002-of-00002.safetensors",
        "base.index": lay.base / "model.safetensors.index.json",
        "base.config": lay.base / "config.json",
    }


def _corrupt_bytes(data: st.DataObject, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    head = 8 + struct.unpack("<Q", raw[:8])[0] if path.suffix == ".safetensors" else len(raw)
    op = data.draw(st.sampled_from(["truncate", "flip", "splice"]), label="op")
    hi = data.draw(st.sampled_from([min(head, len(raw)), len(raw)]), label="region")
    pos = data.draw(st.integers(0, max(hi - 1, 0)), label="pos")
    if op == "truncate":
        del raw[pos:]
    elif op == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    else:
        new = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        raw[pos : pos + len(new)] = new
    path.write_bytes(bytes(raw))
    return f"{op}@{pos}"


def _corrupt_header(data: st.DataObject, path: Path) -> str:
    header, body = mc.read_safetensors_header(path)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from([*names, "__metadata__", "new.weight"]), label="entry")
    entry = header.get(name)
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "whole"]))
    if name == "__metadata__" or field == "whole" or not isinstance(entry, dict):
        header[name] = data.draw(JSON, label="value")
    elif field == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(ST_DTYPES) | JSON, label="dtype")
    elif field == "shape":
        shape = list(entry["shape"])
        if shape and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(shape) - 1))
            shape[i] += data.draw(st.integers(-2, 2))
        else:
            shape = data.draw(JSON, label="shape")
        entry["shape"] = shape
    elif field == "data_offsets":
        b, e = entry["data_offsets"]
        db, de = data.draw(st.integers(-64, 64)), data.draw(st.integers(-64, 64))
        entry["data_offsets"] = data.draw(st.sampled_from([[b + db, e + de], [b + db, e + db]]))
    else:
        entry[data.draw(st.text(max_size=6))] = data.draw(JSON)
    mc.write_raw_safetensors(path, header, body)
    return f"header {name}.{field}"


def _corrupt_json(data: st.DataObject, path: Path, keys: list[str]) -> str:
    doc = json.loads(path.read_text())
    if path.name.endswith(".index.json"):
        wm = doc["weight_map"]
        key = data.draw(st.sampled_from(sorted(wm)), label="tensor")
        choice = data.draw(st.sampled_from(["name", "drop", "whole"]))
        if choice == "name":
            wm[key] = data.draw(JSON, label="shard")
        elif choice == "drop":
            del wm[key]
        else:
            doc["weight_map"] = data.draw(JSON, label="weight_map")
    else:
        key = data.draw(st.sampled_from(keys) | st.text(max_size=6), label="key")
        if data.draw(st.booleans()) or key not in doc:
            doc[key] = data.draw(JSON, label="value")
        else:
            del doc[key]
    path.write_text(json.dumps(doc))
    return f"json {path.name}"


@SETTINGS
@given(data=st.data())
def test_random_corruption_never_crashes_or_leaves_output(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d:
        lay = mc.build_valid(Path(d), shards=2)
        files = _files(lay)
        which = data.draw(st.sampled_from(sorted(files)), label="file")
        path = files[which]
        kinds = ["bytes"] + (["header"] if path.suffix == ".safetensors" else ["json"])
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "bytes":
            what = _corrupt_bytes(data, path)
        elif kind == "header":
            what = _corrupt_header(data, path)
        else:
            keys = CONFIG_KEYS if which == "adapter.config" else BASE_KEYS
            what = _corrupt_json(data, path, keys)
        before = mc.snapshot(lay.root)
        result = CliRunner().invoke(main, lay.argv)
        err = result.stderr
        where = f"{which} {what}: exit {result.exit_code}: {err.strip()}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"{where}: raised {result.exception!r}") from result.exception
        assert result.exit_code in (0, 2), where
        assert "Traceback" not in err and "internal error" not in err, where
        if result.exit_code == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("loracc: error: "), where
            assert not lay.out.exists(), f"{where}: partial output"
        else:
            assert lay.out.is_dir(), where
        assert mc.tmp_entries(lay.out) == [], f"{where}: temporaries left"
        after = mc.snapshot(lay.root, lambda p: p == lay.out)
        assert after == before, f"{where}: an input changed"


def test_corruption_fixture_is_valid(tmp_path: Path) -> None:
    """Without corruption the fixture merges, so exit 2 in the test above comes from the defect."""
    lay = mc.build_valid(tmp_path, shards=2)
    assert sorted(_files(lay)) and all(p.exists() for p in _files(lay).values())
    result = CliRunner().invoke(main, lay.argv)
    assert result.exit_code == 0, result.stderr
