"""Run an ONNX model (optionally with an ``.onnx_adapter``) on chosen onnxruntime providers.

This is the shared core of ``loracc run`` and ``loracc golden``: it resolves the model file,
creates an onnxruntime session on the requested execution providers, checks that the providers
really became active, validates feeds against the graph's input specs, can generate seeded
inputs from those specs, and returns outputs as NumPy arrays.

Provider selection (``--providers cuda,cpu``) is an ordered list. The first provider must become
active; a later one is used only because it is listed ("fall back only when allowed"). onnxruntime
itself silently drops a provider it cannot load (CUDA libraries missing, no GPU) and runs on the
CPU. Here CUDA is probed first (:func:`loracc.io.ort.cuda_usable`), the reason it is unusable is
found by loading onnxruntime's CUDA provider library (which names the missing CUDA library), and
any other provider is checked against ``InferenceSession.get_providers()`` after the fact.

NOTES for developers:

* NumPy has no bfloat16. A bf16 tensor is held as float32 (widening is exact) and converted to
  bf16 bits, round-to-nearest-even, when fed; bf16 outputs are read from their raw bits. Its
  :class:`TensorSpec` keeps ``dtype == "bfloat16"`` so callers pick bf16 tolerances.
* LoRA slots are graph inputs that have initializers of the same name (zero-rank defaults);
  onnxruntime hides them from ``get_inputs()``, so they are never required feeds here.
* ``run_with_ort_values`` is used for every run: it honours active adapters (``run_with_iobinding``
  does not) and lets bf16 cross the boundary.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loracc.errors import FormatError, InputError, OutputError, UnsupportedError
from loracc.io import ort as ort_io

__all__ = [
    "PROVIDER_ALIASES",
    "OnnxSession",
    "RunResult",
    "TensorSpec",
    "file_digest",
    "generate_inputs",
    "load_npz",
    "model_fingerprint",
    "open_session",
    "parse_dims",
    "parse_providers",
    "resolve_onnx",
    "run",
    "save_npz",
]

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
_ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16


# --------------------------------------------------------------------------------------------
# Specs and files


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


def resolve_onnx(model: str | os.PathLike[str]) -> Path:
    """The ``.onnx`` file of ``model``: the path itself, or the single ``*.onnx`` in a folder."""
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise InputError(f"{path}: no .onnx file in this folder")
        names = ", ".join(p.name for p in found)
        raise InputError(f"{path}: several .onnx files ({names}); pass one of them")
    raise InputError(f"{path}: model not found")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    return h.hexdigest()


def _external_data_files(path: Path) -> list[Path]:
    """Files named by the model's external-data initializers (none when onnx is missing)."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx ships with the onnx extras
        return []
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise FormatError(f"{path}: not a readable ONNX model ({e})") from e
    names: set[str] = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in t.external_data if e.key == "location")
    return [path.parent / n for n in sorted(names)]


def model_fingerprint(path: Path) -> str:
    """sha256 over the model file and, in name order, the external-data files it points to."""
    h = hashlib.sha256(file_digest(path).encode())
    for f in _external_data_files(path):
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()


def load_npz(path: str | os.PathLike[str], what: str = "inputs") -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file by name (no pickles)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise InputError(f"{p}: {what} file not found") from e
    except (OSError, ValueError) as e:
        raise FormatError(f"{p}: not a readable .npz {what} file ({e})") from e


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (compressed), creating the parent folder."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez_compressed(tmp, **dict(arrays))
        tmp.replace(p)
    except OSError as e:
        raise OutputError(f"{p}: cannot write ({e.strerror or e})") from e


# --------------------------------------------------------------------------------------------
# bfloat16 bits


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


# --------------------------------------------------------------------------------------------
# Providers


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


