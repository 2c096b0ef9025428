"""Atomic outputs: write next to the destination under a temporary name, rename at the end.

A run that fails leaves nothing; a run killed outright leaves a temporary entry named
``.<dest>.loracc-tmp-<pid>-<token>``, which the next run on the same destination removes once
that pid is gone. Nothing else is ever deleted, and an output may not be, contain or sit inside
one of the inputs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loracc.errors import OutputError

__all__ = ["atomic_dir", "atomic_files", "check_output"]

_TMP = re.compile(r"^\.(?P<name>.+)\.loracc-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_PID_MAX = 2**22  # Linux's PID_MAX_LIMIT; larger "pids" in a name were not written by loracc


def _alive(pid: int) -> bool:
    if not 0 < pid <= _PID_MAX:
        return True  # no loracc run ever had this pid: not our temporary, keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(dest: Path) -> list[Path]:
    """Remove temporaries that loracc runs on ``dest`` left behind when they were killed."""
    removed = []
    parent = dest.parent if dest.parent.exists() else None
    if parent is None:
        return removed
    for entry in parent.iterdir():
        m = _TMP.match(entry.name)
        if m and m["name"] == dest.name and not _alive(int(m["pid"])):
            _remove(entry)
            removed.append(entry)
    return removed


def _homes(src: Path) -> list[Path]:
    """Where the files of input ``src`` really live: the folder, and the folders its links
    point into (a hub-cache snapshot's ``blobs``)."""
    homes = [src.resolve()]
    if src.is_dir():
        for entry in src.iterdir():
            if entry.is_symlink():
                try:
                    homes.append(entry.resolve().parent)
                except (OSError, RuntimeError):
                    continue
    return homes


def check_output(dest: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that exists (without force) or overlaps an input."""
    try:
        target = dest.resolve()
        homes = [(src, home) for src in inputs for home in _homes(src)]
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13)
        raise OutputError(f"{dest}: cannot resolve the output path ({e})") from e
    for src, home in homes:
        if target == home or target.is_relative_to(home) or home.is_relative_to(target):
            where = "the input" if home == src.resolve() else f"the files of the input {src} in"
            raise OutputError(f"{dest}: output overlaps {where} {home}; choose another path")
    if (dest.exists() or dest.is_symlink()) and not force:
        raise OutputError(f"{dest}: already exists (use --force to replace it)")
    if not dest.parent.exists():
        raise OutputError(f"{dest.parent}: output's parent folder does not exist")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest.parent}: output's parent is not a folder")


def _tmp_name(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.loracc-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap_in(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists() or dest.is_symlink():
        old = _tmp_name(dest, "old")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)  # put the previous output back
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_dir(dest: Path, inputs: Sequence[Path], *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dest`` when the block succeeds."""
    dest = Path(dest)
    check_output(dest, inputs, force=force)
    clean_stale(dest)
    tmp = _tmp_name(dest, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{dest.parent}: cannot create the output there ({e.strerror})") from e
    try:
        yield tmp
        _swap_in(tmp, dest)
    except OSError as e:  # disk full, permissions, a special file: not a loracc bug
        _remove(tmp)
        raise OutputError(f"{dest}: not written: {_describe(e)}") from e
    except BaseException:
        _remove(tmp)
        raise


def _describe(e: OSError) -> str:
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


@contextmanager
def atomic_files(
    dests: Sequence[Path], inputs: Sequence[Path], *, force: bool
) -> Iterator[list[Path]]:
    """Yield temporary paths that replace ``dests`` (files) when the block succeeds."""
    dests = [Path(d) for d in dests]
    for d in dests:
        check_output(d, inputs, force=force)
        clean_stale(d)
    tmps = [_tmp_name(d, "tmp") for d in dests]
    try:
        yield tmps
        for tmp, dest in zip(tmps, dests, strict=True):
            if tmp.exists():
                _swap_in(tmp, dest)
    except OSError as e:  # disk full, permissions: not a loracc bug
        for tmp in tmps:
            _remove(tmp)
        raise OutputError(f"{dests[0]}: not written: {_describe(e)}") from e
    except BaseException:
        for tmp in tmps:
            _remove(tmp)
        raise
