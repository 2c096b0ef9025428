"""Issue 7: atomic output. A killed, failed or interrupted merge leaves no destination and no
temporary behind once the next run is done, never touches its inputs, and the stale-temporary
cleanup removes only what loracc made (``.NAME.loracc-tmp-<pid>-<8 hex>``, with no run holding
``NAME``'s lock). The output rules of every command are in test_output_rules.py.

The SIGKILL tests run ``python -m loracc merge`` on a multi-shard base of about 200 MB, written
with ``safetensors`` directly, and kill it once the temporary folder holds its second output shard
(of four).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import loracc
from loracc.cli import main
from loracc.io.output import clean_stale
from tests.support import make_corpus as mc

N_TENSORS, SHARDS, DIM, RANK = 48, 4, 1024, 8
SHARD_SIZE = "51MB"  # 12 tensors of 4 MiB per output shard: 4 shards
PREFIX = "base_model.model."


def _big_case(root: Path) -> tuple[Path, Path]:
    """A 4-shard base of 48 fp32 (1024, 1024) tensors, and LoRA on every one of them."""
    g = torch.Generator().manual_seed(0)
    base, adapter = root / "base", root / "adapter"
    tensors = {
        f"model.layers.{i}.mlp.down_proj.weight": torch.randn(DIM, DIM, generator=g)
        for i in range(N_TENSORS)
    }
    mc.write_base(
        base, tensors, shards=SHARDS, config={**mc.BASE_CONFIG, "num_hidden_layers": N_TENSORS}
    )
    factors = {}
    for i in range(N_TENSORS):
        m = f"{PREFIX}model.layers.{i}.mlp.down_proj"
        factors[f"{m}.lora_A.weight"] = torch.randn(RANK, DIM, generator=g) * 0.1
        factors[f"{m}.lora_B.weight"] = torch.randn(DIM, RANK, generator=g) * 0.1
    config = {**mc.ADAPTER_CONFIG, "r": RANK, "lora_alpha": 16, "target_modules": ["down_proj"]}
    mc.write_adapter(adapter, factors, config)
    return base, adapter


def _hashes(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                out[str(p)] = h.hexdigest()
    return out


def _spawn(repo_root: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    return subprocess.Popen(
        [sys.executable, "-m", "loracc", "merge", "--max-shard-size", SHARD_SIZE, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=repo_root,
    )


def _kill_mid_write(proc: subprocess.Popen[bytes], out: Path, timeout: float = 120.0) -> Path:
    """SIGKILL ``proc`` once its temporary folder holds a second shard; return that folder."""
    deadline = time.monotonic() + timeout
    prefix = f".{out.name}.loracc-tmp-{proc.pid}-"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"merge ended (exit {proc.returncode}) before it could be killed: {err}")
        tmps = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
        staged = tmps[0] / "0" if tmps else None  # the output folder, staged in the temporary
        if (
            staged
            and staged.is_dir()
            and sum(p.suffix == ".safetensors" for p in staged.iterdir()) >= 2
        ):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            return tmps[0]
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no temporary folder appeared")


def _check_merged(out: Path, base: Path, adapter: Path) -> None:
    """Output tensors equal the fp64 reference W + s·B@A, rounded once to fp32 (the first and
    last tensor of every output shard are compared; all names, dtypes and shapes are)."""
    got: dict[str, torch.Tensor] = {}
    sample: list[str] = []
    for f in sorted(out.glob("*.safetensors")):
        shard = load_file(f)
        got.update(shard)
        sample += [next(iter(shard)), list(shard)[-1]]
    ref_base: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("*.safetensors")):
        ref_base.update(load_file(f))
    assert set(got) == set(ref_base)
    assert all(got[k].shape == t.shape and got[k].dtype == t.dtype for k, t in ref_base.items())
    factors = load_file(adapter / "adapter_model.safetensors")
    ref = mc.reference_merge({k: ref_base[k] for k in sample}, factors, 16 / RANK)
    for k, r in ref.items():
        err = (got[k].double() - r.double()).abs().max().item()
        assert err <= 2e-6, f"{k}: max error {err}"


@pytest.fixture(scope="module")
def big_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _big_case(tmp_path_factory.mktemp("big"))


def test_sigkill_mid_merge_leaves_no_destination(
    big_case: tuple[Path, Path], tmp_path: Path, repo_root: Path
) -> None:
    base, adapter = big_case
    out = tmp_path / "merged"
    before = _hashes(base, adapter)
    proc = _spawn(repo_root, "--base", str(base), "--adapter", str(adapter), "-o", str(out))
    stale = _kill_mid_write(proc, out)
    assert not out.exists(), "a killed merge left a destination"
    assert stale.exists(), "the killed run's temporary should still be there (nothing cleaned it)"
    lock = out.parent / f".{out.name}.loracc-lock"  # released by the kernel, left on disk
    assert mc.tmp_entries(out) == sorted([stale, lock])

    # The next run cleans the dead run's temporary and succeeds.
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out)]
    result = CliRunner().invoke(main, [*argv, "--max-shard-size", SHARD_SIZE])
    assert result.exit_code == 0, result.stderr
    assert out.is_dir() and mc.tmp_entries(out) == []
    assert len(list(out.glob("model-*.safetensors"))) == SHARDS
    assert _hashes(base, adapter) == before
    _check_merged(out, base, adapter)


def test_sigkill_during_force_keeps_the_previous_output(
    big_case: tuple[Path, Path], tmp_path: Path, repo_root: Path
) -> None:
    """--force replaces the destination only at the end: killed earlier, the old one stays."""
    base, adapter = big_case
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("the previous result\n")
    proc = _spawn(
        repo_root, "--base", str(base), "--adapter", str(adapter), "-o", str(out), "--force"
    )
    _kill_mid_write(proc, out)
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    loracc.merge(base, adapter, out, force=True, max_shard_size=SHARD_SIZE)
    assert not (out / "previous.txt").exists() and mc.tmp_entries(out) == []


def test_two_merges_to_one_destination(
    big_case: tuple[Path, Path], tmp_path: Path, repo_root: Path
) -> None:
    """Started together without --force: exactly one writes, the other exits 2 (the lock, or
    the destination it finds at the final rename). Both exited 0 before, one silently replacing
    the other's output."""
    base, adapter = big_case
    out = tmp_path / "merged"
    procs = [
        _spawn(repo_root, "--base", str(base), "--adapter", str(adapter), "-o", str(out))
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errors = [p.stderr.read().decode() if p.stderr else "" for p in procs]
    assert codes == [0, 2], errors
    assert any("another loracc run" in e or "already exists" in e for e in errors), errors
    assert mc.tmp_entries(out) == []
    _check_merged(out, base, adapter)


def test_run_in_another_pid_namespace_keeps_its_temporary(
    big_case: tuple[Path, Path], tmp_path: Path, repo_root: Path
) -> None:
    """A merge in its own PID namespace (two containers on one volume) writes as pid ~300,
    which looks dead from here: a second run's cleanup here deleted its live temporary, and it
    failed. The lock says it is alive: the second run is refused instead, and that merge
    completes."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    base, adapter = big_case
    out = tmp_path / "merged"
    merge = [
        sys.executable,
        "-m",
        "loracc",
        "merge",
        "--max-shard-size",
        SHARD_SIZE,
        "--workers",
        "1",
    ]
    merge += ["--base", str(base), "--adapter", str(adapter), "-o", str(out)]
    # 300 short processes first, so that python's pid in the namespace is one the host lacks
    script = "seq 1 300 | xargs -n1 true; " + " ".join(shlex.quote(a) for a in merge)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(repo_root)),
        cwd=repo_root,
    )
    deadline = time.monotonic() + 120
    while not (tmps := [p for p in tmp_path.iterdir() if ".loracc-tmp-" in p.name]):
        if proc.poll() is not None:
            pytest.skip(f"cannot run in a new PID namespace (needs root): {proc.stderr.read()!r}")
        assert time.monotonic() < deadline, "no temporary appeared"
        time.sleep(0.001)
    with pytest.raises(loracc.errors.OutputError, match="another loracc run"):
        clean_stale(out)  # what a second run does first, under the destination's lock
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    assert not tmps[0].exists() and mc.tmp_entries(out) == []
    _check_merged(out, base, adapter)


# ------------------------------------------------------------------------------------------------
# Failures and interrupts in-process


@pytest.fixture
def small_case(tmp_path: Path) -> mc.Layout:
    return mc.build_valid(tmp_path)


def test_interrupt_mid_merge_removes_the_temporary(small_case: mc.Layout) -> None:
    lay = small_case
    seen: list[int] = []

    def progress(done: int, total: int, key: str, *_bytes: int) -> None:
        seen.append(done)
        if done == 3:
            assert mc.tmp_entries(lay.out), "no temporary while writing"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loracc.merge(lay.base, lay.adapter, lay.out, progress=progress)
    assert seen[-1] == 3
    assert not lay.out.exists() and mc.tmp_entries(lay.out) == []


def test_failed_force_run_keeps_the_previous_output(tmp_path: Path) -> None:
    lay = mc.build_case(mc.CASES_BY_NAME["merged-overflow"], tmp_path)
    lay.out.mkdir()
    (lay.out / "previous.txt").write_text("keep me\n")
    result = CliRunner().invoke(main, [*lay.argv, "--force"])
    assert result.exit_code == 2 and "NaN or Inf" in result.stderr
    assert sorted(p.name for p in lay.out.iterdir()) == ["previous.txt"]
    assert mc.tmp_entries(lay.out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_cleanup_removes_only_loracc_temporaries_of_this_destination(
    small_case: mc.Layout,
) -> None:
    """No lock held on ``out`` means no run writes it: every ``.out.loracc-tmp-…`` goes, whatever
    its pid says (a pid means nothing across PID namespaces), and nothing else."""
    lay = small_case
    parent, dead, alive = lay.out.parent, _dead_pid(), os.getpid()
    outside = parent / "outside-target"
    outside.mkdir()
    (outside / "precious.txt").write_text("not loracc's\n")

    def make(name: str, *, link: bool = False) -> Path:
        p = parent / name
        if link:
            p.symlink_to(outside, target_is_directory=True)
        else:
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"partial")
        return p

    removed = [
        make(f".out.loracc-tmp-{dead}-0123abcd"),
        make(f".out.loracc-tmp-{alive}-0123abcd"),  # a pid alive here: a reused pid, no lock
        make(f".out.loracc-tmp-{dead}-deadbeef", link=True),  # the link goes, not its target
    ]
    kept = [
        make(f".other.loracc-tmp-{dead}-0123abcd"),  # another destination
        make(f".out.loracc-tmp-{dead}-0123abcz"),  # not loracc's pattern
        make(f".out.loracc-tmp-{dead}-0123abcd.bak"),
        make(f"out.loracc-tmp-{dead}-0123abcd"),  # no leading dot
        make(".out.loracc-tmp-99999999999-0123abcd"),  # no such pid can exist
        make(".out.loracc-tmp-0-0123abcd"),
        make(f".out.loracc-tmp--{dead}-0123abcd"),
    ]
    loracc.merge(lay.base, lay.adapter, lay.out)
    assert lay.out.is_dir()
    for p in removed:
        assert not p.exists() and not p.is_symlink(), p.name
    for p in kept:
        assert p.exists(), p.name
    assert (outside / "precious.txt").read_text() == "not loracc's\n"


def test_output_file_exists_is_refused_then_replaced_with_force(small_case: mc.Layout) -> None:
    lay = small_case
    lay.out.write_text("a file, not a folder\n")
    r = CliRunner().invoke(main, lay.argv)
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert lay.out.read_text() == "a file, not a folder\n"
    r = CliRunner().invoke(main, [*lay.argv, "--force"])
    assert r.exit_code == 0, r.stderr
    assert lay.out.is_dir() and mc.tmp_entries(lay.out) == []


def test_disk_full_is_a_one_line_error_and_leaves_nothing(
    small_case: mc.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from loracc.lower import merge as merge_mod

    def full(self: object, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(merge_mod.SafetensorsWriter, "close", full)
    lay = small_case
    r = CliRunner().invoke(main, lay.argv)
    assert r.exit_code == 2, r.stderr
    assert "No space left on device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not lay.out.exists() and mc.tmp_entries(lay.out) == []
