"""The docs run as written: every shell and Python block of README.md and docs/*.md, and the
``run:`` steps of the example CI workflow (docs/examples/golden-check.yml).

Each doc's blocks run in order, as a user pasting them one after another would, in a folder that
holds tiny real files under the docs' placeholder names (tests/support/doc_fixtures.py): shell
blocks through ``bash -eo pipefail``, Python blocks in a fresh interpreter. A block that is not
meant to run carries ``<!-- not-run: reason -->`` (tests/support/doc_blocks.py); each is listed as
a skip with its reason in the test summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.support.doc_blocks import FENCE_LANGUAGES, Block, doc_files, extract
from tests.support.doc_fixtures import build_workspace

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "docs" / "examples" / "golden-check.yml"
# onnxruntime's warning for each adapter slot at the default log level; loracc silences it.
SLOT_WARNING = "appears in graph inputs"
# GitHub Actions runs a `run:` step as `bash --noprofile --norc -eo pipefail {0}`.
ACTIONS_BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]

BLOCKS: list[Block] = [b for path in doc_files(ROOT) for b in extract(path, ROOT)]
NOT_RUN = [b for b in BLOCKS if b.kind and b.not_run is not None]
DOCS_WITH_CODE = sorted({b.file for b in BLOCKS if b.kind and b.not_run is None})


@pytest.fixture(scope="session")
def docs_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("docs") / "template")


@pytest.fixture
def workspace(docs_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(docs_template, tmp_path / "ws", symlinks=False))


@pytest.fixture(scope="session")
def approved_template(docs_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs' folder with the goldens recorded, as the workflow expects the repository."""
    root = Path(shutil.copytree(docs_template, tmp_path_factory.mktemp("approved") / "ws"))
    _record_goldens(root)
    return root


