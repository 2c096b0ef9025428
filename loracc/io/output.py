"""The output rules every writing command holds (merge, convert, export, pack, run -o, golden
record), implemented once here.

- **No overlap.** An output may not be, contain or sit inside an input (links resolved), even
  with ``--force``; callers list every input file (external data, shards, adapters, npz inputs).
- **``--force`` to replace**, checked under the lock and again by the final rename itself
  (``renameat2(RENAME_NOREPLACE)``), so a destination made meanwhile is never replaced.
- **Atomic, as a set.** A run stages every output in its own folder
  ``.<NAME>.loracc-tmp-<pid>-<8 hex>`` beside the first destination ``NAME`` (libraries' own
  temporaries, such as onnx-ir's, land inside it too) and moves them in at the end. One output is
  one rename; ``--force`` swaps it with the old one (``RENAME_EXCHANGE``), so a reader sees the
  old or the new, never nothing. Several outputs (``export``'s ``OUT.onnx``, ``OUT.onnx.data``,
  ``OUT.onnx_adapter``) are committed by a journal: once every file is staged, ``COMMIT`` is
  renamed into the staging folder (the commit point), naming each staged file, its final name
  and the identity (device, inode) of the staged file and of the entry it replaces. Then each
  file is swapped in. A run killed before the journal leaves the previous set whole; a run killed
  after it is rolled forward by the next run, entry by entry, only where the destination is
  still the entry the journal replaced. Ctrl-C and SIGTERM are held back during the renames.
- **One run per destination.** ``flock`` on ``.<NAME>.loracc-lock`` beside each destination,
  held for the whole write; a second run exits 2. Whatever carries a destination's name is
  therefore left over by a dead run: the next run removes it, or restores it when it is the
  previous output moved aside (``.<NAME>.loracc-old-…``, only where ``renameat2`` is missing) and
  the destination is gone. No pid is consulted (a pid means nothing across PID namespaces).
- **Signals.** SIGTERM raises :class:`~loracc.errors.Terminated` (a ``KeyboardInterrupt``) while
  an output is being written, so it cleans up as Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from loracc.errors import InputError, OutputError, Terminated

__all__ = ["atomic_dir", "atomic_files", "check_complete", "check_output", "clean_stale"]

_ENTRY = re.compile(r"^\.(?P<label>.+)\.loracc-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_PID_MAX = 2**22  # Linux's PID_MAX_LIMIT; larger "pids" in a name were not written by loracc
_NAME_MAX = 255  # bytes in one path component (Linux, macOS)
_LONGEST_TAIL = len(f".loracc-old-{_PID_MAX}-{0:08x}")
_JOURNAL = "COMMIT"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


# --------------------------------------------------------------------------------------------
# Names


def _label(name: str) -> str:
    """``name`` as loracc's entries beside it carry it: whole, or cut and hashed to fit."""
    room = _NAME_MAX - 1 - _LONGEST_TAIL
    if len(os.fsencode(name)) <= room:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    cut = name
    while len(os.fsencode(cut)) > room - 9:
        cut = cut[:-1]
    return f"{cut}~{digest}"


def _entry(dest: Path, kind: str) -> Path:
    return dest.parent / f".{_label(dest.name)}.loracc-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{_label(dest.name)}.loracc-lock"


def _leftovers(dests: Sequence[Path], kind: str) -> list[tuple[Path, Path]]:
    """(entry, destination) for each ``kind`` entry a run on one of ``dests`` left behind."""
    by_label = {_label(d.name): d for d in dests}
    found = []
    for entry in sorted(dests[0].parent.iterdir()):
        m = _ENTRY.match(entry.name)
        if m and m["kind"] == kind and m["label"] in by_label and 0 < int(m["pid"]) <= _PID_MAX:
            found.append((entry, by_label[m["label"]]))
    return found


# --------------------------------------------------------------------------------------------
# Renames


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl: no wrapper
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the kernel or filesystem lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _refuse_existing(dest: Path) -> OutputError:
    return OutputError(f"{dest}: already exists (use --force to replace it)")


