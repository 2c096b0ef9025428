"""The docs stay true: every LoraConfig field loracc knows has its behaviour documented."""

from __future__ import annotations

from pathlib import Path

from loracc.io.peft_config import FIELDS

ROOT = Path(__file__).resolve().parents[2]


def test_formats_doc_lists_every_known_field_with_its_behaviour() -> None:
    text = (ROOT / "docs" / "FORMATS.md").read_text()
    for name, behaviour in FIELDS.items():
        assert f"| `{name}` | {behaviour} |" in text, f"docs/FORMATS.md: '{name}' row out of date"


def test_readme_keeps_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "./scripts/demo.sh" in text and "./scripts/test.sh" in text
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
