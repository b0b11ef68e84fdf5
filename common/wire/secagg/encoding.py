"""Fixed-point encoding of real vectors in the ring Z_2^64 (numpy uint64, wrapping arithmetic).

Masks are uniform in the ring, so the sum must be recovered exactly modulo
2^64: each site contributes round(value * scale), at most `bound` in
magnitude, as a two's-complement uint64. As long as sites x bound < 2^63 the
true sum lies in the signed range and decodes without ambiguity; a sum outside
contributors x bound means a site broke the bound or a mask was not removed,
and is refused instead of being wrapped into a plausible number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpriv.common.wire.secagg.errors import EncodingOverflowError

RING_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class FixedPoint:
    scale: float
    bound: int

    def encode(self, values: np.ndarray) -> np.ndarray:
        scaled = np.rint(np.asarray(values, dtype=np.float64).ravel() * self.scale)
        bad = ~np.isfinite(scaled) | (np.abs(scaled) > self.bound)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EncodingOverflowError(
                f"coordinate {i}: value {float(np.ravel(values)[i])!r} x scale {self.scale} exceeds the "
                f"fixed-point bound {self.bound} ({int(bad.sum())} coordinate(s) out of range)"
            )
        return scaled.astype(np.int64).view(np.uint64)

    def decode_sum(self, total: np.ndarray, contributors: int) -> np.ndarray:
        signed = np.asarray(total, dtype=np.uint64).view(np.int64)
        limit = contributors * self.bound
        # Not np.abs: abs(-2^63) wraps to itself and would slip through.
        bad = (signed > limit) | (signed < -limit)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EncodingOverflowError(
                f"coordinate {i}: the unmasked sum {int(signed[i])} exceeds {contributors} sites x bound "
                f"{self.bound}; a site broke the bound or a mask was not removed ({int(bad.sum())} coordinate(s))"
            )
        return signed.astype(np.float64) / self.scale

    def quantization_error(self, contributors: int) -> float:
        """Largest per-coordinate distance between the decoded and the exact sum (rounding only)."""
        return contributors * 0.5 / self.scale
