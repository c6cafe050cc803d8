"""IsoFLOP expansion: at each compute budget, every model size trains for the tokens that spend
that budget (C = steps x global_batch x FLOPs of a packed row, from training/flops.py)."""

from __future__ import annotations

import math


def steps_for_budget(budget: float, step_flops: float) -> int:
    """Whole optimizer steps whose training FLOPs are closest to `budget` (at least one)."""
    return max(1, round(budget / step_flops))


def budget_label(budget: float) -> str:
    """A compact, path-safe label: 1.5e10 -> "1.5e10", 3e12 -> "3e12"."""
    exponent = math.floor(math.log10(budget))
    mantissa = budget / 10**exponent
    if round(mantissa, 2) >= 10:  # 9.999e9 rounds to 10: carry into the exponent
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.3g}e{exponent}"
