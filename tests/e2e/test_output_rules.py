"""Issue 11: the output rules, for every command that writes.

Commands: ``merge``, ``convert``, ``export --onnx`` (merged; ``--keep-lora`` writes the set
``OUT.onnx`` + ``OUT.onnx.data`` + ``OUT.onnx_adapter``), ``pack``, ``run -o``, ``golden record``
(ONNX and Hugging Face). Rules: no overlap with any input file, ``--force`` to replace, no missing
parent created, one run per destination (the lock), SIGTERM/SIGINT clean up, replacement
recoverable and the set never mixed after a kill at any rename, names of any length, read-only
and full disks (one line, exit 2, nothing left).

Fault injection uses ``strace`` (``inject=SYSCALL:signal=…:when=N``); those tests skip where
strace cannot trace. The tmpfs tests need root (``mount``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import loracc
from loracc.cli import main
from loracc.io.output import clean_stale
from tests.support import make_corpus as mc

pytest.importorskip("onnxruntime")

REPO = Path(loracc.__file__).resolve().parents[1]  # the loracc under test, for subprocesses
WRITERS = (
    "merge",
    "convert",
    "combine",
    "export",
    "export-keep-lora",
    "pack",
    "run",
    "golden-record",
    "golden-record-hf",
)


@dataclass
class Writer:
    """One writing command on its own tiny inputs."""

    name: str
    root: Path
    argv: Callable[[Path], list[str]]  # the command line writing to the given output path
    inputs: dict[str, Path]  # files and folders it reads, by role
    out: Path  # where the tests write by default
    set_of: Callable[[Path], list[Path]] = lambda o: [o]  # the outputs it writes for -o O

    def outputs(self, out: Path) -> list[Path]:
        return self.set_of(out)


def _cmd(*argv: str) -> Callable[[Path], list[str]]:
    return lambda out: [*argv, "-o", str(out)]


def _onnx_set(keep_lora: bool) -> Callable[[Path], list[Path]]:
    def outputs(o: Path) -> list[Path]:
        extra = [o.with_suffix(".onnx_adapter")] if keep_lora else []
        return [o, o.with_name(o.name + ".data"), *extra]

    return outputs


def build(name: str, root: Path) -> Writer:
    root.mkdir(parents=True, exist_ok=True)
    if name in ("merge", "convert", "combine", "golden-record-hf"):
        lay = mc.build_valid(root, shards=2)
        base, adapter = str(lay.base), str(lay.adapter)
        if name == "merge":
            argv = _cmd("merge", "--base", base, "--adapter", adapter)
            return Writer(
                name, root, argv, {"base": lay.base, "adapter": lay.adapter}, root / "out"
            )
        if name in ("convert", "combine"):
            method = ["--method", "cat"] if name == "combine" else []
            argv = _cmd(name, "--adapter", adapter, *method)
            return Writer(name, root, argv, {"adapter": lay.adapter}, root / "out")
        argv = _cmd("golden", "record", "--model", base)
        return Writer(name, root, argv, {"base": lay.base}, root / "out.npz")
    if name.startswith("export"):
        lay = mc.build_onnx_valid(root)
        keep = name == "export-keep-lora"
        argv = _cmd(*lay.argv[:2], *(["--keep-lora"] if keep else []), *lay.argv[2:-2])
        ins = {"model": lay.base / "model.onnx", "data": lay.base / mc.ONNX_DATA}
        ins["adapter"] = lay.adapter
        return Writer(name, root, argv, ins, root / "out.onnx", _onnx_set(keep))
    lay = mc.build_slotted_valid(root)
    model = lay.base / "model.onnx"
    ins = {"model": model, "data": lay.base / mc.ONNX_DATA}
    if name == "pack":
        return Writer(name, root, _cmd(*lay.argv[:-2]), {**ins, "adapter": lay.adapter}, lay.out)
    if name == "run":
        npz = root / "inputs.npz"
        np.savez(npz, x=np.ones((1, mc.HIDDEN), np.float32))
        argv = _cmd("run", "--model", str(model), "--inputs", str(npz))
        return Writer(name, root, argv, {**ins, "inputs": npz}, root / "out.npz")
    return Writer(
        name, root, _cmd("golden", "record", "--model", str(model)), ins, root / "out.npz"
    )


@pytest.fixture(params=WRITERS)
def writer(request: pytest.FixtureRequest, tmp_path: Path) -> Writer:
    return build(request.param, tmp_path / request.param)


def invoke(*argv: str) -> object:
    return CliRunner().invoke(main, list(argv))


def leftovers(folder: Path) -> list[str]:
    """Entries loracc (or a library it called) made beside its outputs and left."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and "loracc" in p.name)


