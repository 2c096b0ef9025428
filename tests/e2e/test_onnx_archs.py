"""loracc ONNX export across architectures and exporters, vs the unmerged PEFT forward.

Tiny BERT (sequence classification), Qwen2 (q/k/v biases), ViT (image classification), Llama
and GPT-2 (Conv1D, tied head), each exported by torch three ways:

* ``ts_nofold``: TorchScript with ``do_constant_folding=False`` (weights keep their parameter
  names, a Transpose feeds each MatMul),
* ``ts``: TorchScript defaults (constant folding: ``onnx::MatMul_<n>`` weights),
* ``dyn``: the dynamo exporter (``val_<n>`` weights, module path in node metadata).

Every arch x mode gets plain LoRA (merged and keep-lora with filled slots, run by onnxruntime's
CPU provider); the variants (rsLoRA on every arch; DoRA, lora_bias, trainable tokens, PiSSA and
OLoRA on Qwen2 / Llama) run on the ``ts`` graphs, and Qwen2's on all three. lora_bias on a
module without a base bias (Qwen2's o_proj) is refused, as PEFT cannot merge it either. The
hot-swap scenario runs one session over an ``--empty-slots`` export: base, adapter A, adapter B
(subset of A's targets, other rank), base again.

References come from torch/PEFT only (reloaded from disk), never from loracc. The CLI refusals
(unbound module, pack without slot, shape mismatch) are corpus cases of ``test_bad_inputs.py``
(``onnx-site-unbound``, ``pack-module-without-slot``, ``onnx-site-shape``) and are not repeated.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import loracc
from tests.support import peft_oracle as po
from tests.support.onnx_oracle import assert_close, run, session

ATOL = 1e-4  # absolute, fp32 onnxruntime vs torch
MODES = ["ts_nofold", "ts", "dyn"]
ARCHS = ["bert", "qwen2", "vit", "llama", "gpt2"]


# --------------------------------------------------------------------------------------------
# Tiny models


def _config(arch: str) -> Any:
    import transformers as tf

    if arch == "bert":
        return tf.BertConfig(
            vocab_size=po.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0,
        )  # fmt: skip
    if arch == "qwen2":
        return tf.Qwen2Config(
            vocab_size=po.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    if arch == "vit":
        return tf.ViTConfig(
            image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=5,
        )  # fmt: skip
    if arch == "llama":
        return po.llama_config()
    if arch == "gpt2":
        return po.gpt2_config()
    raise AssertionError(arch)


def _auto(arch: str) -> Any:
    import transformers as tf

    return {
        "bert": tf.AutoModelForSequenceClassification,
        "vit": tf.AutoModelForImageClassification,
    }.get(arch, tf.AutoModelForCausalLM)


def _load(arch: str, folder: Path) -> torch.nn.Module:
    model = _auto(arch).from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _inputs(arch: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    if arch == "vit":
        return torch.randn(2, 3, 32, 32, generator=gen)
    ids = torch.randint(1, po.VOCAB, (2, 12), generator=gen)
    ids[0, : len(po.TRAINABLE_IDS)] = torch.tensor(po.TRAINABLE_IDS)
    return ids


class _Out(torch.nn.Module):
    """Logits from one tensor input (ids or pixels); the HF module tree kept under ``m``."""

    def __init__(self, model: torch.nn.Module, arch: str) -> None:
        super().__init__()
        self.m = model
        self.arch = arch

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.arch == "vit":
            return self.m(pixel_values=x).logits
        if self.arch == "bert":
            return self.m(input_ids=x).logits
        return self.m(input_ids=x, position_ids=pos, attention_mask=mask, use_cache=False).logits


def _causal_args(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TorchScript cannot trace the causal LMs' mask building from ids alone (aten::diff):
    positions and mask are explicit inputs, as in test_onnx_export."""
    return x, torch.arange(x.shape[1]).expand(x.shape[0], -1), torch.ones_like(x)


def _forward(model: torch.nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _Out(model, arch)(x).detach().float().clone()


# --------------------------------------------------------------------------------------------
# Adapters (PEFT) and their references


_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "vit": ["q_proj", "v_proj", "fc1", "fc2", "projection"],  # projection: the patch Conv2d
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}

