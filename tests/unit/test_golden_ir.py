"""The per-pass IR goldens (golden/ir/) match what the passes print today.

Runs the ``--check`` logic of scripts/regen_golden.py for the ``ir`` suite. The goldens are
reviewed text: a change in a pass's output shows up as a diff here, and is accepted by running
``python scripts/regen_golden.py`` and committing the new files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest

from scripts import regen_golden

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def regen() -> ModuleType:
    return regen_golden


def test_ir_goldens_up_to_date(regen):
    problems = regen.check(["ir"])
    assert not problems, "\n".join(problems) + "\nrun: python scripts/regen_golden.py"


def test_every_registered_pass_has_a_golden(regen):
    from loracc.passes import PASSES

    covered = {spec.split("{")[0] for case in regen.IR_CASES for spec in case.passes}
    assert covered == set(PASSES)


def test_check_reports_changed_missing_and_stale_files(regen, tmp_path):
    root = tmp_path / "golden"
    shutil.copytree(REPO / "golden" / "ir", root / "ir")
    assert regen.check(["ir"], root=root) == []
    changed = root / "ir" / "truncate" / "before.txt"
    changed.write_text(changed.read_text().replace("rank=3", "rank=4", 1))
    (root / "ir" / "pissa" / "after-reconstruct-residual.txt").unlink()
    (root / "ir" / "pissa" / "stray.txt").write_text("x")
    problems = "\n".join(regen.check(["ir"], root=root))
    assert "-  kind=embedding rank=4" in problems and "+  kind=embedding rank=3" in problems
    assert "missing golden/ir/pissa/after-reconstruct-residual.txt" in problems
    assert "stale file golden/ir/pissa/stray.txt" in problems
    assert regen.main(["--check", "--suite", "ir"]) == 0
