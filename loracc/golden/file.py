"""The golden file: one ``.npz`` whose ``__golden__`` entry holds the metadata as UTF-8 JSON
bytes, beside the arrays each artifact kind stores (``input/<name>``, ``output/<name>``,
``sample/<tensor>``). Read and written through :mod:`loracc.io.npz`, under the output rules."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loracc.errors import FormatError, OutputError
from loracc.io.npz import read_npz, write_npz
from loracc.io.output import check_output

__all__ = ["GOLDEN_FORMAT", "META_KEY", "check_golden_output", "read_golden_file", "write_golden"]

GOLDEN_FORMAT = 1
META_KEY = "__golden__"


def check_golden_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """:func:`loracc.io.output.check_output`, and the golden is one file, not a folder."""
    check_output(out, inputs, force=force)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; the golden is one .npz file")


def write_golden(
    path: Path,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    inputs: Sequence[Path],
    force: bool,
) -> None:
    """Write the golden file ``path``: ``meta`` as sorted JSON and ``arrays``."""
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    write_npz(path, {META_KEY: blob, **arrays}, inputs=inputs, force=force)


def read_golden_file(
    path: str | os.PathLike[str], kinds: Collection[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, arrays) of a golden file of one of ``kinds``, or a :class:`FormatError`
    naming what is wrong."""
    p = Path(path)
    arrays = read_npz(p, what="golden")
    blob = arrays.pop(META_KEY, None)
    if blob is None:
        raise FormatError(f"{p}: not a loracc golden file (no {META_KEY} entry)")
    try:
        meta = json.loads(bytes(blob.astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: {META_KEY} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != GOLDEN_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise FormatError(
            f"{p}: golden format {got!r}; this loracc reads format {GOLDEN_FORMAT} (re-record it)"
        )
    if meta.get("kind") not in kinds:
        raise FormatError(f"{p}: unknown golden kind {meta.get('kind')!r}")
    return meta, arrays