# variant -> (arch -> LoraConfig kwargs); "lora" and "rslora" on every arch
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {a: dict(r=4, lora_alpha=8, target_modules=t) for a, t in _TARGETS.items()},
    "rslora": {
        a: dict(r=4, lora_alpha=6, use_rslora=True, target_modules=t) for a, t in _TARGETS.items()
    },
    "dora": {
        "llama": dict(r=4, lora_alpha=8, use_dora=True, target_modules=_TARGETS["llama"]),
        "qwen2": dict(r=4, lora_alpha=8, use_dora=True, target_modules=_TARGETS["qwen2"]),
    },
    # on q/k/v only: Qwen2's biased projections (PEFT cannot merge lora_bias without a base bias,
    # and loracc refuses it too; see test_lora_bias_without_base_bias_is_refused)
    "lora_bias": {
        "qwen2": dict(
            r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"]
        ),
    },
    "lora_bias_o": {
        "qwen2": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "o_proj"]),
    },
    "trainable_tokens": {
        "qwen2": dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            trainable_token_indices=list(po.TRAINABLE_IDS),
        ),
        "llama": dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            trainable_token_indices=list(po.TRAINABLE_IDS),
        ),
    },
    "pissa": {
        "qwen2": dict(
            r=4,
            lora_alpha=8,
            init_lora_weights="pissa",
            target_modules=["q_proj", "o_proj", "up_proj"],
        ),
    },
    "olora": {
        "qwen2": dict(
            r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["v_proj", "down_proj"]
        ),
        "llama": dict(
            r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["k_proj", "gate_proj"]
        ),
    },
    # hot-swap: B targets a subset of A's ("lora") modules, with another rank and alpha
    "subset_r2": {
        "qwen2": dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"]),
    },
}


@dataclass
class ArchCase:
    arch: str
    variant: str
    base_dir: Path
    adapter_dir: Path
    inputs: torch.Tensor
    base_logits: torch.Tensor
    peft_logits: torch.Tensor
    disabled_logits: torch.Tensor  # the PeftModel with its adapters disabled
    sites: dict[str, dict[str, Any]]  # PEFT's LoRA layers (po._peft_sites)


class Cases:
    """Bases, adapters and base exports, each built once per session."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self._tmp = tmp
        self._bases: dict[str, tuple[Path, torch.Tensor]] = {}
        self._cases: dict[tuple[str, str], ArchCase] = {}
        self._exports: dict[tuple[str, str], Path | str] = {}
        self._outs: dict[tuple[Any, ...], tuple[Path, Any]] = {}

    def base(self, arch: str) -> tuple[Path, torch.Tensor]:
        if arch not in self._bases:
            po.seed_all(0)
            model = _auto(arch).from_config(_config(arch), dtype=torch.float32)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * po.BASE_STD)
            folder = self._tmp.mktemp(f"base_{arch}")
            model.save_pretrained(str(folder))
            inputs = _inputs(arch)
            self._bases[arch] = (folder, _forward(_load(arch, folder), arch, inputs))
        return self._bases[arch]

    def case(self, arch: str, variant: str) -> ArchCase:
        key = (arch, variant)
        if key not in self._cases:
            from peft import LoraConfig, PeftModel, get_peft_model

            base_dir, base_logits = self.base(arch)
            inputs = _inputs(arch)
            kw = dict(VARIANTS[variant][arch])
            kw.setdefault("init_lora_weights", False)
            if arch == "gpt2":
                kw["fan_in_fan_out"] = True
            po.seed_all(1000 + len(variant))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = get_peft_model(_load(arch, base_dir), LoraConfig(**kw))
                with torch.no_grad():
                    for _, p in peft_model.named_parameters():
                        if p.requires_grad:
                            p.add_(torch.randn_like(p) * po.ADAPTER_STD)
                adapter_dir = self._tmp.mktemp(f"adapter_{arch}_{variant}")
                peft_model.save_pretrained(str(adapter_dir))
                del peft_model
                ref = PeftModel.from_pretrained(_load(arch, base_dir), str(adapter_dir)).eval()
                peft_logits = _forward(ref, arch, inputs)
                with ref.disable_adapter():
                    disabled = _forward(ref, arch, inputs)
                sites = po._peft_sites(ref)
            self._cases[key] = ArchCase(
                arch, variant, base_dir, adapter_dir, inputs, base_logits, peft_logits, disabled,
                sites,
            )  # fmt: skip
        return self._cases[key]

    def onnx_base(self, arch: str, mode: str) -> Path:
        """The base exported ``mode``; skips (with the exporter's error) when torch fails."""
        key = (arch, mode)
        if key not in self._exports:
            base_dir, _ = self.base(arch)
            model = _Out(_load(arch, base_dir), arch).eval()
            x = _inputs(arch)
            path = self._tmp.mktemp(f"onnx_{arch}_{mode}") / "model.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if mode == "dyn":
                        program = torch.onnx.export(
                            model, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
                            verbose=False,
                        )  # fmt: skip
                        program.save(str(path))
                    else:
                        causal = arch in ("qwen2", "llama", "gpt2")
                        torch.onnx.export(
                            model, _causal_args(x) if causal else (x,), str(path), dynamo=False,
                            input_names=["x", "pos", "mask"] if causal else ["x"],
                            output_names=["logits"], do_constant_folding=(mode == "ts"),
                        )  # fmt: skip
                self._exports[key] = path
            except Exception as e:  # the exporter's own failure is the skip reason
                self._exports[key] = f"torch.onnx.export ({mode}) failed on {arch}: {e!r}"[:300]
        got = self._exports[key]
        if isinstance(got, str):
            pytest.skip(got)
        return got

    def export(self, arch: str, mode: str, variant: str, **kw: Any) -> tuple[Path, Any]:
        key = (arch, mode, variant, tuple(sorted(kw.items())))
        if key not in self._outs:
            base = self.onnx_base(arch, mode)
            out = self._tmp.mktemp(f"out_{arch}_{mode}_{variant}") / "out.onnx"
            report = loracc.export_onnx(base, self.case(arch, variant).adapter_dir, out, **kw)
            self._outs[key] = (out, report)
        return self._outs[key]


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cases]:
    yield Cases(tmp_path_factory)
    # the largest errors seen (pytest -s shows them)
    for what, err in sorted(MAX_ERR.items(), key=lambda kv: -kv[1])[:5]:
        print(f"\nmax abs err {err:.3g}: {what}", end="")


