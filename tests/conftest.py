"""Shared fixtures: PEFT oracle cases built once per session under tmp_path_factory."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every pipeline the tests run verifies the IR before and after each pass (loracc.verify).
os.environ.setdefault("LORACC_VERIFY", "1")


def _quiet_transformers() -> None:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the venv has it
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_quiet_transformers()

from tests.support import peft_oracle  # noqa: E402  (after transformers is quieted)


class CaseFactory:
    """Builds each named :data:`peft_oracle.CASE_SPECS` case at most once per session."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._cases: dict[str, peft_oracle.Case] = {}

    def get(self, name: str) -> peft_oracle.Case:
        if name not in self._cases:
            root = self._tmp.mktemp(f"case_{name}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._cases[name] = peft_oracle.build_case(name, root)
        return self._cases[name]


@pytest.fixture(scope="session")
def peft_cases(tmp_path_factory: pytest.TempPathFactory) -> CaseFactory:
    return CaseFactory(tmp_path_factory)


class MergeCache:
    """Runs ``loracc.merge`` once per (case, options) and shares the output folder."""

    def __init__(self, cases: CaseFactory, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._cases = cases
        self._tmp = tmp_path_factory
        self._outs: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def get(self, name: str, **kwargs: Any) -> tuple[peft_oracle.Case, Path]:
        case = self._cases.get(name)
        key = (name, tuple(sorted(kwargs.items())))
        if key not in self._outs:
            import loracc  # imported here so that fixture errors and loracc errors stay apart

            out = self._tmp.mktemp(f"merged_{name}") / "out"
            loracc.merge(str(case.base_dir), str(case.adapter_dir), str(out), **kwargs)
            self._outs[key] = out
        return case, self._outs[key]


@pytest.fixture(scope="session")
def merged(peft_cases: CaseFactory, tmp_path_factory: pytest.TempPathFactory) -> MergeCache:
    return MergeCache(peft_cases, tmp_path_factory)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The PEFT matrix figures (tests/e2e/test_peft_matrix.py), when that test ran."""
    matrix = sys.modules.get("tests.support.peft_matrix_cases")
    lines = matrix.RESULTS.summary_lines() if matrix is not None else []
    if lines:
        terminalreporter.section("PEFT LoRA matrix")
        for line in lines:
            terminalreporter.write_line(line)
