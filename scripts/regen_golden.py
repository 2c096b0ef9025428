#!/usr/bin/env python
"""Regenerate, or check, the golden files under golden/.

    python scripts/regen_golden.py                 # rewrite every suite's files
    python scripts/regen_golden.py --check         # exit 1 when a file differs, is missing or stale
    python scripts/regen_golden.py --suite ir      # only some suites

A *golden suite* owns one folder under golden/ and generates its files' text from scratch in a
temporary folder. ``--check`` regenerates in memory and diffs against the tree (CI runs it
through tests/unit/test_golden_ir.py). A new suite (model outputs, ONNX text) is a :class:`Suite`
appended to :data:`SUITES`, typically imported from its own module next to this script.

The ``ir`` suite: for each case, a tiny base checkpoint and PEFT adapter folder are written from
small integers (no PEFT, no random numbers), read with ``loracc.load_adapter``, and every pass of
the case runs from the same input with the verifier on. ``golden/ir/<case>/before.txt`` is the
printed input IR and ``after-<pass>.txt`` the IR after that pass (``loracc.printer.print_ir``:
tensors as shape, dtype and hash). The inputs are chosen so that every pass computes exactly in
IEEE arithmetic (integer sums, power-of-two scales, triangular or diagonal factors, whose QR and
SVD are exact), so the hashes do not depend on the BLAS or LAPACK build.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

from loracc.io.checkpoint import Checkpoint  # noqa: E402
from loracc.io.peft import read_peft_adapter  # noqa: E402
from loracc.io.safetensors import SafetensorsWriter  # noqa: E402
from loracc.ir import Adapter  # noqa: E402
from loracc.passes import PassContext, parse_pipeline  # noqa: E402
from loracc.pipeline import run_pipeline  # noqa: E402
from loracc.printer import print_ir  # noqa: E402
from loracc.weights import BaseWeights  # noqa: E402
from scripts.golden_models import suite as models_suite  # noqa: E402

__all__ = ["GOLDEN", "SUITES", "Suite", "check", "generate", "main", "write"]

GOLDEN = REPO / "golden"


@dataclass(frozen=True)
class Suite:
    """A named set of golden files under ``golden/<folder>``.

    Attributes:
        name: what ``--suite`` selects.
        folder: the folder under golden/ that this suite owns entirely (stale files are reported).
        generate: scratch folder -> {path relative to ``folder``: text}.
        description: one line for ``--help``.
    """

    name: str
    folder: str
    generate: Callable[[Path], dict[str, str]]
    description: str = ""
    # A suite whose files are binary or checked against an oracle instead of regenerated text:
    # run(check) checks (True) or regenerates (False) golden/<folder> and returns the problems;
    # generate is then unused.
    run: Callable[[bool], list[str]] | None = None


# --------------------------------------------------------------------------------------------
# The ir suite: printed IR before and after each pass


def ints(shape: Sequence[int], seed: int, modulus: int = 7) -> torch.Tensor:
    """Small integers in [-(modulus // 2), modulus // 2] as float32, the same on every machine."""
    n = 1
    for d in shape:
        n *= d
    i = torch.arange(n, dtype=torch.int64)
    values = (i * 5 + seed * 3 + (i * i) % 11) % modulus - modulus // 2
    return values.to(torch.float32).reshape(tuple(shape))


def diagonal(rows: int, cols: int, values: Sequence[float]) -> torch.Tensor:
    out = torch.zeros(rows, cols)
    for i, v in enumerate(values):
        out[i, i] = v
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    table = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = SafetensorsWriter(path, table, {"format": "pt"})
    for key, tensor in tensors.items():
        writer.write(key, tensor.contiguous())
    writer.close()


def save_base(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    save_tensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    full = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": None, **config}
    save_tensors(
        folder / "adapter_model.safetensors",
        {f"base_model.model.{k}": v for k, v in tensors.items()},
    )
    (folder / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True))
    return folder


def lora(module: str, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": A, f"{module}.lora_B.weight": B}


@dataclass(frozen=True)
class IrCase:
    """One golden case: how to write its base and adapter, and the passes to run on it."""

    name: str
    build: Callable[[Path], tuple[Path | None, Path, Path | None]]  # -> (base, adapter, initial)
    passes: tuple[str, ...]
    doc: str = ""
    extra: dict[str, str] = field(default_factory=dict)


_Q = "model.layers.0.self_attn.q_proj"


def _dora(root: Path) -> tuple[Path, Path, None]:
    base = save_base(
        root / "base",
        {
            "model.embed_tokens.weight": ints((10, 6), 1),
            f"{_Q}.weight": ints((6, 6), 2),
            "conv.weight": ints((4, 3, 1, 1), 3),
        },
        {"model_type": "llama"},
    )
    tensors = {
        **lora(_Q, ints((2, 6), 4), ints((6, 2), 5)),
        f"{_Q}.lora_magnitude_vector": torch.arange(1, 7, dtype=torch.float32),
        "model.embed_tokens.lora_embedding_A": ints((2, 10), 6),
        "model.embed_tokens.lora_embedding_B": ints((6, 2), 7),
        "model.embed_tokens.lora_magnitude_vector": torch.arange(6, 0, -1, dtype=torch.float32),
        **lora("conv", ints((2, 3, 1, 1), 8), ints((4, 2, 1, 1), 9)),
        "conv.lora_magnitude_vector": torch.full((1, 4, 1, 1), 2.0),
    }
    adapter = save_adapter(root / "adapter", tensors, {"use_dora": True})
    return base, adapter, None


def _dora_conv1d(root: Path) -> tuple[Path, Path, None]:
    c_attn = "transformer.h.0.attn.c_attn"
    base = save_base(
        root / "base",
        {f"{c_attn}.weight": ints((4, 12), 1), f"{c_attn}.bias": ints((12,), 2)},
        {"model_type": "gpt2"},
    )
    tensors = {
        **lora(c_attn, ints((2, 4), 3), ints((12, 2), 4)),
        f"{c_attn}.lora_magnitude_vector": torch.arange(1, 13, dtype=torch.float32),
    }
    return base, save_adapter(root / "adapter", tensors, {"use_dora": True}), None


def _pissa(root: Path) -> tuple[Path, Path, None]:
    # W "diagonal" (6, 4) with distinct singular values s·k²: the SVD is exact, √(S/s) = k.
    base = save_base(
        root / "base", {f"{_Q}.weight": diagonal(6, 4, [2, 32, 18, 8])}, {"model_type": "llama"}
    )
    tensors = lora(_Q, ints((2, 4), 1), ints((6, 2), 2))
    return base, save_adapter(root / "adapter", tensors, {"init_lora_weights": "pissa"}), None


def _olora(root: Path) -> tuple[Path, Path, None]:
    # Upper-triangular W: Householder QR leaves it as R with Q = I, exactly.
    w = torch.triu(ints((6, 6), 3))
    w.diagonal().copy_(torch.tensor([3.0, -2, 4, 1, 5, 2]))
    base = save_base(root / "base", {f"{_Q}.weight": w}, {"model_type": "llama"})
    tensors = lora(_Q, ints((2, 6), 1), ints((6, 2), 2))
    return base, save_adapter(root / "adapter", tensors, {"init_lora_weights": "olora"}), None


def _pissa_niter(root: Path) -> tuple[Path, Path, Path]:
    base = save_base(root / "base", {f"{_Q}.weight": ints((6, 4), 1)}, {"model_type": "llama"})
    config = {"init_lora_weights": "pissa_niter_4", "use_rslora": True, "lora_alpha": 2}
    adapter = save_adapter(root / "adapter", lora(_Q, ints((2, 4), 2), ints((6, 2), 3)), config)
    initial = save_adapter(root / "initial", lora(_Q, ints((2, 4), 4), ints((6, 2), 5)), config)
    return base, adapter, initial


def _replication(root: Path) -> tuple[Path, Path, None]:
    tensors = {"model.embed_tokens.weight": ints((8, 4), 0)}
    for i in range(3):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = ints((4,), 10 + i)
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = ints((4, 4), 20 + i)
    tensors["model.norm.weight"] = ints((4,), 5)
    config = {
        "model_type": "qwen2",
        "num_hidden_layers": 3,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    }
    base = save_base(root / "base", tensors, config)
    adapter_tensors: dict[str, torch.Tensor] = {}
    for j in range(4):
        adapter_tensors |= lora(
            f"model.layers.{j}.self_attn.q_proj", ints((2, 4), 30 + j), ints((4, 2), 40 + j)
        )
    adapter = save_adapter(
        root / "adapter", adapter_tensors, {"layer_replication": [[0, 2], [1, 3]]}
    )
    return base, adapter, None


def _replication_drop(root: Path) -> tuple[Path, Path, None]:
    tensors = {}
    for i in range(3):
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = ints((4, 6), 20 + i)
    base = save_base(root / "base", tensors, {"model_type": "llama", "num_hidden_layers": 3})
    adapter = save_adapter(
        root / "adapter",
        lora("model.layers.1.mlp.down_proj", ints((2, 6), 1), ints((4, 2), 2)),
        {"layer_replication": [[0, 1], [2, 3]]},
    )
    return base, adapter, None


def _truncate(root: Path) -> tuple[None, Path, None]:
    # B = [diag(b); 0] and Aᵀ = [diag(a); 0]: both QRs are exact (Q = I), and the core diag(a·b)
    # has an exact SVD. q_proj: a·b = 4, 16, 9 (singular values out of order, exact roots).
    tensors = {
        **lora(_Q, diagonal(5, 3, [1, 4, -3]).T, diagonal(7, 3, [4, 4, -3])),
        "model.embed_tokens.lora_embedding_A": diagonal(3, 6, [2, 1, 1]),
        "model.embed_tokens.lora_embedding_B": diagonal(4, 3, [1, 8, 3]),
    }
    return None, save_adapter(root / "adapter", tensors, {"r": 3, "lora_alpha": 6}), None


def _fold_scaling(root: Path) -> tuple[None, Path, None]:
    tensors = lora(_Q, ints((4, 6), 1), ints((6, 4), 2))
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"q_proj": 2}}
    return None, save_adapter(root / "adapter", tensors, config), None


def save_onnx(path: Path, nodes: list[Any], weights: dict[str, torch.Tensor]) -> Path:
    """A graph of ``nodes`` over the float input ``x`` and the ``weights`` (an ONNX base)."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    graph = helper.make_graph(
        nodes,
        "golden",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(t.numpy(), name) for name, t in weights.items()],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _graph_layout(root: Path) -> tuple[Path, Path, None]:
    from onnx import helper

    # c_attn is read as (in, out) with no Transpose: stored as Conv1D; q_proj goes through one.
    c_attn, q = "transformer.h.0.attn.c_attn", "transformer.h.0.attn.q_proj"
    nodes = [
        helper.make_node("MatMul", ["x", f"{c_attn}.weight"], ["h"]),
        helper.make_node("Transpose", [f"{q}.weight"], ["qt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "qt"], ["y"]),
    ]
    weights = {f"{c_attn}.weight": ints((4, 6), 1), f"{q}.weight": ints((6, 6), 2)}
    base = save_onnx(root / "base.onnx", nodes, weights)
    tensors = {
        **lora(c_attn, ints((2, 4), 3), ints((6, 2), 4)),
        **lora(q, ints((2, 6), 5), ints((6, 2), 6)),
    }
    return base, save_adapter(root / "adapter", tensors, {}), None


def _drop_noop(root: Path) -> tuple[Path, Path, None]:
    from onnx import helper

    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    nodes = [
        helper.make_node("Gather", [embed, "x"], ["h"]),
        helper.make_node("Gemm", ["h", head], ["y"], transB=1),
    ]
    base = save_onnx(root / "base.onnx", nodes, {embed: ints((8, 4), 1), head: ints((8, 4), 2)})
    # the embedding is saved whole but unchanged (dropped); the head is changed (kept)
    tensors = {embed: ints((8, 4), 1), head: ints((8, 4), 3)}
    config = {"modules_to_save": ["embed_tokens", "lm_head"]}
    return base, save_adapter(root / "adapter", tensors, config), None


def _untie(root: Path) -> tuple[Path, Path, None]:
    base = save_base(
        root / "base",
        {"model.embed_tokens.weight": ints((8, 4), 1), "model.norm.weight": ints((4,), 2)},
        {"model_type": "llama", "tie_word_embeddings": True},
    )
    tensors = lora("lm_head", ints((2, 4), 3), ints((8, 2), 4))
    return base, save_adapter(root / "adapter", tensors, {}), None


IR_CASES: tuple[IrCase, ...] = (
    IrCase("dora", _dora, ("fold-dora",), "DoRA on Linear, Embedding and a 1x1 Conv"),
    IrCase("dora-conv1d", _dora_conv1d, ("fold-dora",), "DoRA on GPT-2's Conv1D (stored in, out)"),
    IrCase("pissa", _pissa, ("reconstruct-residual",), "pissa recomputed from the base"),
    IrCase("olora", _olora, ("reconstruct-residual",), "olora recomputed from the base"),
    IrCase(
        "pissa-niter-initial",
        _pissa_niter,
        ("reconstruct-residual",),
        "pissa_niter with --initial-adapter, rsLoRA (alpha x sqrt 2)",
    ),
    IrCase(
        "layer-replication",
        _replication,
        ("expand-layer-replication",),
        "[[0, 2], [1, 3]] on 3 layers, layer_types re-indexed",
    ),
    IrCase(
        "layer-replication-drop",
        _replication_drop,
        ("expand-layer-replication",),
        "[[0, 1], [2, 3]] on 3 layers: layer 1 becomes stored layer 2, layer 2 is dropped",
    ),
    IrCase(
        "truncate",
        _truncate,
        ("truncate-rank{rank=2}", "truncate-rank{energy=0.7}"),
        "rank cap and energy target",
    ),
    IrCase("fold-scaling", _fold_scaling, ("fold-scaling",), "rsLoRA and alpha_pattern folded"),
    IrCase("untie", _untie, ("untie-embeddings",), "LoRA on a tied lm_head"),
    IrCase(
        "graph-layout",
        _graph_layout,
        ("apply-graph-layout",),
        "ONNX base: a parameter read (in, out) with no Transpose is Conv1D",
    ),
    IrCase(
        "drop-noop",
        _drop_noop,
        ("drop-noop-replacements",),
        "ONNX base: a modules_to_save tensor equal to the graph's is dropped",
    ),
)


def _file_name(spec: str) -> str:
    for a, b in (("{", "_"), ("}", ""), ("=", "-"), (",", "_")):
        spec = spec.replace(a, b)
    return f"after-{spec}.txt"


def bound_onnx_base(path: Path, adapter: Adapter) -> BaseWeights:
    """The ONNX model at ``path`` as base weights, bound to ``adapter`` (as export binds it)."""
    from loracc.io.onnx_model import load_model
    from loracc.lower.onnx.bind import bind_adapter
    from loracc.lower.onnx.index import GraphIndex
    from loracc.lower.onnx.surgery import lift_weight_constants
    from loracc.lower.onnx.weights import OnnxBase

    model = load_model(path)
    lift_weight_constants(model.graph)
    table = bind_adapter(GraphIndex(model), [adapter])
    return OnnxBase.from_table(table, [adapter], path.name)


def generate_ir(scratch: Path) -> dict[str, str]:
    """Every ir case's before/after texts, keyed ``<case>/<file>``."""
    files: dict[str, str] = {}
    for case in IR_CASES:
        root = scratch / case.name
        root.mkdir()
        base_dir, adapter_dir, initial_dir = case.build(root)
        if base_dir is not None and base_dir.suffix == ".onnx":
            adapter = read_peft_adapter(adapter_dir, None, initial=initial_dir)
            base: BaseWeights | None = bound_onnx_base(base_dir, adapter)
        else:
            base = Checkpoint(base_dir) if base_dir is not None else None
            adapter = read_peft_adapter(adapter_dir, base, initial=initial_dir)
        header = f"# {case.name}: {case.doc}\n" if case.doc else ""
        files[f"{case.name}/before.txt"] = header + print_ir(adapter)
        for spec in case.passes:
            result = run_pipeline(adapter, parse_pipeline(spec), PassContext(base=base), check=True)
            files[f"{case.name}/{_file_name(spec)}"] = f"# {spec}\n" + print_ir(result.adapter)
    return files


IR_SUITE = Suite("ir", "ir", generate_ir, "printed IR before and after each pass")

# Every suite, in the order they run. Add a suite by appending it here.
MODELS_SUITE = Suite(
    "models",
    "models",
    lambda _: {},
    "loracc merge, ONNX export, keep-lora and pack vs PEFT's logits (scripts/golden_models.py)",
    run=models_suite,
)

SUITES: list[Suite] = [IR_SUITE, MODELS_SUITE]


# --------------------------------------------------------------------------------------------
# Driver


def _select(names: Sequence[str] | None) -> list[Suite]:
    if not names:
        return list(SUITES)
    known = {s.name: s for s in SUITES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"regen_golden: unknown suite(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def generate(suite: Suite) -> dict[str, str]:
    """The suite's files, generated in a scratch folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"golden-{suite.name}-") as scratch:
        return suite.generate(Path(scratch))


def check(names: Sequence[str] | None = None, *, root: Path = GOLDEN) -> list[str]:
    """Differences between the generated and the stored files, as messages with diffs."""
    problems: list[str] = []
    for suite in _select(names):
        if suite.run is not None:
            problems += [f"{suite.name}: {p}" for p in suite.run(True)]
            continue
        folder = root / suite.folder
        wanted = generate(suite)
        stored = (
            {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            if folder.exists()
            else set()
        )
        for rel in sorted(stored - set(wanted)):
            problems.append(f"{suite.name}: stale file golden/{suite.folder}/{rel}")
        for rel, text in sorted(wanted.items()):
            path = folder / rel
            if not path.exists():
                problems.append(f"{suite.name}: missing golden/{suite.folder}/{rel}")
                continue
            old = path.read_text()
            if old != text:
                diff = difflib.unified_diff(
                    old.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    f"golden/{suite.folder}/{rel}",
                    "generated",
                )
                problems.append(f"{suite.name}: differs\n{''.join(diff)}")
    return problems


def write(names: Sequence[str] | None = None, *, root: Path = GOLDEN) -> list[str]:
    """Rewrite the suites' folders; return the files that changed, appeared or went away."""
    changed: list[str] = []
    for suite in _select(names):
        if suite.run is not None:
            problems = suite.run(False)
            changed += [f"{suite.name}: {p}" for p in problems] or [f"wrote golden/{suite.folder}"]
            continue
        folder = root / suite.folder
        wanted = generate(suite)
        if folder.exists():
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder).as_posix()
                if rel not in wanted:
                    path.unlink()
                    changed.append(f"removed golden/{suite.folder}/{rel}")
        for rel, text in sorted(wanted.items()):
            path = folder / rel
            if path.exists() and path.read_text() == text:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(f"wrote golden/{suite.folder}/{rel}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate or check golden files. Suites: "
        + "; ".join(f"{s.name}: {s.description}" for s in SUITES)
    )
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a diff")
    parser.add_argument("--suite", action="append", help="a suite to run (repeatable)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.suite)
        for p in problems:
            print(p)
        if problems:
            print("golden files are out of date: run python scripts/regen_golden.py")
            return 1
        print("golden files up to date")
        return 0
    for line in write(args.suite) or ["golden files already up to date"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
