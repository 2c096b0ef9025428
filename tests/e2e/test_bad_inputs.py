"""Issue 7: every bad-input corpus case gets its exit code and one-line message, and nothing else.

For each case of ``make_corpus.CASES`` the test runs the ``loracc`` command line in-process and
checks: the exit code; the message (one line, naming the file, key or module); no traceback and
no "internal error"; the inputs byte-identical before and after (every file under the case
folder is hashed, including files outside the input folders that links point to); no output and
no ``.NAME.loracc-*`` temporary left on failure; a pickle canary never unpickled. Cases that exit
0 are checked against an independent fp64 merge. One case also runs as a real process, to check
``--debug`` and the exit status.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from loracc.cli import main
from tests.support import make_corpus as mc

CASES = mc.CASES_BY_NAME


def _marks(case: mc.Case) -> list[pytest.MarkDecorator]:
    if case.bug:  # a known loracc bug: the case must keep failing until the fix lands
        return [pytest.mark.xfail(reason=case.bug, strict=True)]
    if case.pending:
        return [pytest.mark.xfail(reason=case.pending, strict=False)]
    if case.needs and importlib.util.find_spec(case.needs) is None:
        return [pytest.mark.xfail(reason=f"{case.needs} has not landed", strict=False)]
    return []


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, argv, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"loracc raised {result.exception!r}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def _snapshot(lay: mc.Layout) -> dict[str, str]:
    out_name = lay.out.name

    def exclude(p: Path) -> bool:
        if p.name.startswith(f".{out_name}.loracc-"):
            return True
        return not lay.out_preexists and p == lay.out

    return mc.snapshot(lay.root, exclude)


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_close_to_reference(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]):
    assert set(got) == set(ref)
    for k, r in ref.items():
        g = got[k]
        assert g.dtype == r.dtype and g.shape == r.shape, k
        ok = torch.isclose(g.double(), r.double(), rtol=2e-6, atol=1e-7, equal_nan=True)
        assert bool(ok.all()), f"{k}: max err {(g.double() - r.double()).abs().max()}"


@pytest.mark.parametrize("name", [pytest.param(c.name, marks=_marks(c)) for c in mc.CASES], ids=str)
def test_corpus_case(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    lay = mc.build_case(case, tmp_path / "case")
    before = _snapshot(lay)
    code, out, err = run_cli(lay.argv)
    text = err if case.exit_code else out
    assert "Traceback" not in out + err
    assert "internal error" not in err, err
    assert code == case.exit_code, f"exit {code}, wanted {case.exit_code}: {err or out}"
    assert case.message in text, f"{case.message!r} not in {text!r}"
    if case.exit_code:
        assert case.names in err, f"the message does not name {case.names!r}: {err!r}"
        if case.one_line:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("loracc: error: "), err
        if not lay.out_preexists:
            assert not lay.out.exists() and not lay.out.is_symlink(), "partial output left"
    else:
        assert lay.out.is_dir()
    assert mc.tmp_entries(lay.out) == [], "temporary entries left"
    assert _snapshot(lay) == before, "an input changed"
    if lay.marker is not None:
        assert not lay.marker.exists(), "loracc unpickled a file"


def test_merge_ok_results_match_fp64_reference(tmp_path: Path) -> None:
    """The exit-0 cases wrote the right numbers (fp64 reference, rounded once)."""
    for name in ("config-unknown-field", "output-exists-force", "hf-cache-links"):
        lay = mc.build_case(CASES[name], tmp_path / name)
        base = _load_folder(lay.base)
        adapter = load_file(lay.adapter / "adapter_model.safetensors")
        code, _, err = run_cli(lay.argv)
        assert code == 0, err
        _assert_close_to_reference(_load_folder(lay.out), mc.reference_merge(base, adapter, 2.0))
        if name == "output-exists-force":
            assert not (lay.out / "keep.txt").exists()
        assert json.loads((lay.out / "config.json").read_text())["model_type"] == "llama"


def test_allow_nonfinite_writes_the_nan(tmp_path: Path) -> None:
    lay = mc.build_case(CASES["adapter-nan-allowed"], tmp_path / "c")
    base = _load_folder(lay.base)
    adapter = load_file(lay.adapter / "adapter_model.safetensors")
    code, _, err = run_cli(lay.argv)
    assert code == 0, err
    got = _load_folder(lay.out)
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert bool(torch.isnan(q).any())
    _assert_close_to_reference(got, mc.reference_merge(base, adapter, 2.0))


def _ort_run(model: Path, x: Any, adapter: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    lora = ort.LoraAdapter()
    if adapter is not None:
        lora.Load(str(adapter))
        run_options.add_active_adapter(lora)
    return sess.run(None, {"x": x}, run_options)[0]


def test_onnx_corpus_inputs_are_valid(tmp_path: Path) -> None:
    """The hand-written ONNX base and keep-lora model are real: they export, pack and run, and
    compute the fp64 reference (so each ONNX case fails for its own defect, nothing else).
    """
    pytest.importorskip("onnxruntime")
    import numpy as np

    base = {k: v.double().numpy() for k, v in mc.base_tensors().items()}
    x = np.random.default_rng(0).standard_normal((1, mc.HIDDEN)).astype(np.float32)

    def forward(delta: dict[str, Any]) -> Any:
        h = x.astype(np.float64)
        for i in range(mc.LAYERS):
            mods = [f"model.layers.{i}.self_attn.{t}" for t in mc.TARGETS]
            h = sum(h @ (base[f"{m}.weight"] + delta.get(m, 0.0)).T for m in mods)
        return h

    def deltas(adapter: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = {}
        for key, a in adapter.items():
            if key.endswith(".lora_A.weight"):
                m = key.removesuffix(".lora_A.weight")
                b = adapter[f"{m}.lora_B.weight"]
                out[m.removeprefix(mc.PREFIX)] = 2.0 * (b.double() @ a.double()).numpy()
        return out

    lay = mc.build_onnx_valid(tmp_path / "merged")
    code, _, err = run_cli(lay.argv)
    assert code == 0, err
    want = forward(deltas(mc.adapter_tensors()))
    np.testing.assert_allclose(_ort_run(lay.out, x), want, rtol=1e-4, atol=1e-5)

    lay = mc.build_slotted_valid(tmp_path / "slotted")
    code, _, err = run_cli(lay.argv)
    assert code == 0, err
    want = forward(deltas(mc.adapter_tensors(targets=("q_proj",))))
    got = _ort_run(lay.base / "model.onnx", x, lay.out)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        _ort_run(lay.base / "model.onnx", x), forward({}), rtol=1e-4, atol=1e-5
    )


def test_every_corpus_case_is_documented(repo_root: Path) -> None:
    doc = (repo_root / "docs" / "ERRORS.md").read_text()
    missing = [c.name for c in mc.CASES if f"`{c.name}`" not in doc]
    assert not missing, f"docs/ERRORS.md does not list {missing}"
    table = f"{mc.TABLE_START}\n{mc.markdown_table()}\n{mc.TABLE_END}"
    assert table in doc, (
        "stale table: run python -m tests.support.make_corpus --update-doc docs/ERRORS.md"
    )


# ------------------------------------------------------------------------------------------------
# A real process: stderr, exit status, --debug


def _subprocess(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    return subprocess.run(
        [sys.executable, "-m", "loracc", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=repo_root,
    )


def test_debug_shows_the_traceback_in_a_real_process(tmp_path: Path, repo_root: Path) -> None:
    """A real process: exit status 2, the traceback with --debug, then the same one line."""
    lay = mc.build_case(CASES["base-offsets-past-end"], tmp_path / "c")
    code, _, plain = run_cli(lay.argv)
    assert code == 2 and len(plain.strip().splitlines()) == 1
    debug = _subprocess(repo_root, "--debug", *lay.argv)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "FormatError" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == plain.strip()
    assert not lay.out.exists() and mc.tmp_entries(lay.out) == []


def test_reference_is_independent() -> None:
    """Sanity of the fp64 reference itself on one hand-computed entry."""
    base = {"m.weight": torch.tensor([[1.0, 2.0]])}
    adapter = {
        f"{mc.PREFIX}m.lora_A.weight": torch.tensor([[1.0, 1.0]]),
        f"{mc.PREFIX}m.lora_B.weight": torch.tensor([[3.0]]),
    }
    ref = mc.reference_merge(base, adapter, 0.5)["m.weight"]
    assert ref.tolist() == [[2.5, 3.5]] and math.isclose(float(ref.sum()), 6.0)
