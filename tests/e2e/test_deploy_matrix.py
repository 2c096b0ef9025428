"""The deployment matrix: every exporter × mode cell against PEFT (tests/support/deploy_cases.py).

Each cell either matches PEFT within its exporter's stated tolerance or is refused by loracc
with the reason the case states; nothing else passes. docs/ONNX.md's table
(``scripts/deploy_matrix.py --markdown``) must name the same rows and columns, show "refused"
exactly where a cell is refused, and hold figures within the tolerances.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.deploy_cases import (
    MODES,
    Cell,
    Exporter,
    exporters,
    rel_error,
    row_names,
    run_cell,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "ONNX.md"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exporter]:
    return {ex.name: ex for ex in exporters(tmp_path_factory.mktemp("deploy"))}


def test_rows_are_the_documented_ones(rows: dict[str, Exporter]) -> None:
    assert list(rows) == row_names()
    for ex in rows.values():  # each adapter changes its model's output: the cells can fail
        assert rel_error(ex.reference, ex.base_reference) > 1e-1, ex.name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", row_names())
def test_cell(rows: dict[str, Exporter], tmp_path: Path, name: str, mode: str) -> None:
    ex = rows[name]
    cell: Cell = run_cell(ex, mode, tmp_path)
    if mode in ex.refusals:
        assert cell.refusal is not None, f"{name} / {mode}: expected a refusal, got {cell.error}"
        assert re.search(ex.refusals[mode], cell.refusal), cell.refusal
        assert "Traceback" not in cell.refusal
        return
    assert cell.refusal is None, f"{name} / {mode} refused: {cell.refusal}"
    _, tolerance = ex.reference_for(mode)
    assert cell.error is not None and cell.error <= tolerance, (name, mode, cell.error)


def _doc_table() -> list[list[str]]:
    text = DOC.read_text()
    section = text[text.index("## Deployment matrix") :].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    table = []
    for line in section[start:]:
        if not line.startswith("|"):
            break  # the first table of the section only
        if not line.startswith("|---"):
            table.append([c.strip() for c in line.strip("|").split("|")])
    return table


def test_doc_table_matches_the_cases(rows: dict[str, Exporter]) -> None:
    header, *body = _doc_table()
    assert header == ["exporter", *MODES, "tolerance"]
    assert [r[0] for r in body] == row_names()
    for row in body:
        ex = rows[row[0]]
        for mode, value in zip(MODES, row[1:-1], strict=True):
            if mode in ex.refusals:
                assert value == "refused", (ex.name, mode, value)
            else:
                assert float(value) <= ex.reference_for(mode)[1], (ex.name, mode, value)
