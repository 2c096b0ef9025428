"""MatMulNBits weights dequantized as the op defines, in numpy: the int4/int8 reference.

Independent of loracc (used by tests/e2e/test_onnx_quant.py and scripts/make_genai_fixtures.py
to build PEFT references on the dequantized float model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed (N, blocks, bytes) values, low bits first, as (N, blocks * values per byte)."""
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1).astype(np.int32)
    per = 8 // bits
    mask = (1 << bits) - 1
    return np.stack([(flat >> (bits * i)) & mask for i in range(per)], -1).reshape(rows, -1)


def dequantize(node: Any, inits: Mapping[str, np.ndarray], *, steps: bool = False) -> np.ndarray:
    """The (N, K) = (out, in) weight of MatMulNBits ``node``: (q - zero_point) * scale per block
    (no zero points: symmetric, 2^(bits-1)); ``steps``: each element's |scale| instead."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    q = unpack(inits[node.input[1]], bits)[:, : blocks * block].reshape(n, blocks, block)
    scales = inits[node.input[2]].reshape(n, blocks).astype(np.float64)
    if steps:
        return np.repeat(np.abs(scales), block, axis=1)[:, :k]
    if len(node.input) > 3 and node.input[3]:
        zero = unpack(inits[node.input[3]].reshape(n, -1), bits)[:, :blocks]
    else:
        zero = np.full((n, blocks), 1 << (bits - 1))
    return ((q - zero[:, :, None]) * scales[:, :, None]).reshape(n, -1)[:, :k]
