"""A checked safetensors reader and a streaming writer.

Format (https://github.com/huggingface/safetensors#format): 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data area. The reader validates every entry against the file size before any tensor is
touched, so a truncated file or a header that lies is a one-line :class:`FormatError`. The writer
takes the whole tensor table up front and writes the header; tensors are then appended in order, or
filled at their final offsets from several threads (``write_at``/``copy_into``) and committed in
order. A shard is never built in memory, and unchanged tensors are copied byte for byte, in the
kernel, without decoding.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from loracc.errors import FormatError, shorten
from loracc.io.inputs import json_containers, open_input, reject_duplicate_keys

if TYPE_CHECKING:  # torch loads when a tensor is read or written, not for a header
    import torch

__all__ = [
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "all_finite",
    "dtype_name",
    "torch_dtype",
]


@dataclass(frozen=True, slots=True)
class _Dtype:
    """A safetensors dtype: torch's name for it, its size, and the bits that are all set in
    exactly its non-finite values (NaN, Inf), 0 for an integer dtype (see :func:`all_finite`)."""

    torch_name: str
    itemsize: int
    nonfinite: int = 0


_DTYPES: Mapping[str, _Dtype] = {
    "F64": _Dtype("float64", 8, 0x7FF0_0000_0000_0000),
    "F32": _Dtype("float32", 4, 0x7F80_0000),
    "F16": _Dtype("float16", 2, 0x7C00),
    "BF16": _Dtype("bfloat16", 2, 0x7F80),
    "F8_E4M3": _Dtype("float8_e4m3fn", 1, 0x7F),  # no Inf; NaN is S.1111.111
    "F8_E5M2": _Dtype("float8_e5m2", 1, 0x7C),
    "I64": _Dtype("int64", 8),
    "I32": _Dtype("int32", 4),
    "I16": _Dtype("int16", 2),
    "I8": _Dtype("int8", 1),
    "U64": _Dtype("uint64", 8),
    "U32": _Dtype("uint32", 4),
    "U16": _Dtype("uint16", 2),
    "U8": _Dtype("uint8", 1),
    "BOOL": _Dtype("bool", 1),
}
_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, d.torch_name) for name, d in _DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of safetensors dtype ``name`` (imports torch)."""
    return _torch_dtypes()[name]


