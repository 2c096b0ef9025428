"""The fenced code blocks of README.md and docs/*.md, for tests/e2e/test_docs_run.py.

Every fence carries a language: ``bash`` / ``sh`` / ``python`` blocks are run by the test,
``text`` blocks (output, diagrams, transcripts) are not code. A shell or Python block that is not
meant to run says so, with its reason, in an HTML comment on the line before its fence (invisible
when the Markdown is rendered)::

    <!-- not-run: rewrites the checked-in golden/ folder -->
    ```bash
    python scripts/regen_golden.py
    ```

A block that needs an optional package names its module the same way,
``<!-- needs: onnxruntime_genai -->``: it runs where that module is installed and is reported as
skipped elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CODE", "FENCE_LANGUAGES", "Block", "doc_files", "extract"]

# Shell and Python blocks: what the docs-run test executes.
CODE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
# Every language a fence may carry; "text" is output, diagrams and transcripts.
FENCE_LANGUAGES = {*CODE, "text", "yaml", "json", "toml"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<key>not-run|needs):(?P<value>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and why it is not run (if so)."""

    file: str  # relative to the checkout root
    line: int  # 1-based line of the opening fence
    language: str  # the fence's first word ("" when it has none)
    code: str  # the lines between the fences, the fence's indentation removed
    not_run: str | None = None  # the marker's reason ("" when the marker has none)
    needs: tuple[str, ...] = ()  # modules the block imports or runs that may not be installed

    @property
    def kind(self) -> str | None:
        """``"bash"`` or ``"python"`` for a block the test runs, else None."""
        return CODE.get(self.language)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path) -> list[Path]:
    """README.md and docs/*.md (the user-facing docs), in a stable order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def extract(path: Path, root: Path) -> list[Block]:
    """The fenced blocks of the Markdown file ``path``, with their not-run markers.

    Raises:
        ValueError: a fence is never closed.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(root).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].strip().split(" ")[0] if opening["info"].strip() else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        else:
            raise ValueError(f"{rel}:{start + 1}: fence never closed")
        markers = _markers(lines, start)
        blocks.append(
            Block(
                rel,
                start + 1,
                language,
                "\n".join(body) + "\n",
                markers.get("not-run"),
                tuple(markers.get("needs", "").split()),
            )
        )
        i += 1
    return blocks


def _markers(lines: list[str], fence: int) -> dict[str, str]:
    """``not-run`` / ``needs`` markers on the comment lines right above the fence (blank lines
    between are allowed)."""
    found: dict[str, str] = {}
    j = fence - 1
    while j >= 0:
        if not lines[j].strip():
            j -= 1
            continue
        marker = _MARKER.match(lines[j])
        if not marker:
            break
        found[marker["key"]] = marker["value"].strip()
        j -= 1
    return found
