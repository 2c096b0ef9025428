"""Opening input files: regular files only, and JSON read within a bound.

Every file loracc reads goes through :func:`open_input`: a named pipe would block the read
forever and a character device (``/dev/zero``) would never end, so anything but a regular file
(after following links) is refused before a byte is read. JSON inputs are small by nature; a
file past :data:`MAX_JSON_BYTES` is refused instead of parsed, and a key written twice in one
object is an error rather than a silent "last one wins".
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from loracc.errors import ConfigError, FormatError, InputError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_CONTAINERS",
    "inside",
    "json_containers",
    "open_input",
    "prefetch",
    "read_json",
    "reject_duplicate_keys",
]

MAX_JSON_BYTES = 64 * 1024 * 1024  # real configs and indexes are kilobytes to a few megabytes
# JSON arrays and objects in one file. Each costs ~60 bytes of memory for 2 bytes of input, so a
# file of "[[],[],...]" within the size limit would take gigabytes to parse; real configs and
# indexes hold a few hundred to a few thousand.
MAX_JSON_CONTAINERS = 1_000_000

_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_input(path: Path, what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading, or an :class:`InputError` when it is not a regular file.

    The mode is checked with ``stat`` (through links) before opening, and again on the open
    descriptor: the open itself is non-blocking, so a pipe swapped in between cannot hang it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as e:
        raise InputError(f"{path}: {what} not found") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is {_kind(mode)}, not a regular file; loracc reads files only")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{path}: is {_kind(mode)}, not a regular file; loracc reads files only")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def json_containers(raw: bytes) -> int:
    """An upper bound on the arrays and objects in JSON text (brackets in strings count too),
    found without parsing it."""
    return raw.count(b"[") + raw.count(b"{")


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a dict, or ValueError naming the first key written twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of at most ``limit`` bytes, with a one-line error naming it."""
    with open_input(path) as f:
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) > limit:
        raise ConfigError(f"{path}: larger than {limit // (1024 * 1024)} MB, the JSON size limit")
    containers = json_containers(raw)
    if containers > MAX_JSON_CONTAINERS:
        raise ConfigError(
            f"{path}: holds up to {containers} JSON arrays and objects, past the limit of "
            f"{MAX_JSON_CONTAINERS}"
        )
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError as e:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from e
    except ValueError as e:  # a duplicate key, or an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def _hub_blobs(folder: Path) -> Path | None:
    """``<repo>/blobs`` when ``folder`` is a Hugging Face hub-cache ``<repo>/snapshots/<rev>``."""
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent / "blobs"
    return None


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder/name`` when it stays inside ``folder`` after resolving links, else an error.

    The one exception is the Hugging Face hub cache, whose snapshot files are links into the
    same repository's ``blobs`` folder.
    """
    if "\0" in name:
        raise FormatError(f"{what}: {name!r} holds a NUL byte")
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise FormatError(f"{what}: '{name}' points outside {folder}")
    path = folder / name
    try:
        real, home = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13)
        raise FormatError(f"{what}: '{name}' cannot be resolved ({e})") from e
    blobs = _hub_blobs(home)
    if not (real.is_relative_to(home) or (blobs is not None and real.parent == blobs)):
        raise FormatError(f"{what}: '{name}' resolves outside {folder} (a link?)")
    return path


# What prefetch asks the kernel to read ahead at most: about what a disk delivers while the
# interpreter imports torch (1-4 s), and a small share of the page cache of a machine that merges.
PREFETCH_BYTES = 2 * 2**30


def prefetch(folders: Iterable[Path], limit: int = PREFETCH_BYTES) -> threading.Thread:
    """Start reading the first ``limit`` bytes of the safetensors files in ``folders`` into the
    page cache, in a daemon thread (``posix_fadvise(WILLNEED)``), and return the thread.

    ``loracc merge`` calls it before it imports torch, so with a cold page cache the disk reads
    the base while the interpreter loads (start-up hidden behind I/O). Only a hint: a
    file that cannot be opened is left for the reader to report."""

    def run() -> None:
        left = limit
        for folder in folders:
            try:
                files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
            except OSError:
                continue
            for path in files:
                if left <= 0:
                    return
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
                except OSError:
                    continue
                try:
                    info = os.fstat(fd)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    size = min(info.st_size, left)
                    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
                    left -= size
                except OSError:
                    pass
                finally:
                    os.close(fd)

    thread = threading.Thread(target=run, name="loracc-prefetch", daemon=True)
    thread.start()
    return thread
