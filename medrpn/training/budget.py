"""``TrainingBudget``: a learning-rate schedule and a stopping rule measured in the run's budget, not in epochs.

A recipe written in epochs assumes a machine speed. ``configs/demo.yaml`` promises a 15-minute CPU run; with a
cosine schedule over 210 epochs and ``trainer.max_time`` as a guard, a machine 1.5x slower than the one the
recipe was tuned on is cut off at epoch ~120: the learning rate is still at 40% of its peak, and the last
validation (the one ``best.ckpt`` is chosen by) happened at epoch 70, mid-schedule. Measured on such a machine
(2-core AMD EPYC, 1,445 instead of 2,189 steps in 15 minutes): held-out CPM 0.498 against 0.625 for the same
config on the machine it was tuned on.

This callback makes the schedule follow the budget the run actually has. Training *progress* is the largest of

- elapsed training time / ``trainer.max_time`` (wall clock since the start of training, validation included),
- ``global_step / trainer.max_steps`` and
- ``epochs done / trainer.max_epochs``

(the limits that are set), so whichever runs out first ends the schedule. At every step the learning rate of
each parameter group is ``base_lr * f(progress)``: a linear warm-up over ``warmup_fraction``, then a half cosine
down to ``final_lr_fraction * base_lr``, reached exactly when the budget ends, on any machine. When the time
budget is the binding limit, the callback stops training early enough to leave room for one last validation
(as long as the longest validation so far, or ``validation_reserve`` of the budget before any) and makes that
validation run, so checkpoint selection sees the fully annealed weights instead of a mid-schedule snapshot.

Lightning's ``max_time`` counts training only (from ``on_train_start``); what happens before — loading and
caching the scans in the data module's ``setup``, anchor planning — is not in it (in the demo about 1.3 minutes
of a 16.3-minute ``medrpn fit``). With ``count_setup=True`` the clock starts when the callback is constructed,
which the Lightning CLI does before any of that, so the whole ``medrpn fit`` stays within ``max_time``.

It replaces an epoch-based ``lr_scheduler`` (a run configuring both is refused). Runs stopped by time are not
bit-reproducible across machines (nor were they before): the number of steps depends on the machine's speed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
from lightning_utilities.core.rank_zero import rank_zero_info
from pytorch_lightning.callbacks import Callback, Timer

__all__ = ["TrainingBudget", "budget_lr_factor"]


def budget_lr_factor(progress: float, *, warmup_fraction: float, final_lr_fraction: float) -> float:
    """Learning-rate multiplier at ``progress`` in ``[0, 1]`` of the budget.

    Linear warm-up from ``1 / 1000`` to 1 over ``warmup_fraction``, then half a cosine from 1 to
    ``final_lr_fraction``; constant ``final_lr_fraction`` past the end (``progress > 1``).

    Args:
        progress: fraction of the budget used (values outside ``[0, 1]`` are clamped).
        warmup_fraction: fraction of the budget spent warming up, in ``[0, 1)``.
        final_lr_fraction: multiplier reached at the end of the budget, in ``[0, 1]``.

    Returns:
        The multiplier.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if warmup_fraction > 0 and p < warmup_fraction:
        return 1e-3 + (1.0 - 1e-3) * p / warmup_fraction
    q = (p - warmup_fraction) / (1.0 - warmup_fraction)
    return final_lr_fraction + (1.0 - final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * q))


