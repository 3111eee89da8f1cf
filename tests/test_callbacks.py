"""The phase progress bar: a time-limited phase shows its clock, not a step limit it never reaches."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from anomaly_rl.callbacks import UNBOUNDED_STEPS, PhaseProgressBar


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Recording(PhaseProgressBar):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        self.seen = (self.total_train_batches, self.get_metrics(trainer, trainer.lightning_module))


@pytest.mark.parametrize(("max_steps", "max_time", "expect_clock"), [
    (UNBOUNDED_STEPS, "00:00:01:00", True),  # the SFT control: time alone bounds it
    (3, None, False),                         # a step budget: the ordinary bar
])
def test_time_limited_phase_shows_elapsed_and_remaining(max_steps: int, max_time: str | None, expect_clock: bool) -> None:
    bar = _Recording()
    trainer = L.Trainer(max_steps=3 if not expect_clock else max_steps, max_time=max_time, max_epochs=1,
                        callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", limit_train_batches=3)
    trainer.fit(_Tiny())
    total, metrics = bar.seen
    if expect_clock:
        assert total == float("inf")
        assert metrics["elapsed"].count(":") == 1 and metrics["left"].startswith("00:5")
    else:
        assert total == 3
        assert "elapsed" not in metrics and "left" not in metrics
