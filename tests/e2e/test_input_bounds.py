"""Issue 11, items 7-11 and 14-15: inputs that hung or exhausted memory, and their bounds.

Each former hang runs ``loracc`` in a real process under a hard timeout, so a regression fails
(``TimeoutExpired``) instead of hanging the suite. Bounds that need no process are checked on the
reader functions directly. docs/ERRORS.md ("Input bounds") lists each bound with its test here.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from loracc.cli import main
from loracc.errors import ConfigError, FormatError, InputError
from loracc.io.inputs import open_input, read_json
from loracc.io.npz import MIN_UNPACKED_LIMIT, read_npz
from loracc.io.peft_config import LoraConfig, is_targeted, match_pattern
from tests.support import make_corpus as mc

TIMEOUT_S = 60  # every case below finishes in a few seconds; the old code ran for minutes or ever


def _loracc(repo_root: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``loracc ARGS`` in a fresh interpreter (``prelude`` runs first), killed at the timeout."""
    code = f"{prelude}\nfrom loracc.cli import main\nmain()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(repo_root)),
        timeout=TIMEOUT_S,
        cwd=repo_root,
    )


def _refused(proc: subprocess.CompletedProcess[str], message: str, names: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}: {err or proc.stdout}"
    assert len(err.splitlines()) == 1 and err.startswith("loracc: error: "), err
    assert message in err and names in err, err


def _config(lay: mc.Layout, **change: object) -> None:
    (lay.adapter / "adapter_config.json").write_text(json.dumps({**mc.ADAPTER_CONFIG, **change}))


# ------------------------------------------------------------------------------------------------
# 7. Patterns: a time bound, Python's semantics

# Where each field's pattern is matched against module names (layers_pattern only counts with
# layers_to_transform and a target list).
_PATTERN_CONFIGS = {
    "target_modules": lambda p: {"target_modules": p},
    "exclude_modules": lambda p: {"exclude_modules": p},
    "alpha_pattern": lambda p: {"alpha_pattern": {p: 4}},
    "rank_pattern": lambda p: {"rank_pattern": {p: 4}},
    "modules_to_save": lambda p: {"modules_to_save": [p]},
    "layers_pattern": lambda p: {"layers_pattern": p, "layers_to_transform": [0, 1]},
}


@pytest.mark.parametrize("field", list(_PATTERN_CONFIGS))
def test_backtracking_pattern_finishes(field: str, tmp_path: Path, repo_root: Path) -> None:
    """``(.|.)+Z`` backtracks exponentially in ``re`` (the issue: past 65 s); it matches no
    module, so the merge succeeds with the default scale."""
    lay = mc.build_valid(tmp_path)
    _config(lay, **_PATTERN_CONFIGS[field]("(.|.)+Z"))
    proc = _loracc(repo_root, *lay.argv)
    assert proc.returncode == 0, proc.stderr
    assert "merged 4 sites" in proc.stdout


@pytest.mark.parametrize("field", list(_PATTERN_CONFIGS))
def test_pattern_past_the_time_bound_is_refused(
    field: str, tmp_path: Path, repo_root: Path
) -> None:
    """A pattern that backtracks even in ``regex`` stops at the time bound: exit 2 naming the
    field (rank_pattern keys are matched for the overlapping-keys note)."""
    lay = mc.build_valid(tmp_path)
    _config(lay, **_PATTERN_CONFIGS[field]("(.|.)+(?!)"))
    _refused(_loracc(repo_root, *lay.argv), "catastrophic backtracking", f"'{field}' pattern")


_SEMANTICS = [
    (r"^(?!.*vision).*(q_proj|v_proj)", "model.layers.0.self_attn.q_proj"),
    (r"^(?!.*vision).*(q_proj|v_proj)", "model.vision.layers.0.q_proj"),
    (r"(\w+)\.\1", "model.model"),
    (r".*\.(q|k)_proj$", "layers.1.k_proj\n"),
    (r"(?i)Q_PROJ", "q_proj"),
    (r"layers\.[0-9]+\.mlp\..*", "model.layers.10.mlp.up_proj"),
    (r"a|ab", "ab"),
]


