"""GGML block formats as integer codes + per-group scales, the form QuantLinear stores (numpy, no torch).

    W = scales * (q - zero_point) + mins        per group of `group` consecutive elements of a row

    type   bits  group  zero_point  scales                mins
    q8_0    8     32        0       d (fp16)              -
    q4_0    4     32        8       d (fp16)              -
    q4_1    4     32        0       d (fp16)              m (fp16)
    q5_0    8     32       16       d (fp16)              -                (codes 0..31)
    q5_1    8     32        0       d (fp16)              m (fp16)         (codes 0..31)
    q4_K    4     32        0       d*sc (fp32, exact)    -dmin*m (fp32, exact)
    q5_K    8     32        0       d*sc                  -dmin*m          (codes 0..31)
    q6_K    8     16       32       d*sc (sc int8)        -                (codes 0..63)

Every product above is exact in fp32 (fp16 mantissa x an integer of <= 8 bits), and `dequantize` evaluates
the formula in the order ggml does, so it equals `gguf.quants.dequantize` bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FLOAT_TYPES", "QUANT_TYPES", "SUPPORTED", "Codes", "codes", "dequantize", "type_id"]

FLOAT_TYPES = {0: "f32", 1: "f16", 30: "bf16"}
# q5_0 / q5_1 are llama-quantize's fallback where a row is not a multiple of 256 (q4_K -> q5_0, q5_K -> q5_1:
# GLM-4-9B's ffn_down rows of 13696, GLM-4.5-Air's experts of 1408), so K-quant files of GLM models hold them
QUANT_TYPES = {8: "q8_0", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 12: "q4_K", 13: "q5_K", 14: "q6_K"}
SUPPORTED = {**FLOAT_TYPES, **QUANT_TYPES}
_BLOCK = {8: (32, 34), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 12: (256, 144), 13: (256, 176),
          14: (256, 210)}


def type_id(name: str) -> int:
    return {v: k for k, v in SUPPORTED.items()}[name]


@dataclass
class Codes:
    """One tensor's rows as QuantLinear reads them. q: [rows, K] codes (uint8 / int8) or, for bits 4,
    `packed` [rows, K/2] in q4_0 nibble order; scales / mins: [rows, K/group]."""

    bits: int
    group: int
    zero_point: int
    scales: np.ndarray
    mins: np.ndarray | None
    q: np.ndarray | None = None
    packed: np.ndarray | None = None

    def unpacked(self) -> np.ndarray:
        if self.q is not None:
            return self.q
        p = self.packed.reshape(self.packed.shape[0], -1, 16)  # [rows, K/32, 16]: lo nibbles j, hi j + 16
        return np.concatenate([p & 15, p >> 4], axis=-1).reshape(p.shape[0], -1)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 12 bytes -> eight 6-bit scales and mins: bytes 0-3 / 4-7 hold the low 6 bits of sc[0:4] / m[0:4] and
    # their top 2 bits hold bits 4-5 of sc[4:8] / m[4:8]; bytes 8-11 hold the low nibbles of sc[4:8] | m[4:8] << 4
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, m


def codes(raw: np.ndarray, ggml_type: int) -> Codes:
    """raw: uint8 [rows, row_bytes] of a quantized tensor -> Codes (rows keep their order)."""
    block, size = _BLOCK[ggml_type]
    rows = raw.shape[0]
    blk = raw.reshape(-1, size)  # [rows * blocks_per_row, size]
    nb = blk.shape[0]
    per_row = nb // rows if rows else 0

    def shaped(x: np.ndarray) -> np.ndarray:
        return x.reshape(rows, per_row * (x.size // nb) if nb else 0)

    if ggml_type == 8:  # q8_0: d, 32 x int8
        return Codes(8, 32, 0, shaped(_f16(blk[:, 0:2])), None, q=shaped(blk[:, 2:].view(np.int8)))
    if ggml_type == 2:  # q4_0: d, 16 bytes (lo nibbles = elements 0..15, hi = 16..31)
        return Codes(4, 32, 8, shaped(_f16(blk[:, 0:2])), None, packed=shaped(blk[:, 2:]))
    if ggml_type == 3:  # q4_1: d, m, 16 bytes
        return Codes(4, 32, 0, shaped(_f16(blk[:, 0:2])), shaped(_f16(blk[:, 2:4])), packed=shaped(blk[:, 4:]))
    if ggml_type in (6, 7):  # q5_0: d, qh, qs / q5_1: d, m, qh, qs; qh bit j is the 5th bit of element j
        off = 2 if ggml_type == 6 else 4
        hi = np.unpackbits(blk[:, off:off + 4], axis=1, bitorder="little")  # [nb, 32]
        qs = blk[:, off + 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1) | (hi << 4)
        d = shaped(_f16(blk[:, 0:2]))
        if ggml_type == 6:
            return Codes(8, 32, 16, d, None, q=shaped(q))
        return Codes(8, 32, 0, d, shaped(_f16(blk[:, 2:4])), q=shaped(q))
    if ggml_type in (12, 13):  # q4_K / q5_K: d, dmin, 12 scale bytes, [qh 32 bytes (q5_K)], qs 128 bytes
        d, dmin = _f16(blk[:, 0:2]).astype(np.float32), _f16(blk[:, 2:4]).astype(np.float32)
        sc, m = _k_scale_min(blk[:, 4:16])
        scales = d[:, None] * sc.astype(np.float32)  # [nb, 8]
        mins = -(dmin[:, None] * m.astype(np.float32))
        qs = blk[:, -128:].reshape(nb, 4, 1, 32)  # 4 chunks of 64 elements: lo nibbles, then hi nibbles
        lo = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15  # [nb, 4, 2, 32]
        q = lo.reshape(nb, 8, 32)
        if ggml_type == 12:
            packed = q[..., :16] | (q[..., 16:] << 4)  # our q4_0 nibble order per 32-element group
            return Codes(4, 32, 0, shaped(scales), shaped(mins), packed=shaped(packed))
        qh = blk[:, 16:48].reshape(nb, 1, 32)  # bit j of byte i: the 5th bit of element i of sub-block j
        hi = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        return Codes(8, 32, 0, shaped(scales), shaped(mins), q=shaped(q | (hi << 4)))
    if ggml_type == 14:  # q6_K: ql 128, qh 64, 16 int8 scales, d
        ql = blk[:, 0:128].reshape(nb, 2, 1, 64)  # two halves of 128 elements
        ql = ((ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(nb, 2, 4, 32)
        qh = blk[:, 128:192].reshape(nb, 2, 1, 32)
        qh = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (ql | (qh << 4)).reshape(nb, 256)
        scales = _f16(blk[:, 208:210]).astype(np.float32)[:, None] * blk[:, 192:208].view(np.int8).astype(np.float32)
        return Codes(8, 16, 32, shaped(scales), None, q=shaped(q))
    raise ValueError(f"ggml type {ggml_type} has no code layout here")


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """raw bytes (uint8 [rows, row_bytes], or the typed array for float types) -> fp32 [rows, K]."""
    if ggml_type == 0:
        return raw.view(np.float32)
    if ggml_type == 1:
        return raw.view(np.float16).astype(np.float32)
    if ggml_type == 30:  # bf16: the upper half of an fp32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    c = codes(raw, ggml_type)
    q = c.unpacked().astype(np.float32)
    rows = q.shape[0]
    if c.zero_point:
        q -= np.float32(c.zero_point)
    w = q.reshape(rows, -1, c.group) * c.scales.astype(np.float32)[..., None]
    if c.mins is not None:  # only when present: adding 0.0 would turn ggml's -0.0 into +0.0
        w += c.mins.astype(np.float32)[..., None]
    return w.reshape(rows, -1)
