"""The slot manifest of a keep-lora model and the check that adapter files cover its slots.

No torch here: ``loracc run`` and ``golden record|check`` with an adapter file check its slots
(:func:`check_adapter_files`) on installs without the ``torch`` extra. The lowering that writes
the manifest and the slots is :mod:`loracc.lower.onnx.lora`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from loracc.errors import FormatError, UnsupportedError

__all__ = [
    "MANIFEST_KEY",
    "MANIFEST_VERSION",
    "Member",
    "SlotGroup",
    "check_adapter_files",
    "read_manifest",
    "slot_values",
    "uncovered_defaults",
]

MANIFEST_KEY = "loracc.slots"
MANIFEST_VERSION = 1


@dataclass
class Member:
    """One adapter module of a slot group and its rows of the group's output axis."""

    module: str
    kind: str
    start: int
    stop: int


@dataclass
class SlotGroup:
    """The slots of one branch: names, shapes, dtype, and the modules they serve."""

    key: str
    op: str
    fan_in: int
    fan_out: int
    kernel: list[int]
    dtype: int
    A: str
    B: str
    rank_dim: str
    members: list[Member]
    weight: str
    weight_transposed: bool
    scale: str | None = None
    bias: str | None = None
    nodes: list[str] = field(default_factory=list)
    experts: int = 0

    @property
    def channel_shape(self) -> list[int]:
        """Shape of the DoRA scale slot: broadcast over the node output's channel axis (Conv's
        (N, C, *k) output: C, the one before the kernel axes; MatMul's (..., out): the last)."""
        from loracc import kernels  # torch: only the lowering asks

        trailing = len(self.kernel) if self.op == "Conv" else 0
        return kernels.channel_shape(1 + trailing, 0, self.fan_out)

    def member(self, module: str) -> Member | None:
        return next((m for m in self.members if m.module == module), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotGroup:
        members = [Member(**m) for m in data["members"]]
        return cls(**{**data, "members": members})


def read_manifest(model: ir.Model, where: str) -> list[SlotGroup]:
    """The slot groups a keep-lora export recorded in ``model``."""
    text = model.metadata_props.get(MANIFEST_KEY)
    if text is None:
        raise FormatError(
            f"{where}: no '{MANIFEST_KEY}' metadata; not a model written by "
            "`loracc export --onnx --keep-lora`"
        )
    try:
        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION:
            raise FormatError(f"{where}: slot manifest version {data.get('version')} is unknown")
        groups = [SlotGroup.from_json(g) for g in data["groups"]]
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{where}: slot manifest is malformed ({e})") from e
    graph_inputs = {v.name for v in model.graph.inputs}
    for g in groups:
        for name in (g.A, g.B, g.scale, g.bias):
            if name and (name not in graph_inputs or name not in model.graph.initializers):
                raise FormatError(f"{where}: slot '{name}' is not a graph input with a default")
    return groups


def _neutral(value: ir.Value, groups: Sequence[SlotGroup]) -> bool:
    """A default that adds nothing: rank 0, zeros, or a loracc DoRA scale of ones."""
    tensor = value.const_value
    assert tensor is not None
    if tensor.size == 0:
        return True
    identity = 1 if any(value.name == g.scale for g in groups) else 0
    return bool((np.asarray(tensor.numpy()).astype(np.float64) == identity).all())


def slot_values(model: ir.Model, groups: Sequence[SlotGroup] = ()) -> dict[str, ir.Value]:
    """The model's adapter slots: graph inputs with a same-name float initializer (the
    onnxruntime contract); those of ``groups`` (loracc's manifest) when given. Otherwise only
    names that say LoRA/DoRA count, so a model that lists every initializer as an input (IR < 4)
    does not turn its weights into slots."""
    graph = model.graph
    named = {n for g in groups for n in (g.A, g.B, g.scale, g.bias) if n}
    slots: dict[str, ir.Value] = {}
    for v in graph.inputs:
        init = graph.initializers.get(v.name or "")
        tensor = init.const_value if init is not None else None
        if init is None or tensor is None or not tensor.dtype.is_floating_point():
            continue
        lower = (v.name or "").lower()
        if v.name in named or (not named and ("lora_" in lower or "dora" in lower)):
            slots[v.name or ""] = init
    return slots


def uncovered_defaults(model: ir.Model, names: set[str], where: str) -> list[str]:
    """Slots whose default is active (not rank 0, zeros, or a DoRA scale of ones) that ``names``
    (the tensors of the adapter files activated together) leave out: onnxruntime would run
    those defaults beside the files' values, two adapters mixed. Empty when nothing is active."""
    if not names:
        return []
    groups = read_manifest(model, where) if MANIFEST_KEY in model.metadata_props else []
    return sorted(
        name
        for name, value in slot_values(model, groups).items()
        if name not in names and not _neutral(value, groups)
    )


def check_adapter_files(
    model: str | os.PathLike[str], *adapter_files: str | os.PathLike[str]
) -> None:
    """Refuse adapter files that, activated together on ``model``, leave some of its active
    slot defaults in place (a model exported with ``--filled-slots`` holds an adapter in its
    defaults; a file naming only some slots would run beside the rest of it, two adapters
    mixed, with no error from onnxruntime).

    Raises:
        UnsupportedError: naming the model, the files and the uncovered slots.
    """
    from loracc.io.onnx_model import load_model
    from loracc.io.ort import adapter_names

    if not adapter_files:
        return
    names = set().union(*(adapter_names(f) for f in adapter_files))
    model_path = Path(model)
    left = uncovered_defaults(load_model(model_path), names, str(model_path))
    if left:
        files = ", ".join(str(f) for f in adapter_files)
        more = f" (and {len(left) - 4} more)" if len(left) > 4 else ""
        raise UnsupportedError(
            f"{files}: does not set the slot(s) {', '.join(repr(n) for n in left[:4])}{more} "
            f"whose defaults in {model_path} hold another adapter; onnxruntime would mix the "
            "two. Write the file with `loracc pack --model` for this model, or export the model "
            "with --empty-slots (the default)"
        )