@pytest.mark.parametrize(("pattern", "name"), _SEMANTICS)
@pytest.mark.parametrize("how", ["match", "fullmatch"])
def test_matching_keeps_python_re_semantics(how: str, pattern: str, name: str) -> None:
    want = getattr(re, how)(pattern, name)
    got = match_pattern(how, pattern, name, "target_modules")  # type: ignore[arg-type]
    assert (got is None) == (want is None)
    if want is not None:
        assert got is not None and got.span() == want.span() and got.groups() == want.groups()


def test_modules_to_save_matches_as_peft_does(tmp_path: Path) -> None:
    """peft excludes modules_to_save with ``re.match``, which a top-level alternation makes a
    prefix match: ``lm_head|score`` excludes ``x.lm_head_extra.q_proj``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    fields = {"target_modules": ["q_proj"], "modules_to_save": ["lm_head|score"]}
    peft_cfg = PeftLoraConfig(**fields)
    ours = LoraConfig(tmp_path / "adapter_config.json", fields, (), ())
    for name in ("x.lm_head_extra.q_proj", "x.lm_head.q_proj", "model.layers.0.q_proj"):
        theirs = check_target_module_exists(peft_cfg, name)
        assert is_targeted(name, ours) == (
            bool(theirs) and type(theirs).__name__ != "_ExcludedModule"
        )
    assert not is_targeted("x.lm_head_extra.q_proj", ours)


# ------------------------------------------------------------------------------------------------
# 8. Special files


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


_MERGE_FIFOS = {
    "base config.json": lambda lay: lay.base / "config.json",
    "adapter_config.json": lambda lay: lay.adapter / "adapter_config.json",
    "adapter_model.safetensors": lambda lay: lay.adapter / "adapter_model.safetensors",
    "model.safetensors": lambda lay: lay.base / "model.safetensors",
}


@pytest.mark.parametrize("which", list(_MERGE_FIFOS))
def test_named_pipe_input_is_refused(which: str, tmp_path: Path, repo_root: Path) -> None:
    lay = mc.build_valid(tmp_path)
    path = _MERGE_FIFOS[which](lay)
    _fifo(path)
    _refused(_loracc(repo_root, *lay.argv), "is a named pipe, not a regular file", path.name)
    assert not lay.out.exists()


def test_named_pipe_index_is_refused(tmp_path: Path, repo_root: Path) -> None:
    lay = mc.build_valid(tmp_path, shards=2)
    _fifo(lay.base / "model.safetensors.index.json")
    _refused(_loracc(repo_root, *lay.argv), "is a named pipe", "model.safetensors.index.json")


def _npz_argv(lay: mc.Layout, option: str, npz: Path) -> list[str]:
    """``run --inputs NPZ`` or ``golden check --golden NPZ`` on the slotted corpus model."""
    model = str(lay.base / "model.onnx")
    if option == "--inputs":
        return ["run", "--model", model, "--inputs", str(npz)]
    return ["golden", "check", "--model", model, "--golden", str(npz)]


@pytest.mark.parametrize("option", ["--inputs", "--golden"])
def test_named_pipe_npz_is_refused(option: str, tmp_path: Path, repo_root: Path) -> None:
    pytest.importorskip("onnxruntime")
    lay = mc.build_slotted_valid(tmp_path)
    npz = tmp_path / "pipe.npz"
    os.mkfifo(npz)
    _refused(_loracc(repo_root, *_npz_argv(lay, option, npz)), "is a named pipe", "pipe.npz")


def test_character_device_is_refused_before_reading() -> None:
    """/dev/zero never ends: reading it as JSON grew memory ~1 GB/s until OOM."""
    with pytest.raises(InputError, match="is a character device, not a regular file"):
        read_json(Path("/dev/zero"))
    with pytest.raises(InputError, match="is a folder"):
        open_input(Path("/"))


def test_character_device_as_base_config(tmp_path: Path, repo_root: Path) -> None:
    """A /dev/zero device node made inside the base folder (needs root and mknod)."""
    lay = mc.build_valid(tmp_path)
    (lay.base / "config.json").unlink()
    try:
        os.mknod(lay.base / "config.json", stat.S_IFCHR | 0o444, os.makedev(1, 5))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here ({e})")
    _refused(_loracc(repo_root, *lay.argv), "is a character device", "config.json")


# ------------------------------------------------------------------------------------------------
# 9. npz bombs and lying npz headers


def _npz_bomb(path: Path, nbytes: int) -> None:
    """One float32 member of ``nbytes`` zeros, deflated (~1000x), streamed: never in memory."""
    chunk = bytes(1 << 24)
    header = {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)}
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z,
        z.open("x.npy", "w", force_zip64=True) as m,
    ):
        np.lib.format.write_array_header_1_0(m, header)
        for start in range(0, nbytes, len(chunk)):
            m.write(chunk[: min(len(chunk), nbytes - start)])


@pytest.mark.parametrize("option", ["--inputs", "--golden"])
def test_npz_bomb_is_refused_from_its_headers(option: str, tmp_path: Path, repo_root: Path) -> None:
    """A ~1.3 MB file declaring 320 MiB of zeros (the issue's: 3.1 MB, 3 GiB, 17 s, 3.4 GB)."""
    pytest.importorskip("onnxruntime")
    lay = mc.build_slotted_valid(tmp_path)
    bomb = tmp_path / "bomb.npz"
    _npz_bomb(bomb, MIN_UNPACKED_LIMIT + (64 << 20))
    assert bomb.stat().st_size < 4 << 20
    _refused(_loracc(repo_root, *_npz_argv(lay, option, bomb)), "unpacks to", "bomb.npz")


def _npz_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _npy(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """``array`` as .npy bytes, its header optionally claiming another ``shape``."""
    import io

    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    if shape is not None:
        header["shape"] = shape
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(array.tobytes())
    return buf.getvalue()


def test_npz_member_shape_must_match_its_size(tmp_path: Path) -> None:
    lying = _npz_with(tmp_path / "a.npz", {"x.npy": _npy(np.ones(4, np.float32), (2**40,))})
    with pytest.raises(FormatError, match=r"array 'x': shape \(1099511627776,\) of float32 needs"):
        read_npz(lying)


def test_npz_refuses_objects_and_strays(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="holds Python objects"):
        read_npz(_npz_with(tmp_path / "o.npz", {"x.npy": buf.getvalue()}))
    with pytest.raises(FormatError, match=r"member 'notes\.txt' is not an \.npy array"):
        read_npz(_npz_with(tmp_path / "s.npz", {"notes.txt": b"hi"}))


def test_npz_reads_what_numpy_wrote(tmp_path: Path) -> None:
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.array([[1, 2]])}
    np.savez_compressed(tmp_path / "ok.npz", **arrays)
    got = read_npz(tmp_path / "ok.npz")
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype


# ------------------------------------------------------------------------------------------------
# 10. Inputs that amplify under the size caps


def _metadata_of_lists(lay: mc.Layout, nbytes: int) -> None:
    """The adapter header's ``__metadata__`` is ``[[],[],...]`` of ``nbytes`` bytes."""
    path = lay.adapter / "adapter_model.safetensors"
    header, data = mc.read_safetensors_header(path)
    del header["__metadata__"]
    lists = b"[" + b"[]," * (nbytes // 3) + b"[]]"
    text = b'{"__metadata__": ' + lists + b", " + json.dumps(header).encode()[1:]
    mc.write_raw_safetensors(path, None, data, header_text=text)


def test_metadata_of_lists_is_refused_before_parsing(tmp_path: Path, repo_root: Path) -> None:
    """The issue's 99 MB header (41 s, 2.9 GB RSS, exit 0)."""
    lay = mc.build_valid(tmp_path)
    _metadata_of_lists(lay, 99_000_000)
    _refused(_loracc(repo_root, *lay.argv), "JSON arrays and objects", "adapter_model.safetensors")


def test_many_empty_tensors_are_refused_before_parsing(tmp_path: Path, repo_root: Path) -> None:
    """The issue's 1.4 M zero-size tensors in a 94 MB base header (181 s)."""
    lay = mc.build_valid(tmp_path)
    path = lay.base / "model.safetensors"
    header, data = mc.read_safetensors_header(path)
    body = b",".join(
        b'"e.%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}' % i
        for i in range(1_400_000)
    )
    text = json.dumps(header).encode()[:-1] + b", " + body + b"}"
    mc.write_raw_safetensors(path, None, data, header_text=text)
    _refused(_loracc(repo_root, *lay.argv), "1400", "model.safetensors")


def test_huge_adapter_config_is_refused_unread(tmp_path: Path, repo_root: Path) -> None:
    """The issue's 1 GB adapter_config.json (11 s, 2.3 GB); sparse here, so no disk is used."""
    lay = mc.build_valid(tmp_path)
    with open(lay.adapter / "adapter_config.json", "r+b") as f:
        f.truncate(1 << 30)
    _refused(_loracc(repo_root, *lay.argv), "the JSON size limit", "adapter_config.json")


def test_json_of_nested_lists_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"x": [' + b"[]," * 1_000_001 + b"[]]}")
    with pytest.raises(ConfigError, match="JSON arrays and objects"):
        read_json(path)


def test_large_layer_replication_needs_the_flag(tmp_path: Path, repo_root: Path) -> None:
    """The issue's ``[[0, 2]] * 200000`` (a 1.6 MB config that would write ~3.5 GB)."""
    lay = mc.build_valid(tmp_path)
    _config(lay, layer_replication=[[0, 2]] * 200_000)
    _refused(_loracc(repo_root, *lay.argv), "--allow-large-replication", "400000 layers")


# ------------------------------------------------------------------------------------------------
# 11. A missing optional dependency is exit 2, not an internal error


@pytest.mark.parametrize(
    ("module", "hint"), [("onnx_ir", "'loracc[onnx]'"), ("onnx", "'loracc[onnx]'")]
)
def test_missing_onnx_extra(module: str, hint: str, tmp_path: Path, repo_root: Path) -> None:
    pytest.importorskip("onnx")
    lay = mc.build_onnx_valid(tmp_path)
    proc = _loracc(repo_root, *lay.argv, prelude=f"import sys; sys.modules[{module!r}] = None")
    _refused(proc, f"is not installed: pip install {hint}", module)


def test_missing_onnxruntime(tmp_path: Path, repo_root: Path) -> None:
    pytest.importorskip("onnx")
    lay = mc.build_slotted_valid(tmp_path)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.ones((1, mc.HIDDEN), np.float32))
    args = ["run", "--model", str(lay.base / "model.onnx"), "--inputs", str(inputs)]
    proc = _loracc(repo_root, *args, prelude="import sys; sys.modules['onnxruntime'] = None")
    _refused(proc, "onnxruntime is not installed: pip install onnxruntime", "onnxruntime")


# ------------------------------------------------------------------------------------------------
# 14-15. What loracc prints: escaped names, the CUDA fallback note


def test_notes_escape_control_characters(tmp_path: Path) -> None:
    """An unknown config field is echoed in a note; its newline must not start a new line."""
    lay = mc.build_valid(tmp_path)
    _config(lay, **{"x\nloracc: merged 4 sites OK": False, "y\u202eexe.txt": False})
    result = CliRunner().invoke(main, lay.argv)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "loracc: merged 4 sites OK" not in lines
    assert any("x\\x0aloracc: merged 4 sites OK" in line for line in lines)
    assert "\u202e" not in result.stdout and "y\\u202eexe.txt" in result.stdout


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA is usable here: there is no fallback to report"
)
@pytest.mark.parametrize("as_json", [True, False])
def test_cuda_fallback_is_noted(as_json: bool, tmp_path: Path) -> None:
    lay = mc.build_valid(tmp_path)
    argv = [*lay.argv, "--device", "cuda"] + (["--json"] if as_json else [])
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    note = "--device cuda: no usable CUDA device here; computed on the CPU"
    if as_json:
        assert note in json.loads(result.stdout)["notes"]
    else:
        assert f"note: {note}" in result.stdout


def test_header_dims_bound_matches_torch() -> None:
    """2**63 - 1 is the largest dimension torch holds; the reader's bound is exactly that."""
    from loracc.io import safetensors as st

    assert torch.empty((st._MAX_DIM, 0)).shape[0] == st._MAX_DIM
    with pytest.raises((RuntimeError, TypeError, OverflowError)):
        torch.empty((st._MAX_DIM + 1, 0))