class TrainingBudget(Callback):
    """Cosine learning rate over the training budget (time, steps or epochs) and a final validation on time-out.

    Args:
        warmup_fraction: fraction of the budget with a linear learning-rate warm-up, in ``[0, 1)``.
        final_lr_fraction: learning rate at the end of the budget, as a fraction of the optimizer's, in ``[0, 1]``.
        validation_reserve: fraction of the time budget kept for the final validation until a validation has been
            timed (then the longest one measured is kept, plus 10%), in ``[0, 0.5]``.
        count_setup: count the time since this callback was constructed (the CLI does so before the data module
            loads and caches the scans) into ``max_time``, so that set-up, training and the final validation
            together fit in it. ``False`` (Lightning's meaning of ``max_time``): training time only. Only
            meaningful when the callback is built right before ``fit``, as the CLI does.

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(
        self,
        *,
        warmup_fraction: float = 0.02,
        final_lr_fraction: float = 0.0,
        validation_reserve: float = 0.05,
        count_setup: bool = False,
    ) -> None:
        super().__init__()
        self._created = time.monotonic()
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction}")
        if not 0.0 <= final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {final_lr_fraction}")
        if not 0.0 <= validation_reserve <= 0.5:
            raise ValueError(f"validation_reserve must lie in [0, 0.5], got {validation_reserve}")
        self.warmup_fraction = warmup_fraction
        self.final_lr_fraction = final_lr_fraction
        self.validation_reserve = validation_reserve
        self.count_setup = count_setup
        self._setup_s = 0.0
        self._base_lrs: list[list[float]] = []
        self._timer: Timer | None = None
        self._budget_s: float | None = None
        self._val_started: float | None = None
        self._val_longest_s: float | None = None
        self.stopped_for_time = False
        """Whether this callback ended training because the time budget (minus the final validation) ran out."""

    # ------------------------------------------------------------------ budget
    def _time_budget(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        """``(elapsed, total)`` seconds of the trainer's ``max_time``, or ``None`` without a time limit."""
        if self._timer is None or self._budget_s is None:
            return None
        return self._setup_s + self._timer.time_elapsed("train"), self._budget_s

    def _stop_time(self) -> float | None:
        """Seconds into training at which to stop so that the final validation fits in the budget."""
        if self._budget_s is None:
            return None
        reserve = (
            1.1 * self._val_longest_s if self._val_longest_s is not None else self.validation_reserve * self._budget_s
        )
        return max(self._budget_s - reserve, 0.0)

    def progress(self, trainer: pl.Trainer, batch_fraction: float = 0.0) -> float:
        """Fraction of the budget used: the largest of the time, step and epoch fractions that are limited.

        Args:
            trainer: the running trainer.
            batch_fraction: fraction of the current epoch done (for the epoch limit).

        Returns:
            A value in ``[0, 1]`` (0 when no limit is set).
        """
        parts = [0.0]
        t = self._time_budget(trainer)
        stop = self._stop_time()
        if t is not None and stop is not None and stop > 0:
            parts.append(t[0] / stop)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            parts.append(trainer.global_step / trainer.max_steps)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            parts.append((trainer.current_epoch + batch_fraction) / trainer.max_epochs)
        return min(max(parts), 1.0)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the base learning rates and the time budget; refuse a second scheduler."""
        if trainer.lr_scheduler_configs:
            raise ValueError(
                "TrainingBudget sets the learning rate itself from the run's budget: remove the model's "
                "lr_scheduler (e.g. model.lr_scheduler: null) or the TrainingBudget callback"
            )
        self._base_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        # Trainer.callbacks is set by a connector, so the stubs do not declare it
        timers = [c for c in trainer.callbacks if isinstance(c, Timer)]  # type: ignore[attr-defined]
        self._timer = timers[0] if timers else None
        if self._timer is not None:
            remaining = self._timer.time_remaining("train")
            if remaining is not None:
                self._budget_s = self._timer.time_elapsed("train") + remaining
        if self._timer is not None and self._budget_s is not None:
            if self.count_setup:  # set-up time so far: since construction, minus training already on the clock
                self._setup_s = max(time.monotonic() - self._created - self._timer.time_elapsed("train"), 0.0)
            setup_note = f" minus {self._setup_s / 60:.1f} min of set-up" if self.count_setup else ""
            rank_zero_info(
                f"TrainingBudget: cosine learning rate over {(self._budget_s - self._setup_s) / 60:.1f} min of "
                f"training (trainer.max_time{setup_note}), ending with a validation of the final weights"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Set every parameter group's learning rate from the progress."""
        num_batches = trainer.num_training_batches
        frac = batch_idx / num_batches if isinstance(num_batches, int) and num_batches > 0 else 0.0
        progress = self.progress(trainer, frac)
        if trainer.world_size > 1:  # one clock for all ranks, or their parameters would drift apart
            progress = float(trainer.strategy.broadcast(progress, src=0))
        factor = budget_lr_factor(
            progress,
            warmup_fraction=self.warmup_fraction,
            final_lr_fraction=self.final_lr_fraction,
        )
        for opt, bases in zip(trainer.optimizers, self._base_lrs):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * factor
        if trainer.loggers:
            pl_module.log("train/lr_factor", factor, on_step=True, on_epoch=False, logger=True, prog_bar=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Out of time (minus the final validation's reserve): stop here and validate the final weights."""
        stop = self._stop_time()
        t = self._time_budget(trainer)
        if stop is None or t is None or trainer.should_stop:
            return
        out_of_time = t[0] >= stop
        if trainer.world_size > 1:  # rank 0's clock decides for every rank, at the same step
            out_of_time = bool(trainer.strategy.broadcast(out_of_time, src=0))
        if not out_of_time:
            return
        trainer.should_stop = True
        self.stopped_for_time = True
        if trainer.enable_validation:
            # Lightning validates on a stop request only in a validation epoch: make every epoch one
            trainer.check_val_every_n_epoch = None
        rank_zero_info(
            f"TrainingBudget: stopping at step {trainer.global_step} (epoch {trainer.current_epoch}) after "
            f"{t[0] / 60:.1f} of {t[1] / 60:.1f} min, to validate the final weights within the budget"
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Time the validation (its duration is the reserve kept for the last one)."""
        if not trainer.sanity_checking:
            self._val_started = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the longest validation."""
        if self._val_started is None or trainer.sanity_checking:
            return
        took = time.monotonic() - self._val_started
        self._val_longest_s = took if self._val_longest_s is None else max(self._val_longest_s, took)
        self._val_started = None