def hashes(w: Writer) -> dict[str, str]:
    """Every input file's content (inputs' folders whole)."""
    return {str(p): str(mc.snapshot(p if p.is_dir() else p.parent)) for p in w.inputs.values()}


def identities(paths: list[Path]) -> list[tuple[int, int] | None]:
    return [(p.lstat().st_dev, p.lstat().st_ino) if os.path.lexists(p) else None for p in paths]


# ------------------------------------------------------------------------------------------------
# Overlap, --force, parents


OVERLAPS = {  # id: (command, the input -o names, --force)
    "merge-base-shard": (
        "merge",
        lambda w: w.inputs["base"] / "model-00001-of-00002.safetensors",
        True,
    ),
    "merge-adapter-file": (
        "merge",
        lambda w: w.inputs["adapter"] / "adapter_model.safetensors",
        True,
    ),
    "convert-adapter-config": (
        "convert",
        lambda w: w.inputs["adapter"] / "adapter_config.json",
        True,
    ),
    "export-inside-adapter": ("export", lambda w: w.inputs["adapter"] / "inside.onnx", True),
    "export-keep-lora-model": ("export-keep-lora", lambda w: w.inputs["model"], True),
    "pack-inside-adapter": ("pack", lambda w: w.inputs["adapter"] / "inside.onnx_adapter", True),
    "run-model-no-force": ("run", lambda w: w.inputs["model"], False),  # replaced it before
    "run-model-data": ("run", lambda w: w.inputs["data"], True),
    "run-inputs-npz": ("run", lambda w: w.inputs["inputs"], True),
    "golden-record-model-data": ("golden-record", lambda w: w.inputs["data"], True),
    "golden-record-model": ("golden-record", lambda w: w.inputs["model"], True),
    "golden-record-hf-shard": (
        "golden-record-hf",
        lambda w: w.inputs["base"] / "model-00001-of-00002.safetensors",
        True,
    ),
}


@pytest.mark.parametrize(("name", "target", "force"), OVERLAPS.values(), ids=OVERLAPS.keys())
def test_output_over_an_input_is_refused(
    name: str, target: Callable[[Writer], Path], force: bool, tmp_path: Path
) -> None:
    w = build(name, tmp_path)
    before = hashes(w)
    r = invoke(*w.argv(target(w)), *(["--force"] if force else []))
    assert r.exit_code == 2 and "overlaps" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert hashes(w) == before
    assert leftovers(target(w).parent) == []


def test_existing_output_needs_force_then_is_replaced(writer: Writer) -> None:
    w, out = writer, writer.out
    first = w.outputs(out)[-1]  # for a set: a member other than the one -o names
    first.write_bytes(b"an earlier result\n")
    r = invoke(*w.argv(out))
    assert r.exit_code == 2 and "already exists" in r.stderr, r.output
    assert first.read_bytes() == b"an earlier result\n"
    r = invoke(*w.argv(out), "--force")
    assert r.exit_code == 0, r.output
    assert all(p.exists() for p in w.outputs(out))
    assert not first.is_file() or first.read_bytes() != b"an earlier result\n"
    assert leftovers(w.root) == []


def test_missing_parent_is_refused_not_created(writer: Writer) -> None:
    out = writer.root / "missing" / writer.out.name
    r = invoke(*writer.argv(out))
    assert r.exit_code == 2 and "parent folder does not exist" in r.stderr, r.output
    assert not out.parent.exists()


def test_long_output_name(writer: Writer) -> None:
    """A 240-character name: its temporaries must fit the 255-byte limit (exit 1 before)."""
    out = writer.root / ("n" * (240 - len(writer.out.suffix)) + writer.out.suffix)
    r = invoke(*writer.argv(out))
    assert r.exit_code == 0, r.output
    assert all(p.exists() for p in writer.outputs(out))
    assert leftovers(writer.root) == []


