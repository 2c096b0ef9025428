"""Issue 15, items 2-6: what the command line tells a new user, and what it accepts.

* ``--json`` prints one JSON object on stdout whatever the exit code (errors: ``ok``,
  ``exit_code``, ``error``), usage errors included, for every command that has the flag;
* paths as users give them: an adapter's own file, a hub-cache repository folder, a hub id
  found in the local cache; an HF folder given to ``export --onnx`` says what to do;
* progress with bytes/s and ETA, a line every few seconds when stderr is not a terminal,
  ``--progress``; the summary's time is the whole command's, broken down in ``--json``;
* ``export`` prints a summary (``-v``: the binding table and slots); ``merge --json`` counts
  skipped sites per reason;
* ``merge --dry-run`` runs every check and writes nothing; ``--dtype`` shows its short names.

Merged tensors are compared with the corpus's independent fp64 reference (``reference_merge``),
never with loracc's own output.
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from loracc.cli import main
from loracc.cli.common import Progress
from tests.support import make_corpus as mc

SCALE = mc.ALPHA / mc.RANK


def invoke(argv: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, argv, env=env, catch_exceptions=False)


def json_out(res: Result) -> dict[str, Any]:
    """stdout holds exactly one JSON object."""
    data = json.loads(res.stdout)
    assert isinstance(data, dict), res.stdout
    return data


@pytest.fixture
def lay(tmp_path: Path) -> mc.Layout:
    return mc.build_valid(tmp_path / "case")


def assert_reference_merge(out: Path) -> None:
    got = load_file(out / "model.safetensors")
    ref = mc.reference_merge(mc.base_tensors(), mc.adapter_tensors(), SCALE)
    assert set(got) == set(ref)
    for key, r in ref.items():
        assert torch.allclose(got[key].double(), r.double(), rtol=2e-6, atol=1e-7), key


# ------------------------------------------------------------------------------------------------
# 2. --json: one JSON object on stdout, errors included


def _error_argv(lay: mc.Layout, tmp: Path) -> dict[str, list[str]]:
    """A failing command line (exit 2, bad input) for every command with --json."""
    missing = str(tmp / "missing")
    return {
        "merge": ["merge", "--base", str(lay.base), "--adapter", missing, "-o", str(lay.out)],
        "convert": ["convert", "--adapter", missing, "-o", str(lay.out)],
        "inspect": ["inspect", missing],
        "export": [
            "export",
            "--onnx",
            "--base",
            f"{missing}.onnx",
            "--adapter",
            str(lay.adapter),
            "-o",
            str(tmp / "o.onnx"),
        ],
        "pack": [
            "pack",
            "--model",
            f"{missing}.onnx",
            "--adapter",
            str(lay.adapter),
            "-o",
            str(tmp / "a.onnx_adapter"),
        ],
        "golden record": ["golden", "record", "--model", missing, "-o", str(tmp / "g.npz")],
        "golden check": ["golden", "check", "--model", str(lay.base), "--golden", missing],
        "run": ["run", "--model", f"{missing}.onnx", "--inputs", f"{missing}.npz"],
    }


COMMANDS = ["merge", "convert", "inspect", "export", "pack", "golden record", "golden check", "run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_json_error_is_a_json_object(command: str, lay: mc.Layout, tmp_path: Path) -> None:
    """Before: nothing on stdout, so `--json > report.json` left an empty file."""
    res = invoke([*_error_argv(lay, tmp_path)[command], "--json"])
    assert res.exit_code == 2, res.output
    data = json_out(res)
    assert data["ok"] is False and data["exit_code"] == 2
    assert "missing" in data["error"]
    assert res.stderr.startswith("loracc: error: ") and res.stderr.count("\n") == 1


def _json_commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            found += _json_commands(cmd, (*path, name))
        elif any(p.name == "as_json" for p in cmd.params):
            found.append((*path, name))
    return found


def test_every_json_command_is_covered() -> None:
    """A command added later gets the parametrized test below without anyone listing it."""
    assert {" ".join(c) for c in _json_commands(main)} >= set(COMMANDS)


@pytest.mark.parametrize("words", _json_commands(main), ids=" ".join)
def test_every_json_command_answers_in_json(
    words: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--json` and nothing else: a usage error or a bad input, as one JSON object."""
    monkeypatch.chdir(tmp_path)
    res = invoke([*words, "--json"])
    assert res.exit_code == 2, res.output
    data = json_out(res)
    assert data["ok"] is False and data["exit_code"] == 2 and data["error"]
    assert list(tmp_path.iterdir()) == []


