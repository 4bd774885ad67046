"""The best value of a validation metric so far: which checkpoint to keep as `best`, and when to stop.

Its state travels in every checkpoint, so a resumed run keeps counting patience where it was.
"""

from __future__ import annotations

from trainer.config import ConfigError


class BestMetric:
    def __init__(self, metric: str | None, mode: str, patience: int | None) -> None:
        """`metric` as logged, e.g. `eval/accuracy`; None turns tracking off (and early stopping with it)."""
        if patience is not None and metric is None:
            raise ConfigError("train.early_stop_patience needs train.best_metric, e.g. eval/accuracy")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.value: float | None = None
        self.step: int | None = None  # the step the best value was measured at
        self.evals_since = 0

    def update(self, scalars: dict[str, float], step: int) -> bool:
        """Record one evaluation's scalars (names without the `eval/` prefix); True when it is a new best."""
        if self.metric is None:
            return False
        name = self.metric.removeprefix("eval/")
        if name not in scalars:
            raise ConfigError(f"train.best_metric {self.metric!r}: this task logs {', '.join('eval/' + k for k in scalars)}")
        value = scalars[name]
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value, self.step, self.evals_since = value, step, 0
        else:
            self.evals_since += 1
        return better

    def exhausted(self) -> bool:
        return self.patience is not None and self.evals_since >= self.patience

    def state(self) -> dict | None:
        return None if self.metric is None else {"value": self.value, "step": self.step, "evals_since": self.evals_since}

    def restore(self, state: dict | None) -> None:
        if state and self.metric is not None:
            self.value, self.step, self.evals_since = state["value"], state["step"], state["evals_since"]
