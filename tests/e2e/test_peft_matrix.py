"""PEFT's own LoRA test matrix: every case merged by loracc exactly as PEFT does, or refused.

See tests/support/peft_matrix_cases.py for the cases and how each is classified. A case fails
when loracc's merge is WRONG (differs from PEFT with exit 0), or refuses with a reason other than
the documented one, or refuses where PEFT merges. The session summary (tests/conftest.py) prints
the figures: cases, bit-identical, within tolerance, refused (with reasons), wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from tests.support import peft_matrix_cases as pm


def _param(case: pm.MatrixCase) -> object:
    # raises=AssertionError: an xfail case must fail on its verdict, not crash while being built.
    xfail = pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.xfail)
    marks = [xfail] if case.xfail else []
    return pytest.param(case, id=case.name, marks=marks)


def test_matrix_holds_every_lora_entry_of_peft_test_cases() -> None:
    """The 46 LoRA-family entries of peft's TEST_CASES (tests/test_custom_models.py)."""
    names = [c.name for c in pm.CASES if c.from_peft]
    assert len(names) == len(set(names)) == 46
    assert len({c.name for c in pm.CASES}) == len(pm.CASES)


@pytest.mark.parametrize("case", [_param(c) for c in pm.CASES])
def test_matrix_case(case: pm.MatrixCase, tmp_path: Path) -> None:
    outcome = pm.run_case(case, tmp_path)
    assert outcome.verdict != pm.WRONG, f"{case.name}: WRONG with exit 0: {outcome.detail}"
    if outcome.verdict == pm.WITHIN_TOLERANCE and case.oracle == "merge":
        assert not case.exact, f"{case.name}: not bit-identical to PEFT's merge: {outcome.detail}"
    if outcome.verdict == pm.REFUSED:
        assert case.refusal is not None, f"{case.name}: refused, PEFT merges it: {outcome.detail}"
        assert re.search(case.refusal, outcome.detail, re.IGNORECASE), (
            f"{case.name}: refused without the documented reason /{case.refusal}/: {outcome.detail}"
        )
