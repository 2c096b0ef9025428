"""``.npz`` outputs keep every array whatever its name (``run -o``, ``golden record``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loracc.io.npz import read_npz, write_npz


def test_an_array_named_like_a_numpy_option_is_written(tmp_path: Path) -> None:
    arrays = {"allow_pickle": np.arange(3, dtype=np.int64), "logits": np.ones((2, 2), np.float32)}
    out = tmp_path / "out.npz"
    write_npz(out, arrays, inputs=[], force=False)
    back = read_npz(out)
    assert sorted(back) == ["allow_pickle", "logits"]
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)
    with np.load(out) as loaded:  # numpy reads it as its own
        np.testing.assert_array_equal(loaded["logits"], arrays["logits"])
