"""Learning-rate schedules as multipliers of optim.lr (for torch's LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

from hyla.platform.config import OptimConfig


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> factor. Both schedules warm up linearly over optim.warmup_steps to 1, then:
    cosine decays to optim.min_lr_ratio at the last step; wsd (warmup-stable-decay) holds 1
    and decays linearly to min_lr_ratio over the last optim.decay_fraction of the steps."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if total_steps < 1:
        raise ValueError(f"trainer.steps must be >= 1, got {total_steps}")
    decay_start = max(warmup, total_steps - round(cfg.decay_fraction * total_steps))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1 - (1 - floor) * progress

    return cosine if cfg.schedule == "cosine" else wsd