def test_save_npz_leaves_a_file_named_like_its_old_temporary(tmp_path: Path) -> None:
    w = build("run", tmp_path)
    mine = w.out.with_name(w.out.name + ".tmp.npz")
    mine.write_bytes(b"the user's own file\n")
    r = invoke(*w.argv(w.out))
    assert r.exit_code == 0, r.output
    assert mine.read_bytes() == b"the user's own file\n"


# ------------------------------------------------------------------------------------------------
# One run per destination


def test_a_held_lock_refuses_and_keeps_the_live_runs_temporary(writer: Writer) -> None:
    """A run holding the lock (here: this test) is alive whatever its pid looks like from here,
    as a run in another PID namespace: its temporary stays, the second run exits 2."""
    out = writer.out
    live = writer.root / f".{out.name}.loracc-tmp-{_dead_pid()}-0123abcd"
    live.mkdir()
    (live / "0").write_bytes(b"being written\n")
    with _held_lock(out):
        r = invoke(*writer.argv(out), "--force")
    assert r.exit_code == 2 and "another loracc run" in r.stderr, r.output
    assert (live / "0").read_bytes() == b"being written\n"
    assert not out.exists()


def test_destination_made_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """The no-``--force`` check holds at the final rename, not only at the start."""
    import loracc

    lay = mc.build_valid(tmp_path)

    def progress(done: int, total: int, key: str, *_bytes: int) -> None:
        if done == 1:
            lay.out.mkdir()
            (lay.out / "theirs.txt").write_text("made by another program\n")

    with pytest.raises(loracc.errors.OutputError, match="already exists"):
        loracc.merge(lay.base, lay.adapter, lay.out, progress=progress)
    assert [p.name for p in lay.out.iterdir()] == ["theirs.txt"]
    assert leftovers(tmp_path) == []


@contextmanager
def _held_lock(dest: Path) -> Iterator[None]:
    """Hold ``dest``'s lock as a live run would."""
    path = dest.parent / f".{dest.name}.loracc-lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------
# Fault injection: signals and kills at every rename


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    r = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True)
    return r.returncode == 0


needs_strace = pytest.mark.skipif(not _strace_works(), reason="strace missing or cannot trace")