def _move_in(staged: Path, dest: Path, *, replace: bool) -> None:
    """Rename ``staged`` to ``dest``. Without ``replace`` an existing ``dest`` is refused by
    the rename itself; with it the old entry is swapped into ``staged``'s place (the staging
    folder's removal deletes it) or, without ``renameat2``, moved aside first."""
    try:
        if _rename2(staged, dest, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        if not replace:
            raise _refuse_existing(dest) from None
        if _rename2(staged, dest, _RENAME_EXCHANGE):
            return
    if not replace:
        if staged.is_dir():  # a folder cannot be linked: check, then rename (small window)
            if _exists(dest):
                raise _refuse_existing(dest)
            os.rename(staged, dest)
        else:
            try:
                os.link(staged, dest)  # fails when dest exists: no window
            except FileExistsError:
                raise _refuse_existing(dest) from None
        return
    old = None
    if _exists(dest):
        old = _entry(dest, "old")  # restored by the next run if we die before dest is back
        os.rename(dest, old)
    try:
        os.rename(staged, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        _remove(old)


def _identity(path: Path) -> list[int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


# --------------------------------------------------------------------------------------------
# Locks, signals, leftovers


@contextmanager
def _locked(dests: Sequence[Path]) -> Iterator[None]:
    """Hold the lock of every destination (in name order), or refuse: another run writes."""
    with ExitStack() as stack:
        for dest in sorted(dests):
            stack.enter_context(_lock_one(dest))
        yield


_held: set[Path] = set()  # lock files this process holds (flock does not nest across opens)


@contextmanager
def _lock_one(dest: Path) -> Iterator[None]:
    path = _lock_path(dest)
    if path in _held:
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"{dest.parent}: cannot create the output there ({_what(e)})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(
                    f"{dest}: another loracc run is writing it (lock {path.name}); wait for it "
                    "or choose another path"
                ) from None
            raise OutputError(f"{path}: cannot lock the output ({_what(e)})") from e
        # a run that finished meanwhile unlinked the file we opened: lock the new one
        if _identity(path) == [os.fstat(fd).st_dev, os.fstat(fd).st_ino]:
            break
        os.close(fd)
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        with suppress(OSError):
            path.unlink(missing_ok=True)  # while still held: the next run creates a fresh one
        os.close(fd)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the block runs (main thread, default handler)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the renames run; they act when the block ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove(path: Path) -> None:
    """Remove ``path`` (a link itself, not its target); never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _recover(dests: Sequence[Path]) -> None:
    """Under the locks of ``dests``: restore a previous output a dead run moved aside, roll
    its committed set forward, and remove whatever else it left."""
    _restore_moved_aside(dests)
    for staging, _ in _leftovers(dests, "tmp"):
        journal = staging / _JOURNAL
        if journal.is_file() and not journal.is_symlink():
            _roll_forward(staging, journal)
        _remove(staging)


def _restore_moved_aside(dests: Sequence[Path]) -> None:
    for old, dest in _leftovers(dests, "old"):
        if _exists(dest):
            _remove(old)
        else:
            os.rename(old, dest)


def _roll_forward(staging: Path, journal: Path) -> None:
    try:
        entries = json.loads(journal.read_text())["entries"]
        moves = [(staging / e["staged"], staging.parent / e["dest"], e) for e in entries]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a journal loracc wrote completely: the staging folder goes
    if any(Path(e[k]).name != e[k] for _, _, e in moves for k in ("staged", "dest")):
        return  # names only, never a path out of the folder
    with _locked([d for _, d, _ in moves]):
        _restore_moved_aside([d for _, d, _ in moves])
        for staged, dest, e in moves:
            if _identity(staged) == e["new"] and _identity(dest) == e["old"]:
                _move_in(staged, dest, replace=True)


def clean_stale(dest: Path) -> None:
    """What every run on ``dest`` does first, alone: under its lock, restore or remove what a
    killed run left beside it."""
    dest = Path(dest)
    if dest.parent.is_dir():
        with _locked([dest]):
            _recover([dest])


def check_complete(path: Path) -> None:
    """Refuse to read ``path`` while it belongs to a set a killed run left half replaced (a
    journal beside it names it, and not every file of the set is in place yet)."""
    path = Path(path)
    for journal in path.parent.glob(f".*.loracc-tmp-*/{_JOURNAL}"):
        try:
            entries = json.loads(journal.read_text())["entries"]
            mine = any(e["dest"] == path.name for e in entries)
            done = all(_identity(path.parent / e["dest"]) == e["new"] for e in entries)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mine and not done:
            raise InputError(
                f"{path}: a killed loracc run left its output set half replaced "
                f"({journal.parent.name}); run that command again to complete it"
            )


# --------------------------------------------------------------------------------------------
# The rules


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


def _check_overlap(dest: Path, inputs: Sequence[Path]) -> None:
    try:
        target = dest.resolve()
        homes = [(src, home) for src in inputs for home in _homes(src)]
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13)
        raise OutputError(f"{dest}: cannot resolve the output path ({e})") from e
    for src, home in homes:
        if target == home or target.is_relative_to(home) or home.is_relative_to(target):
            where = "the input" if home == src.resolve() else f"the files of the input {src} in"
            raise OutputError(f"{dest}: output overlaps {where} {home}; choose another path")


def check_output(dest: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that overlaps an input, has no parent folder, or exists (without
    ``force``). The writers check again under the lock; this lets a command refuse early."""
    dest = Path(dest)
    _check_overlap(dest, [Path(p) for p in inputs])
    if not dest.parent.exists():
        raise OutputError(f"{dest.parent}: output's parent folder does not exist")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest.parent}: output's parent is not a folder")
    if _exists(dest) and not force:
        raise _refuse_existing(dest)


def _what(e: OSError) -> str:
    return e.strerror or str(e)


def _describe(e: OSError, staged: Sequence[Path], dests: Sequence[Path]) -> str:
    """``e`` naming the destination a staged path stands for. A full or read-only disk is the
    output's: the file named then may be the source of a copy, not worth naming."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or e.filename is None:
        return _what(e)
    name = os.fsdecode(e.filename)
    for s, d in zip(staged, dests, strict=True):
        if name == os.fspath(s) or name.startswith(os.fspath(s) + os.sep):
            name = os.fspath(d) + name[len(os.fspath(s)) :]
    return f"{name}: {_what(e)}" if name and name != os.fspath(dests[0]) else _what(e)


def _commit(staging: Path, staged: Sequence[Path], dests: Sequence[Path], force: bool) -> None:
    for s in staged:
        if not _exists(s):
            raise RuntimeError(f"{s}: the writer of {dests[0]} did not write it")
    pairs = list(zip(staged, dests, strict=True))[::-1]  # the first (the .onnx) goes in last
    with _signals_held():
        if len(dests) > 1:
            entries = [
                {"staged": s.name, "dest": d.name, "new": _identity(s), "old": _identity(d)}
                for s, d in pairs
            ]
            pending = staging / f"{_JOURNAL}.tmp"
            pending.write_text(json.dumps({"entries": entries}))
            os.rename(pending, staging / _JOURNAL)  # the commit point
        moved: list[tuple[Path, Path]] = []
        try:
            for s, d in pairs:
                _move_in(s, d, replace=force)
                moved.append((s, d))
        except OutputError:  # made by another program meanwhile: undo ours, keep theirs
            for s, d in moved:
                os.rename(d, s)
            (staging / _JOURNAL).unlink(missing_ok=True)
            raise


@contextmanager
def _atomic(dests: Sequence[Path], inputs: Sequence[Path], *, force: bool, folder: bool):
    dests = [Path(d) for d in dests]
    if len({d.name for d in dests}) != len(dests) or len({d.parent for d in dests}) != 1:
        raise OutputError(f"{dests[0]}: two outputs would share one path")
    for d in dests:
        check_output(d, inputs, force=True)
    with _locked(dests), _sigterm_interrupts():
        try:
            _recover(dests)
        except OSError as e:
            raise OutputError(f"{dests[0]}: cannot clear a killed run's leftovers ({e})") from e
        if not force:
            for d in dests:
                if _exists(d):
                    raise _refuse_existing(d)
        staging = _entry(dests[0], "tmp")
        staged = [staging / f"{i}{'' if folder else d.suffix}" for i, d in enumerate(dests)]
        try:
            try:
                staging.mkdir()
                if folder:
                    staged[0].mkdir()
            except OSError as e:
                where = dests[0].parent
                raise OutputError(f"{where}: cannot create the output there ({_what(e)})") from e
            yield staged
            _commit(staging, staged, dests, force)
        except OSError as e:  # disk full, read-only, name too long: not a loracc bug
            raise OutputError(f"{dests[0]}: not written: {_describe(e, staged, dests)}") from e
        finally:
            _remove(staging)


@contextmanager
def atomic_dir(dest: Path, inputs: Sequence[Path], *, force: bool) -> Iterator[Path]:
    """Yield an empty folder that becomes ``dest`` when the block succeeds."""
    with _atomic([dest], inputs, force=force, folder=True) as (tmp,):
        yield tmp


@contextmanager
def atomic_files(
    dests: Sequence[Path], inputs: Sequence[Path], *, force: bool
) -> Iterator[list[Path]]:
    """Yield one path per destination file; all of them replace ``dests`` as one set when the
    block succeeds (each must have been written)."""
    with _atomic(dests, inputs, force=force, folder=False) as staged:
        yield staged