def _cuda_reason(ort: Any) -> str:
    """Why CUDA is not usable, as precisely as can be found without a noisy session."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    capi = Path(ort.__file__).parent / "capi"
    lib = next(iter(sorted(capi.glob("*onnxruntime_providers_cuda.*"))), None)
    if lib is not None:
        try:
            ctypes.CDLL(str(lib))
        except OSError as e:  # names the missing CUDA/cuDNN library
            return f"{lib.name} cannot load: {e}"
    return "onnxruntime could not start a session on it (no usable GPU or driver?)"


@dataclass
class OnnxSession:
    """An onnxruntime session plus what loracc needs around it."""

    path: Path
    session: Any
    requested: tuple[str, ...]
    providers: tuple[str, ...]  # the active ones, in onnxruntime's order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    adapter: Path | None = None
    notes: list[str] = field(default_factory=list)
    _run_options: Any = None
    _lora_adapter: Any = None

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
        import onnxruntime as ort

        self.check_feeds(feeds)
        values = {s.name: _ort_value(ort, s, feeds[s.name]) for s in self.inputs}
        names = [s.name for s in self.outputs]
        try:
            result = self.session.run_with_ort_values(names, values, self._run_options)
        except Exception as e:  # onnxruntime raises its own exception classes
            msg = _first_line(e)
            hint = ""
            if self.adapter is not None and "Invalid input name" in msg:
                hint = f" ({self.adapter.name} holds a tensor the model has no LoRA slot for)"
            raise InputError(f"{self.path}: onnxruntime run failed: {msg}{hint}") from e
        return {s.name: _from_ort_value(s, v) for s, v in zip(self.outputs, result, strict=True)}


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


def _ort_value(ort: Any, s: TensorSpec, a: np.ndarray) -> Any:
    if s.dtype == "bfloat16":
        bits = a if a.dtype == np.uint16 else to_bf16_bits(a)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(bits), onnx_element_type=_ONNX_BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))


def _from_ort_value(s: TensorSpec, v: Any) -> np.ndarray:
    if s.dtype != "bfloat16":
        return np.array(v.numpy(), copy=True)
    if v.device_name().lower() != "cpu":
        raise UnsupportedError(f"output '{s.name}': bfloat16 output left on {v.device_name()}")
    n = int(np.prod(v.shape(), dtype=np.int64))
    raw = (ctypes.c_uint16 * n).from_address(v.data_ptr()) if n else []
    bits = np.frombuffer(bytes(raw), dtype=np.uint16, count=n) if n else np.zeros(0, np.uint16)
    return from_bf16_bits(bits).reshape(v.shape())


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UnsupportedError(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
        ) from e
    return ort


def open_session(
    model: str | os.PathLike[str],
    providers: str | Sequence[str] = "cpu",
    *,
    adapter: str | os.PathLike[str] | None = None,
) -> OnnxSession:
    """Create a session on ``providers`` (ordered; later entries are allowed fallbacks).

    Raises:
        UnsupportedError: the first provider did not become active and no later listed provider
            did either; the message says why onnxruntime dropped it.
        InputError: the model or adapter cannot be read.
    """
    ort = _import_ort()
    path = resolve_onnx(model)
    requested = parse_providers(providers)
    available = set(ort.get_available_providers())
    reasons: dict[str, str] = {}
    for p in requested:
        if p not in available:
            have = ", ".join(sorted(available))
            reasons[p] = f"not in this onnxruntime {ort.__version__} build (it has {have})"
        elif p == "CUDAExecutionProvider" and not ort_io.cuda_usable():
            reasons[p] = _cuda_reason(ort)
    tried = [p for p in requested if p not in reasons]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session: Any = None
    active: tuple[str, ...] = ()
    if tried:
        # Keep onnxruntime from printing a provider's load failure; it is reported below.
        ort.set_default_logger_severity(4)
        printed = io.StringIO()  # onnxruntime's Python layer print()s "EP Error" and retries
        try:
            with contextlib.redirect_stdout(printed):
                session = _create(ort, path, so, tried, reasons)
        finally:
            ort.set_default_logger_severity(2)
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
    notes: list[str] = []
    if usable[0] != requested[0]:
        skipped = requested[: requested.index(usable[0])]
        for p in skipped:
            notes.append(
                f"{p} not usable ({reasons.get(p, 'not active')}); "
                f"fell back to {usable[0]} as --providers allows"
            )
    inputs = tuple(_spec(a) for a in session.get_inputs())
    outputs = tuple(_spec(a) for a in session.get_outputs())
    out = OnnxSession(path, session, requested, active, inputs, outputs, notes=notes)
    if adapter is not None:
        out.adapter = Path(adapter)
        out._run_options, out._lora_adapter = _adapter_run_options(ort, out.adapter)
    return out


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


def _short(providers: Sequence[str]) -> str:
    inverse: dict[str, str] = {}
    for k, v in PROVIDER_ALIASES.items():
        inverse.setdefault(v, k)
    return ",".join(inverse.get(p, p) for p in providers)


def _adapter_run_options(ort: Any, path: Path) -> tuple[Any, Any]:
    if not path.is_file():
        raise InputError(f"{path}: adapter file not found")
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(str(path))
    except Exception as e:  # onnxruntime's own exception classes
        raise FormatError(f"{path}: not a readable .onnx_adapter file ({e})") from e
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    return ro, adapter  # the caller keeps the adapter alive as long as the options


# --------------------------------------------------------------------------------------------
# Generated inputs


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``["batch=2", "seq=16"]`` -> ``{"batch": 2, "seq": 16}``."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            size = int(value)
        except ValueError:
            size = -1
        if not sep or not name.strip() or size < 1:
            raise InputError(f"--dim: '{item}' is not NAME=SIZE with SIZE >= 1")
        dims[name.strip()] = size
    return dims


def vocab_sizes(path: Path) -> dict[str, int]:
    """Integer graph inputs that index an embedding table (``Gather``): name -> table rows."""
    try:
        import onnx
    except ImportError:  # pragma: no cover
        return {}
    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    rows = {t.name: int(t.dims[0]) for t in g.initializer if len(t.dims) >= 1}
    for n in g.node:  # Constant-node tables
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims:
            rows[n.output[0]] = int(n.attribute[0].t.dims[0])
    inputs = {i.name for i in g.input}
    alias = {name: name for name in inputs}
    for n in g.node:  # follow Cast/Reshape/Unsqueeze/Identity from a graph input
        if n.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity") and n.input:
            src = alias.get(n.input[0])
            if src is not None:
                alias[n.output[0]] = src
    out: dict[str, int] = {}
    for n in g.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in alias:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis == 0 and n.input[0] in rows:
                name = alias[n.input[1]]
                out[name] = min(out.get(name, rows[n.input[0]]), rows[n.input[0]])
    return out


def generate_inputs(
    sess: OnnxSession, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs from the graph's specs.

    * Symbolic dimensions come from ``dims`` (``--dim NAME=SIZE``); an unnamed dynamic dimension
      is named ``<input>.<axis>``.
    * Integer inputs that feed an embedding ``Gather`` take ids in ``[0, rows)``; an input whose
      name contains ``mask`` is all ones; ``position`` gives ``0..n-1`` on the last axis; any
      other integer input is 0 or 1. Booleans are random, floats standard normal.
    """
    dims = dict(dims or {})
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for s in sess.inputs:
        shape: list[int] = []
        for axis, d in enumerate(s.shape):
            key = d if isinstance(d, str) else f"{s.name}.{axis}"
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif key in dims:
                shape.append(dims[key])
            else:
                if key not in missing:
                    missing.append(key)
                shape.append(1)
        shapes[s.name] = tuple(shape)
    if missing:
        raise InputError(
            f"{sess.path}: give the symbolic dimensions with --dim: "
            + ", ".join(f"{m}=SIZE" for m in missing)
        )
    unused = sorted(set(dims) - _dim_names(sess.inputs))
    if unused:
        raise InputError(
            f"--dim {unused[0]}: the graph has no such dimension "
            f"(it has {', '.join(sorted(_dim_names(sess.inputs))) or 'none'})"
        )
    vocab = vocab_sizes(sess.path)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for s in sess.inputs:
        shape = shapes[s.name]
        lname = s.name.lower()
        kind = s.storage.kind
        if kind == "b":
            a = rng.random(shape) < 0.5
        elif kind in "iu":
            if s.name in vocab:
                a = rng.integers(0, vocab[s.name], size=shape)
            elif "mask" in lname:
                a = np.ones(shape)
            elif "position" in lname and shape:
                a = np.broadcast_to(np.arange(shape[-1]), shape)
            else:
                a = rng.integers(0, 2, size=shape)
        else:
            a = rng.standard_normal(shape)
        feeds[s.name] = np.ascontiguousarray(a, dtype=s.storage)
        if s.dtype == "bfloat16":  # keep exactly the values that are fed
            feeds[s.name] = from_bf16_bits(to_bf16_bits(feeds[s.name]))
    return feeds


