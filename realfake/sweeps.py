"""Sweep files: validation of the whole spec before anything is written, and expansion.

The format follows the sweep-config conventions people know (`method`, `metric`,
`parameters` with `values` or `min`/`max`/`distribution`, `early_terminate`), plus `data`,
`split` and `base` (the fixed part of every run's TrainConfig).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from realfake.config import SplitConfig, TrainConfig, goal_of
from realfake.errors import SpecError


class MetricSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["accuracy", "f1", "roc_auc", "loss"] = "accuracy"
    goal: Literal["maximize", "minimize"] = "maximize"  # unset: minimize for loss, maximize for the rest

    @model_validator(mode="before")
    @classmethod
    def _goal_from_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("goal") is None:
            return data | {"goal": goal_of(data.get("name"))}
        return data

    @property
    def higher_is_better(self) -> bool:
        return self.goal == "maximize"


class ParameterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: list[Any] | None = Field(None, min_length=1)
    min: float | None = None
    max: float | None = None
    distribution: Literal["uniform", "log_uniform", "int_uniform"] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ParameterSpec:
        ranged = self.min is not None or self.max is not None
        if self.values is not None and (ranged or self.distribution):
            raise ValueError("give either `values` or `min`/`max`, not both")
        if self.values is None:
            if self.min is None or self.max is None:
                raise ValueError("give `values`, or both `min` and `max`")
            if self.min > self.max:
                raise ValueError(f"min {self.min} is larger than max {self.max}")
            if self.distribution == "log_uniform" and self.min <= 0:
                raise ValueError("log_uniform needs min > 0")
        return self

    def draw(self, rng: random.Random) -> Any:
        if self.values is not None:
            return rng.choice(self.values)
        low, high = self.min, self.max
        if self.distribution == "log_uniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.distribution == "int_uniform":
            return rng.randint(math.ceil(low), math.floor(high))
        return rng.uniform(low, high)


class EarlyTerminate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["asha"] = "asha"
    min_epochs: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)

    def rungs(self, epochs: int) -> list[int]:
        """Epochs at which a run is compared with its peers: min_epochs * rf**k, before the end."""
        rungs, epoch = [], self.min_epochs
        while epoch < epochs:
            rungs.append(epoch)
            epoch *= self.reduction_factor
        return rungs


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    data: str | None = None
    split: SplitConfig = SplitConfig()
    metric: MetricSpec = MetricSpec()
    method: Literal["grid", "random"] = "grid"
    max_runs: int | None = Field(None, ge=1)
    seed: int = 0
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    base: dict[str, Any] = Field(default_factory=dict)
    early_terminate: EarlyTerminate | None = None
    max_attempts: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        known = set(TrainConfig.model_fields)
        # these errors name their place themselves: a model-wide check has none of its own
        for where, keys in (("base", self.base), ("parameters", self.parameters)):
            for key in keys:
                if key not in known:
                    raise ValueError(f"{where}.{key}: unknown training parameter {key!r} (known: {', '.join(sorted(known))})")
        if self.method == "grid":
            ranged = [k for k, p in self.parameters.items() if p.values is None]
            if ranged:
                raise ValueError(f"parameters: grid sweeps need `values` lists; {', '.join(ranged)} use min/max")
            if self.max_runs is not None:
                raise ValueError("max_runs: only random sweeps take it; a grid runs every combination")
        elif self.max_runs is None:
            raise ValueError("max_runs: random sweeps need max_runs, the number of runs to draw")
        return self


def _location(error: dict) -> str:
    return ".".join(str(part) for part in error["loc"])


def _describe(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        where = _location(item)
        lines.append(f"{prefix}{where}: {message}" if where else f"{prefix}{message}")
    return "; ".join(lines)


def parse_spec(data: Any, source: str = "sweep file") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{source}: {_describe(error)}") from None
    # runs keep their checkpoints by lower loss and higher everything else; pruning and `best`
    # rank by the sweep's metric and goal: all must agree, or `best` is the worst run
    right_goal = goal_of(spec.metric.name)
    if spec.metric.goal != right_goal:
        raise SpecError(f"{source}: metric: {spec.metric.name} is to {right_goal}, not {spec.metric.goal} "
                        f"(leave goal out and it follows the name)")
    chosen = {spec.base.get("selection_metric")}
    if "selection_metric" in spec.parameters:
        chosen |= set(spec.parameters["selection_metric"].values or [])
    chosen -= {None, spec.metric.name}
    if chosen:
        raise SpecError(f"{source}: selection_metric {', '.join(map(str, sorted(chosen)))} differs from metric.name "
                        f"{spec.metric.name}: runs would keep checkpoints by one and be ranked by the other; "
                        f"leave selection_metric out (it follows metric.name)")
    for index, variant in enumerate(expand(spec)):
        try:
            TrainConfig.model_validate(variant)
        except ValidationError as error:
            raise SpecError(f"{source}: variant {index} {variant_label(spec, variant)}: {_describe(error)}") from None
    return spec


def load_spec(path: Path | str) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"cannot read sweep file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
    return parse_spec(data, str(path))


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The run configs of a sweep: base merged with each variant. Pure and reproducible."""
    names = sorted(spec.parameters)
    if spec.method == "grid":
        grids = [spec.parameters[n].values for n in names]
        variants = [dict(zip(names, combo)) for combo in itertools.product(*grids)]
    else:
        rng = random.Random(spec.seed)
        variants = [{n: spec.parameters[n].draw(rng) for n in names} for _ in range(spec.max_runs)]
    # a run keeps its best checkpoint by the sweep's metric unless the base says otherwise
    defaults = {"selection_metric": spec.metric.name}
    return [defaults | spec.base | variant for variant in variants]


def variant_label(spec: SweepSpec, config: dict[str, Any]) -> str:
    """The swept values of one run, e.g. `lr=0.001 batch_size=32`."""
    parts = []
    for name in sorted(spec.parameters):
        value = config.get(name)
        parts.append(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)
