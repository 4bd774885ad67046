"""bench/gpu_bench.py is run on GPU machines only; here its tiny CPU mode proves it works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_tiny_mode_prints_a_row_per_engine():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--engines", "DeepSpeed ZeRO-0,FSDP2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"DeepSpeed ZeRO-0", "FSDP2"}, result.stdout
    for line in rows.values():
        assert "failed" not in line and float(line.split()[-4]) > 0  # tokens/s, MFU, peak GB, s/step