@pytest.fixture
def approved(approved_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(approved_template, tmp_path / "ws"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the venv's `loracc` and `python` first, as after `. .venv/bin/activate`
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess[str]:
    if block.kind == "python":
        return _run([sys.executable, "-c", block.code], cwd)
    return _run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", block.code], cwd)


def _failure(what: str, code: str, done: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{what} exited {done.returncode}:\n{code}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )


# --------------------------------------------------------------------------------------------
# The docs' blocks


def _missing(block: Block) -> list[str]:
    return [m for m in block.needs if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("doc", DOCS_WITH_CODE)
def test_doc_blocks_run_as_written(doc: str, workspace: Path) -> None:
    skipped = []
    for block in (b for b in BLOCKS if b.file == doc and b.kind and b.not_run is None):
        if _missing(block):
            skipped.append(f"{block.where} (needs {', '.join(_missing(block))})")
            continue
        done = run_block(block, workspace)
        assert done.returncode == 0, _failure(block.where, block.code, done)
        assert SLOT_WARNING not in done.stderr, f"{block.where}: onnxruntime's slot warnings"
    if skipped:
        pytest.skip(f"ran every other block; not installed here: {'; '.join(skipped)}")


@pytest.mark.parametrize("block", NOT_RUN, ids=[b.where for b in NOT_RUN])
def test_not_run_block_is_listed_with_its_reason(block: Block) -> None:
    assert block.not_run, f"{block.where}: a not-run marker needs a reason"
    pytest.skip(f"{block.where} not-run: {block.not_run}")


def test_every_fence_names_its_language() -> None:
    """A fence without a language would escape the test silently: output is ```text."""
    unnamed = [f"{b.where} ({b.language or 'none'})" for b in BLOCKS]
    unnamed = [w for w, b in zip(unnamed, BLOCKS, strict=True) if b.language not in FENCE_LANGUAGES]
    assert not unnamed, f"fences need a language from {sorted(FENCE_LANGUAGES)}: {unnamed}"


def test_not_run_markers_sit_on_code_blocks_and_give_a_reason() -> None:
    for path in doc_files(ROOT):
        rel = path.relative_to(ROOT).as_posix()
        markers = path.read_text().count("<!-- not-run:")
        marked = [b for b in BLOCKS if b.file == rel and b.not_run is not None]
        assert markers == len(marked), f"{rel}: a not-run marker is not right above a fence"
        needs = [b for b in BLOCKS if b.file == rel and b.needs]
        assert path.read_text().count("<!-- needs:") == len(needs), f"{rel}: a stray needs marker"
        for b in marked:
            assert b.kind, f"{b.where}: not-run marks a shell or Python block, not ```{b.language}"
            assert b.not_run, f"{b.where}: not-run marker without a reason"


def test_extractor_reads_indented_fences_markers_and_languages(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "1. step\n\n   ```bash\n   echo one\n     indented\n   ```\n\n"
        "<!-- not-run: needs a GPU -->\n<!-- needs: onnxruntime_genai tokenizers -->\n\n"
        "```python\nprint(2)\n```\n````text\n```\n````\n"
    )
    one, two, three = extract(doc, tmp_path)
    assert (one.line, one.kind, one.not_run) == (3, "bash", None)
    assert one.code == "echo one\n  indented\n"
    assert (two.kind, two.not_run, two.code) == ("python", "needs a GPU", "print(2)\n")
    assert two.needs == ("onnxruntime_genai", "tokenizers") and one.needs == ()
    assert (three.kind, three.code) == (None, "```\n")
    (tmp_path / "open.md").write_text("```bash\necho\n")
    with pytest.raises(ValueError, match="never closed"):
        extract(tmp_path / "open.md", tmp_path)


def test_a_failing_block_fails_the_doc(workspace: Path) -> None:
    """The runner is not vacuous: a block's error (an undefined name, a failed command) fails."""
    bad_python = Block("x.md", 1, "python", "import loracc\nloracc.io.ort.providers('auto')\n")
    done = run_block(bad_python, workspace)
    assert done.returncode != 0 and "has no attribute 'ort'" in done.stderr
    bad_shell = Block("x.md", 1, "bash", "loracc run --model missing.onnx --inputs INPUTS.npz\n")
    assert run_block(bad_shell, workspace).returncode == 2


# --------------------------------------------------------------------------------------------
# onnxruntime's slot warnings: loracc's sessions are quiet, a plain session is not


def test_loracc_sessions_do_not_print_the_slot_warnings(workspace: Path) -> None:
    model, adapter = "artifacts/model.onnx", "artifacts/support.onnx_adapter"
    plain = f"import onnxruntime as ort\nort.InferenceSession({model!r})\n"
    noisy = _run([sys.executable, "-c", plain], workspace)
    assert noisy.returncode == 0 and noisy.stderr.count(SLOT_WARNING) >= 2  # what users see
    helper = (
        "from loracc.io import ort\n"
        f"ort.session({model!r})\n"
        f"ort.open_session({model!r}, 'cpu', adapter={adapter!r})\n"
    )
    for argv in (  # `loracc golden`: the workflow's tests
        [sys.executable, "-c", helper],
        ["loracc", "run", "--model", model, "--adapter", adapter, "--inputs", "INPUTS.npz"],
    ):
        done = _run(argv, workspace)
        assert done.returncode == 0, _failure(" ".join(argv), "", done)
        assert SLOT_WARNING not in done.stderr, f"{argv}: {done.stderr[:500]}"


# --------------------------------------------------------------------------------------------
# The example workflow


def _workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(job: str) -> list[dict[str, Any]]:
    return list(_workflow()["jobs"][job]["steps"])


def _record_goldens(ws: Path) -> None:
    """Record the goldens the workflow checks, with docs/GOLDEN.md's record block."""
    (record,) = [b for b in BLOCKS if b.file == "docs/GOLDEN.md" and "golden record" in b.code]
    done = run_block(record, ws)
    assert done.returncode == 0, _failure(record.where, record.code, done)


# `loracc` with torch unimportable: what the ONNX job's torch-free install gives.
_NO_TORCH_LORACC = f"""#!{sys.executable}
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from loracc.cli import main
sys.exit(main())
"""


def _run_steps(
    ws: Path, job: str, *, without_torch: bool = False
) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
    argv_prefix: list[str] = []
    if without_torch:
        shim = ws / ".no-torch" / "loracc"
        shim.parent.mkdir(exist_ok=True)
        shim.write_text(_NO_TORCH_LORACC)
        shim.chmod(0o755)
        argv_prefix = ["env", f"PATH={shim.parent}{os.pathsep}{_env()['PATH']}"]
    ran = []
    for step in _steps(job):
        if "run" not in step or step.get("name", "").startswith("Install"):
            continue  # `uses:` steps are GitHub's; the install is replaced by this checkout's venv
        done = _run([*argv_prefix, *ACTIONS_BASH, step["run"]], ws)
        assert SLOT_WARNING not in done.stderr, f"{step['name']}: onnxruntime's slot warnings"
        ran.append((step["name"], done))
        if done.returncode != 0:
            break
    return ran


def _install(job: str) -> list[str]:
    (install,) = [s["run"] for s in _steps(job) if s.get("name", "").startswith("Install")]
    return [shlex.split(line) for line in install.strip().splitlines()][-1]


def test_workflow_installs_loracc_from_git_and_torch_only_where_needed() -> None:
    """loracc is not on the package index; an ONNX check needs no torch, a merged folder does."""
    assert _workflow()["env"]["LORACC_GIT"].startswith("git+https://")
    pip = ["python", "-m", "pip", "install"]
    assert _install("onnx") == [*pip, "loracc[onnx] @ $LORACC_GIT", "onnxruntime"]
    assert _install("cuda") == [*pip, "loracc[onnx] @ $LORACC_GIT", "onnxruntime-gpu"]
    assert _install("merged") == [*pip, "loracc[torch] @ $LORACC_GIT"]


@pytest.mark.parametrize("job", ["onnx", "merged"])
def test_workflow_steps_pass_on_approved_artifacts(approved: Path, job: str) -> None:
    ran = _run_steps(approved, job, without_torch=job == "onnx")
    assert [name for name, _ in ran] == [
        s["name"] for s in _steps(job) if "run" in s and not s["name"].startswith("Install")
    ]
    for name, done in ran:
        assert done.returncode == 0, _failure(name, "", done)
    if job == "onnx":
        assert (approved / "golden-support.json").is_file()


@pytest.mark.parametrize("case", ["regression", "bad input"])
def test_workflow_step_keeps_the_exit_code(approved: Path, case: str) -> None:
    """1 (a regression) stays 1 and 2 (bad input) stays 2, with the report printed."""
    golden = approved / "goldens" / "support.npz"
    if case == "regression":  # the recorded outputs moved: as if the artifact had changed
        with np.load(golden) as z:
            arrays = {k: z[k] for k in z.files}
        for key in arrays:
            if key.startswith("output/"):
                arrays[key] = arrays[key] + 1.0
        np.savez(golden, **arrays)
    else:
        golden.unlink()
    name, done = _run_steps(approved, "onnx", without_torch=True)[0]
    code = {"regression": 1, "bad input": 2}[case]
    assert done.returncode == code, _failure(name, "", done)
    assert done.stdout == (approved / "golden-support.json").read_text()
    report = json.loads(done.stdout)  # --json: one JSON object whatever the exit code
    assert (report["ok"], report["exit_code"]) == (False, code)