_MAX_HEADER = 100 * 1024 * 1024
# Bounds on what a header may describe. Dimensions: torch sizes are int64 (safetensors' are
# u64), so 2**63 - 1 is the largest both hold; torch tensors have at most 64 dimensions. Tensor
# count: a real shard stores far fewer tensors than this floor plus one per 64 data bytes, while a
# header of empty tensors (1.4 M in 94 MB) would otherwise cost minutes per later step.
_MAX_DIM = 2**63 - 1
_MAX_DIMS = 64
_MAX_TENSORS = 100_000
_MIN_BYTES_PER_TENSOR = 64
# A tensor entry is one object and two arrays; anything past that (and _MAX_TENSORS of slack for
# brackets inside names and metadata strings) is refused before parsing: "[[],[],...]" as
# __metadata__ would take ~30x its size in memory to parse.
_CONTAINERS_PER_TENSOR = 3
_MAP_MIN = 64 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return next(name for name, d in _torch_dtypes().items() if d == dtype)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype (the safetensors name), shape and absolute byte
    range. Reading the header needs no torch; :attr:`dtype` and reading the values do."""

    path: Path
    st_dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.st_dtype)

    @property
    def dtype_text(self) -> str:
        """The dtype as torch names it ("bfloat16"), for messages, without importing torch."""
        return _DTYPES[self.st_dtype].torch_name

    @property
    def is_floating_point(self) -> bool:
        return _DTYPES[self.st_dtype].nonfinite != 0

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.st_dtype].itemsize


class SafetensorsFile:
    """One safetensors file, its header parsed and checked; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open_input(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: truncated safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise FormatError(
                        f"{self.path}: header length {n} exceeds the file ({size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror})") from e
        data_start = 8 + n
        self._check_amplification(raw, size - data_start)
        try:
            header = json.loads(raw, object_pairs_hook=reject_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({e})") from e
        except ValueError as e:  # a key written twice
            raise FormatError(f"{self.path}: header has a {e}") from e
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{self.path}: __metadata__ is not an object")
        if not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.tensors: dict[str, TensorInfo] = {}
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            info = self._entry(name, entry, data_start, size)
            self.tensors[name] = info
            spans.append((info.offset, info.offset + info.nbytes, name))
        spans.sort()
        for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
            if begin < end:
                raise FormatError(f"{self.path}: tensors '{a}' and '{b}' overlap")

    def _check_amplification(self, raw: bytes, data_bytes: int) -> None:
        """Refuse, before parsing, a header describing far more than its data can hold.

        Every tensor entry has a ``"data_offsets"`` key, so their count bounds the tensors;
        each entry is one object and two arrays, which bounds the JSON containers.
        """
        entries = raw.count(b'"data_offsets"')
        most = _MAX_TENSORS + data_bytes // _MIN_BYTES_PER_TENSOR
        if entries > most:
            raise FormatError(
                f"{self.path}: {entries} tensors in {data_bytes} bytes of data; at most "
                f"{_MAX_TENSORS} + one per {_MIN_BYTES_PER_TENSOR} bytes are read"
            )
        containers = json_containers(raw)
        if containers > _CONTAINERS_PER_TENSOR * entries + _MAX_TENSORS:
            raise FormatError(
                f"{self.path}: header holds up to {containers} JSON arrays and objects for "
                f"{entries} tensors"
            )

    def _entry(self, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: header entry is not an object")
        dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise FormatError(f"{where}: unknown dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(f"{where}: shape {shorten(shape)} is not a list of non-negative ints")
        if len(shape) > _MAX_DIMS or any(d > _MAX_DIM for d in shape):
            raise FormatError(
                f"{where}: shape {shorten(shape)} has more than {_MAX_DIMS} dimensions or one of "
                f"2**63 or more (torch and safetensors cannot hold it)"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise FormatError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise FormatError(
                f"{where}: data_offsets span {end - begin} bytes, dtype and shape need {nbytes}"
            )
        if data_start + end > size:
            raise FormatError(
                f"{where}: data ends at byte {data_start + end}, past the end of the file "
                f"({size} bytes); the file is truncated"
            )
        return TensorInfo(self.path, entry["dtype"], tuple(shape), data_start + begin, nbytes)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].offset)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a fresh, writable CPU tensor."""
        return read_tensor(self.tensors[name])

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order (for small files such as adapters)."""
        return {k: self.read(k) for k in self.keys()}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read the bytes of ``info`` into a new, writable tensor of its dtype and shape.

    A tensor of ``_MAP_MIN`` bytes or more is a private (copy-on-write) memory map of the file:
    its pages are the page cache's, reclaimable and shared, not the process's anonymous memory,
    until something writes to them. Writes never reach the file. The file's size is checked
    when the map is made; a file truncated while the tensor is in use is a SIGBUS, as with any
    memory map (safetensors' own loader has the same contract).
    """
    import torch

    if info.nbytes >= _MAP_MIN and info.offset % info.itemsize == 0:
        mapped = _map_tensor(info)
        if mapped is not None:
            return mapped
    if info.nbytes:
        return torch.frombuffer(_read_bytes(info), dtype=info.dtype).reshape(info.shape)
    return torch.empty(info.shape, dtype=info.dtype)


def all_finite(info: TensorInfo) -> bool:
    """No NaN or Inf among the values of ``info``, tested on their bits (no torch, no decoding):
    a floating-point value is non-finite exactly when all its exponent bits are set (float8
    E4M3FN: all but the sign bit)."""
    mask = _DTYPES[info.st_dtype].nonfinite
    if not mask or not info.nbytes:
        return True
    bits = np.frombuffer(_read_bytes(info), dtype=_UINTS[info.itemsize])
    return not np.any((bits & mask) == mask)


def _read_bytes(info: TensorInfo) -> bytearray:
    buf = bytearray(info.nbytes)
    with open(info.path, "rb") as f:
        f.seek(info.offset)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise FormatError(f"{info.path}: short read at byte {info.offset}; file truncated?")
    return buf


def _map_tensor(info: TensorInfo) -> torch.Tensor | None:
    import torch

    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    end = info.offset + info.nbytes
    try:
        with open(info.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < end:
                raise FormatError(f"{info.path}: short read at byte {info.offset}; file truncated?")
            mapped = mmap.mmap(f.fileno(), end - start, access=mmap.ACCESS_COPY, offset=start)
    except (OSError, ValueError):
        return None  # not mappable (a pipe, an odd filesystem): read it instead
    flat = torch.frombuffer(mapped, dtype=info.dtype, count=info.numel, offset=info.offset - start)
    return flat.reshape(info.shape)


class SafetensorsWriter:
    """Writes one safetensors file whose tensor table is known before any data is written."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._expected: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in table:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": dtype_name(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_bytes = offset
        data_start = 8 + len(raw)
        self._slots: dict[str, tuple[int, int]] = {}
        begin = data_start
        for name, nbytes in self._expected:
            self._slots[name] = (begin, nbytes)
            begin += nbytes
        # Unbuffered: copy_file_range moves the descriptor's position behind any buffer's back.
        self._file: BinaryIO = open(path, "wb", buffering=0)  # noqa: SIM115  (see close())
        try:
            _write_all(self._file, struct.pack("<Q", len(raw)) + raw)
            preallocate(self._file.fileno(), data_start + offset)
        except BaseException:  # disk full: no writer to abort, close the file here
            self._file.close()
            raise
        self._next = 0

    def _take(self, name: str, nbytes: int) -> None:
        want, size = self._expected[self._next]
        if name != want or nbytes != size:
            raise FormatError(f"writer: expected '{want}' ({size} bytes), got '{name}' ({nbytes})")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (CPU) as the next entry of the table."""
        import torch

        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._take(name, data.nbytes)
        _write_all(self._file, data.data)

    # Random access: tensors filled by ``write_at``/``copy_into`` from any thread (positional
    # writes: the descriptor's position is not used), then ``commit``-ed in table order, which
    # checks the order and moves the position past them for ``write``.

    def slot(self, name: str) -> tuple[int, int]:
        """(absolute file offset, byte size) of tensor ``name``'s data."""
        try:
            return self._slots[name]
        except KeyError:
            raise FormatError(f"writer: '{name}' is not in the table") from None

    def write_at(self, name: str, data: torch.Tensor | bytes | memoryview, at: int = 0) -> None:
        """Write ``data`` (a CPU tensor or bytes) into tensor ``name``, ``at`` bytes in."""
        if not isinstance(data, (bytes, bytearray, memoryview)):  # a tensor
            import torch

            view = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
        else:
            view = memoryview(data).cast("B")
        begin, nbytes = self.slot(name)
        if at < 0 or at + len(view) > nbytes:
            raise FormatError(
                f"writer: {len(view)} bytes at {at} overflow '{name}' ({nbytes} bytes)"
            )
        pwrite_all(self._file.fileno(), view, begin + at)

    def copy_into(self, name: str, info: TensorInfo) -> None:
        """Copy the raw bytes of ``info`` into tensor ``name``, without decoding."""
        begin, nbytes = self.slot(name)
        if info.nbytes != nbytes:
            raise FormatError(f"writer: '{name}' holds {nbytes} bytes, the source {info.nbytes}")
        fd = os.open(info.path, os.O_RDONLY)
        try:
            copy_range_at(fd, self._file.fileno(), info.offset, begin, nbytes, info.path)
        finally:
            os.close(fd)

    def commit(self, name: str) -> None:
        """Take ``name``, already filled by ``write_at``/``copy_into``, as the next entry."""
        begin, nbytes = self.slot(name)
        self._take(name, nbytes)
        os.lseek(self._file.fileno(), begin + nbytes, os.SEEK_SET)

    def fileno(self) -> int:
        """The output's descriptor, for positional writes into a ``slot``."""
        return self._file.fileno()

    def abort(self) -> None:
        """Close the file without checking that every tensor was written."""
        self._file.close()

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            self._file.close()
            raise FormatError(f"writer: closed before tensor '{missing}' was written")
        self._file.close()


def _load_fallocate() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


# fallocate(2) itself, not os.posix_fallocate: where the filesystem cannot preallocate, glibc's
# posix_fallocate emulates it by writing into every block, which would double the writing.
_fallocate = _load_fallocate()


def preallocate(fd: int, size: int) -> None:
    """Allocate the first ``size`` bytes of ``fd``'s file before they are written, where the
    filesystem can; only a hint (a full disk is reported by the writes, as without it).

    Measured on ext4 (docs/BENCHMARKS.md, 7B): buffered writes into preallocated blocks skip
    delayed allocation's per-block reservation: about a tenth of a merge's system time."""
    if _fallocate is not None and size > 0:
        _fallocate(fd, 0, 0, size)


_FALLBACK_CHUNK = 8 * 1024 * 1024


def copy_range_at(
    src: int, dst: int, src_offset: int, dst_offset: int, nbytes: int, name: object = "source"
) -> None:
    """Copy ``nbytes`` between two descriptors at explicit offsets; neither position moves.

    ``os.copy_file_range`` keeps the bytes in the kernel; ``pread``/``pwrite`` through one
    small buffer is the fallback where it is not supported.
    """
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    buf = None
    while done < nbytes:
        if buf is None:
            buf = bytearray(min(_FALLBACK_CHUNK, nbytes - done))
        view = memoryview(buf)[: min(len(buf), nbytes - done)]
        got = os.preadv(src, [view], src_offset + done)
        if got <= 0:
            raise FormatError(f"{name}: file ended during copy; truncated?")
        pwrite_all(dst, view[:got], dst_offset + done)
        done += got


def pread_exact(fd: int, view: memoryview, offset: int, name: object = "source") -> None:
    """Fill ``view`` from ``fd`` at ``offset``, or raise :class:`FormatError` on a short read."""
    done, size = 0, len(view)
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise FormatError(f"{name}: short read at byte {offset + done}; file truncated?")
        done += got


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` to ``fd`` at ``offset``."""
    done, size = 0, len(view)
    while done < size:
        done += os.pwrite(fd, view[done:], offset + done)


def _write_all(dst: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = dst.write(view)
        view = view[n:]
