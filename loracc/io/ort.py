"""onnxruntime: execution-provider choice, sessions, and the ``.onnx_adapter`` file format.

The CUDA execution provider is chosen only when a probe session really runs on it: the
``onnxruntime-gpu`` wheel lists ``CUDAExecutionProvider`` even on machines without CUDA
libraries, and creating a session there prints two error lines before falling back. The probe
runs once, with onnxruntime's default logger silenced, and its answer is cached.

Adapter files are onnxruntime's own format (``onnxruntime.AdapterFormat``, a flatbuffer starting
with ``TORT``): named tensors that ``RunOptions.add_active_adapter`` adds to a run's feeds.
bfloat16 has no numpy type; it is written from uint16 bits with the ONNX element type attached.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loracc.errors import FormatError, InputError

__all__ = [
    "BFLOAT16",
    "cuda_usable",
    "providers",
    "read_adapter",
    "run_options",
    "session",
    "write_adapter",
]

BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16
_LOG_WARNING, _LOG_FATAL = 2, 4


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - the extra is installed in dev
        raise InputError(
            "onnxruntime is not installed: pip install 'loracc[onnx]' (or onnxruntime-gpu for CUDA)"
        ) from e
    return onnxruntime


def _probe_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model.SerializeToString()


@functools.cache
def cuda_usable() -> bool:
    """Whether a session really runs on the CUDA execution provider here (probed once)."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    ort.set_default_logger_severity(_LOG_FATAL)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = _LOG_FATAL
        sess = ort.InferenceSession(
            _probe_model(), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        return "CUDAExecutionProvider" in sess.get_providers()
    except Exception:  # any failure to start CUDA means: not usable
        return False
    finally:
        ort.set_default_logger_severity(_LOG_WARNING)


def providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: "auto" (CUDA when usable), "cuda" or "cpu".

    "cuda" falls back to the CPU quietly when CUDA is not usable, like "auto".
    """
    device = device.lower()
    if device not in ("auto", "cuda", "cpu"):
        raise InputError(f"--device: '{device}' is not one of auto, cuda, cpu")
    if device != "cpu" and cuda_usable():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(
    model: str | os.PathLike[str] | bytes,
    *,
    device: str = "auto",
    threads: int | None = None,
    optimize: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the best usable provider, warnings silenced.

    onnxruntime warns once per adapter slot that "initializer appears in graph inputs"; that is
    the slot contract, so sessions log errors only.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    target = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(target, options, providers=providers(device))


def run_options(*adapter_paths: str | os.PathLike[str]) -> Any:
    """``RunOptions`` with the given adapter files active (names must not overlap).

    The returned options keep the loaded ``LoraAdapter`` objects alive: onnxruntime's
    ``RunOptions`` only points at them, and an adapter collected before the run silently
    leaves the slots at their defaults.
    """
    ort = _ort()

    class _Options(ort.RunOptions):  # type: ignore[misc, name-defined]
        adapters: list[Any]

    options = _Options()
    options.adapters = []
    for path in adapter_paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: adapter file not found")
        adapter = ort.LoraAdapter()
        adapter.Load(os.fspath(path))
        options.add_active_adapter(adapter)
        options.adapters.append(adapter)
    return options


def _ortvalue(ort: Any, array: np.ndarray, element_type: int) -> Any:
    array = np.ascontiguousarray(array)
    if element_type == BFLOAT16:
        bits = array.view(np.uint16) if array.dtype.itemsize == 2 else array
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def write_adapter(
    path: str | os.PathLike[str],
    params: Mapping[str, tuple[np.ndarray, int]],
    *,
    adapter_version: int = 1,
    model_version: int = 0,
) -> None:
    """Write an ``.onnx_adapter`` file: name -> (array, ONNX element type).

    bfloat16 arrays are given as ``ml_dtypes.bfloat16`` or as their uint16 bits.
    """
    ort = _ort()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters({name: _ortvalue(ort, a, t) for name, (a, t) in params.items()})
    fmt.export_adapter(os.fspath(path))


def read_adapter(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """The tensors of an adapter file: name -> (shape, ONNX element type, raw bytes).

    The bytes are copied from the OrtValue's CPU buffer (numpy has no bfloat16).
    """
    import ctypes

    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: adapter file not found")
    try:
        reader = ort.AdapterFormat.read_adapter(os.fspath(path))
        params = reader.get_parameters()
    except Exception as e:
        raise FormatError(f"{path}: not an onnxruntime adapter file ({e})") from e
    out = {}
    for name, value in params.items():
        nbytes = value.tensor_size_in_bytes()
        raw = ctypes.string_at(value.data_ptr(), nbytes) if nbytes else b""
        out[name] = (tuple(value.shape()), int(value.element_type()), raw)
    return out


def element_types(names: Sequence[str], sess: Any) -> dict[str, str]:
    """ORT type strings (e.g. "tensor(float)") of a session's overridable initializers."""
    wanted = set(names)
    return {i.name: i.type for i in sess.get_overridable_initializers() if i.name in wanted}
