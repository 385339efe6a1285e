"""TrainingBudget: cosine learning rate over the run's budget, and a final validation when time runs out."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given
from hypothesis import strategies as st
from pytorch_lightning.demos.boring_classes import BoringModel

from medrpn.training.budget import TrainingBudget, budget_lr_factor


# ---------------------------------------------------------------------------------------------- the schedule
def test_lr_factor_hand_values() -> None:
    kw = {"warmup_fraction": 0.1, "final_lr_fraction": 0.0}
    assert budget_lr_factor(0.0, **kw) == pytest.approx(1e-3)
    assert budget_lr_factor(0.05, **kw) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert budget_lr_factor(0.1, **kw) == pytest.approx(1.0)
    assert budget_lr_factor(0.55, **kw) == pytest.approx(0.5)  # half-way through the cosine
    assert budget_lr_factor(1.0, **kw) == pytest.approx(0.0, abs=1e-12)
    assert budget_lr_factor(3.0, **kw) == pytest.approx(0.0, abs=1e-12)  # past the end: clamped
    assert budget_lr_factor(1.0, warmup_fraction=0.0, final_lr_fraction=0.1) == pytest.approx(0.1)
    assert budget_lr_factor(0.0, warmup_fraction=0.0, final_lr_fraction=0.1) == pytest.approx(1.0)


@given(
    p=st.floats(0.0, 1.0),
    q=st.floats(0.0, 1.0),
    warmup=st.floats(0.0, 0.5),
    final=st.floats(0.0, 1.0),
)
def test_lr_factor_bounded_and_decreasing_after_warmup(p: float, q: float, warmup: float, final: float) -> None:
    a, b = sorted((p, q))
    fa = budget_lr_factor(a, warmup_fraction=warmup, final_lr_fraction=final)
    fb = budget_lr_factor(b, warmup_fraction=warmup, final_lr_fraction=final)
    assert min(final, 1e-3) - 1e-12 <= fa <= 1.0 + 1e-12
    if a >= warmup:
        assert fb <= fa + 1e-12
    else:
        assert fa <= 1.0 + 1e-12


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup_fraction": 1.0}, {"warmup_fraction": -0.1}, {"final_lr_fraction": 1.5}, {"validation_reserve": 0.9}],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrainingBudget(**kwargs)


# ---------------------------------------------------------------------------------------------- in a trainer
class _Recorder(BoringModel):
    """Records the learning rate of every step and the global step of every validation."""

    def __init__(self, step_seconds: float = 0.0, scheduler: bool = False) -> None:
        super().__init__()
        self.step_seconds = step_seconds
        self.scheduler = scheduler
        self.lrs: list[float] = []
        self.val_steps: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return super().training_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_steps.append(self.trainer.global_step)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.5)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 10)}


def _trainer(budget: TrainingBudget, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[budget],
        **kwargs,
    )


def test_step_budget_anneals_to_the_final_fraction_at_max_steps() -> None:
    model = _Recorder()
    budget = TrainingBudget(warmup_fraction=0.0, final_lr_fraction=0.1)
    _trainer(budget, max_steps=20, max_epochs=-1, check_val_every_n_epoch=100).fit(model)
    assert len(model.lrs) == 20
    assert model.lrs[0] == pytest.approx(0.5)
    expected_last = 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert model.lrs[-1] == pytest.approx(expected_last)
    assert all(b <= a + 1e-12 for a, b in zip(model.lrs, model.lrs[1:]))
    assert not budget.stopped_for_time


def test_epoch_budget_follows_epochs_and_batches() -> None:
    model = _Recorder()
    budget = TrainingBudget(warmup_fraction=0.0)
    _trainer(budget, max_epochs=2, check_val_every_n_epoch=100).fit(model)
    assert len(model.lrs) == 8
    for i, lr in enumerate(model.lrs):  # progress = (epoch + batch / 4) / 2 = i / 8
        assert lr == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * i / 8)))


def test_time_budget_stops_early_and_validates_the_final_weights() -> None:
    model = _Recorder(step_seconds=0.05)
    budget = TrainingBudget(warmup_fraction=0.0, validation_reserve=0.2)
    # an epoch-based recipe that expects 1,000 epochs and validates every 500: the time limit binds first
    trainer = _trainer(budget, max_epochs=1000, max_time={"seconds": 2}, check_val_every_n_epoch=500)
    start = time.monotonic()
    trainer.fit(model)
    took = time.monotonic() - start
    assert budget.stopped_for_time
    assert model.val_steps == [trainer.global_step]  # validated once, on the final weights
    assert 10 <= trainer.global_step <= 40  # ~1.6 s of 0.05 s steps
    assert took < 4.0
    assert model.lrs[0] == pytest.approx(0.5)
    assert model.lrs[-1] < 0.05 * 0.5  # annealed by the time it stopped
    assert all(b <= a + 1e-12 for a, b in zip(model.lrs, model.lrs[1:]))


class _SlowSetup(_Recorder):
    """Spends ``setup_seconds`` in ``setup`` (where a data module loads and caches its scans)."""

    def __init__(self, setup_seconds: float, step_seconds: float) -> None:
        super().__init__(step_seconds=step_seconds)
        self.setup_seconds = setup_seconds

    def setup(self, stage: str) -> None:
        time.sleep(self.setup_seconds)


@pytest.mark.parametrize("count_setup", [False, True])
def test_count_setup_puts_the_set_up_time_in_the_budget(count_setup: bool) -> None:
    model = _SlowSetup(setup_seconds=1.0, step_seconds=0.05)
    budget = TrainingBudget(warmup_fraction=0.0, validation_reserve=0.1, count_setup=count_setup)
    trainer = _trainer(budget, max_epochs=1000, max_time={"seconds": 2}, check_val_every_n_epoch=500)
    start = time.monotonic()
    trainer.fit(model)
    took = time.monotonic() - start
    assert budget.stopped_for_time
    assert model.val_steps == [trainer.global_step]
    if count_setup:  # 1 s of set-up + ~0.8 s of training + the final validation: the whole fit within 2 s
        assert 5 <= trainer.global_step <= 20
        assert took < 2.5
    else:  # Lightning's max_time: ~1.8 s of training after the 1 s set-up
        assert trainer.global_step >= 25
        assert took >= 2.5
    assert model.lrs[-1] < 0.1 * 0.5  # annealed within the shorter budget too


def test_a_second_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match="lr_scheduler"):
        _trainer(TrainingBudget(), max_steps=2).fit(_Recorder(scheduler=True))
