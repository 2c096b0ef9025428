"""A checked safetensors reader and a streaming writer.

Format (https://github.com/huggingface/safetensors#format): 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data area. The reader validates every entry against the file size before any tensor is
touched, so a truncated file or a header that lies is a one-line :class:`FormatError`. The writer
takes the whole tensor table up front, writes the header, then streams tensors in order: a shard is
never built in memory, and unchanged tensors are copied byte for byte without decoding.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from loracc.errors import FormatError

__all__ = ["DTYPES", "SafetensorsFile", "SafetensorsWriter", "TensorInfo", "dtype_name"]

DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_COPY_CHUNK = 64 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return _NAMES[dtype]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One safetensors file, its header parsed and checked; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
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
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{self.path}: __metadata__ is not an object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        data_start = 8 + n
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

    def _entry(self, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: header entry is not an object")
        dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise FormatError(f"{where}: unknown dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative ints")
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
        return TensorInfo(self.path, dtype, tuple(shape), data_start + begin, nbytes)

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
    """Read the bytes of ``info`` into a new tensor of its dtype and shape."""
    buf = bytearray(info.nbytes)
    if info.nbytes:
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise FormatError(f"{info.path}: short read at byte {info.offset}; file truncated?")
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
    return torch.empty(info.shape, dtype=info.dtype)


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
        # Unbuffered: copy_file_range moves the descriptor's position behind any buffer's back.
        self._file: BinaryIO = open(path, "wb", buffering=0)  # noqa: SIM115  (see close())
        _write_all(self._file, struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _take(self, name: str, nbytes: int) -> None:
        want, size = self._expected[self._next]
        if name != want or nbytes != size:
            raise FormatError(f"writer: expected '{want}' ({size} bytes), got '{name}' ({nbytes})")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (CPU) as the next entry of the table."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._take(name, data.nbytes)
        _write_all(self._file, memoryview(data))

    def copy_from(self, name: str, info: TensorInfo) -> None:
        """Append the raw bytes of a tensor of another safetensors file, without decoding."""
        self._take(name, info.nbytes)
        with open(info.path, "rb") as src:
            copy_range(src, self._file, info.offset, info.nbytes)

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            self._file.close()
            raise FormatError(f"writer: closed before tensor '{missing}' was written")
        self._file.close()


def copy_range(src: BinaryIO, dst: BinaryIO, offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` from ``src`` at ``offset`` to the current position of ``dst``.

    ``os.copy_file_range`` keeps the bytes in the kernel (and lets a copy-on-write filesystem
    share extents); plain reads and writes are the fallback where it is not supported.
    """
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done, offset + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    src.seek(offset + done)
    while done < nbytes:
        chunk = src.read(min(_COPY_CHUNK, nbytes - done))
        if not chunk:
            raise FormatError(f"{src.name}: file ended during copy; truncated?")
        _write_all(dst, chunk)
        done += len(chunk)


def _write_all(dst: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = dst.write(view)
        view = view[n:]
