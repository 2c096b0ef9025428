"""``.npz`` files: read within bounds, never unpickling; written under the output rules.

An ``.npz`` is a zip of ``.npy`` members, and a few megabytes of deflated zeros unpack to
gigabytes. Before anything is decompressed, the zip's central directory (each member's declared
size) and each member's ``.npy`` header (dtype and shape) are checked: the declared sizes may
add up to at most :data:`MIN_UNPACKED_LIMIT` or :data:`MAX_RATIO` times the file's size,
whichever is larger, and each member's shape must account for exactly its declared size. The
zip reader never returns more than a member's declared size, so these checks bound the memory.

Writing (``run -o``, ``golden record``) goes through :func:`loracc.io.output.atomic_files`: not
over an input, an existing file only with ``--force``, renamed into place when complete.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from loracc.errors import FormatError
from loracc.io.inputs import open_input
from loracc.io.output import atomic_files

__all__ = ["MAX_MEMBERS", "MAX_RATIO", "MIN_UNPACKED_LIMIT", "read_npz", "write_npz"]

# Real inputs and golden files hold a few to a few hundred arrays of floats or token ids, which
# deflate 1-10x; 64x leaves room for masks and padding, and any file may unpack to 256 MiB.
MIN_UNPACKED_LIMIT = 256 * 1024 * 1024
MAX_RATIO = 64
MAX_MEMBERS = 10_000


def read_npz(path: str | os.PathLike[str], what: str = "inputs") -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file ``path`` by name, after checking what it declares."""
    path = Path(path)
    with open_input(path, f"{what} file") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            with zipfile.ZipFile(f) as z:
                members = _checked_members(path, z, size)
                return {name: _read_member(path, z, info) for name, info in members.items()}
        except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError) as e:
            raise FormatError(f"{path}: not a readable .npz {what} file ({e})") from e


def write_npz(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    *,
    inputs: Sequence[Path],
    force: bool,
) -> None:
    """Write ``arrays`` to ``path`` (compressed) under loracc's output rules: not over one of
    ``inputs``, existing only with ``force``, atomic (:mod:`loracc.io.output`)."""
    # What np.savez_compressed writes, member by member: it takes the names as keyword arguments,
    # so an array named "allow_pickle" (an ONNX output may be) became its option, not a member.
    with (
        atomic_files([Path(path)], inputs, force=force) as (tmp,),
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z,
    ):
        for name, array in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array))


def _checked_members(path: Path, z: zipfile.ZipFile, size: int) -> dict[str, zipfile.ZipInfo]:
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise FormatError(f"{path}: {len(infos)} arrays; at most {MAX_MEMBERS} are read")
    limit = max(MIN_UNPACKED_LIMIT, MAX_RATIO * size)
    declared = sum(i.file_size for i in infos)
    if declared > limit:
        raise FormatError(
            f"{path}: unpacks to {declared} bytes, over the limit of {limit} (the larger of "
            f"{MIN_UNPACKED_LIMIT >> 20} MiB and {MAX_RATIO}x the file's {size} bytes)"
        )
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise FormatError(f"{path}: member '{info.filename}' is not an .npy array")
        name = info.filename.removesuffix(".npy")
        if name in members:
            raise FormatError(f"{path}: array '{name}' is stored twice")
        members[name] = info
    return members


def _check_header(path: Path, member: IO[bytes], info: zipfile.ZipInfo) -> None:
    """The member's .npy header: a plain dtype and a shape that accounts for its zip size."""
    where = f"{path}: array '{info.filename.removesuffix('.npy')}'"
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise FormatError(f"{where}: .npy format {version} is not read (1.0 and 2.0 are)")
    if dtype.hasobject or dtype.itemsize == 0:
        raise FormatError(f"{where}: dtype {dtype} holds Python objects or nothing; not read")
    count = math.prod(shape)
    data = info.file_size - member.tell()
    if count * dtype.itemsize != data:
        raise FormatError(
            f"{where}: shape {tuple(shape)} of {dtype} needs {count * dtype.itemsize} bytes, "
            f"the member holds {data}"
        )


def _read_member(path: Path, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with z.open(info) as member:
        _check_header(path, member, info)
    with z.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)
