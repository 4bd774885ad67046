"""Checkpoint directory layout, atomic publication, `latest`, retention and trainer state.

    <run>/checkpoints/step_000500/   engine shards, trainer_state.json, COMPLETE
    <run>/checkpoints/latest         names the newest complete checkpoint
    <run>/checkpoints/best           names the best one by `train.best_metric` (kept by retention)

Engines write into `step_N.tmp/`; once every rank has finished, rank 0 adds
`trainer_state.json` and `COMPLETE`, renames the directory and only then rewrites `latest`.
A crash at any moment therefore leaves the previous checkpoint usable, and a directory without
`COMPLETE` is never loaded.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    tokens: int
    data_fingerprint: str
    world_size: int
    engine: str  # deepspeed or fsdp2: the shard format
    zero_stage: int | None
    model_shape: dict  # arch and sizes: a checkpoint of another shape is refused by name
    nan_skips: int = 0
    config: dict = field(default_factory=dict)
    best: dict | None = None  # the best-metric tracker's state (trainer.early_stop), so patience resumes exactly


def tag(step: int) -> str:
    return f"step_{step:06d}"


class Checkpoints:
    def __init__(self, root: Path) -> None:
        self.root = root

    def latest(self) -> str | None:
        """The tag `latest` names, checked to be a complete checkpoint; None for a fresh run."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        return self._complete(pointer)

    def best(self) -> str | None:
        """The tag `best` names (a run with `train.best_metric`), else None."""
        pointer = self.root / "best"
        return self._complete(pointer) if pointer.exists() else None

    def _complete(self, pointer: Path) -> str:
        name = pointer.read_text().strip()
        if not (self.root / name / "COMPLETE").exists():
            raise ConfigError(
                f"{pointer}: names {name}, which is missing or incomplete; point it at a complete step_N directory or delete it"
            )
        return name

    def read_state(self, name: str) -> TrainerState:
        return TrainerState(**json.loads((self.root / name / "trainer_state.json").read_text()))

    def staging(self, step: int) -> str:
        """Tag of the temporary directory engines write into."""
        return tag(step) + ".tmp"

    def clear_staging(self, step: int) -> None:
        """Remove what a killed run left half-written for this step."""
        shutil.rmtree(self.root / self.staging(step), ignore_errors=True)

    def publish(self, state: TrainerState, keep_last: int, keep_every: int | None, best: bool = False) -> Path:
        """Rank 0, after all ranks wrote: state + COMPLETE, rename, `latest` (and `best`), retention."""
        staging, final = self.root / self.staging(state.step), self.root / tag(state.step)
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
        (staging / "COMPLETE").write_text("")
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for pointer in ("latest", "best") if best else ("latest",):
            pointer_tmp = self.root / f"{pointer}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.root / pointer)
        _fsync_dir(self.root)
        self._prune(state.step, keep_last, keep_every)
        return final

    def _prune(self, newest: int, keep_last: int, keep_every: int | None) -> None:
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))
        keep = set(steps[-keep_last:]) | {newest}
        if (best := self.best()) is not None:
            keep.add(int(STEP_DIR.match(best).group(1)))
        if keep_every:
            keep |= {s for s in steps if s % keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.root / tag(step))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> str:
    """This process's torch RNG state as base64 text: JSON, so no pickle in a checkpoint."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(state: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))
