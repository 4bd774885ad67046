"""Mixture weights over the run, and the rows of each source every global batch holds (`data.sources`).

Why counts carried over steps: a source's exact share of a batch of B rows is rarely a whole number
of rows (0.7 × 8 = 5.6). Rounding each step on its own would drift (5.6 → 6 every step is 0.4 rows
too many per step); rounding the running total instead keeps every source within one row of its
target, at every step. The counts are a pure function of the step and the schedules, so a run
resumes (at any world size) from the step number alone.

The rule, for the 0-based step t with weights w_s(t) and target T_s(t) = Σ_{u<t} B·w_s(u)/Σw(u):
the quota of source s is q_s = T_s(t + 1) - C_s(t), what it is owed after this step; the quotas
sum to B. Each source gets ⌊q_s⌋ rows (never fewer than 0) and the rows left go, one each, to the
largest remainders q_s - ⌊q_s⌋ (ties: the earlier source). So C_s(t) - T_s(t) stays within one row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from data_tools.common import ConfigError

__all__ = ["RowCounts", "WeightSchedule", "check_total_weight", "largest_remainder"]

_TIE_DIGITS = 9  # remainders equal to this many digits tie (and go to the earlier source): float noise decides nothing


@dataclass(frozen=True)
class WeightSchedule:
    """A source's weight at every step: piecewise linear through (step, weight) points, constant before
    the first point and after the last. A plain number is one point."""

    points: tuple[tuple[int, float], ...]

    @classmethod
    def parse(cls, value: float | Sequence[Sequence[float]], key: str) -> WeightSchedule:
        """`value` as given in the config (a number or [[step, weight], …]); one-line errors name `key`."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raw = [(0, value)]
        elif isinstance(value, Sequence) and value and all(isinstance(p, Sequence) and len(p) == 2 for p in value):
            raw = [(p[0], p[1]) for p in value]
        else:
            raise ConfigError(f"'{key}' must be a number or a list of [step, weight] pairs, got {value!r}")
        points = []
        for step, weight in raw:
            if float(step) != int(step) or step < 0:
                raise ConfigError(f"'{key}': step {step} must be a whole number >= 0")
            if not weight >= 0 or math.isinf(weight):
                raise ConfigError(f"'{key}': weight {weight} at step {int(step)} must be a finite number >= 0")
            points.append((int(step), float(weight)))
        if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
            raise ConfigError(f"'{key}': steps {[p[0] for p in points]} must be ascending")
        return cls(tuple(points))

    def at(self, step: int) -> float:
        points = self.points
        if step <= points[0][0]:
            return points[0][1]
        for (s0, w0), (s1, w1) in zip(points, points[1:]):
            if step <= s1:
                return w0 + (w1 - w0) * (step - s0) / (s1 - s0)
        return points[-1][1]


def check_total_weight(schedules: dict[str, WeightSchedule], where: str) -> None:
    """Refuse schedules whose weights are all zero at some step. Their sum is linear between the
    points, so its minimum lies at a point (or at step 0): checking every point checks every step."""
    for step in sorted({0, *(s for schedule in schedules.values() for s, _ in schedule.points)}):
        if sum(schedule.at(step) for schedule in schedules.values()) <= 0:
            raise ConfigError(f"{where}: the weights of data.sources ({', '.join(schedules)}) are all zero at step {step}; "
                              "give some source a positive weight there")


def largest_remainder(quotas: Sequence[float], total: int) -> list[int]:
    """Whole counts, none negative, summing to `total`, each within one of its quota (the quotas sum to `total`)."""
    counts = [max(0, math.floor(q)) for q in quotas]

    def remainder(s: int) -> float:
        return round(quotas[s] - counts[s], _TIE_DIGITS)

    left = total - sum(counts)
    for s in sorted(range(len(quotas)), key=lambda s: (-remainder(s), s))[: max(left, 0)]:
        counts[s] += 1
    while left < 0:  # sources owed nothing took 0 instead of -1: the rows come off the smallest remainders
        s = min((s for s in range(len(quotas)) if counts[s] > 0), key=lambda s: (remainder(s), -s))
        counts[s], left = counts[s] - 1, left + 1
    return counts


class RowCounts:
    """C_s(t): the rows of source s in the first t global batches (the module docstring's rule).

    The rule is sequential (each step's quotas carry the earlier steps' rounding), so reaching step t
    costs t small steps (~10-40 µs each): `at` remembers the last state it reached, and `from_step`
    starts from it when it can, so a resume walks from step 0 once and the loop's calls cost a step each.
    """

    def __init__(self, schedules: Sequence[WeightSchedule], global_batch: int) -> None:
        self.schedules, self.global_batch = tuple(schedules), global_batch
        self._state = self._start()

    def _start(self) -> tuple[int, list[int], list[float]]:
        """(step, counts, counts - targets) before the first batch."""
        return 0, [0] * len(self.schedules), [0.0] * len(self.schedules)

    def shares(self, step: int) -> list[float]:
        """Each source's fraction of the batch of `step` (0-based), by its weight then."""
        weights = [schedule.at(step) for schedule in self.schedules]
        return [w / sum(weights) for w in weights]

    def _advance(self, state: tuple[int, list[int], list[float]]) -> tuple[int, list[int], list[float]]:
        step, counts, ahead = state
        owed = [self.global_batch * share for share in self.shares(step)]
        rows = largest_remainder([o - a for o, a in zip(owed, ahead)], self.global_batch)
        return step + 1, [c + n for c, n in zip(counts, rows)], [a + n - o for a, n, o in zip(ahead, rows, owed)]

    def at(self, step: int) -> list[int]:
        """C_s(step) for every source, in source order."""
        if step < self._state[0]:
            self._state = self._start()
        while self._state[0] < step:
            self._state = self._advance(self._state)
        return list(self._state[1])

    def from_step(self, step: int) -> Iterator[tuple[int, list[int], list[int]]]:
        """(t, C(t), C(t + 1)) for t = step, step + 1, …, from `at`'s last state when it is not past `step`.
        Safe in another thread: it only reads that state, an immutable tuple that `at` replaces whole."""
        state = self._state
        if state[0] > step:
            state = self._start()
        while state[0] < step:
            state = self._advance(state)
        while True:
            following = self._advance(state)
            yield state[0], state[1], following[1]
            state = following
