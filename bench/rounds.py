"""Alternating rounds, shared by the benches that compare contenders run one after another on a shared machine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Outcome = TypeVar("Outcome")


def alternating_rounds(names: Sequence[str], rounds: int,
                       run_one: Callable[[str], Outcome | str]) -> dict[str, list[Outcome] | str]:
    """`rounds` runs of every contender in turn, every other round in reverse order, so a change of the machine's
    load during the bench falls on all of them alike; `run_one` returns a reason (str) when a run fails, and a
    contender that fails once stops."""
    runs: dict[str, list[Outcome] | str] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            if isinstance(runs[name], list):
                outcome = run_one(name)
                runs[name] = outcome if isinstance(outcome, str) else [*runs[name], outcome]
    return runs
