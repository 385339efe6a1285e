"""BestAndLastCheckpoint: best by the monitored metric (ties to the later epoch), last.ckpt at the end of training."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from medrpn.training.checkpointing import BestAndLastCheckpoint


class _PeaksEarly(BoringModel):
    """Logs ``val/cpm`` 1.0 at the first validation and 0.0 afterwards (the best is the first epoch)."""

    def on_validation_epoch_end(self) -> None:
        self.log("val/cpm", 1.0 if self.current_epoch == 0 else 0.0)


class _Logs(BoringModel):
    """Logs ``val/cpm`` from a fixed list, one value per epoch."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def on_validation_epoch_end(self) -> None:
        self.log("val/cpm", self.values[self.current_epoch])


def _trainer(ckpt: BestAndLastCheckpoint, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
    )


def test_last_checkpoint_is_the_final_epoch_when_the_best_is_early(tmp_path: Path) -> None:
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, filename="best", monitor="val/cpm", mode="max", save_last=True)
    trainer = _trainer(ckpt, 3)
    trainer.fit(_PeaksEarly())
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert best["global_step"] == 2  # epoch 0
    assert last["global_step"] == 6 == trainer.global_step  # plain ModelCheckpoint would leave it at 2
    assert Path(ckpt.best_model_path).name == "best.ckpt"
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize(
    ("values", "best_step"),
    [
        ([0.5, 0.5, 0.5], 6),  # all tied: the final epoch, not the first
        ([0.2, 0.7, 0.7, 0.4], 6),  # tie at the top: the later of the two
        ([0.2, 0.7, 0.6, 0.4], 4),  # no tie: plain "max"
        ([0.5, float("nan"), 0.5], 6),  # NaN never counts as a tie or an improvement
    ],
)
def test_ties_go_to_the_later_epoch(tmp_path: Path, values: list[float], best_step: int) -> None:
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, filename="best", monitor="val/cpm", mode="max", save_last=True)
    _trainer(ckpt, len(values)).fit(_Logs(values))
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == best_step
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]


def test_ties_with_top_k_replace_the_oldest_of_the_tied(tmp_path: Path) -> None:
    ckpt = BestAndLastCheckpoint(
        dirpath=tmp_path,
        filename="e{epoch}",
        auto_insert_metric_name=False,
        monitor="val/cpm",
        mode="max",
        save_top_k=2,
        save_last=False,
    )
    _trainer(ckpt, 4).fit(_Logs([0.5, 0.5, 0.5, 0.1]))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["e1.ckpt", "e2.ckpt"]
