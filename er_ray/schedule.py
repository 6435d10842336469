"""The learning rate's plan over a run's steps, and the epochs a time budget fits.

    plan = StepPlan(steps_per_epoch * epochs, warmup_fraction)   # warm-up, then linear decay to zero
    scheduler = warmup_then_linear_decay(optimizer, plan)
    plan.replan(steps_per_epoch * epochs_in_budget(budget, spent, steady, ceiling, done))   # after each budgeted epoch
"""

from __future__ import annotations

from .defaults import WARMUP


class StepPlan:
    """Warm-up, then linear decay to zero at `total` steps. The end may be moved while training (`replan`: a time
    budget fixes the epochs after the first); the decay then continues from where it is to the new end."""

    def __init__(self, total: int, warmup_fraction: float = WARMUP):
        self.warmup_fraction = warmup_fraction
        self.replan(total)

    def replan(self, total: int) -> None:
        """A new end. The warm-up stays the same share of the run as now planned, not of the --epochs ceiling a
        budgeted run starts with (a ceiling of 16 epochs would warm up for a whole epoch of a 4-epoch run); a run
        still warming up then moves to the decay line at once."""
        self.total, self.warmup = total, max(1, int(self.warmup_fraction * total))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def warmup_then_linear_decay(optimizer, plan: StepPlan):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan)


def epochs_in_budget(budget: float, spent: float, steady: float, ceiling: int, done: int = 1) -> int:
    """The epochs that fit `budget` seconds: `done` epochs took `spent`, the next take `steady` each (without the
    first epoch's wait for the first batch: the data pipeline's start, paid once). At least `done`, at most `ceiling`.
    (Planning every epoch at the first one's cost left a third of fine-tuning's time unused on TREC.)"""
    return max(done, min(ceiling, done + int(max(0.0, budget - spent) // max(steady, 1e-9))))
