"""An independent, table-driven numpy reference of the formats, written from the specifications (OCP MX v1.0,
NVIDIA's NVFP4 recipe, DeepSeek's FP8 blocks), sharing no code with quant/: every representable value is listed
from its bit fields and each input goes to the nearest one, ties to the even code."""

import numpy as np

F32 = np.float32


def e2m1_table() -> np.ndarray:
    """Value of each 4-bit code: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    out = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        mag = (m / 2) * 2.0 ** (1 - 1) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        out.append(-mag if s else mag)
    return np.array(out, F32)


def e4m3_table() -> np.ndarray:
    """Value of each byte of float8 E4M3 'fn': bias 7, exponent 0 subnormal, S.1111.111 = NaN, no infinities."""
    out = []
    for code in range(256):
        s, e, m = code >> 7, (code >> 3) & 15, code & 7
        if e == 15 and m == 7:
            out.append(np.nan)
            continue
        mag = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        out.append(-mag if s else mag)
    return np.array(out, np.float64)


E2M1 = e2m1_table()
E4M3 = e4m3_table()


def _nearest_code(x: float, table: np.ndarray, positive_codes: range) -> int:
    """Code of the nearest magnitude among positive_codes (saturating at the largest), ties to the even code."""
    a = abs(x)
    mags = np.array([table[c] for c in positive_codes], np.float64)
    if np.isinf(a) or a >= mags[-1]:
        return positive_codes[-1]
    d = np.abs(mags - a)
    best = np.flatnonzero(d == d.min())
    if len(best) > 1:
        best = [b for b in best if positive_codes[b] % 2 == 0]
    return positive_codes[best[0]]


def _codes(x, table, positive_codes: range, nan_code: int, sign_bit: int) -> np.ndarray:
    flat = np.asarray(x, np.float64).reshape(-1)
    out = [nan_code if np.isnan(v) else _nearest_code(v, table, positive_codes) | (sign_bit if np.signbit(v) else 0)
           for v in flat]
    return np.array(out, np.uint8).reshape(np.shape(x))


def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """NaN -> 0 (the documented choice: NaN is reported through the block scale)."""
    return _codes(x, E2M1, range(8), 0, 8)


def e4m3_codes(x: np.ndarray) -> np.ndarray:
    """Saturating at 448 (0x7E); NaN -> 0x7F. Codes 0x00..0x7E are every finite non-negative value, ascending."""
    return _codes(x, E4M3, range(0x7F), 0x7F, 0x80)


def e4m3_value(codes: np.ndarray) -> np.ndarray:
    return E4M3[np.asarray(codes, np.int64)].astype(F32)


def nvfp4(x: np.ndarray, amax=None):
    """x [..., K] float32 (one tensor) -> (codes [..., K], E4M3 scale codes [..., K/16], tensor scale)."""
    x = np.asarray(x, F32)
    amax = F32(np.abs(x).max()) if amax is None else F32(amax)
    s_t = F32(amax / F32(6 * 448)) if amax > 0 else F32(1.0)
    xb = x.reshape(*x.shape[:-1], -1, 16)
    bmax = np.abs(xb).max(-1)
    s = np.maximum(bmax / (F32(6) * s_t), F32(2.0 ** -9)).astype(F32)
    s = np.where(bmax == 0, F32(1.0), s)
    sc = e4m3_codes(s)
    denom = (e4m3_value(sc) * s_t).astype(F32)
    codes = e2m1_codes((xb / denom[..., None]).astype(F32))
    return codes.reshape(x.shape), sc, s_t


def nvfp4_dequant(codes, scale_codes, s_t):
    q = E2M1[codes].reshape(*codes.shape[:-1], -1, 16)
    return (q * e4m3_value(scale_codes)[..., None] * F32(s_t)).astype(F32).reshape(codes.shape)


def mxfp4(x: np.ndarray):
    """OCP rule: shared exponent floor(log2 amax) - 2 per 32 (an all-zero block gets 0). -> (codes, E8M0 bytes)."""
    x = np.asarray(x, F32)
    xb = x.reshape(*x.shape[:-1], -1, 32)
    bmax = np.abs(xb).max(-1).astype(np.float64)
    e = np.where(bmax > 0, np.floor(np.log2(np.where(bmax > 0, bmax, 1.0))) - 2, 0).astype(np.int64)
    e = np.clip(e, -127, 127)
    codes = e2m1_codes((xb / np.exp2(e.astype(np.float64))[..., None]).astype(F32))
    return codes.reshape(x.shape), (e + 127).astype(np.uint8)


def mxfp4_dequant(codes, ebytes):
    q = E2M1[codes].reshape(*codes.shape[:-1], -1, 32).astype(np.float64)
    return (q * np.exp2(ebytes.astype(np.float64) - 127)[..., None]).astype(F32).reshape(codes.shape)


def fp8_rows(x: np.ndarray, block: int = 128):
    """1 x block along the last axis (K a multiple of block here): -> (E4M3 codes, float32 scales)."""
    x = np.asarray(x, F32)
    xb = x.reshape(*x.shape[:-1], -1, block)
    bmax = np.abs(xb).max(-1)
    s = np.where(bmax > 0, bmax / F32(448), F32(1.0)).astype(F32)
    return e4m3_codes((xb / s[..., None]).astype(F32)).reshape(x.shape), s


def pack(codes: np.ndarray) -> np.ndarray:
    c = codes.reshape(*codes.shape[:-1], -1, 2).astype(np.uint8)
    return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