def test_json_golden_regression_is_exit_1_with_its_report(lay: mc.Layout, tmp_path: Path):
    """golden check's regression (exit 1): the report, marked not ok with its exit code."""
    golden = tmp_path / "g.npz"
    assert invoke(["golden", "record", "--model", str(lay.base), "-o", str(golden)]).exit_code == 0
    assert invoke(lay.argv).exit_code == 0
    res = invoke(["golden", "check", "--model", str(lay.out), "--golden", str(golden), "--json"])
    assert res.exit_code == 1, res.output
    data = json_out(res)
    assert data["ok"] is False and data["exit_code"] == 1 and data["passed"] is False


def test_json_success_says_ok(lay: mc.Layout) -> None:
    res = invoke([*lay.argv, "--json"])
    assert res.exit_code == 0, res.output
    data = json_out(res)
    assert data["ok"] is True and data["exit_code"] == 0 and data["sites"] == 4


# ------------------------------------------------------------------------------------------------
# 3. Paths as users give them


def test_adapter_file_means_its_folder(lay: mc.Layout) -> None:
    """Before: "adapter folder not found" for a file that exists."""
    argv = list(lay.argv)
    argv[argv.index("--adapter") + 1] = str(lay.adapter / "adapter_model.safetensors")
    res = invoke(argv)
    assert res.exit_code == 0, res.output
    assert_reference_merge(lay.out)


def test_other_file_as_adapter_says_give_its_folder(lay: mc.Layout) -> None:
    argv = list(lay.argv)
    argv[argv.index("--adapter") + 1] = str(lay.base / "config.json")
    res = invoke(argv)
    assert res.exit_code == 2
    assert "give the adapter's folder" in res.stderr and "config.json" in res.stderr


def _hub_cache(root: Path) -> Path:
    """A hub cache holding models--tiny--llama (refs/main -> its one snapshot); the cache."""
    lay = mc.build_case(mc.CASES_BY_NAME["base-hub-repo-folder"], root)
    return lay.base.parent.parent.parent


def test_hub_repo_folder_reads_refs_main(lay: mc.Layout, tmp_path: Path) -> None:
    """Before: "no model.safetensors" for a models--ORG--NAME folder."""
    repo = _hub_cache(tmp_path / "hub") / "models--tiny--llama"
    argv = list(lay.argv)
    argv[argv.index("--base") + 1] = str(repo)
    res = invoke(argv)
    assert res.exit_code == 0, res.output
    assert_reference_merge(lay.out)


