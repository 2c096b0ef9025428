"""onnxruntime, in one place: providers, sessions, adapter files, run options, OrtValues.

Everything in loracc that talks to onnxruntime goes through this module (``loracc run``,
``loracc golden``, the adapter files of ``export --keep-lora`` and ``pack``).

**Providers** come in two modes:

* :func:`providers` (``"auto"``, ``"cuda"``, ``"cpu"``): CUDA when usable, else the CPU, quietly.
* :func:`parse_providers` (``"cuda,cpu"``, for ``--providers``): an ordered, strict list. The
  first provider must become active; a later one is used only because it is listed ("fall back
  only when allowed"). :func:`open_session` says why a provider was not used.

The CUDA execution provider counts as usable only when a probe session really runs on it
(:func:`cuda_usable`): the ``onnxruntime-gpu`` wheel lists ``CUDAExecutionProvider`` even on
machines without CUDA libraries, and creating a session there prints two error lines before
falling back. The probe runs once, with onnxruntime's default logger silenced; its answer is
cached. Why CUDA is unusable is found by loading onnxruntime's CUDA provider library (which names
the missing CUDA library); any other provider is checked against
``InferenceSession.get_providers()`` after the fact.

**Adapter files** are onnxruntime's own format (``onnxruntime.AdapterFormat``, a flatbuffer
starting with ``TORT``): named tensors that ``RunOptions.add_active_adapter`` adds to a run's
feeds.

NOTES for developers:

* ``RunOptions`` only points at a ``LoraAdapter``: an adapter collected before the run silently
  leaves the slots at their defaults. :func:`run_options` returns options that keep their adapters
  referenced; never build ``RunOptions`` with adapters anywhere else.
* NumPy has no bfloat16. A bf16 tensor is held as float32 (widening is exact) and converted to
  bf16 bits, round-to-nearest-even, when fed (:func:`to_ortvalue`); bf16 outputs are read from
  their raw bits (:func:`to_numpy`). A bf16 :class:`TensorSpec` keeps ``dtype == "bfloat16"`` so
  callers pick bf16 tolerances.
* LoRA slots are graph inputs that have initializers of the same name (zero-rank defaults);
  onnxruntime hides them from ``get_inputs()``, so they are never required feeds.
* ``run_with_ort_values`` is used for every run: it honours active adapters
  (``run_with_iobinding`` does not: IOBinding callers bind :func:`adapter_ortvalues` to the slot
  inputs instead) and lets bf16 cross the boundary.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import functools
import io
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loracc.errors import FormatError, InputError, UnsupportedError

__all__ = [
    "BFLOAT16",
    "PROVIDER_ALIASES",
    "AdapterSession",
    "Session",
    "TensorSpec",
    "adapter_ortvalues",
    "block_quantizer",
    "cuda_usable",
    "from_bf16_bits",
    "open_session",
    "parse_providers",
    "providers",
    "read_adapter",
    "run_options",
    "session",
    "session_device",
    "to_bf16_bits",
    "to_numpy",
    "to_ortvalue",
    "version",
    "write_adapter",
]

BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16
_LOG_WARNING, _LOG_ERROR, _LOG_FATAL = 2, 3, 4

PROVIDER_ALIASES: Mapping[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
}

# onnxruntime type strings -> (our dtype name, NumPy storage dtype). bfloat16 is stored as float32.
_ORT_TYPES: Mapping[str, tuple[str, Any]] = {
    "tensor(float)": ("float32", np.float32),
    "tensor(double)": ("float64", np.float64),
    "tensor(float16)": ("float16", np.float16),
    "tensor(bfloat16)": ("bfloat16", np.float32),
    "tensor(int64)": ("int64", np.int64),
    "tensor(int32)": ("int32", np.int32),
    "tensor(int16)": ("int16", np.int16),
    "tensor(int8)": ("int8", np.int8),
    "tensor(uint64)": ("uint64", np.uint64),
    "tensor(uint32)": ("uint32", np.uint32),
    "tensor(uint16)": ("uint16", np.uint16),
    "tensor(uint8)": ("uint8", np.uint8),
    "tensor(bool)": ("bool", np.bool_),
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise UnsupportedError(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from e
    return onnxruntime


def block_quantizer(bits: int) -> Any:
    """onnxruntime's MatMulNBits block quantizer for ``bits`` (4 or 8), called as
    ``(packed, weight, scales, zero_points, block_size, N, K, symmetric)``; it fills the first
    four arrays in place."""
    _ort()  # the one message when onnxruntime is missing
    from onnxruntime.capi import _pybind_state as ort_c

    return {4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[bits]


def version() -> str:
    """The onnxruntime version."""
    return str(_ort().__version__)


# --------------------------------------------------------------------------------------------
# Providers


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


def _cuda_hidden() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")


@functools.cache
def cuda_usable() -> bool:
    """Whether a session really runs on the CUDA execution provider here (probed once)."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers() or _cuda_hidden():
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


