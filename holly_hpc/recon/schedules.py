"""Learning-rate schedules of reconstruct's own: HOLLy's plateau schedule for the points.

`train.points_lr_schedule: plateau` lowers the points' learning rate by `factor` whenever the training loss
has not improved for `patience` steps, on top of the shared schedule (constant or cosine) of
runtime.kinds.make_lr_scheduler. It is deterministic and its whole state is in state_dict, so a resumed run
drops the rate at the very steps an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class PlateauSchedule:
    """Scale one parameter group's learning rate down by `factor` when the loss plateaus.

    Call step(loss) once per training step, after the optimiser's step and the shared scheduler's (the
    order of runtime.kinds.optimiser_step). `loss` may be a detached tensor on the training device: it is
    summed there, and read (one .item(), one device sync) only every `check_every` steps, when the mean of
    the window is compared with the best mean so far. A float works too, and a float given at log intervals
    can stand for the steps since the last call: step(value, steps=log_every).

    A window mean below best - threshold·|best| is an improvement (the first finite one always is). Once
    `patience` steps have passed without one, the scale drops to max(scale · factor, min_lr / base_lr) and
    the count starts again (so the next drop needs another `patience` steps). The group's rate is then the
    shared scheduler's last rate (its constant or cosine value; the group's initial rate without a
    scheduler) times the scale: set, never multiplied in place, so it cannot compound. `min_lr` floors the
    plateau's own reductions, relative to the group's base rate (a cosine schedule's factor still applies on
    top). check_every is capped at patience.

    With several ranks each sees its own shard's loss: pass `reduce` (e.g. an all-reduce mean over the
    ranks) so they all take the same decisions; it is called on the window's sum (a tensor) at checks only.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        group: int,
        patience: int,
        factor: float = 0.5,
        min_lr: float = 0.0,
        check_every: int = 10,
        threshold: float = 1e-4,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if patience < 1 or check_every < 1:
            raise ValueError(f"plateau: patience and check_every must be >= 1, got {patience} and {check_every}")
        if not 0 < factor < 1:
            raise ValueError(f"plateau: factor must lie in (0, 1), got {factor}")
        if min_lr < 0:
            raise ValueError(f"plateau: min_lr must be >= 0, got {min_lr}")
        self.optimizer, self.group, self.scheduler, self.reduce = optimizer, group, scheduler, reduce
        self.patience, self.factor, self.min_lr = patience, factor, min_lr
        self.check_every, self.threshold = min(check_every, patience), threshold
        g = optimizer.param_groups[group]
        self.base_lr = float(g.get("initial_lr", g["lr"]))
        self.scale = 1.0
        self.best = math.inf
        self.seen = 0  # steps counted so far
        self.last_improved = 0  # self.seen at the last improvement (or reduction)
        self.reductions = 0
        self._sum: torch.Tensor | float = 0.0  # loss · steps over the current window
        self._count = 0  # steps in the current window

    @property
    def lr(self) -> float:
        """The rate the group will use at its next step."""
        return float(self.optimizer.param_groups[self.group]["lr"])

    def _scheduled(self) -> float:
        if self.scheduler is None:
            return self.base_lr
        return float(self.scheduler.get_last_lr()[self.group])

    def apply(self) -> None:
        """Set the group's rate to the shared schedule's times the scale (idempotent)."""
        self.optimizer.param_groups[self.group]["lr"] = self._scheduled() * self.scale

    def step(self, loss: torch.Tensor | float, steps: int = 1) -> None:
        """Count `steps` steps whose mean training loss is `loss`; check every check_every steps."""
        value = loss.detach() if torch.is_tensor(loss) else float(loss)
        self._sum = self._sum + value * steps
        self._count += steps
        self.seen += steps
        if self._count >= self.check_every:
            self._check()
        self.apply()

    def _check(self) -> None:
        total = self._sum
        if self.reduce is not None:
            total = self.reduce(torch.as_tensor(total, dtype=torch.float64).clone())
        mean = (total.item() if torch.is_tensor(total) else float(total)) / self._count
        self._sum, self._count = 0.0, 0
        if math.isfinite(self.best):
            improved = mean < self.best - self.threshold * abs(self.best)
        else:
            improved = math.isfinite(mean)  # the first finite mean is the first best
        if improved:
            self.best, self.last_improved = mean, self.seen
        elif self.seen - self.last_improved >= self.patience:
            floor = self.min_lr / self.base_lr if self.base_lr > 0 else 0.0
            new = max(self.scale * self.factor, floor)
            if new < self.scale:
                self.scale = new
                self.reductions += 1
            self.last_improved = self.seen

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (reads the window's partial sum: one sync, at checkpoints only)."""
        partial = self._sum.item() if torch.is_tensor(self._sum) else float(self._sum)
        return {
            "scale": self.scale,
            "best": self.best,
            "seen": self.seen,
            "last_improved": self.last_improved,
            "reductions": self.reductions,
            "window_sum": partial,
            "window_count": self._count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.seen = float(state["scale"]), float(state["best"]), int(state["seen"])
        self.last_improved, self.reductions = int(state["last_improved"]), int(state["reductions"])
        self._sum, self._count = float(state["window_sum"]), int(state["window_count"])
