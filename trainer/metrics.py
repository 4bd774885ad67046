"""Rank 0's record of a run: TensorBoard scalars, `metrics.jsonl` for scripts, one console line.

On resume everything logged after the checkpoint step is dropped first (TensorBoard's
`purge_step`, and the tail of metrics.jsonl), so curves never fold back over themselves.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger("trainer")

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per device, for MFU

# metrics.jsonl key → TensorBoard tag of a logged training step (the record's other keys are jsonl only)
TRAIN_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "tokens_per_s": "perf/tokens_per_s", "step_s": "perf/step_s",
    "data_wait_frac": "perf/data_wait_frac", "peak_mem_gb": "mem/peak_gb", "nan_skips": "train/nan_skips",
    "grad_norm": "train/grad_norm", "mfu": "perf/mfu", "seq_len": "train/seq_len",
}


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, config_text: str, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)  # also a restart from 0
            if not resume_step:
                self.writer.add_text("config", "```yaml\n" + config_text + "\n```", 0)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, record: dict, tags: Mapping[str, str]) -> None:
        """metrics.jsonl gets `record` with the step; TensorBoard gets each value `tags` names a tag for
        (record key → tag), skipping None. One dict per event, so a value is written in one place."""
        if not self.enabled:
            return
        if self.writer is not None:
            for key, tag in tags.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        """Text for TensorBoard's Text tab (generated samples), markdown."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_flops(peak_tflops: float | None) -> float | None:
    """A device's peak FLOP/s for MFU: `metrics.peak_tflops` when set, else the known GPU's, else None (no MFU)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((tf * 1e12 for gpu, tf in PEAK_TFLOPS.items() if gpu in name), None)
    return None


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