def _cuda_reason(ort: Any) -> str:
    """Why CUDA is not usable, as precisely as can be found without a noisy session."""
    if _cuda_hidden():
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    capi = Path(ort.__file__).parent / "capi"
    lib = next(iter(sorted(capi.glob("*onnxruntime_providers_cuda.*"))), None)
    if lib is not None:
        try:
            ctypes.CDLL(str(lib))
        except OSError as e:  # names the missing CUDA/cuDNN library
            return f"{lib.name} cannot load: {e}"
    return "onnxruntime could not start a session on it (no usable GPU or driver?)"


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


def parse_providers(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"cuda,cpu"`` -> ``("CUDAExecutionProvider", "CPUExecutionProvider")``, order kept.

    Full onnxruntime names are accepted as they are.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            known = ", ".join(PROVIDER_ALIASES)
            raise InputError(f"--providers: '{name}' is not a provider (use {known})")
        if full not in out:
            out.append(full)
    if not out:
        raise InputError("--providers: empty list")
    return tuple(out)


def _short(names: Sequence[str]) -> str:
    inverse: dict[str, str] = {}
    for k, v in PROVIDER_ALIASES.items():
        inverse.setdefault(v, k)
    return ",".join(inverse.get(p, p) for p in names)


# --------------------------------------------------------------------------------------------
# bfloat16 bits and OrtValues


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bf16_bits_of(array: np.ndarray) -> np.ndarray:
    """uint16 bits as they are, ``ml_dtypes.bfloat16`` viewed as bits, floats rounded."""
    if array.dtype == np.uint16:
        return array
    if array.dtype.name == "bfloat16":
        return array.view(np.uint16)
    return to_bf16_bits(array)


def to_ortvalue(array: np.ndarray, element_type: int | None = None) -> Any:
    """A CPU ``OrtValue`` of ``array``; ``element_type=BFLOAT16`` makes a bf16 tensor.

    A bf16 tensor is given as its uint16 bits, as ``ml_dtypes.bfloat16``, or as floats (rounded
    to nearest even).
    """
    ort = _ort()
    if element_type == BFLOAT16:
        bits = np.ascontiguousarray(_bf16_bits_of(array))
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _raw_bytes(value: Any, what: str) -> bytes:
    """A copy of a CPU ``OrtValue``'s buffer."""
    if value.device_name().lower() != "cpu":
        raise UnsupportedError(f"{what}: data left on {value.device_name()}, not the CPU")
    nbytes = value.tensor_size_in_bytes()
    return ctypes.string_at(value.data_ptr(), nbytes) if nbytes else b""


def to_numpy(value: Any, what: str = "tensor") -> np.ndarray:
    """A NumPy copy of an ``OrtValue``; bfloat16 is widened to float32 (exact).

    ``what`` names the value in errors (a bfloat16 value must be on the CPU).
    """
    if int(value.element_type()) != BFLOAT16:
        return np.array(value.numpy(), copy=True)
    bits = np.frombuffer(_raw_bytes(value, what), dtype=np.uint16)
    return from_bf16_bits(bits).reshape(value.shape())


# --------------------------------------------------------------------------------------------
# Adapter files and run options


@functools.cache
def _run_options_class() -> type:
    class RunOptions(_ort().RunOptions):  # type: ignore[misc]
        """onnxruntime's RunOptions plus the adapters it points at, kept referenced."""

        adapters: list[Any]

    return RunOptions


def run_options(*adapter_paths: str | os.PathLike[str]) -> Any:
    """``RunOptions`` with the given adapter files active (names must not overlap).

    The returned options keep the loaded ``LoraAdapter`` objects alive: onnxruntime's
    ``RunOptions`` only points at them, and an adapter collected before the run silently
    leaves the slots at their defaults.
    """
    ort = _ort()
    options = _run_options_class()()
    options.adapters = []
    for p in adapter_paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(f"{path}: adapter file not found")
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(os.fspath(path))
        except Exception as e:  # onnxruntime's own exception classes
            raise FormatError(
                f"{path}: not a readable .onnx_adapter file ({_first_line(e)})"
            ) from e
        options.add_active_adapter(adapter)
        options.adapters.append(adapter)
    return options


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
    fmt = _ort().AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    # An OrtValue only points at its array; the AdapterFormat keeps the pointers, not the
    # arrays. A converted copy (non-contiguous input, bf16 bits) lives only in its Python
    # OrtValue: keep those referenced until the file is written, or it holds freed memory.
    values = {name: to_ortvalue(a, t) for name, (a, t) in params.items()}
    fmt.set_parameters(values)
    try:
        fmt.export_adapter(os.fspath(path))
    except Exception as e:  # onnxruntime's own error types say only "Failed to write N bytes"
        why = "onnxruntime could not write the adapter file (disk full, or not writable)"
        raise OSError(errno.EIO, why, os.fspath(path)) from e


def _adapter_parameters(path: Path) -> dict[str, Any]:
    """name -> OrtValue (zero-copy views) of an adapter file."""
    ort = _ort()
    if not path.is_file():
        raise InputError(f"{path}: adapter file not found")
    try:
        return dict(ort.AdapterFormat.read_adapter(os.fspath(path)).get_parameters())
    except Exception as e:  # onnxruntime's own exception classes
        raise FormatError(f"{path}: not an onnxruntime adapter file ({e})") from e


def adapter_names(path: str | os.PathLike[str]) -> set[str]:
    """The tensor names an adapter file holds (the slots it sets)."""
    return set(_adapter_parameters(Path(path)))


def read_adapter(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """The tensors of an adapter file: name -> (shape, ONNX element type, raw bytes).

    The bytes are copied from the OrtValue's CPU buffer (numpy has no bfloat16).
    """
    path = Path(path)
    params = _adapter_parameters(path)
    return {
        name: (tuple(v.shape()), int(v.element_type()), _raw_bytes(v, f"{path}: {name}"))
        for name, v in params.items()
    }


def adapter_ortvalues(
    path: str | os.PathLike[str], device: str = "cpu", device_id: int = 0
) -> dict[str, Any]:
    """The tensors of an adapter file as OrtValues of their own on ``device`` ("cpu", "cuda").

    For IOBinding: ``run_with_iobinding`` ignores the adapters active in its ``RunOptions`` (it
    only warns), so bind these to the slot inputs of the same names instead. Empty tensors (the
    rank-0 slots of a multi-adapter file) stay on the CPU.
    """
    path = Path(path)
    out: dict[str, Any] = {}
    for name, value in _adapter_parameters(path).items():
        if int(value.element_type()) == BFLOAT16:
            raise UnsupportedError(
                f"{path}: {name} is bfloat16; bind it from to_ortvalue on the CPU"
            )
        array = np.array(value.numpy(), copy=True)  # the reader's values are views into it
        out[name] = _device_value(array, device, device_id)
    return out


class AdapterSession:
    """An ``InferenceSession`` stand-in whose runs apply the adapter active for the request.

    For callers that run the session themselves without loracc's ``RunOptions`` (optimum's
    ``ORTModelForCausalLM`` calls ``session.run(None, feeds)``, or ``run_with_iobinding`` on
    CUDA): put this object where the session was, and choose the adapter per request with
    :meth:`active`. Everything else (``get_inputs``, ``io_binding``, ``_sess`` …) is the
    wrapped session's.

    * ``run`` passes ``RunOptions`` with the active adapter (none: the graph's slot defaults).
    * ``run_with_iobinding`` binds the active adapter's tensors, as OrtValues on the session's
      device, to the slot inputs of the binding (onnxruntime ignores ``RunOptions`` adapters
      there). A binding is reused across calls, so the slots an earlier request bound and this
      one does not set are bound back to the model's ``defaults``: a request never runs with
      the previous request's adapter.

    The active adapter is a context variable: each thread (or asyncio task) has its own, and
    one without :meth:`active` runs the defaults. Build it with
    :func:`loracc.adapter_session`, which checks the files against the model first.
    """

    def __init__(
        self,
        session: Any,
        adapters: Mapping[str, str | os.PathLike[str]],
        defaults: Mapping[str, np.ndarray],
        device: str = "cpu",
        device_id: int = 0,
    ) -> None:
        self._session = session
        self._files = {name: Path(path) for name, path in adapters.items()}
        self._options = {name: run_options(path) for name, path in self._files.items()}
        self._device = (device, device_id)
        self._defaults = defaults
        self._device_defaults: dict[str, Any] = {}
        self._device_tensors: dict[str, dict[str, Any]] = {}
        self._bound: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._active: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"loracc_adapter_{id(self)}", default=None
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapter names this session knows."""
        return tuple(self._files)

    @property
    def current(self) -> str | None:
        """The adapter active for this thread or task (None: the slot defaults)."""
        return self._active.get()

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        """Run with adapter ``name`` (None: the model's slot defaults) inside the block."""
        if name is not None and name not in self._files:
            known = ", ".join(self._files) or "none"
            raise InputError(f"adapter '{name}' is not one of this session's ({known})")
        token = self._active.set(name)
        try:
            yield
        finally:
            self._active.reset(token)

    def run(self, output_names: Any, input_feed: Mapping[str, Any], run_options: Any = None) -> Any:
        return self._session.run(output_names, input_feed, self._run_options(run_options))

    def run_with_ort_values(
        self, output_names: Any, input_dict_ort_values: Mapping[str, Any], run_options: Any = None
    ) -> Any:
        options = self._run_options(run_options)
        return self._session.run_with_ort_values(output_names, input_dict_ort_values, options)

    def _run_options(self, run_options: Any) -> Any:
        """The caller's options when no adapter is active, else the active adapter's."""
        name = self._active.get()
        if name is None:
            return run_options
        if run_options is not None:
            raise InputError(
                f"adapter '{name}' is active and the caller passed its own RunOptions; "
                "activate adapters in one place"
            )
        return self._options[name]

    def run_with_iobinding(self, iobinding: Any, run_options: Any = None) -> None:
        name = self._active.get()
        tensors = self._tensors(name) if name is not None else {}
        for slot in self._bound.get(iobinding, set()) - set(tensors):
            iobinding.bind_ortvalue_input(slot, self._default(slot))
        for slot, value in tensors.items():
            iobinding.bind_ortvalue_input(slot, value)
        self._bound[iobinding] = set(tensors)
        self._session.run_with_iobinding(iobinding, run_options)

    def _tensors(self, name: str) -> dict[str, Any]:
        if name not in self._device_tensors:
            self._device_tensors[name] = adapter_ortvalues(self._files[name], *self._device)
        return self._device_tensors[name]

    def _default(self, slot: str) -> Any:
        if slot not in self._device_defaults:
            array = np.ascontiguousarray(self._defaults[slot])
            self._device_defaults[slot] = _device_value(array, *self._device)
        return self._device_defaults[slot]


def _device_value(array: np.ndarray, device: str, device_id: int) -> Any:
    """An OrtValue owning a copy of ``array`` on ``device``; an empty one (a rank-0 slot) stays
    on the CPU: it has no bytes to move, and a bound CPU input is valid on any provider."""
    on = ("cpu", 0) if array.size == 0 else (device, device_id)
    return _ort().OrtValue.ortvalue_from_numpy(array, *on)


def session_device(session: Any) -> tuple[str, int]:
    """("cuda", device id) when ``session`` runs on the CUDA execution provider, else ("cpu", 0)."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "cpu", 0
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return "cuda", int(options.get("device_id", 0))


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A graph input or output as onnxruntime sees it: name, dtype, shape (int, symbol or None)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @property
    def storage(self) -> np.dtype[Any]:
        """The NumPy dtype that holds this tensor (float32 for bfloat16)."""
        return np.dtype(_ORT_TYPES[_ort_type(self.dtype)][1])

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


def _ort_type(dtype: str) -> str:
    for k, (name, _) in _ORT_TYPES.items():
        if name == dtype:
            return k
    raise UnsupportedError(f"tensor dtype '{dtype}' is not supported by loracc run")


def _spec(arg: Any) -> TensorSpec:
    if arg.type not in _ORT_TYPES:
        raise UnsupportedError(
            f"graph input/output '{arg.name}' has type {arg.type}; loracc run supports "
            f"{', '.join(n for n, _ in _ORT_TYPES.values())}"
        )
    shape = tuple(d if isinstance(d, int | str) or d is None else None for d in arg.shape or ())
    return TensorSpec(arg.name, _ORT_TYPES[arg.type][0], shape)


@dataclass(frozen=True, slots=True)
class Session:
    """An onnxruntime session plus what loracc needs around it."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    requested: tuple[str, ...]
    providers: tuple[str, ...]  # the active ones, in onnxruntime's order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    adapter: Path | None = None
    notes: tuple[str, ...] = ()
    options: Any = field(default=None, repr=False)  # RunOptions, adapters kept referenced

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise :class:`InputError` unless ``feeds`` match the inputs by name, dtype, shape."""
        names = {s.name for s in self.inputs}
        missing = [s.name for s in self.inputs if s.name not in feeds]
        extra = sorted(set(feeds) - names)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"not graph inputs: {', '.join(extra)}")
            want = ", ".join(f"{s.name} {s.describe()}" for s in self.inputs)
            raise InputError(
                f"{self.path}: inputs do not match the graph ({'; '.join(parts)}); "
                f"the graph takes {want}"
            )
        for s in self.inputs:
            _check_array(self.path, s, feeds[s.name])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; outputs by name (bfloat16 outputs widened to float32)."""
        self.check_feeds(feeds)
        values = {
            s.name: to_ortvalue(feeds[s.name], BFLOAT16 if s.dtype == "bfloat16" else None)
            for s in self.inputs
        }
        names = [s.name for s in self.outputs]
        try:
            result = self.session.run_with_ort_values(names, values, self.options)
        except Exception as e:  # onnxruntime raises its own exception classes
            msg = _first_line(e)
            hint = ""
            if self.adapter is not None and "Invalid input name" in msg:
                hint = (
                    f" ({self.adapter.name} holds a tensor the model has no LoRA slot for; "
                    "`loracc pack --model` writes a file in this model's slot names)"
                )
            raise InputError(f"{self.path}: onnxruntime run failed: {msg}{hint}") from e
        return {n: to_numpy(v, f"output '{n}'") for n, v in zip(names, result, strict=True)}


def _check_array(path: Path, s: TensorSpec, a: np.ndarray) -> None:
    ok_dtype = a.dtype == s.storage or (s.dtype == "bfloat16" and a.dtype == np.uint16)
    if not ok_dtype:
        raise InputError(
            f"{path}: input '{s.name}' is {a.dtype}{list(a.shape)}, the graph takes {s.describe()}"
        )
    bad_rank = a.ndim != len(s.shape)
    bad_dim = not bad_rank and any(
        isinstance(d, int) and d != n for d, n in zip(s.shape, a.shape, strict=True)
    )
    if bad_rank or bad_dim:
        raise InputError(
            f"{path}: input '{s.name}' has shape {list(a.shape)}, the graph takes {s.describe()}"
        )


def open_session(
    model: str | os.PathLike[str],
    providers: str | Sequence[str] = "cpu",
    *,
    adapter: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    optimize: bool = True,
) -> Session:
    """A session of the ``.onnx`` file ``model`` on ``providers`` (ordered, strict).

    Later providers are allowed fallbacks; a provider onnxruntime drops is reported in
    ``Session.notes`` when a later one took over.

    Raises:
        UnsupportedError: the first provider did not become active and no later listed provider
            did either; the message says why onnxruntime dropped it.
        InputError: the model or adapter cannot be read.
    """
    ort = _ort()
    path = Path(model)
    if not path.is_file():
        raise InputError(f"{path}: model not found")
    requested = parse_providers(providers)
    available = set(ort.get_available_providers())
    reasons: dict[str, str] = {}
    for p in requested:
        if p not in available:
            have = ", ".join(sorted(available))
            reasons[p] = f"not in this onnxruntime {ort.__version__} build (it has {have})"
        elif p == "CUDAExecutionProvider" and not cuda_usable():
            reasons[p] = _cuda_reason(ort)
    tried = [p for p in requested if p not in reasons]
    so = ort.SessionOptions()
    so.log_severity_level = _LOG_ERROR  # not the "initializer appears in graph inputs" warnings
    if threads is not None:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session: Any = None
    active: tuple[str, ...] = ()
    if tried:
        # Keep onnxruntime from printing a provider's load failure; it is reported below.
        ort.set_default_logger_severity(_LOG_FATAL)
        printed = io.StringIO()  # onnxruntime's Python layer print()s "EP Error" and retries
        try:
            with contextlib.redirect_stdout(printed):
                session = _create(ort, path, so, tried, reasons)
        finally:
            ort.set_default_logger_severity(_LOG_WARNING)
        active = tuple(session.get_providers())
        ep_error = re.search(r"^EP Error (.*?)\n when using", printed.getvalue(), re.S | re.M)
        for p in tried:
            if p not in active and p not in reasons:
                reasons[p] = "onnxruntime did not activate it"
                if ep_error:  # drop the "file.cc:123 void fn(args)" prefix
                    text = re.sub(r"^\S+:\d+ .*?\) ", "", " ".join(ep_error.group(1).split()))
                    reasons[p] = text
    usable = [p for p in requested if p in active]
    if not usable:
        why = "; ".join(f"{p}: {reasons.get(p, 'not active')}" for p in requested)
        hint = ""
        if requested[0] != "CPUExecutionProvider":
            hint = f" (to allow falling back, list it: --providers {_short(requested)},cpu)"
        raise UnsupportedError(f"requested provider(s) not usable: {why}{hint}")
    notes = tuple(
        f"{p} not usable ({reasons.get(p, 'not active')}); "
        f"fell back to {usable[0]} as --providers allows"
        for p in requested[: requested.index(usable[0])]
    )
    return Session(
        path,
        session,
        requested,
        active,
        tuple(_spec(a) for a in session.get_inputs()),
        tuple(_spec(a) for a in session.get_outputs()),
        adapter=None if adapter is None else Path(adapter),
        notes=notes,
        options=None if adapter is None else run_options(adapter),
    )


def session(
    model: str | os.PathLike[str],
    *,
    device: str = "auto",
    threads: int | None = None,
    optimize: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on :func:`providers` of ``device``, errors-only logging.

    onnxruntime warns once per adapter slot that "initializer appears in graph inputs"; that is
    the slot contract, so sessions log errors only.
    """
    return open_session(model, providers(device), threads=threads, optimize=optimize).session


def _create(ort: Any, path: Path, so: Any, tried: list[str], reasons: dict[str, str]) -> Any:
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=tried)
    except Exception as e:  # a provider that loads but fails to initialise raises
        if len(tried) == 1:
            raise _session_error(path, e) from e
        reasons[tried[0]] = _first_line(e)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=tried[1:])
    except Exception as e:
        raise _session_error(path, e) from e


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else repr(e)


def _session_error(path: Path, e: BaseException) -> InputError:
    return FormatError(f"{path}: onnxruntime cannot create a session: {_first_line(e)}")
