"""ONNX model files: load with external data mapped lazily, save atomically, keep paths inside.

Loading goes through onnx-ir, which memory-maps external data only when a tensor is read, so a
model of any size opens in the time its graph takes to parse. Every external-data location is
checked before anything is read: it must be a relative path that stays inside the model's folder
(no ``..``, no absolute path, no link out) and the byte range must lie inside the file.

Saving writes the graph and, when the model needs it, one external-data file ``<name>.data``
beside it. Unchanged external tensors are copied from the source file by the kernel
(``copy_file_range``); changed tensors are :class:`onnx_ir.LazyTensor` objects computed one at a
time while the file is written, so memory stays at a few tensors whatever the model's size. All
outputs are written under temporary names and renamed at the end (:func:`atomic_files`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, SupportsInt, cast

import numpy as np
import onnx
import onnx_ir as ir

from loracc.errors import FormatError, InputError, LoraccError, OutputError
from loracc.io.inputs import inside
from loracc.io.output import atomic_files, check_complete

if TYPE_CHECKING:  # torch loads only where tensors are converted: `loracc run` needs none
    import torch

__all__ = [
    "MAX_IR_VERSION",
    "PROTO_LIMIT",
    "embedding_rows",
    "external_data_files",
    "external_tensors",
    "load_model",
    "needs_external_data",
    "output_paths",
    "save_model",
    "tensor_dims",
    "tensor_to_torch",
    "torch_dtype",
    "torch_to_tensor",
    "write_outputs",
]

# onnxruntime 1.20 reads IR version 10; newer releases read more. loracc writes at most this.
MAX_IR_VERSION = 10
# Protobuf cannot serialize a message of 2 GiB; stay well clear of it.
PROTO_LIMIT = 1_800_000_000

# The float ONNX element types and their torch dtypes' names.
_TORCH = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64",
}


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX model; external data stays on disk until a tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX model not found")
    check_complete(path)
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf and onnx-ir raise many kinds
        raise FormatError(f"{path}: not a readable ONNX model ({e})") from e
    if not model.graph.outputs:  # an empty file, or one cut where a protobuf field ends, parses
        raise FormatError(f"{path}: not a readable ONNX model (no graph outputs; truncated?)")
    for tensor in external_tensors(model):
        _check_external(tensor, path)
    return model


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every initializer of every graph (subgraphs included) stored as external data."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def _check_external(tensor: ir.ExternalTensor, model_path: Path) -> None:
    folder = model_path.parent
    what = f"{model_path}: initializer '{tensor.name}' external data"
    location = os.fspath(tensor.location)
    if "\0" in location:  # os calls raise ValueError on it
        raise FormatError(f"{what}: location {location!r} holds a NUL byte")
    data = inside(folder, location, what)
    if not data.is_file():
        found = "is not a regular file" if data.exists() else "not found"
        raise FormatError(f"{what}: file '{location}' {found}")
    size = data.stat().st_size
    offset = tensor.offset or 0
    length = tensor.length if tensor.length is not None else tensor.nbytes
    if offset < 0 or length != tensor.nbytes or offset + length > size:
        raise FormatError(
            f"{what}: bytes [{offset}, {offset + length}) of '{tensor.location}' "
            f"({size} bytes) do not hold a {tensor.dtype.name} {list(tensor.shape)} tensor"
        )
    tensor.base_dir = os.fspath(folder)


def tensor_dims(shape: Iterable[int | ir.SymbolicDimProtocol]) -> tuple[int, ...]:
    """The sizes of a tensor's ``shape``: a tensor holds data, so its dimensions are numbers
    (a value's shape may be symbolic; onnx-ir types both alike)."""
    return tuple(int(cast("SupportsInt", d)) for d in shape)


def tensor_to_torch(tensor: ir.TensorProtocol, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh torch tensor holding ``tensor`` (bf16 included), optionally cast."""
    import torch

    if tensor.dtype not in _TORCH:
        raise FormatError(f"initializer '{tensor.name}': dtype {tensor.dtype.name} is not a float")
    array = tensor.numpy()
    if tensor.dtype == ir.DataType.BFLOAT16:
        out = torch.from_numpy(np.array(array.view(np.uint16), copy=True)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(np.array(array, copy=True))
    out = out.reshape(tensor_dims(tensor.shape))
    del array
    if isinstance(tensor, ir.ExternalTensor):
        # unmap: the caller holds its own copy now (unless another view keeps the mapping)
        with contextlib.suppress(BufferError):
            tensor.release()
    return out if dtype is None else out.to(dtype)


def torch_to_tensor(value: torch.Tensor, dtype: ir.DataType, name: str | None = None) -> ir.Tensor:
    """An onnx-ir tensor of ``dtype`` holding ``value`` (rounded once to that dtype)."""
    import torch

    value = value.detach().to(device="cpu", dtype=torch_dtype(dtype)).contiguous()
    if dtype == ir.DataType.BFLOAT16:
        array = value.view(torch.int16).numpy().view(np.uint16)
        return ir.Tensor(array, dtype=dtype, name=name)
    return ir.Tensor(value.numpy(), dtype=dtype, name=name)


def torch_dtype(dtype: ir.DataType) -> torch.dtype:
    """The torch dtype of a float ONNX element type."""
    import torch

    try:
        return cast("torch.dtype", getattr(torch, _TORCH[dtype]))
    except KeyError:
        raise FormatError(f"element type {dtype.name} is not a float type") from None


def needs_external_data(model: ir.Model) -> bool:
    """Whether the model stores external data or its weights pass protobuf's 2 GB limit."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                return True
            if tensor is not None:
                total += tensor.nbytes
    return total > PROTO_LIMIT


def _ir_version(model: ir.Model) -> None:
    current = model.ir_version or MAX_IR_VERSION
    opset = model.opset_imports.get("", 0)
    if current > MAX_IR_VERSION and opset <= 22:
        model.ir_version = MAX_IR_VERSION
    elif current < 4:
        model.ir_version = 4  # initializers that are not inputs need IR 4
    else:
        model.ir_version = current


def save_model(model: ir.Model, path: Path, data_path: Path | None) -> None:
    """Write ``model`` to ``path``; with ``data_path``, its initializers go to that file.

    ``path`` and ``data_path`` may be temporary names; the graph records ``data_path``'s final
    name given by :func:`write_outputs`, so this is an internal helper.
    """
    _ir_version(model)
    try:
        if data_path is None:
            ir.save(model, path)
        else:
            # onnx-ir names the data file in the graph by the path it writes to: write to the
            # temporary name, then point the graph at the final name.
            ir.save(model, path, external_data=data_path.name)
    except Exception as e:
        # onnx-ir wraps what a lazy tensor raised (NonFiniteError, ...) or a failed write
        # (disk full) in SerdeError layers
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, (LoraccError, OSError)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _point_locations(onnx_path: Path, old: str, new: str) -> None:
    """Rewrite the external-data location ``old`` to ``new`` in a saved (small) graph file."""
    proto = onnx.load(os.fspath(onnx_path), load_external_data=False)
    changed = False
    for tensor in _tensor_protos(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
                changed = True
    if changed:
        onnx.save(proto, os.fspath(onnx_path))


def _graph_proto(path: Path) -> onnx.ModelProto:
    """The model's protobuf with external data left on disk."""
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise FormatError(f"{path}: not a readable ONNX model ({e})") from e


def _subgraphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def _graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies at any depth, in functions too)."""
    pending = [proto.graph, *_subgraphs(n for f in proto.functions for n in f.node)]
    while pending:
        graph = pending.pop()
        yield graph
        pending.extend(_subgraphs(graph.node))


def _tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model stores: initializers (sparse ones too) and tensor attributes
    (``Constant`` values), in every graph and function."""
    nodes: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    sparse: list[onnx.SparseTensorProto] = []
    for graph in _graphs(proto):
        yield from graph.initializer
        sparse.extend(graph.sparse_initializer)
        nodes.extend(graph.node)
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                sparse.append(attr.sparse_tensor)
            sparse.extend(attr.sparse_tensors)
    for s in sparse:
        yield from (s.values, s.indices)


def external_data_files(path: Path) -> list[Path]:
    """The files that any tensor of the model (subgraphs and functions included) keeps its
    external data in, in name order: a fingerprint or an overlap check must see them all."""
    names = {
        entry.value
        for tensor in _tensor_protos(_graph_proto(path))
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / n for n in sorted(names)]


def embedding_rows(path: Path) -> dict[str, int]:
    """Integer graph inputs that index an embedding table (``Gather`` on axis 0, reached through
    Cast/Reshape/Unsqueeze/Squeeze/Identity): input name -> table rows (the least, if several)."""
    graph = _graph_proto(path).graph
    rows = {t.name: int(t.dims[0]) for t in graph.initializer if len(t.dims) >= 1}
    for n in graph.node:  # Constant-node tables
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims:
            rows[n.output[0]] = int(n.attribute[0].t.dims[0])
    alias = {i.name: i.name for i in graph.input}
    for n in graph.node:  # follow Cast/Reshape/Unsqueeze/Identity from a graph input
        if n.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity") and n.input:
            src = alias.get(n.input[0])
            if src is not None:
                alias[n.output[0]] = src
    out: dict[str, int] = {}
    for n in graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in alias:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis == 0 and n.input[0] in rows:
                name = alias[n.input[1]]
                out[name] = min(out.get(name, rows[n.input[0]]), rows[n.input[0]])
    return out


def output_paths(dest: Path, *, external_data: bool, extra: Sequence[Path] = ()) -> list[Path]:
    """The files :func:`write_outputs` writes for ``dest``: the model, its data file when
    ``external_data``, then ``extra``. Refuses a name without ``.onnx`` and a shared path."""
    dest = Path(dest)
    if dest.suffix != ".onnx":
        raise OutputError(f"{dest}: an ONNX model path must end in .onnx")
    data = [dest.with_name(dest.name + ".data")] if external_data else []
    dests = [dest, *data, *extra]
    if len(set(dests)) != len(dests):
        raise OutputError(f"{dest}: two outputs would share one path")
    return dests


def write_outputs(
    model: ir.Model,
    dest: Path,
    *,
    inputs: Sequence[Path],
    force: bool,
    external_data: bool | None = None,
    extra: Sequence[tuple[Path, object]] = (),
) -> list[Path]:
    """Write ``model`` to ``dest`` (plus ``dest.data`` when needed) and the ``extra`` files.

    ``extra`` holds (path, writer) pairs; ``writer(tmp_path)`` writes one file. Everything is
    written under temporary names and renamed only when all succeeded. Returns the paths written.

    Args:
        external_data: True/False forces external data on or off; None chooses it: on when the
            base model used external data or the weights would pass protobuf's 2 GB limit.
    """
    if external_data is None:
        external_data = needs_external_data(model)
    dests = output_paths(dest, external_data=external_data, extra=[p for p, _ in extra])
    data = dests[1] if external_data else None
    with atomic_files(dests, inputs, force=force) as tmps:
        if data is None:
            save_model(model, tmps[0], None)
        else:
            save_model(model, tmps[0], tmps[1])
            _point_locations(tmps[0], tmps[1].name, data.name)
            if not tmps[1].exists():  # no tensor was large enough to go external
                tmps[1].touch()
        for (_, writer), tmp in zip(extra, tmps[len(dests) - len(extra) :], strict=True):
            writer(tmp)  # type: ignore[operator]
    return dests
