"""Asynchronous successive halving (ASHA): keep a run only if it ranks in the top 1/rf
of the runs of its sweep that reached the same rung (in a cross-validated sweep, the runs
of its fold).

The decision is a pure function of plain numbers; the rung records live in SQL.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from realfake.metrics import Metrics
from realfake.store import Run, RungValue, Sweep, upsert
from realfake.sweeps import EarlyTerminate


def should_continue(
    value: float, competing: Sequence[float], reduction_factor: int, higher_is_better: bool = True
) -> bool:
    """Whether a run with `value` at a rung goes on, given every value at that rung (its own included).

    As in Optuna's successive halving, the best `len(competing) // reduction_factor` values
    go on, and at least the single best one does.
    """
    if not competing:
        return True
    ranked = sorted(competing, reverse=higher_is_better)
    keep = max(1, len(ranked) // reduction_factor)
    threshold = ranked[keep - 1]
    return value >= threshold if higher_is_better else value <= threshold


def asha_prune_hook(session: Session, run_id: int, epoch: int, metrics: dict[str, Metrics]) -> bool:
    """The training loop's pruning hook: True stops the run after this epoch."""
    run = session.get(Run, run_id)
    if run.sweep_id is None:
        return False
    sweep = session.get(Sweep, run.sweep_id)
    early = sweep.spec.get("early_terminate")
    if not early:
        return False
    asha = EarlyTerminate.model_validate(early)
    if epoch not in asha.rungs(run.config["epochs"]):
        return False
    split = metrics.get("val") or metrics["train"]
    value = split.value(sweep.metric_name)
    if value is None:
        return False
    upsert(
        session, RungValue,
        [{"sweep_id": sweep.id, "run_id": run_id, "rung": epoch, "value": float(value)}],
        keys=("run_id", "rung"),
    )
    query = select(RungValue.value).where(RungValue.sweep_id == sweep.id, RungValue.rung == epoch)
    if run.fold is not None:  # folds validate on different faces: a run competes within its own
        query = query.join(Run, Run.id == RungValue.run_id).where(Run.fold == run.fold)
    competing = session.scalars(query).all()
    return not should_continue(float(value), competing, asha.reduction_factor, sweep.metric_goal == "maximize")
