"""The 4-bit codes NF4 is compared with (notebook 03): bitsandbytes' FP4 and plain INT4. Not part of any method."""
from __future__ import annotations

import torch


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 levels (its other 4-bit type), sorted: a tiny float, 1 sign, 2 exponent and 1 mantissa bit.

    Magnitudes 0, 0.0625 (the one subnormal), 2, 3, 4, 6, 8, 12 -- powers of two and 1.5 times them -- divided by 12.
    bitsandbytes stores both +0 and -0, so two of its 16 codes mean zero; here they are one level (15 in all).
    """
    normal = [m * 2.0 ** e for e in (1, 2, 3) for m in (1.0, 1.5)]  # 2, 3, 4, 6, 8, 12
    magnitudes = torch.tensor([0.0, 0.0625] + normal, dtype=torch.float64) / 12.0
    return torch.cat([-magnitudes[1:], magnitudes]).sort().values.float()  # (15,)


def int4_code() -> torch.Tensor:
    """Plain symmetric INT4 with absmax scaling: 15 evenly spaced levels k/7, k = -7..7 (no normal prior)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)
