"""``loracc.io.ort.write_adapter`` writes the values given, also for arrays it must convert.

An OrtValue only points at its array and ``AdapterFormat`` keeps the pointers: a converted copy
(a transposed, non-contiguous array; bf16 bits made from floats) was freed before the file was
written, which then held whatever the memory held next (7.6e31 for a transposed fp32 array).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loracc.io.ort import BFLOAT16, from_bf16_bits, read_adapter, to_bf16_bits, write_adapter

FLOAT = 1  # onnx.TensorProto.FLOAT


def test_converted_arrays_are_written_as_given(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((64, 48)).astype(np.float32) for _ in range(16)]
    params = {f"t{i}": (w.T, FLOAT) for i, w in enumerate(weights)}  # views, not contiguous
    params |= {f"b{i}": (w, BFLOAT16) for i, w in enumerate(weights)}  # floats -> bf16 bits
    path = tmp_path / "a.onnx_adapter"
    write_adapter(path, params)
    read = read_adapter(path)
    for i, w in enumerate(weights):
        shape, kind, data = read[f"t{i}"]
        assert shape == (48, 64) and kind == FLOAT
        np.testing.assert_array_equal(np.frombuffer(data, np.float32).reshape(shape), w.T)
        shape, kind, data = read[f"b{i}"]
        assert kind == BFLOAT16
        got = from_bf16_bits(np.frombuffer(data, np.uint16)).reshape(shape)
        np.testing.assert_array_equal(got, from_bf16_bits(to_bf16_bits(w)))