@pytest.mark.parametrize("var", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"])
def test_hub_id_from_local_cache(var: str, lay: mc.Layout, tmp_path: Path) -> None:
    """Before: "folder not found" for tiny/llama, which transformers loads from its cache."""
    cache = _hub_cache(tmp_path / "hub")
    if var == "HF_HOME":
        cache = cache.rename(tmp_path / "home")
        (cache / "hub").mkdir()
        (cache / "models--tiny--llama").rename(cache / "hub" / "models--tiny--llama")
    elif var == "XDG_CACHE_HOME":
        (tmp_path / "xdg" / "huggingface").mkdir(parents=True)
        cache = cache.rename(tmp_path / "xdg" / "huggingface" / "hub").parent.parent
    env = {"HF_HUB_CACHE": None, "HF_HOME": None, "XDG_CACHE_HOME": None, var: str(cache)}
    argv = list(lay.argv)
    argv[argv.index("--base") + 1] = "tiny/llama"
    res = invoke(argv, env=env)  # type: ignore[arg-type]
    assert res.exit_code == 0, res.output
    assert_reference_merge(lay.out)


def test_hub_id_not_cached_says_where_it_looked(lay: mc.Layout, tmp_path: Path) -> None:
    argv = list(lay.argv)
    argv[argv.index("--base") + 1] = "tiny/llama"
    res = invoke(argv, env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert res.exit_code == 2
    assert str(tmp_path / "empty" / "models--tiny--llama") in res.stderr
    assert "does not download" in res.stderr
    assert not lay.out.exists()


def test_export_with_hf_folder_points_to_merge_and_the_docs(lay: mc.Layout, tmp_path: Path):
    """Before: "ONNX model not found" for an HF folder given to export --onnx."""
    res = invoke(["export", "--onnx", "--base", str(lay.base), "--adapter", str(lay.adapter),
                  "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    assert res.exit_code == 2
    assert "`loracc merge` takes Hugging Face folders" in res.stderr
    assert "docs/ONNX.md" in res.stderr


def test_run_with_hf_folder_says_what_run_takes(lay: mc.Layout, tmp_path: Path) -> None:
    """Before: "no .onnx file in this folder", with no word on what takes an HF folder."""
    inputs = tmp_path / "in.npz"
    inputs.write_bytes(b"")
    res = invoke(["run", "--model", str(lay.base), "--inputs", str(inputs)])
    assert res.exit_code == 2
    assert "a Hugging Face folder" in res.stderr and "golden record/check" in res.stderr


# ------------------------------------------------------------------------------------------------
# 4. Progress and wall time


def _progress(bar: bool, every: float) -> str:
    """What the display prints for 4 tensors of 1 MB, one written per second."""
    ticks = iter(range(100))
    err = io.StringIO()
    show = Progress("merging", bar=bar, every=every, clock=lambda: float(next(ticks)))
    with redirect_stderr(err):
        show(0, 4, "", 0, 4_000_000)
        for i in range(1, 5):
            show(i, 4, f"t{i}", i * 1_000_000, 4_000_000)
    return err.getvalue()


def test_progress_bar_shows_bytes_rate_and_eta() -> None:
    text = _progress(bar=True, every=5.0)
    frames = text.split("\r")[1:]
    assert len(frames) == 4 and text.endswith("\n")
    assert "25% 1.0 MB/4.0 MB 1.0 MB/s ETA 0:03 (1/4 tensors) t1" in frames[0]
    assert "100% 4.0 MB/4.0 MB 1.0 MB/s in 0:04 (4/4 tensors)" in frames[-1]


def test_progress_lines_when_not_a_terminal() -> None:
    """Not a terminal: a plain line every `every` seconds, ETA while running, time at the end."""
    assert _progress(bar=False, every=2.0).splitlines() == [
        "merging:  50% 2.0 MB/4.0 MB 1.0 MB/s ETA 0:02 (2/4 tensors)",
        "merging: 100% 4.0 MB/4.0 MB 1.0 MB/s in 0:04 (4/4 tensors)",
    ]
    assert _progress(bar=False, every=60.0) == ""  # a short run prints nothing


def test_progress_option(lay: mc.Layout) -> None:
    always = invoke([*lay.argv, "--progress", "always"])
    assert always.exit_code == 0 and "merging [" in always.stderr and "/s" in always.stderr
    never = invoke([*lay.argv[:-1], str(lay.out) + "2", "--progress", "never"])
    assert never.exit_code == 0 and never.stderr == ""


def test_summary_time_is_the_whole_command(lay: mc.Layout) -> None:
    """Before: `seconds` was the write step alone; now the command's, steps in --json."""
    data = json_out(invoke([*lay.argv, "--json"]))
    steps = data["steps"]
    assert set(steps) == {"read", "passes", "write", "startup"}
    assert data["seconds"] >= sum(steps.values()) - 0.01
    assert data["seconds"] >= steps["write"] + steps["read"]


# ------------------------------------------------------------------------------------------------
# 5. Verbosity


def test_export_prints_a_summary_and_the_table_with_v(tmp_path: Path) -> None:
    onnx = mc.build_onnx_valid(tmp_path / "onnx")
    argv = [*onnx.argv, "--keep-lora", "--dry-run"]
    quiet = invoke(argv)
    assert quiet.exit_code == 0, quiet.output
    site = "model.layers.0.self_attn.q_proj"
    assert site not in quiet.stdout and "\nslot " not in quiet.stdout
    assert "keep-lora: 4 sites bound" in quiet.stdout and "-v" in quiet.stdout
    loud = invoke([*argv, "-v"])
    assert loud.exit_code == 0
    assert site in loud.stdout and "\nslot " in loud.stdout
    assert len(loud.stdout.splitlines()) > len(quiet.stdout.splitlines()) + 4


def test_merge_json_counts_skipped_sites_per_reason(lay: mc.Layout) -> None:
    """Before: one entry per site per pass ("skipped": [{"site": ..., "reason": ...}, ...])."""
    passes = {p["pass"]: p for p in json_out(invoke([*lay.argv, "--json"]))["passes"]}
    assert passes["fold-dora"]["skipped"] == {"not DoRA": 4}
    assert passes["expand-layer-replication"]["skipped"] == {"no layer_replication": 1}


# ------------------------------------------------------------------------------------------------
# 6. merge --dry-run and --dtype


def test_merge_dry_run_writes_nothing_and_gives_the_size(lay: mc.Layout) -> None:
    before = mc.snapshot(lay.root)
    dry = invoke([*lay.argv, "--dry-run", "--dtype", "bf16", "--json"])
    assert dry.exit_code == 0, dry.output
    planned = json_out(dry)
    assert mc.snapshot(lay.root) == before and not lay.out.exists()
    assert planned["dry_run"] is True and "check" in planned["steps"]
    ref = mc.reference_merge(mc.base_tensors(), mc.adapter_tensors(), SCALE, torch.bfloat16)
    assert planned["bytes_written"] == sum(t.nbytes for t in ref.values())
    assert len(planned["changed"]) == 4 and planned["config_updates"] == {"torch_dtype": "bfloat16"}
    text = invoke([*lay.argv, "--dry-run"])
    assert "dry run, nothing written" in text.stdout and not lay.out.exists()


def test_merge_dry_run_and_paths_with_a_stack(lay: mc.Layout) -> None:
    """A stack (repeated --adapter) gets the same dry run, and each --adapter the same path
    resolution: the second adapter given by its file."""
    second = lay.root / "adapter2"
    shutil.copytree(lay.adapter, second)
    argv = [*lay.argv, "--adapter", str(second / "adapter_model.safetensors")]
    before = mc.snapshot(lay.root)
    dry = json_out(invoke([*argv, "--dry-run", "--json"]))
    assert dry["ok"] and dry["dry_run"] and len(dry["changed"]) == 4
    assert mc.snapshot(lay.root) == before and not lay.out.exists()
    real = json_out(invoke([*argv, "--json"]))
    assert real["bytes_written"] == dry["bytes_written"] and real["changed"] == dry["changed"]
    got = load_file(lay.out / "model.safetensors")
    ref = mc.reference_merge(mc.base_tensors(), mc.adapter_tensors(), 2 * SCALE)  # A twice
    for key, r in ref.items():
        assert torch.allclose(got[key].double(), r.double(), rtol=2e-6, atol=1e-7), key


def test_merge_dry_run_runs_the_checks(lay: mc.Layout, tmp_path: Path) -> None:
    """An existing output and a tensor that overflows fp16 are refused as in a real merge."""
    lay.out.mkdir()
    assert invoke([*lay.argv, "--dry-run"]).exit_code == 2
    overflow = mc.build_case(mc.CASES_BY_NAME["merged-overflow-fp16"], tmp_path / "fp16")
    res = invoke([*overflow.argv, "--dry-run"])
    assert res.exit_code == 2 and "NaN or Inf" in res.stderr
    assert not overflow.out.exists()


def test_dtype_short_names_in_help_and_errors(lay: mc.Layout) -> None:
    helptext = invoke(["merge", "--help"]).stdout
    assert "fp16" in helptext and "bf16" in helptext and "float16" in helptext
    res = invoke([*lay.argv, "--dtype", "half"])
    assert res.exit_code == 2
    assert "fp16" in res.stderr and "float16" in res.stderr
