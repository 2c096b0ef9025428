"""Print the deployment matrix: each exporter × mode cell's error vs PEFT, or its refusal.

The cases are tests/support/deploy_cases.py's (the test tests/e2e/test_deploy_matrix.py checks
the same cells against their tolerances). ``--markdown`` prints only the table docs/ONNX.md
holds; by default the refusals' reasons and the tolerances' reasons follow it.

Usage: python scripts/deploy_matrix.py [--markdown]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.support.deploy_cases import MODES, exporters, run_cell, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="the table only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deploy_matrix_") as tmp:
        rows = exporters(Path(tmp) / "models")
        cells = [
            run_cell(ex, mode, Path(tmp) / f"{i}_{j}")
            for i, ex in enumerate(rows)
            for j, mode in enumerate(MODES)
        ]
    print(table(cells, rows))
    if not args.markdown:
        print()
        for c in cells:
            if c.refusal is not None:
                print(f"refused: {c.exporter} / {c.mode}: {c.refusal}")
        for ex in rows:
            print(f"tolerance {ex.name}: {ex.tolerance:.0e} ({ex.why_tolerance})")
            for mode, (_, tolerance, why) in ex.overrides.items():
                print(f"tolerance {ex.name} / {mode}: {tolerance:.2g} ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
