"""An option that takes one value, given twice, is refused (exit 2, one line), never "last wins".

click keeps the last value of a repeated option, so ``merge --adapter A --adapter B`` once merged
B alone with exit 0. Every loracc command refuses a repeated single-valued option instead; options
meant to repeat (``--dim``, merge's and export's ``--adapter``, which stack adapters) and plain
flags are left alone.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from loracc.cli import main
from loracc.cli.common import OnceCommand


@pytest.fixture(scope="module")
def dirs(peft_cases) -> dict[str, str]:
    first, second = peft_cases.get("llama_linear"), peft_cases.get("llama_rslora")
    return {
        "BASE": str(first.base_dir),
        "A": str(first.adapter_dir),
        "B": str(second.adapter_dir),
    }


def _invoke(args: list[str] | str, dirs: dict[str, str]) -> click.testing.Result:
    """Run the CLI with BASE, A and B replaced by the case folders."""
    words = args.split() if isinstance(args, str) else args
    return CliRunner().invoke(main, [dirs.get(a, a) for a in words])


def test_merge_with_two_adapters_keeps_both(dirs, tmp_path):
    """The old bug: exit 0, "merged N sites", output identical to B alone. Now both are merged
    (a stack, tests/e2e/test_stacking.py checks the values against PEFT)."""
    both, alone = tmp_path / "both", tmp_path / "alone"
    res = _invoke(f"merge --base BASE --adapter A --adapter B -o {both}", dirs)
    assert res.exit_code == 0, res.output
    res_b = _invoke(f"merge --base BASE --adapter B -o {alone}", dirs)
    res_a = _invoke(f"merge --base BASE --adapter A -o {tmp_path / 'a'}", dirs)
    sites = [int(r.output.split()[1]) for r in (res, res_a, res_b)]
    assert sites[0] == sites[1] + sites[2] > sites[2], (res.output, res_a.output, res_b.output)
    assert (both / "model.safetensors").read_bytes() != (alone / "model.safetensors").read_bytes()


# Each: a command line (split on spaces) that is valid once the repeated option is given once.
MERGE = "merge --base BASE --adapter A -o OUT"
EXPORT = "export --onnx --base M.onnx --adapter A -o OUT"
REPEATS = {
    "merge --base": f"{MERGE} --base BASE",
    "merge -o/--output": f"{MERGE} --output OUT2",
    "merge --initial-adapter": f"{MERGE} --initial-adapter A --initial-adapter B",
    "merge --passes": f"{MERGE} --passes truncate-rank{{rank=2}} --passes fold-scaling",
    "merge --dtype": f"{MERGE} --dtype float16 --dtype bfloat16",
    "merge --weights": f"{MERGE} --weights 1 --weights 2",
    "combine --weights": "combine --adapter A --method cat --weights 1 --weights 2 -o OUT",
    "convert --adapter": "convert --adapter A --adapter B -o OUT",
    "convert --base": "convert --adapter A --base BASE --base BASE -o OUT",
    "convert --rank": "convert --adapter A --rank 2 --rank 4 -o OUT",
    "inspect --base": "inspect A --base BASE --base BASE",
    "compile --adapter": "compile --adapter A --adapter B",
    "compile --base": "compile --adapter A --base BASE --base BASE",
    "pack --adapter": "pack --model M.onnx --adapter A --adapter B -o OUT",
    "export --base": f"{EXPORT} --base N.onnx",
    "export -o/--output": f"{EXPORT} -o OUT2",
    "export --external-data/--no-external-data": f"{EXPORT} --external-data --no-external-data",
    "golden check --golden": "golden check --model M --golden G --golden H",
    "run --model": "run --model M --model N --inputs I",
}


@pytest.mark.parametrize("case", list(REPEATS))
def test_repeated_single_valued_option_is_refused(case, dirs, tmp_path):
    command, option = case.rsplit(" ", 1)
    args = [str(tmp_path / a) if a.startswith("OUT") else a for a in REPEATS[case].split()]
    res = _invoke(args, dirs)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"loracc: error: {command}: {option} given 2 times"), res.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_repeatable_options_and_plain_flags_still_repeat(dirs, tmp_path):
    """A plain flag twice changes nothing; a multiple option collects its values."""
    out = tmp_path / "out"
    res = _invoke(f"merge --base BASE --adapter A -o {out} --force --force", dirs)
    assert res.exit_code == 0, res.output
    res = _invoke("export --onnx --base M.onnx --adapter A --adapter B -o X", dirs)
    assert res.exit_code == 2 and "given 2 times" not in res.output  # M.onnx is missing


def _commands(group: click.Group) -> list[click.Command]:
    found: list[click.Command] = []
    for cmd in group.commands.values():
        found += _commands(cmd) if isinstance(cmd, click.Group) else [cmd]
    return found


def test_every_command_refuses_repeats():
    """New commands (and options) get the rule without anyone remembering it."""
    commands = _commands(main)
    assert len(commands) >= 8
    for cmd in commands:
        assert isinstance(cmd, OnceCommand), cmd.name


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("1", "--weights: 1 weight(s) for 2 adapter(s)"),
        ("1,x", "--weights: cannot read '1,x' (comma-separated numbers, e.g. 1.0,0.5)"),
        ("1,inf", "--weights: inf is not a finite number"),
    ],
)
def test_weights_read_alike_by_every_command(weights, message, dirs, tmp_path):
    """merge, export --onnx and combine read --weights with one definition: one message each,
    before any input is read (export's base does not exist)."""
    commands = {
        "merge": "merge --base BASE --adapter A --adapter B",
        "export": "export --onnx --base M.onnx --adapter A --adapter B",
        "combine": "combine --adapter A --adapter B --method cat",
    }
    for name, command in commands.items():
        out = tmp_path / name
        res = _invoke([*command.split(), "--weights", weights, "-o", str(out)], dirs)
        assert res.exit_code == 2, res.output
        assert res.output == f"loracc: error: {message}\n", (name, res.output)
        assert not out.exists()


def test_no_traceback_and_inputs_untouched(dirs, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in Path(dirs["A"]).iterdir()}
    res = _invoke(f"convert --adapter A --adapter A -o {tmp_path / 'o'}", dirs)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert {p: p.stat().st_mtime_ns for p in Path(dirs["A"]).iterdir()} == before
