"""Block-wise weight quantization in numpy: a weight [K, N] (the B of `x @ B`) cut into blocks of
`group_size` rows along K, one scale per block and column, symmetric codes (no zero point), and the
two byte layouts the graphs take: ONNX Runtime's MatMulNBits and ONNX's packed INT4/INT8 tensors.

Symmetric means code = round(w / scale) with scale = max |w| of the block / (2^(bits-1) - 1), so codes
lie in [-7, 7] (int4) or [-127, 127] (int8) and zero is exact. TensorRT's weight-only GEMMs take only
zero zero-points, so both targets share this one scheme (an asymmetric zero point would have served
ONNX Runtime alone)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, numpy_helper

from hovle_edge.errors import InputError

BITS = (4, 8)


def check_group_size(rows: int, group_size: int, what: str) -> None:
    """Blocks must tile K exactly, and MatMulNBits takes only powers of two from 16 up."""
    if group_size < 16 or group_size & (group_size - 1):
        raise InputError(f"group size {group_size}: choose a power of two of at least 16 (32, 64, 128, ...)",
                         setting="group_size")
    if rows % group_size:
        raise InputError(f"group size {group_size} does not divide the input width {rows} of {what}; "
                         f"choose a group size that divides it (the largest power of two that does is "
                         f"{rows & -rows})", setting="group_size")


@dataclass
class QuantizedWeight:
    codes: np.ndarray  # int8 [K, N], in [-qmax, qmax]
    scales: np.ndarray  # [K // group_size, N], the weight's float dtype
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        blocks = self.codes.reshape(rows // self.group_size, self.group_size, cols).astype(np.float32)
        return (blocks * self.scales.astype(np.float32)[:, None, :]).reshape(rows, cols).astype(self.scales.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored in a graph: packed codes and scales."""
        return self.codes.size * self.bits // 8 + self.scales.nbytes


def quantize_weight(weight: np.ndarray, bits: int, group_size: int, what: str = "the weight",
                    clip: np.ndarray | None = None) -> QuantizedWeight:
    """Round-to-nearest, symmetric, one scale per block of `group_size` rows and per column. `clip`
    [K // g, N] (at most 1) shrinks each block's range: its largest values saturate, the rest round finer."""
    if bits not in BITS:
        raise InputError(f"{bits} bits: choose 4 or 8", setting="bits")
    rows, cols = weight.shape
    check_group_size(rows, group_size, what)
    qmax = 2 ** (bits - 1) - 1
    blocks = weight.astype(np.float32).reshape(rows // group_size, group_size, cols)
    largest = np.abs(blocks).max(axis=1)  # [K // g, N]
    if clip is not None:
        largest = largest * clip
    # Scales are rounded to the stored dtype first, so that codes are chosen for the scale the graph uses.
    scales = np.where(largest > 0, largest / qmax, 1.0).astype(weight.dtype)
    codes = np.clip(np.rint(blocks / scales.astype(np.float32)[:, None, :]), -qmax, qmax).astype(np.int8)
    return QuantizedWeight(codes.reshape(rows, cols), scales, bits, group_size)


def matmul_nbits_arrays(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, K / g, g * bits / 8], scales [N * K / g]) as com.microsoft.MatMulNBits reads them:
    B transposed to one row per output column, codes offset by 2^(bits-1) (the zero point it assumes
    when none is given), two 4-bit codes to a byte with the first in the low nibble."""
    rows, cols = weight.shape
    unsigned = (weight.codes.T.astype(np.int16) + 2 ** (weight.bits - 1)).astype(np.uint8)  # [N, K]
    unsigned = unsigned.reshape(cols, rows // weight.group_size, weight.group_size)
    if weight.bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return np.ascontiguousarray(unsigned), np.ascontiguousarray(weight.scales.T).reshape(-1)


def codes_tensor(weight: QuantizedWeight, name: str) -> TensorProto:
    """The codes as an ONNX INT4 (packed two to a byte, first in the low nibble) or INT8 tensor [K, N]."""
    if weight.bits == 8:
        return numpy_helper.from_array(weight.codes, name)
    flat = weight.codes.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    tensor = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(weight.shape))
    tensor.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return tensor
