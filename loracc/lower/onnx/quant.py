"""Quantized weight uses: onnxruntime's int4/int8 ``MatMulNBits`` and int8 ``MatMulInteger``.

Two schemes are recognised as the weight use of a Linear module (the site's weight in the
reference orientation (out, in) = (N, K) is their dequantized weight):

``com.microsoft::MatMulNBits`` (onnxruntime-genai ``-p int4``, onnxruntime.quantization's
``MatMulNBitsQuantizer``): inputs ``A, B, scales[, zero_points[, g_idx[, bias]]]``, attributes
``K, N, bits, block_size[, accuracy_level]``. ``B`` is (N, k_blocks, blob) uint8, each row's
K values in blocks of ``block_size`` (the last padded), ``8 / bits`` values per byte, low bits
first; ``scales`` (N·k_blocks) in the activation dtype; ``zero_points`` packed the same way
(absent: ``2^(bits-1)``). With ``b = k // block_size``:
``W[n, k] = (q[n, k] - zp[n, b]) · scale[n, b]``.

``MatMulInteger`` as ``quantize_dynamic`` writes it: ``x`` → ``DynamicQuantizeLinear`` →
``MatMulInteger(x_q, W_q, x_zp, w_zp)`` → ``Cast`` → ``Mul(·, x_scale · w_scale)``. ``W_q`` is
(K, N) int8/uint8 with a per-tensor or per-column scale and zero point; the float input of the
``DynamicQuantizeLinear`` and the output of the final ``Mul`` are the Linear's input and output.

Keep-lora leaves the quantized node as it is and adds the float LoRA branch from the Linear's
float input to its float output. A merge into ``MatMulNBits`` dequantizes, adds the delta in
fp32, and requantizes with the node's scheme (bits, block size, zero points or symmetric): on
the node's own grid (scales and zero points kept) for each block whose values still fit its
range, else by onnxruntime's own block quantizer (``quantize_matmul_4bits`` /
``quantize_matmul_8bits``); the node and its attributes (``accuracy_level`` included) stay.
``MatMulInteger`` merges are refused (not built: its weight scale is folded into the
activation-scale ``Mul``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from loracc.errors import UnsupportedError
from loracc.io.onnx_model import tensor_dims
from loracc.io.ort import block_quantizer

__all__ = [
    "QUANT_OPS",
    "DequantScheme",
    "IntegerScheme",
    "NBitsScheme",
    "QuantScheme",
    "requantized",
    "scheme_of",
]

QUANT_OPS = ("MatMulNBits", "MatMulInteger")
_NBITS_ATTRS = frozenset({"K", "N", "bits", "block_size", "accuracy_level"})


def _initializer(value: ir.Value | None) -> ir.Value | None:
    return value if value is not None and value.const_value is not None else None


def _tensor(value: ir.Value) -> ir.TensorProtocol:
    """The constant of an initializer :func:`_initializer` accepted."""
    tensor = value.const_value
    assert tensor is not None
    return tensor


def _shape(value: ir.Value) -> tuple[int, ...]:
    return tensor_dims(_tensor(value).shape)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(rows, ...) packed uint8 → (rows, count) values, low bits first."""
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1)
    if bits == 8:
        return flat[:, :count].astype(np.int32)
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(flat >> (bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(rows, -1)[:, :count].astype(np.int32)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, count) values → (rows, ceil(count·bits/8)) uint8, low bits first (zero padded)."""
    per = 8 // bits
    rows, count = values.shape
    padded = np.zeros((rows, -(-count // per) * per), dtype=np.uint8)
    padded[:, :count] = values
    groups = padded.reshape(rows, -1, per)
    out = np.zeros(groups.shape[:2], dtype=np.uint8)
    for i in range(per):
        out |= (groups[:, :, i] << (bits * i)).astype(np.uint8)
    return out


@dataclass(frozen=True)
class _MatMulLike:
    """A quantized weight read by ``node``: input 0 the float activation, its output the result."""

    node: ir.Node

    def input(self, index: int) -> ir.Value:
        value = self.node.inputs[index]
        assert value is not None
        return value

    @property
    def activation(self) -> ir.Value:
        return self.input(0)

    @property
    def output_node(self) -> ir.Node:
        return self.node


@dataclass(frozen=True)
class NBitsScheme(_MatMulLike):
    """A ``MatMulNBits`` node's block quantization."""

    K: int
    N: int
    bits: int
    block_size: int
    scales: ir.Value
    zero_points: ir.Value | None
    refusal: str | None

    @property
    def op(self) -> str:
        return "MatMulNBits"

    @property
    def weight_input(self) -> ir.Value:
        return self.input(1)

    @property
    def float_dtype(self) -> ir.DataType:
        return _tensor(self.scales).dtype

    @property
    def k_blocks(self) -> int:
        return (self.K + self.block_size - 1) // self.block_size

    @property
    def shape(self) -> tuple[int, int]:
        """The dequantized weight (N, K): the reference orientation, not transposed."""
        return (self.N, self.K)

    @property
    def transposed(self) -> bool:
        return False

    def dequantize(
        self,
        packed: ir.TensorProtocol,
        tensors: tuple[ir.TensorProtocol, ir.TensorProtocol | None] | None = None,
    ) -> torch.Tensor:
        """The (N, K) fp32 weight the node computes with (``tensors``: the scales and zero
        points to use instead of the node's current ones)."""
        scale_t, zp_t = tensors or self.tensors()
        q = _unpack(packed.numpy(), self.bits, self.k_blocks * self.block_size)
        scales = scale_t.numpy().astype(np.float32)
        scales = scales.reshape(self.N, self.k_blocks)
        zp = self._zero_points(zp_t)
        q = q.reshape(self.N, self.k_blocks, self.block_size) - zp[:, :, None]
        w = (q.astype(np.float32) * scales[:, :, None]).reshape(self.N, -1)[:, : self.K]
        return torch.from_numpy(np.ascontiguousarray(w))

    def _zero_points(self, zp_t: ir.TensorProtocol | None) -> np.ndarray:
        """(N, k_blocks) zero points (absent: ``2^(bits-1)``)."""
        if zp_t is None:
            return np.full((self.N, self.k_blocks), 1 << (self.bits - 1), dtype=np.int32)
        return _unpack(zp_t.numpy().reshape(self.N, -1), self.bits, self.k_blocks)

    def tensors(self) -> tuple[ir.TensorProtocol, ir.TensorProtocol | None]:
        """The node's scales and zero points (None: symmetric)."""
        zp = _tensor(self.zero_points) if self.zero_points is not None else None
        return _tensor(self.scales), zp

    def quantize(self, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``weight`` (N, K) requantized by onnxruntime's block quantizer with this scheme:
        (packed B, scales, zero points or None), each in its initializer's shape and dtype."""
        if self.refusal is not None:
            raise UnsupportedError(self.refusal)
        quantizer = block_quantizer(self.bits)
        dtype = np.float16 if self.float_dtype == ir.DataType.FLOAT16 else np.float32
        k_blocks, per = self.k_blocks, 8 // self.bits
        rows = k_blocks * self.block_size
        padded = np.zeros((rows, self.N), dtype=dtype)
        padded[: self.K] = weight.T.to(torch.float32).numpy().astype(dtype)
        packed = np.zeros((self.N, k_blocks, (self.block_size + per - 1) // per), dtype=np.uint8)
        zero_points = np.zeros((self.N, (k_blocks + per - 1) // per), dtype=np.uint8)
        scales = np.zeros((self.N, k_blocks), dtype=dtype)
        symmetric = self.zero_points is None
        quantizer(packed, padded, scales, zero_points, self.block_size, self.N, rows, symmetric)
        weight_input = self.node.inputs[1]
        assert weight_input is not None
        packed_b = packed.reshape(_shape(weight_input))
        block_scales = scales.reshape(_shape(self.scales))
        if self.zero_points is None:
            return packed_b, block_scales, None
        return packed_b, block_scales, zero_points.reshape(_shape(self.zero_points))

    def requantize(
        self,
        weight: torch.Tensor,
        tensors: tuple[ir.TensorProtocol, ir.TensorProtocol | None],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``weight`` (N, K) on the node's grid: each block keeps its scale and zero point
        (``tensors``, the node's original ones) where its values round into the quantized range,
        so a weight the edit leaves alone keeps its bytes and a small delta does not re-round the
        whole block; other blocks are requantized by onnxruntime's quantizer (:meth:`quantize`)."""
        ort_packed, ort_scales, ort_zp = self.quantize(weight)
        n, kb, bs, bits = self.N, self.k_blocks, self.block_size, self.bits
        scale_t, zp_t = tensors
        old_scales = scale_t.numpy().astype(np.float32).reshape(n, kb)
        old_zp = self._zero_points(zp_t)
        w: np.ndarray = np.zeros((n, kb * bs), dtype=np.float32)
        w[:, : self.K] = weight.to(torch.float32).numpy()
        w = w.reshape(n, kb, bs)
        step = old_scales[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            on_grid = np.rint(np.where(step != 0, w / step, np.where(w == 0, 0.0, np.inf)))
        q_grid = on_grid + old_zp[:, :, None]
        fits = ((q_grid >= 0) & (q_grid <= (1 << bits) - 1)).all(axis=2)
        q_ort = _unpack(ort_packed, bits, kb * bs).reshape(n, kb, bs)
        q = np.where(fits[:, :, None], q_grid, q_ort).astype(np.uint8)
        packed = _pack(q.reshape(n * kb, bs), bits).reshape(ort_packed.shape)
        scales = np.where(fits, old_scales, ort_scales.reshape(n, kb).astype(np.float32))
        scales = scales.astype(ort_scales.dtype).reshape(ort_scales.shape)
        if zp_t is None or ort_zp is None:
            return packed, scales, None
        if fits.all():
            return packed, scales, zp_t.numpy().reshape(ort_zp.shape)
        new_zp = _unpack(ort_zp.reshape(n, -1), bits, kb)
        zp = _pack(np.where(fits, old_zp, new_zp).astype(np.uint8), bits)
        return packed, scales, zp.reshape(ort_zp.shape)


class _ScaledWeight:
    """A (K, N) integer initializer dequantized by ``scale`` (int8 schemes, merge refused)."""

    scale: ir.Value

    @property
    def float_dtype(self) -> ir.DataType:
        return _tensor(self.scale).dtype

    @property
    def transposed(self) -> bool:
        return True

    @staticmethod
    def _no_merge(node: ir.Node, what: str) -> str:
        return (
            f"{node.name or node.op_type}: merging into {what} is not supported; export with "
            "--keep-lora, or merge into the float model and quantize it again"
        )


@dataclass(frozen=True)
class IntegerScheme(_ScaledWeight):
    """A ``MatMulInteger`` node of ``quantize_dynamic``'s pattern (int8 weight, dynamic input)."""

    node: ir.Node
    activation: ir.Value
    output_node: ir.Node
    scale: ir.Value
    zero_point: ir.Value | None

    @property
    def op(self) -> str:
        return "MatMulInteger"

    @property
    def weight_input(self) -> ir.Value:
        value = self.node.inputs[1]
        assert value is not None
        return value

    @property
    def refusal(self) -> str:
        return self._no_merge(self.node, "a MatMulInteger (int8 dynamic quantization) base")

    def dequantize(self, weight: ir.TensorProtocol) -> torch.Tensor:
        """The (K, N) fp32 weight (stored orientation)."""
        q = weight.numpy().astype(np.float32)
        scale = _tensor(self.scale).numpy().astype(np.float32)
        zp = (
            _tensor(self.zero_point).numpy().astype(np.float32)
            if self.zero_point is not None
            else np.float32(0)
        )
        return torch.from_numpy(np.ascontiguousarray((q - zp) * scale))


@dataclass(frozen=True)
class DequantScheme(_ScaledWeight, _MatMulLike):
    """A ``MatMul`` whose weight is ``DequantizeLinear(q, scale[, zero_point])`` of an initializer
    (QDQ: ``MatMulNBitsQuantizer``'s QDQ format, ``quantize_static``): per tensor, per axis or
    blocked (``axis``, ``block_size``)."""

    dequantize_node: ir.Node
    scale: ir.Value
    zero_point: ir.Value | None
    axis: int
    block_size: int

    @property
    def op(self) -> str:
        return "DequantizeLinear"

    @property
    def weight_input(self) -> ir.Value:
        value = self.dequantize_node.inputs[0]
        assert value is not None
        return value

    @property
    def refusal(self) -> str:
        return self._no_merge(self.dequantize_node, "a QDQ (DequantizeLinear) weight")

    def _expand(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if values.ndim == 0 or values.size == 1:
            return values.reshape(())
        axis = self.axis % len(shape)
        if values.ndim == 1:  # per axis
            view = [1] * len(shape)
            view[axis] = -1
            return values.reshape(view)
        repeated = np.repeat(values, self.block_size, axis=axis)  # blocked
        return np.take(repeated, np.arange(shape[axis]), axis=axis)

    def dequantize(self, weight: ir.TensorProtocol) -> torch.Tensor:
        """The (K, N) fp32 weight (stored orientation), as DequantizeLinear computes it."""
        q = weight.numpy().astype(np.float32)
        scale = self._expand(_tensor(self.scale).numpy().astype(np.float32), q.shape)
        zp = (
            self._expand(_tensor(self.zero_point).numpy().astype(np.float32), q.shape)
            if self.zero_point is not None
            else np.float32(0)
        )
        return torch.from_numpy(np.ascontiguousarray((q - zp) * scale))


QuantScheme = NBitsScheme | IntegerScheme | DequantScheme


def _nbits(node: ir.Node) -> NBitsScheme | None:
    attrs = {k: a.value for k, a in node.attributes.items()}
    inputs = list(node.inputs) + [None] * 6
    scales = _initializer(inputs[2])
    if scales is None or not all(k in attrs for k in ("K", "N", "bits", "block_size")):
        return None
    zero_points = _initializer(inputs[3]) if inputs[3] is not None else None
    weight = _initializer(inputs[1])
    if weight is None or (inputs[3] is not None and zero_points is None):
        return None
    K, N, bits, block_size = (int(attrs[k]) for k in ("K", "N", "bits", "block_size"))
    if min(K, N, block_size) <= 0 or bits not in (2, 4, 8):
        return None
    k_blocks, per = -(-K // block_size), 8 // bits
    fits = (
        int(np.prod(_shape(weight))) == N * k_blocks * -(-block_size // per)
        and _shape(weight)[0] == N
        and int(np.prod(_shape(scales))) == N * k_blocks
        and (zero_points is None or int(np.prod(_shape(zero_points))) == N * -(-k_blocks // per))
    )
    if not fits:  # not the layout MatMulNBits defines: left unbound, named as a near miss
        return None
    where = node.name or "MatMulNBits"
    refusal = None
    if zero_points is not None and _tensor(zero_points).dtype != ir.DataType.UINT8:
        refusal = f"{where}: float zero points cannot be requantized by onnxruntime's quantizer"
    if inputs[4] is not None:
        refusal = (
            f"{where}: MatMulNBits with g_idx (GPTQ act-order) cannot be requantized: the "
            "group order is not derivable from the weight; export with --keep-lora"
        )
    shared = [v.name for v in (weight, scales, zero_points) if v and len(v.consumers()) != 1]
    if shared:
        refusal = (
            f"{where}: {shared[0]!r} is read by other nodes too; cannot requantize it for this "
            "node alone"
        )
    unknown = sorted(set(attrs) - _NBITS_ATTRS)
    if unknown:
        refusal = f"{where}: MatMulNBits attributes {unknown} are unknown; cannot requantize"
    if bits not in (4, 8):
        refusal = f"{where}: MatMulNBits bits={attrs['bits']} cannot be requantized (4 or 8)"
    scale_dtype = _tensor(scales).dtype
    if scale_dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        refusal = f"{where}: MatMulNBits scales of {scale_dtype.name} cannot be requantized"
    return NBitsScheme(
        node=node,
        K=K,
        N=N,
        bits=bits,
        block_size=block_size,
        scales=scales,
        zero_points=zero_points,
        refusal=refusal,
    )


def _only_consumer(value: ir.Value, op: str) -> ir.Node | None:
    consumers = value.consumers()
    return consumers[0] if len(consumers) == 1 and consumers[0].op_type == op else None


def _integer(node: ir.Node) -> IntegerScheme | None:
    inputs = list(node.inputs) + [None] * 4
    quantize = inputs[0].producer() if inputs[0] is not None else None
    if quantize is None or quantize.op_type != "DynamicQuantizeLinear":
        return None
    x = quantize.inputs[0]
    cast = _only_consumer(node.outputs[0], "Cast")
    mul = _only_consumer(cast.outputs[0], "Mul") if cast is not None else None
    if x is None or mul is None:
        return None
    scales = [v for v in mul.inputs if v is not None and v.producer() is not cast]
    combine = scales[0].producer() if len(scales) == 1 else None
    if combine is None or combine.op_type != "Mul":
        return None
    x_scale = quantize.outputs[1]
    weight_scales = [v for v in combine.inputs if v is not x_scale]
    if len(weight_scales) != 1 or _initializer(weight_scales[0]) is None:
        return None
    zero_point = _initializer(inputs[3])
    if inputs[3] is not None and zero_point is None:
        return None
    weight_scale = weight_scales[0]
    assert weight_scale is not None
    return IntegerScheme(node, x, mul, weight_scale, zero_point)


def _dequantized(node: ir.Node) -> DequantScheme | None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    dq = weight.producer() if weight is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    inputs = list(dq.inputs) + [None] * 3
    q, scale = _initializer(inputs[0]), _initializer(inputs[1])
    zero_point = _initializer(inputs[2])
    if q is None or scale is None or (inputs[2] is not None and zero_point is None):
        return None
    if len(_shape(q)) != 2 or not _tensor(scale).dtype.is_floating_point():
        return None
    axis, block = dq.attributes.get("axis"), dq.attributes.get("block_size")
    return DequantScheme(
        node=node,
        dequantize_node=dq,
        scale=scale,
        zero_point=zero_point,
        axis=axis.as_int() if axis is not None else 1,
        block_size=block.as_int() if block is not None else 0,
    )


def scheme_of(node: ir.Node) -> QuantScheme | None:
    """The scheme of a quantized node (or of a MatMul reading a DequantizeLinear weight) whose
    weight loracc can read, else None."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return _dequantized(node)
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        return _nbits(node)
    if node.op_type == "MatMulInteger" and node.domain in ("", "ai.onnx"):
        return _integer(node)
    return None


def requantized(
    scheme: QuantScheme, source: ir.TensorProtocol, edit: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Make the node of ``scheme`` compute with ``edit(dequantized weight)``, requantized.

    The weight, scales and zero points become lazy tensors computed together once, when the
    model is written; ``edit`` takes and returns the fp32 weight in its stored orientation and
    raises for a result that may not be written. Refused (:class:`UnsupportedError`) where the
    scheme cannot be reproduced (``scheme.refusal``, checked when the merge is planned too).
    """
    if not isinstance(scheme, NBitsScheme) or scheme.refusal is not None:
        raise UnsupportedError(scheme.refusal or "")
    weight_value = scheme.weight_input
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    original = scheme.tensors()  # before they become the lazy tensors below

    def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if not results:
            results.append(scheme.requantize(edit(scheme.dequantize(source, original)), original))
        return results[0]

    def lazy(value: ir.Value, part: int) -> ir.LazyTensor:
        tensor = _tensor(value)
        dtype, name = tensor.dtype, value.name

        def make() -> ir.TensorProtocol:
            array = compute()[part]
            assert array is not None
            return ir.Tensor(array, dtype=dtype, name=name)

        return ir.LazyTensor(
            make, dtype=dtype, shape=ir.Shape(tensor_dims(tensor.shape)), name=name
        )

    parts = [(weight_value, 0), (scheme.scales, 1), (scheme.zero_points, 2)]
    for value, part in [(v, p) for v, p in parts if v is not None]:
        value.const_value = lazy(value, part)