def _dim_names(specs: Sequence[TensorSpec]) -> set[str]:
    return {
        d if isinstance(d, str) else f"{s.name}.{axis}"
        for s in specs
        for axis, d in enumerate(s.shape)
        if not (isinstance(d, int) and d >= 0)
    }


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    """Outputs of one run and where they came from."""

    model: Path
    adapter: Path | None
    providers: tuple[str, ...]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    output_specs: tuple[TensorSpec, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "adapter": str(self.adapter) if self.adapter else None,
            "providers": list(self.providers),
            "outputs": [
                {
                    "name": s.name,
                    "dtype": s.dtype,
                    "shape": list(self.outputs[s.name].shape),
                    **_summary(self.outputs[s.name]),
                }
                for s in self.output_specs
            ],
            "notes": self.notes,
        }


def _summary(a: np.ndarray) -> dict[str, float | None]:
    if a.size == 0 or a.dtype.kind not in "biuf":
        return {"min": None, "max": None, "mean": None}
    f = a.astype(np.float64)
    finite = f[np.isfinite(f)]
    if finite.size == 0:
        return {"min": None, "max": None, "mean": None}
    return {"min": float(finite.min()), "max": float(finite.max()), "mean": float(finite.mean())}


def run(
    model: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray],
    *,
    adapter: str | os.PathLike[str] | None = None,
    providers: str | Sequence[str] = "cpu",
) -> RunResult:
    """Run ``model`` (with ``adapter`` active) on ``inputs`` (an ``.npz`` path or arrays)."""
    feeds = dict(inputs) if isinstance(inputs, Mapping) else load_npz(inputs)
    sess = open_session(model, providers, adapter=adapter)
    outputs = sess.run(feeds)
    return RunResult(
        sess.path, sess.adapter, sess.providers, feeds, outputs, sess.outputs, list(sess.notes)
    )
