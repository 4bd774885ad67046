"""Learning-rate schedules: linear warmup, then constant, linear, cosine or WSD decay to a floor.

`lr_factor(step)` multiplies `optim.lr`; it is a pure function of the step so a resumed run
continues on exactly the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from trainer.config import ScheduleConfig


def lr_factor_fn(config: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    warmup, floor = config.warmup_steps, config.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / decay_steps, 1.0)
        if config.decay == "constant":
            return 1.0
        if config.decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        if config.decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd: warmup, stable at the peak, then a linear cool-down over the last fraction
        cooldown_start = 1 - config.wsd_decay_frac
        if progress < cooldown_start:
            return 1.0
        return floor + (1 - floor) * (1 - (progress - cooldown_start) / config.wsd_decay_frac)

    return factor
