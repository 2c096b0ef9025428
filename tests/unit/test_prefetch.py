"""``loracc.io.inputs.prefetch``: a read-ahead hint that never blocks nor raises."""

from __future__ import annotations

import os
from pathlib import Path

from loracc.io.inputs import prefetch


def test_prefetch_skips_what_it_cannot_read(tmp_path: Path) -> None:
    """A FIFO named like a shard (opening it for reading would block), a missing folder and a
    file: the thread ends at once, having read nothing past the limit."""
    (tmp_path / "model-1.safetensors").write_bytes(b"\0" * 4096)
    os.mkfifo(tmp_path / "model-0.safetensors")
    thread = prefetch([tmp_path / "missing", tmp_path / "model-1.safetensors", tmp_path], 1024)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert thread.daemon  # never keeps the process alive
