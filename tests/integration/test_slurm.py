"""The SLURM launcher against a real SLURM (slurm_cluster.py: two nodes on loopback, accounting on).

A 2-node DeepSpeed job trains exactly like torchrun with 2 processes; `scontrol requeue` in the
middle of an FSDP2 run gives the same losses bitwise after the automatic resume; a `--time`
shorter than the run is crossed by requeues on SIGUSR2; the data stages run as job arrays, a rerun
after a cancelled element submits only that task and the shards equal a local run's; sbatch's
refusals are one line.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401  (provides the fixture slurm_cluster)
from test_train import losses, metrics
from trainer_runs import ENV, train_cmd

pytestmark = pytest.mark.slow

STEPS = 200
LONG = [f"train.max_steps={STEPS}", "train.ckpt_every=100", "train.eval_every=100"]
DEEPSPEED = ["engine.type=deepspeed", *LONG]
FSDP2 = ["engine.type=fsdp2", *LONG]


def launch(cluster: SlurmCluster, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], env={**ENV, "SLURM_CONF": str(cluster.conf)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def train_job(cluster: SlurmCluster, config_file: Path, run_dir: Path, *args: str) -> str:
    """Submit a 2-node × 1-task CPU training job into `run_dir`; its job id."""
    out = launch(cluster, *train_args(config_file, run_dir, *args)).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


def train_args(config_file: Path, run_dir: Path, *args: str) -> list[str]:
    return ["slurm", "train", "--config", config_file, "--nodes", "2", "--gpus-per-node", "0", "--time", "5",
            f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *args]


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "slurm" / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, config_file):
    """The run directory of the same training as a SLURM job, uninterrupted, by torchrun with 2
    processes (run once per set of overrides)."""
    runs: dict[tuple[str, ...], Path] = {}

    def reference(*overrides: str) -> Path:
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("torchrun") / "ref"
            subprocess.run(train_cmd(config_file, 2, run_dir, *overrides), env=ENV, check=True, capture_output=True, timeout=600)
            runs[overrides] = run_dir
        return runs[overrides]

    return reference


def test_two_nodes_train_exactly_like_torchrun(slurm_cluster, tmp_path, config_file, torchrun):
    run_dir = tmp_path / "two-nodes"
    dry_run = launch(slurm_cluster, *train_args(config_file, run_dir, *DEEPSPEED), "--dry-run").stdout
    job = train_job(slurm_cluster, config_file, run_dir, *DEEPSPEED)
    assert slurm_cluster.wait_for(job) == "COMPLETED", (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()[-3000:]
    assert losses(run_dir) == losses(torchrun(*DEEPSPEED))
    submitted = (run_dir / "slurm" / job / f"{job}_submission.sh").read_text()
    assert submitted.rstrip() in dry_run  # the dry run printed exactly what sbatch got
    assert [e["event"] for e in events(run_dir)] == ["start", "end"]
    status = launch(slurm_cluster, "status", run_dir).stdout
    assert f"job:        {job} COMPLETED" in status and f"checkpoint: step_{STEPS:06d}" in status


def test_scontrol_requeue_resumes_with_the_same_losses(slurm_cluster, tmp_path, config_file, torchrun):
    run_dir = tmp_path / "requeued"
    job = train_job(slurm_cluster, config_file, run_dir, *FSDP2)
    wait_until(lambda: logged_steps(run_dir) >= 20, "step 20")
    requeued = time.monotonic()
    slurm_cluster.run("scontrol", "requeue", job)
    log = run_dir / "slurm" / job / f"{job}_0_log.err"
    wait_until(lambda: "resumed from" in log.read_text(), "the requeued job to resume")
    print(f"\nscontrol requeue → 'resumed from' in the log: {time.monotonic() - requeued:.1f} s")
    assert slurm_cluster.wait_for(job) == "COMPLETED", log.read_text()[-3000:]
    assert losses(run_dir) == losses(torchrun(*FSDP2))
    stops = [e for e in events(run_dir) if e["event"] == "stop"]
    assert [(e["signal"], e["restart"]) for e in stops] == [("SIGTERM", 0)]
    assert max(e["restart"] for e in events(run_dir)) == 1
    assert "requeues:   1 (at most 10)" in launch(slurm_cluster, "status", run_dir).stdout


def test_time_limit_shorter_than_the_run_is_crossed_by_requeues(slurm_cluster, tmp_path, config_file, torchrun):
    """--time 1 with SIGUSR2 5 s before it, and about 60 s of training at the speed torchrun just
    had: more than one allocation can hold (SLURM signals 25–55 s after the start)."""
    step_s = statistics.median(m["step_s"] for m in metrics(torchrun(*DEEPSPEED)) if "step_s" in m)
    steps = 10 * math.ceil(60 / step_s / 10)
    run_dir = tmp_path / "time-limited"
    overrides = ["engine.type=deepspeed", f"train.max_steps={steps}", f"train.ckpt_every={steps}", f"train.eval_every={steps}",
                 "train.log_every=10"]
    job = train_job(slurm_cluster, config_file, run_dir, *overrides, "--time", "1", "--signal-delay", "5")
    log = run_dir / "slurm" / job / f"{job}_0_log.err"
    assert slurm_cluster.wait_for(job, timeout=600) == "COMPLETED", log.read_text()[-3000:]
    assert sorted(losses(run_dir)) == list(range(10, steps + 1, 10))  # every logged step once: none lost, none repeated
    stops = [e for e in events(run_dir) if e["event"] == "stop"]
    assert stops and all(e["signal"] == "SIGUSR2" and e["action"].startswith("requeued") for e in stops), stops
    print(f"\n{steps} steps in {len(stops) + 1} allocations of --time 1, stopped at {[e['checkpoint'] for e in stops]}")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"


def test_data_arrays_rerun_only_the_missing_task(slurm_cluster, tmp_path, corpora):
    config = tmp_path / "pipeline.yaml"
    config.write_text("dedup: {bands: 4, rows_per_band: 28, buckets_per_band: 1}\n")  # 5 bucket tasks, not 152
    prepare = ["--input", corpora / "handbook-multilingual.warc.gz", "--input", corpora / "iana.warc.gz",
               "--input", corpora / "enwiki-sample.xml.bz2", "--train-tokenizer", "512", "--seq-len", "64",
               "--valid-fraction", "0.1", "--task-mb", "1", "--config", config]
    local = subprocess.Popen([sys.executable, "-m", "data_tools", "-q", "prepare", *map(str, prepare), "--workers", "1",
                              "--output", str(tmp_path / "local")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out_dir = tmp_path / "slurm"
    submit = ["slurm", "data", "--time", "10", "--array-parallelism", "2", *prepare, "--output", out_dir]
    first = launch(slurm_cluster, *submit).stdout
    extract, *_, manifest = re.findall(r"job (\d+)", first)
    assert "extract: array of 4 (plan tasks 0-3)" in first and "bucket: array of 5 (plan tasks 0-4)" in first
    slurm_cluster.run("scancel", f"{extract}_3")  # still pending: at most 2 elements run at once
    assert slurm_cluster.wait_for(manifest) == "CANCELLED"  # afterok can no longer be met: the chain is cancelled

    second = launch(slurm_cluster, *submit).stdout
    assert "submitted extract: array of 1 (plan tasks 3)" in second and "tokenize: array of 4 (plan tasks 0-3)" in second
    assert "pack: array of 4 (plan tasks 0-3)" in second
    manifest = re.findall(r"job (\d+)", second)[-1]
    assert slurm_cluster.wait_for(manifest) == "COMPLETED", launch(slurm_cluster, "status", out_dir).stdout
    assert local.wait(timeout=300) == 0, local.stderr.read()
    for split in ("train", "valid"):
        shards = [json.loads((d / "tokens" / split / "manifest.json").read_text())["shards"]
                  for d in (out_dir, tmp_path / "local")]
        assert [s["sha256"] for s in shards[0]] == [s["sha256"] for s in shards[1]] and shards[0], split


@pytest.mark.parametrize("args, reason", [(["--partition", "nope"], "Invalid partition name specified"),
                                          (["--nodes", "3"], "More processors requested than permitted")])
def test_sbatch_refusals_are_one_line(slurm_cluster, tmp_path, config_file, args, reason):
    result = launch(slurm_cluster, *train_args(config_file, tmp_path / "refused", *args), expect=2)
    assert result.stderr == f"error: sbatch refused the job: Batch job submission failed: {reason}\n"