def traced(argv: list[str], *injects: str) -> subprocess.CompletedProcess[str]:
    """``python -m loracc ARGV`` under ``strace -e inject=…`` (no bytecode written: the only
    mkdir/rename calls are the output layer's and its libraries')."""
    calls = ",".join(dict.fromkeys(spec.split(":")[0] for spec in injects))
    cmd = ["strace", "-qq", "-o", os.devnull, "-e", f"trace={calls}"]
    for spec in injects:
        cmd += ["-e", f"inject={spec}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    cmd += [sys.executable, "-m", "loracc", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


SIGNALS = [(w, "SIGTERM", 143, "terminated") for w in WRITERS] + [
    (w, "SIGINT", 130, "interrupted") for w in ("merge", "export-keep-lora")
]


@needs_strace
@pytest.mark.parametrize(("name", "sig", "code", "word"), SIGNALS)
def test_signal_mid_write_cleans_up_and_keeps_the_previous_output(
    name: str, sig: str, code: int, word: str, tmp_path: Path
) -> None:
    """The signal arrives as the run creates its temporary folder (the first mkdir); SIGTERM
    killed the run outright before (temporaries left), or came after the write (file outputs)."""
    writer = build(name, tmp_path)
    out = writer.out
    r = invoke(*writer.argv(out))
    assert r.exit_code == 0, r.output
    previous = identities(writer.outputs(out))
    r = traced([*writer.argv(out), "--force"], f"mkdir:signal={sig}:when=1")
    assert r.returncode == code and r.stderr.strip() == f"loracc: {word}", r.stderr
    assert identities(writer.outputs(out)) == previous
    assert leftovers(writer.root) == []


KILL_MODES = {  # mode: (the call killed, every 1st or 2nd one, other injections)
    # renameat2 available: per file a NOREPLACE (fails: it exists) then an EXCHANGE; a kill at
    # the NOREPLACE leaves the state of a kill at the EXCHANGE before it, so every 2nd one
    "exchange": ("renameat2", 2, ()),
    # no renameat2 (ENOSYS): kill at each rename (onnx-ir's, the journal, old aside, new in)
    "fallback": ("rename", 1, ("renameat2:error=ENOSYS",)),
}


KILLS = [(w, m) for w in ("merge", "export-keep-lora") for m in KILL_MODES]


@needs_strace
@pytest.mark.parametrize(("name", "mode"), KILLS)
def test_kill_at_every_rename_leaves_the_old_or_the_new_set_whole(
    name: str, mode: str, tmp_path: Path
) -> None:
    """``--force`` replacement SIGKILLed at the n-th rename, n = 1, 2, … until a run completes.
    After the next run's cleanup every output is there, all old or all new: never a lost
    output (the -old- entry deleted) and never a mix of two sets."""
    w = build(name, tmp_path)
    out = w.out
    call, step, others = KILL_MODES[mode]
    kills = 0
    for n in range(step, 20, step):
        r = invoke(*w.argv(out), "--force")
        assert r.exit_code == 0, r.output
        old = identities(w.outputs(out))
        r = traced(
            [*w.argv(out), "--force"],
            *others,
            f"{call}:error=EIO:signal=SIGKILL:when={n}",
        )
        if r.returncode == 0:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        kills += 1
        before_cleanup = identities(w.outputs(out))
        if len(old) > 1 and len({a == b for a, b in zip(old, before_cleanup, strict=True)}) > 1:
            # half replaced until the next run: loracc's readers refuse it meanwhile
            _refuses_to_read(out)
        clean_stale(out)
        now = identities(w.outputs(out))
        assert None not in now, f"kill at {call} #{n}: an output is missing: {now}"
        same = [a == b for a, b in zip(old, now, strict=True)]
        assert all(same) or not any(same), f"kill at {call} #{n}: old and new mixed: {same}"
        # a killed run's lock files may stay (empty; the next run on each reuses and removes it)
        left = [e for e in leftovers(w.root) if not e.endswith(".loracc-lock")]
        assert left == [], f"kill at {call} #{n}"
    assert kills, f"no {call} to kill in a --force replacement"
    assert leftovers(w.root) == []


def _refuses_to_read(model: Path) -> None:
    npz = model.parent / "reader-inputs.npz"
    np.savez(npz, x=np.ones((1, mc.HIDDEN), np.float32))
    r = invoke("run", "--model", str(model), "--inputs", str(npz))
    assert r.exit_code == 2 and "half replaced" in r.stderr, r.output
    npz.unlink()


@needs_strace
def test_killed_export_leaves_no_library_temporary(tmp_path: Path) -> None:
    """onnx-ir writes the data file in its own ``.<name>.<random>/`` folder and renames it out;
    killed there, that folder (a partial data file) was never cleaned. Now it sits inside
    loracc's temporary, which the next run removes."""
    w = build("export", tmp_path)
    r = traced(w.argv(w.out), "rename:error=EIO:signal=SIGKILL:when=1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert leftovers(w.root), "the kill should leave something to clean"
    r = invoke(*w.argv(w.out))
    assert r.exit_code == 0, r.output
    assert leftovers(w.root) == []


# ------------------------------------------------------------------------------------------------
# Read-only and full filesystems (root: tmpfs mounts)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    mounted: list[Path] = []

    def mount(name: str, *options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(("size=256k", *options)), "tmpfs", str(where)],
            capture_output=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:  # lazily: a file a failed run left open must not keep it mounted
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def _fill(folder: Path, leave: int) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(folder / "filler", max(0, (folder / "filler").stat().st_size - leave))


@pytest.mark.parametrize("fs", ["read-only", "full"])
def test_unwritable_filesystem_is_one_line_exit_2(
    writer: Writer, fs: str, tmpfs: Callable[..., Path]
) -> None:
    where = tmpfs(fs, "ro") if fs == "read-only" else tmpfs(fs)
    if fs == "full":
        _fill(where, leave=2048)  # room for the lock and folder entries, not for the output
    out = where / writer.out.name
    r = invoke(*writer.argv(out))
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr
    assert ("Read-only" if fs == "read-only" else "not written") in r.stderr
    assert sorted(p.name for p in where.iterdir()) == ([] if fs == "read-only" else ["filler"])
