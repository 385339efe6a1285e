"""BestAndLastCheckpoint: best by the monitored metric, last.ckpt at the end of training even without improvement."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from medrpn.training.checkpointing import BestAndLastCheckpoint


class _PeaksEarly(BoringModel):
    """Logs ``val/cpm`` 1.0 at the first validation and 0.0 afterwards (the best is the first epoch)."""

    def on_validation_epoch_end(self) -> None:
        self.log("val/cpm", 1.0 if self.current_epoch == 0 else 0.0)


def test_last_checkpoint_is_the_final_epoch_when_the_best_is_early(tmp_path: Path) -> None:
    ckpt = BestAndLastCheckpoint(dirpath=tmp_path, filename="best", monitor="val/cpm", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
    )
    trainer.fit(_PeaksEarly())
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert best["global_step"] == 2  # epoch 0
    assert last["global_step"] == 6 == trainer.global_step  # plain ModelCheckpoint would leave it at 2
    assert Path(ckpt.best_model_path).name == "best.ckpt"
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
