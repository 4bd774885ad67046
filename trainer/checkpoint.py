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
import logging
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from data_tools.common import CheckpointError, first_line

STEP_DIR = re.compile(r"^step_(\d{6,})$")
ABANDONED = "abandoned"  # checkpoints newer than the one a `--resume-from` run went back to
log = logging.getLogger("trainer")


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
    sources: dict = field(default_factory=dict)  # a mixture's rows and epoch per source (trainer.mixture), checked on resume
    doc_attention: bool | None = None  # rows attended per document (data.doc_attention as resolved); None: not recorded

    def trained_doc_attention(self) -> bool | None:
        """Whether the run trained with document attention: as recorded, else (older checkpoints) as its config
        set it explicitly; None when neither says. A resume must keep it: the model learnt one kind of attention."""
        if self.doc_attention is not None:
            return self.doc_attention
        return self.config.get("data", {}).get("doc_attention")


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
            raise CheckpointError(
                f"{pointer}: names {name}, which is missing or incomplete; point it at a complete step_N directory or delete it"
            )
        return name

    def resume_tag(self, choice: str) -> str | None:
        """The checkpoint a run continues from: `latest`, `previous` (the complete one before the
        newest, when the newest is damaged) or a `step_N` tag; None for a fresh run."""
        if choice == "latest":
            return self.latest()
        complete = sorted(p.name for p in self._step_dirs() if (p / "COMPLETE").exists())
        if choice == "previous":
            pointer = self.root / "latest"
            newest = pointer.read_text().strip() if pointer.exists() else None
            earlier = [name for name in complete if newest and name < newest]
            if not earlier:
                raise CheckpointError(f"{self.root}: --resume-from previous needs a complete checkpoint before `latest` "
                                  f"({newest or 'none'}); there is none, start a new run.name")
            return earlier[-1]
        if choice not in complete:
            raise CheckpointError(f"{self.root / choice}: --resume-from {choice}: not a complete checkpoint here; "
                              f"complete ones: {', '.join(complete) or 'none'}")
        return choice

    def rewind(self, name: str) -> None:
        """Rank 0, after resuming from `name` rather than `latest`: move the newer checkpoints into
        `abandoned/` (kept for inspection, out of retention's way) and point `latest` at `name`."""
        newer = [p for p in self._step_dirs() if p.name > name]
        for path in newer:
            (self.root / ABANDONED).mkdir(exist_ok=True)
            os.replace(path, self.root / ABANDONED / path.name)
        self._point("latest", name)
        if newer:
            log.warning("moved %s to %s: this run continues from %s", ", ".join(sorted(p.name for p in newer)),
                        self.root / ABANDONED, name)

    def read_state(self, name: str) -> TrainerState:
        """The checkpoint's trainer state: plain JSON, never a pickle."""
        path = self.root / name / "trainer_state.json"
        try:
            return TrainerState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointError(f"{unreadable(path, err)}; `--resume-from previous` continues from the checkpoint "
                              f"before {name}") from None

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
            self._point(pointer, final.name)
        self._prune(state.step, keep_last, keep_every)
        return final

    def _point(self, pointer: str, name: str) -> None:
        """Rewrite a pointer file atomically: readers see the old name or the new one."""
        pointer_tmp = self.root / f"{pointer}.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, self.root / pointer)
        _fsync_dir(self.root)

    def _step_dirs(self) -> list[Path]:
        """The published step_N directories (not step_N.tmp, not abandoned/)."""
        return [p for p in self.root.iterdir() if STEP_DIR.match(p.name)]

    def _prune(self, newest: int, keep_last: int, keep_every: int | None) -> None:
        steps = sorted(int(STEP_DIR.match(p.name).group(1)) for p in self._step_dirs())
        keep = set(steps[-keep_last:]) | {newest}
        if (best := self.best()) is not None:
            keep.add(int(STEP_DIR.match(best).group(1)))
        if keep_every:
            keep |= {s for s in steps if s % keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.root / tag(step))


def unreadable(path: Path, err: Exception) -> CheckpointError:
    """The one-line error for a checkpoint file that cannot be loaded safely: a pickle that would
    construct more than tensors and plain records (a pickle can run code), or a damaged file."""
    if isinstance(err, pickle.UnpicklingError):
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "a disallowed object")
        return CheckpointError(f"{path}: refused, it is not a plain tensor checkpoint ({found}); only load checkpoints you wrote")
    return CheckpointError(f"{path}: unreadable ({first_line(err)}); the checkpoint is truncated or corrupt")


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
