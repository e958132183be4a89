"""The callbacks and result types of `realfake.train.fit`, kept out of train.py so that
`realfake.runs` (its `SqlHooks`), which the scheduler imports, does not load torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from realfake.metrics import Metrics


class TrainHooks:
    """Callbacks from `fit`; the defaults do nothing."""

    def should_stop(self) -> bool:
        """Checked between batches: True stops training at once (cancel)."""
        return False

    def on_batch(self, split: str, epoch: int, done: int, total: int) -> None:
        """Progress within an epoch."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, Metrics], best: BestSoFar) -> bool:
        """Persist an epoch's metrics; return False to stop after this epoch (pruning)."""
        return True

    def check_held(self) -> None:
        """Called just before a checkpoint replaces the last one: raises if this process may no
        longer write the run's files (another worker holds it now)."""


@dataclass(frozen=True)
class BestSoFar:
    epoch: int | None = None
    value: float | None = None


@dataclass(frozen=True)
class FitResult:
    """How training ended. `fit` ends completed, stopped or pruned; `runs.train_run` also
    failed (the reason is in SQL) or lease lost (another worker took the run over)."""

    outcome: Literal["completed", "stopped", "pruned", "failed", "lease lost"]
    epochs_done: int | None = None
    best: BestSoFar = BestSoFar()
