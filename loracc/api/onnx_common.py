"""What the ONNX entry points share (:mod:`loracc.api.onnx` exports, :mod:`loracc.api.packing`
packs): the base checkpoint named by ``--base-weights``, an adapter read and checked for an
ONNX target, the ONNX pass pipeline run on it, the paths an output may not overwrite, and the
writer of an ``.onnx_adapter`` file. Nothing here imports onnx until it is called."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracc.api.common import LayoutChoices, PathLike, base_folder
from loracc.legality import Target, require
from loracc.pipeline import compile_adapter, onnx_pipeline, pass_steps

if TYPE_CHECKING:
    import torch

    from loracc.io.checkpoint import Checkpoint
    from loracc.ir import Adapter
    from loracc.lower.onnx.index import GraphIndex
    from loracc.weights import BaseWeights

__all__ = [
    "AdapterWriter",
    "SlotParams",
    "base_checkpoint",
    "compile_for",
    "protected_inputs",
    "read_adapter",
]

# slot (initializer) name -> (value, ONNX element type): the contents of an adapter file
SlotParams = dict[str, tuple["torch.Tensor", int]]


def base_checkpoint(base_weights: PathLike | None) -> Checkpoint | None:
    """The ``--base-weights`` checkpoint, None when not given."""
    if base_weights is None:
        return None
    from loracc.io.checkpoint import Checkpoint

    return Checkpoint(base_folder(base_weights, "--base-weights"))


def read_adapter(
    path: Path,
    ckpt: Checkpoint | None,
    initial: PathLike | None,
    allow_nonfinite: bool,
    layout: LayoutChoices = None,
    *,
    target: Target,
    index: GraphIndex | None = None,
) -> Adapter:
    """The adapter at ``path``; without base weights, the expert weights of ``index`` tell
    several target parameters of one module apart."""
    from loracc.io.peft import read_peft_adapter

    adapter = read_peft_adapter(
        path,
        ckpt,
        initial=initial,
        allow_nonfinite=allow_nonfinite,
        layout=layout,
        param_shapes=index.expert_shape if index is not None and ckpt is None else None,
    )
    require(adapter, target, base=ckpt, before_passes=True)
    return adapter


def compile_for(
    adapter: Adapter, base: BaseWeights, target: Target
) -> tuple[Adapter, list[dict[str, Any]]]:
    """``adapter`` through the ONNX pipeline against ``base``, checked legal for ``target``
    after the passes; the pass steps that changed or said something."""
    result = compile_adapter(adapter, base, onnx_pipeline())
    steps = [s for s in pass_steps(result) if s["changed"] or s["details"]]
    require(result.adapter, target)
    return result.adapter, steps


def protected_inputs(
    model_path: Path,
    adapters: Sequence[Path],
    model: Any,
    *others: PathLike | None,
) -> list[Path]:
    """Paths an output may not overwrite: the model, its external data, the adapters, and
    ``others`` given (the initial adapter, the base weights)."""
    from loracc.io.onnx_model import external_tensors

    found = [model_path, *adapters, *(Path(p) for p in others if p is not None)]
    found += {Path(t.path) for t in external_tensors(model)}
    return found


def _array(value: torch.Tensor, element_type: int) -> Any:
    import onnx_ir as ir

    from loracc.io.onnx_model import torch_to_tensor

    return torch_to_tensor(value, ir.DataType(element_type)).numpy()


class AdapterWriter:
    """Writes one ``.onnx_adapter`` file of ``params``; ``arrays`` converts without writing."""

    def __init__(self, params: SlotParams) -> None:
        self.params = params

    def arrays(self) -> dict[str, tuple[Any, int]]:
        return {n: (_array(v, t), t) for n, (v, t) in self.params.items()}

    def __call__(self, path: Path) -> None:
        from loracc.io.ort import write_adapter

        write_adapter(path, self.arrays())
