"""ONNX exports with torch and runs with onnxruntime, independent of loracc: the ONNX oracle.

Shared by the ONNX tests in tests/e2e (exports of PEFT oracle cases, logits through onnxruntime
with adapter files activated, a q/k/v fusion standing in for onnxruntime-genai's builder).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from tests.support import peft_oracle as po

LOGITS_RTOL = 1e-4  # onnxruntime vs torch fp32, relative to max |reference|


class _Causal(torch.nn.Module):
    """Logits of a HF causal LM from explicit ids, positions and mask (TorchScript-friendly)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits


class _Logits(torch.nn.Module):
    """``lm_head(model(ids))`` with the HF module names kept (for the dynamo exporter)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids=ids, use_cache=False).last_hidden_state)


def _feeds(case: po.Case, names: list[str]) -> dict[str, np.ndarray]:
    ids = case.inputs
    if ids.is_floating_point():
        return {names[0]: ids.numpy()}
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    all_feeds = {"ids": ids, "pos": pos, "mask": torch.ones_like(ids), "input_ids": ids}
    return {n: all_feeds[n].numpy() for n in names}


def _traceable_experts(model: torch.nn.Module, experts: str) -> torch.nn.Module:
    """MoE experts as the exporters can trace them: transformers' default ``grouped_mm`` uses
    ``histc`` (no ONNX op); ``batched_mm`` gathers each token's experts (Gather + MatMul)."""
    can_set = getattr(model, "_can_set_experts_implementation", None)  # transformers models
    if can_set is not None and can_set():
        model.set_experts_implementation(experts)
    return model


def export_torchscript(
    case: po.Case, path: Path, dtype: torch.dtype = torch.float32, experts: str = "batched_mm"
) -> Path:
    model = _traceable_experts(po.load_model(case.base_dir, case.arch, dtype=dtype), experts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.inputs.is_floating_point():
            torch.onnx.export(
                model, (case.inputs,), str(path), dynamo=False, opset_version=17,
                input_names=["x"], do_constant_folding=True,
            )  # fmt: skip
        else:
            model.config._attn_implementation = "eager"
            ids = case.inputs
            pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
            torch.onnx.export(
                _Causal(model), (ids, pos, torch.ones_like(ids)), str(path), dynamo=False,
                opset_version=17, input_names=["ids", "pos", "mask"], output_names=["logits"],
                do_constant_folding=True,
            )  # fmt: skip
    return path


def export_dynamo(case: po.Case, path: Path) -> Path:
    model = _traceable_experts(po.load_model(case.base_dir, case.arch), "batched_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Logits(model), (case.inputs,), dynamo=True, input_names=["input_ids"],
            output_names=["logits"], verbose=False,
        )  # fmt: skip
        program.save(str(path))
    return path


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return options


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])


def run(path_or_session: Any, case: po.Case, *adapters: Path) -> torch.Tensor:
    """Logits of an ONNX model (with adapter files activated through RunOptions)."""
    sess = path_or_session if isinstance(path_or_session, ort.InferenceSession) else None
    sess = sess or session(path_or_session)
    run_options = ort.RunOptions()
    keep = []
    for a in adapters:
        lora = ort.LoraAdapter()
        lora.Load(str(a))
        run_options.add_active_adapter(lora)
        keep.append(lora)  # RunOptions only points at the adapter
    out = sess.run(None, _feeds(case, [i.name for i in sess.get_inputs()]), run_options)[0]
    del keep
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = LOGITS_RTOL) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = po.rel_err(got, ref)
    assert err <= tol, f"{what}: rel err {err:.3g} > {tol:g}"


def fuse_qkv(src: Path, dst: Path) -> None:
    """Fuse each layer's q/k/v MatMuls into one ``attn/qkv_proj`` MatMul + Split.

    The layout onnxruntime-genai's builder uses when LoRA is off: node
    ``/…/layers.N/attn/qkv_proj/MatMul``, initializer ``…attn.qkv_proj.MatMul.weight``
    = concat(Wqᵀ, Wkᵀ, Wvᵀ) along the output axis.
    """
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    by_name = {n.name: n for n in nodes}
    layers = sorted({m.group(1) for n in nodes if (m := re.search(r"layers\.(\d+)/", n.name))})
    replaced: dict[str, list[onnx.NodeProto]] = {}  # first q/k/v node -> fused nodes
    removed: set[str] = set()
    for layer in layers:
        prefix = f"/m/model/layers.{layer}"
        proj = [by_name[f"{prefix}/self_attn/{p}/MatMul"] for p in ("q_proj", "k_proj", "v_proj")]
        x = proj[0].input[0]
        assert all(n.input[0] == x for n in proj)
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in proj]
        name = f"m.model.layers.{layer}.attn.qkv_proj.MatMul.weight"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), name))
        split = numpy_helper.from_array(
            np.array([w.shape[1] for w in weights], dtype=np.int64), f"{name}.split"
        )
        graph.initializer.append(split)
        fused = f"{prefix}/attn/qkv_proj/MatMul_output_0"
        first = min(proj, key=nodes.index)
        replaced[first.name] = [
            onnx.helper.make_node(
                "MatMul", [x, name], [fused], name=f"{prefix}/attn/qkv_proj/MatMul"
            ),
            onnx.helper.make_node(
                "Split", [fused, split.name], [n.output[0] for n in proj], axis=-1,
                name=f"{prefix}/attn/qkv_proj/Split",
            ),
        ]  # fmt: skip
        removed |= {n.name for n in proj}
        for n in proj:
            graph.initializer.remove(inits[n.input[1]])
    order: list[onnx.NodeProto] = []
    for n in nodes:
        order.extend(replaced.get(n.name, []))
        if n.name not in removed:
            order.append(n)
    del graph.node[:]
    graph.node.extend(order)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