class _Feed:
    """What ``test_onnx_export.run`` needs of a case: the inputs."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs


def _run(path_or_sess: Any, case: ArchCase, *adapters: Path) -> torch.Tensor:
    x = case.inputs
    if not x.is_floating_point():  # run() feeds ids by name; our graphs call the input "x"
        sess = path_or_sess if not isinstance(path_or_sess, Path) else session(path_or_sess)
        import onnxruntime as ort

        options = ort.RunOptions()
        keep = []
        for a in adapters:
            lora = ort.LoraAdapter()
            lora.Load(str(a))
            options.add_active_adapter(lora)
            keep.append(lora)
        args = dict(zip(["x", "pos", "mask"], _causal_args(x), strict=True))
        feeds = {i.name: args[i.name].numpy() for i in sess.get_inputs()}
        out = sess.run(None, feeds, options)[0]
        del keep
        return torch.from_numpy(out).float()
    return run(path_or_sess, _Feed(x), *adapters)  # type: ignore[arg-type]


MAX_ERR: dict[str, float] = {}


def _check(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = float((got - ref).abs().max())
    MAX_ERR[what] = err
    assert err <= ATOL, f"{what}: max abs err {err:.3g} > {ATOL:g}"
    assert_close(got, ref, what)


def _assert_effect(case: ArchCase) -> None:
    effect = float((case.peft_logits - case.base_logits).abs().max())
    assert effect > 1e-3, f"{case.arch}/{case.variant}: the adapter barely changes the output"


# --------------------------------------------------------------------------------------------
# Matrix: every arch x mode with plain LoRA; variants on the ``ts`` graphs

MATRIX = [(a, m, "lora") for a in ARCHS for m in MODES] + [
    (arch, "ts", v)
    for v in ("rslora", "dora", "lora_bias", "trainable_tokens", "pissa", "olora")
    for arch in ARCHS
    if arch in VARIANTS[v]
]
# Qwen2's variants on the other two graphs too: biases are an Add after the MatMul (dynamo) or
# a parameter behind a Transpose (no folding), and the embedding is Gather either way
MATRIX += [
    ("qwen2", m, v)
    for m in ("ts_nofold", "dyn")
    for v in ("dora", "lora_bias", "trainable_tokens", "pissa", "olora")
]


@pytest.mark.parametrize("arch,mode,variant", MATRIX, ids=["-".join(t) for t in MATRIX])
def test_export_matches_unmerged_peft(cases: Cases, arch: str, mode: str, variant: str) -> None:
    case = cases.case(arch, variant)
    _assert_effect(case)
    merged, report = cases.export(arch, mode, variant)
    bound = {b["module"]: b for b in report.bindings}
    assert set(case.sites) <= set(bound), sorted(set(case.sites) - set(bound))
    assert {bound[m]["how"] for m in case.sites} == {"scope"}  # the graph's names, no fallback
    if arch == "vit":
        assert bound["vit.embeddings.patch_embeddings.projection"]["op"] == "Conv"
    _check(_run(merged, case), case.peft_logits, f"{arch}/{mode}/{variant} merged")
    kept, _ = cases.export(arch, mode, variant, keep_lora=True, empty_slots=False)
    slots = {i.name for i in session(kept).get_overridable_initializers()}
    for module in case.sites:
        assert {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= slots, module
    _check(_run(kept, case), case.peft_logits, f"{arch}/{mode}/{variant} keep-lora")


@pytest.mark.parametrize("arch,mode", [(a, m) for a in ARCHS for m in MODES])
def test_empty_slots_then_adapter_file(cases: Cases, arch: str, mode: str) -> None:
    """--empty-slots on every arch x graph: the plain model is the base, the file is the adapter."""
    case = cases.case(arch, "lora")
    out, report = cases.export(arch, mode, "lora", keep_lora=True, empty_slots=True)
    sess = session(out)
    _check(_run(sess, case), case.disabled_logits, f"{arch}/{mode} empty slots vs base")
    adapter = Path(report.adapter_files[0]["file"])
    _check(_run(sess, case, adapter), case.peft_logits, f"{arch}/{mode} empty slots + file")


def test_hot_swap_one_session(cases: Cases, tmp_path: Path) -> None:
    """Empty slots from adapter A (Qwen2, r=4, all projections); adapter B packed (r=2, a subset
    of A's modules). One session: plain = base, A, B, plain = base."""
    a, b = cases.case("qwen2", "lora"), cases.case("qwen2", "subset_r2")
    assert set(VARIANTS["subset_r2"]["qwen2"]["target_modules"]) < set(_TARGETS["qwen2"])
    for case in (a, b):
        _assert_effect(case)
        assert torch.equal(case.disabled_logits, a.base_logits) or (
            float((case.disabled_logits - a.base_logits).abs().max()) <= 1e-6
        )
    out, report = cases.export("qwen2", "ts", "lora", keep_lora=True, empty_slots=True)
    file_a = Path(report.adapter_files[0]["file"])
    file_b = tmp_path / "b.onnx_adapter"
    loracc.pack(out, b.adapter_dir, file_b)
    import onnxruntime as ort

    ranks = {
        k.removesuffix(".lora_A.weight"): v.shape()[1]
        for k, v in ort.AdapterFormat.read_adapter(str(file_b)).get_parameters().items()
        if k.endswith(".lora_A.weight")
    }
    assert set(ranks) == set(a.sites)  # every slot is named, the untargeted ones at rank 0
    assert {m for m, r in ranks.items() if r} == set(b.sites)
    assert set(ranks.values()) == {0, 2}
    sess = session(out)
    _check(_run(sess, a), a.disabled_logits, "hot-swap plain (before)")
    _check(_run(sess, a, file_a), a.peft_logits, "hot-swap A")
    _check(_run(sess, b, file_b), b.peft_logits, "hot-swap B")
    _check(_run(sess, a), a.base_logits, "hot-swap plain (after)")
    _check(_run(sess, a, file_a), a.peft_logits, "hot-swap A again")


def test_lora_bias_without_base_bias_is_refused(cases: Cases, tmp_path: Path) -> None:
    """Qwen2's o_proj has no bias: peft cannot merge its lora_bias, loracc refuses it by name."""
    from loracc.errors import LoweringError

    case = cases.case("qwen2", "lora_bias_o")
    base = cases.onnx_base("qwen2", "ts")
    for keep in (False, True):
        with pytest.raises(LoweringError, match=r"model\.layers\.0\.self_attn\.o_proj: lora_bias"):
            loracc.export_onnx(base, case.adapter_dir, tmp_path / "x.onnx", keep_lora=keep)
    assert list(tmp_path.iterdir()) == []
