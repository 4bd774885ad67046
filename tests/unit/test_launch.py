"""The launcher without a cluster: dry runs (64 nodes × 8 GPUs, CPU clusters, data arrays), argument
checks, the rendezvous each task derives from SLURM's variables, the requeue decision and signal
forwarding of a task, sbatch's refusal as one line, and `status`. The real SLURM runs are in
tests/integration/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from data_tools.config import DedupConfig
from data_tools.dedup import bucket_count
from launch import sbatch
from launch.cli import main
from launch.data_array import Step, pending_steps
from launch.local import command, cpu_environment
from launch.slurm import EXIT_REQUEUE, TrainTask, first_host, master_port, read_events, task_env
from launch.status import status

ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = ROOT / "examples" / "llama-8b-deepspeed.yaml"


@pytest.fixture
def no_slurm(tmp_path, monkeypatch) -> Path:
    """A working directory on a machine without any SLURM command (and no OMP_NUM_THREADS to pass on)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path


def fake_commands(tmp_path: Path, monkeypatch, **scripts: str) -> Path:
    """Put shell scripts named like SLURM commands first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_dry_run_of_64_nodes_with_8_gpus(no_slurm, capsys):
    code = main(["slurm", "train", "--config", str(LLAMA_8B), "--nodes", "64", "--gpus-per-node", "8", "--partition", "gpu",
                 "--time", "04:00:00", "--account", "proj", "--qos", "high", "--constraint", "h100", "--exclusive",
                 "--mem", "0", "--cpus-per-task", "12", "--setup", "module load cuda/12.4", "--dry-run", "train.max_steps=1000"])
    out = capsys.readouterr().out
    assert code == 0
    script = out.split("# ---- sbatch script ----\n")[1].split("\n\n# ---- each")[0]
    for line in ("#SBATCH --nodes=64", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=240", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --cpus-per-task=12", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "module load cuda/12.4"):
        assert line in script.splitlines(), line
    run_dir = no_slurm / "runs" / "llama-8b-deepspeed"
    assert f"#SBATCH --error={run_dir}/slurm/%j/%j_0_log.err" in script
    assert "--wckey" not in script
    srun = script.splitlines()[-1]
    assert srun.startswith("srun --unbuffered") and srun.endswith(f"-u -m submitit.core._submit {run_dir}/slurm/%j")
    assert f"{sys.executable} -m trainer --config {LLAMA_8B} train.max_steps=1000" in out
    assert "WORLD_SIZE=512 LOCAL_WORLD_SIZE=8 MASTER_ADDR=<first host of $SLURM_JOB_NODELIST>" in out
    assert "OMP_NUM_THREADS=12" in out
    nodes = [line for line in out.splitlines() if line.startswith("#   node")]
    assert len(nodes) == 64
    assert nodes[0] == "#   node  0: RANK=0-7 LOCAL_RANK=0-7"
    assert nodes[63] == "#   node 63: RANK=504-511 LOCAL_RANK=0-7"
    assert not (no_slurm / "runs").exists()  # a dry run writes nothing


def test_cpu_cluster_runs_tasks_per_node_without_gpus(no_slurm, capsys, tmp_path):
    assert main(["slurm", "train", "--config", str(LLAMA_8B), "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "4",
                 "--time", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=4" in out and "--gpus-per-node" not in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --time=30" in out
    assert "#   node 1: RANK=4-7 LOCAL_RANK=0-3" in out
    assert "OMP_NUM_THREADS=1" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus-per-node", "8", "--tasks-per-node", "4", "--time", "60"], "the trainer runs one process per GPU"),
        (["--gpus-per-node", "8", "--time", "2"], "--signal-delay 120 s: must be shorter than --time 2"),
        (["--gpus-per-node", "8", "--time", "60", "train.no_such_key=1"], "train.no_such_key"),
    ],
    ids=["tasks-vs-gpus", "signal-after-limit", "bad-override"],
)
def test_a_job_that_cannot_work_is_refused_in_one_line(no_slurm, capsys, args, message):
    assert main(["slurm", "train", "--config", str(LLAMA_8B), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "value, expected",
    [("240", 240), ("04:00:00", 240), ("90:30", 91), ("1-00", 1440), ("1-02:30", 1590), ("2-00:00:01", 2881), ("0:30", 1)],
)
def test_time_in_slurm_formats(value, expected):
    assert sbatch.minutes(value) == expected


def test_a_bad_time_is_an_argument_error(no_slurm, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "train", "--config", str(LLAMA_8B), "--gpus-per-node", "8", "--time", "4h"])
    assert exit_info.value.code == 2
    assert "--time 4h: use MINUTES" in capsys.readouterr().err


@pytest.mark.parametrize(
    "nodelist, host",
    [("n[1-2]", "n1"), ("gpu[007-010,3],cpu1", "gpu007"), ("node17", "node17"), ("a1,b2", "a1"),
     ("rack[2-3]-n[05-06]", "rack2-n05")],
)
def test_master_is_the_first_host_of_the_allocation(nodelist, host):
    assert first_host(nodelist) == host


def test_each_task_derives_its_rank_and_the_same_rendezvous():
    slurm = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "6"}
    env = task_env(slurm)
    assert env == {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu01",
                   "MASTER_PORT": str(master_port("4242", 0)), "OMP_NUM_THREADS": "6"}
    assert task_env({**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})["MASTER_PORT"] == env["MASTER_PORT"]
    assert task_env({**slurm, "SLURM_RESTART_COUNT": "1"})["MASTER_PORT"] != env["MASTER_PORT"]
    assert 20000 <= int(env["MASTER_PORT"]) < 60000


def test_without_sbatch_submitting_says_so(no_slurm, capsys):
    assert main(["slurm", "train", "--config", str(LLAMA_8B), "--gpus-per-node", "8", "--time", "60"]) == 2
    err = capsys.readouterr().err
    assert err == "error: sbatch not found on PATH: run this on a SLURM login node, or add --dry-run to see the job\n"


def test_sbatch_refusal_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fake_commands(tmp_path, monkeypatch, srun="exit 0",
                  sbatch='echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1')
    assert main(["slurm", "train", "--config", str(LLAMA_8B), "--gpus-per-node", "8", "--partition", "nope", "--time", "60"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: sbatch refused the job: Batch job submission failed: Invalid partition name specified\n"
    assert list((tmp_path / "runs" / "llama-8b-deepspeed" / "slurm").iterdir()) == []


def test_resume_from_reaches_the_trainer_of_the_first_allocation(no_slurm, capsys):
    checkpoints = no_slurm / "runs" / "llama-8b-deepspeed" / "checkpoints"
    (checkpoints / "step_000040").mkdir(parents=True)
    (checkpoints / "step_000040" / "COMPLETE").touch()
    args = ["slurm", "train", "--config", str(LLAMA_8B), "--gpus-per-node", "8", "--time", "60", "--dry-run"]
    assert main([*args, "--resume-from", "step_000040", "train.max_steps=1000"]) == 0
    out = capsys.readouterr().out
    assert f"-m trainer --config {LLAMA_8B} train.max_steps=1000 --resume-from step_000040\n" in out
    assert "(--resume-from step_000040 in the first allocation only; a requeued one resumes from latest)" in out
    assert main([*args, "--resume-from", "step_000099"]) == 2  # refused at submission, not when the job starts
    err = capsys.readouterr().err
    assert err == (f"error: {checkpoints / 'step_000099'}: --resume-from step_000099: not a complete checkpoint here; "
                   "complete ones: step_000040\n")



# ---------------------------------------------------------------------- what a task does when the trainer stops


@pytest.fixture
def in_job(tmp_path, monkeypatch) -> Path:
    """Rank 0 of job 77 (restarted once so far), with a fake scontrol that records its arguments."""
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"}.items():
        monkeypatch.setenv(key, value)
    fake_commands(tmp_path, monkeypatch, scontrol=f'echo "$@" >> {tmp_path}/scontrol.calls')
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000040\n")
    return tmp_path


def task(in_job: Path, max_requeues: int = 10, command: list[str] = ()) -> TrainTask:
    return TrainTask(list(command), str(in_job), str(in_job / "run"), max_requeues)


def test_usr2_makes_rank_0_requeue_its_job(in_job):
    with pytest.raises(SystemExit) as exit_info:
        task(in_job).stopped(signal.SIGUSR2)
    assert exit_info.value.code == EXIT_REQUEUE
    assert (in_job / "scontrol.calls").read_text() == "requeue 77\n"
    stop = read_events(in_job / "run")[-1]
    assert (stop["signal"], stop["checkpoint"], stop["action"]) == ("SIGUSR2", "step_000040", "requeued (2 of at most 10)")


def test_no_requeue_past_the_cap(in_job):
    with pytest.raises(RuntimeError, match=r"already requeued 1 times \(--max-requeues 1\); submit the same command again"):
        task(in_job, max_requeues=1).stopped(signal.SIGUSR2)
    assert not (in_job / "scontrol.calls").exists()
    assert read_events(in_job / "run")[-1]["action"] == "not requeued: --max-requeues 1 reached"


def test_sigterm_leaves_the_decision_to_slurm(in_job):
    with pytest.raises(SystemExit):
        task(in_job).stopped(signal.SIGTERM)
    assert not (in_job / "scontrol.calls").exists()
    assert read_events(in_job / "run")[-1]["signal"] == "SIGTERM"


@pytest.fixture
def own_handlers():
    """TrainTask installs handlers for the stop signals; put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_before_the_trainer_is_ready_is_forwarded_not_fatal(in_job, own_handlers):
    """SIGUSR2 while the trainer still loads (its handler not yet installed): the trainer must not
    die of it; it gets it again once ready, checkpoints, exits 75, and rank 0 requeues."""
    trainer = ("import signal, sys, time\n"
               "time.sleep(1.5)\n"  # loading: the stop signals are ignored until here
               "got = []\n"
               "signal.signal(signal.SIGUSR2, lambda *a: got.append(1))\n"
               "while not got: time.sleep(0.05)\n"
               "sys.exit(75)\n")
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR2)).start()
    with pytest.raises(SystemExit) as exit_info:
        task(in_job, command=[sys.executable, "-c", trainer])()
    assert exit_info.value.code == EXIT_REQUEUE
    assert (in_job / "scontrol.calls").read_text() == "requeue 77\n"
    assert [e["event"] for e in read_events(in_job / "run")] == ["start", "stop"]


def test_only_the_first_allocation_resumes_from_the_requested_checkpoint(in_job, own_handlers, monkeypatch):
    """A requeued allocation continues from `latest`: resuming from step_N again would undo the steps made since."""
    argv = in_job / "argv.jsonl"
    trainer = [sys.executable, "-c", f"import json, sys; open({str(argv)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')",
               "--config", "c.yaml"]
    for restart in ("0", "1"):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
        assert TrainTask(trainer, str(in_job), str(in_job / "run"), 10, "step_000020")() == 0
    runs = [json.loads(line) for line in argv.read_text().splitlines()]
    assert runs == [["--config", "c.yaml", "--resume-from", "step_000020"], ["--config", "c.yaml"]]


def test_a_trainer_error_fails_the_job(in_job, own_handlers):
    with pytest.raises(RuntimeError, match="the trainer exited with code 3"):
        task(in_job, command=[sys.executable, "-c", "raise SystemExit(3)"])()
    end = read_events(in_job / "run")[-1]
    assert (end["event"], end["exit_code"]) == ("end", 3)


# ---------------------------------------------------------------------- data jobs


def inputs(corpora: Path) -> list[str]:
    return ["--input", str(corpora / "iana.warc.gz"), "--input", str(corpora / "enwiki-sample.xml.bz2")]


@pytest.fixture
def planned(tmp_path, corpora) -> Path:
    """A data job of 3 tasks (one WARC, a Wikipedia dump in two), planned but not run."""
    from data_tools.cli import main as data_main

    out = tmp_path / "data"
    assert data_main(["-q", "prepare", *inputs(corpora), "--output", str(out), "--train-tokenizer", "512", "--seq-len", "64",
                      "--task-mb", "1", "--plan-only"]) == 0
    return out


def mark_done(out: Path, stage: str, index: int | None = None) -> None:
    from data_tools.pipeline import Job

    Job(out).marker(stage, index).write_text("{}")


def test_the_chain_of_data_jobs_holds_only_what_has_no_marker(planned):
    buckets = list(range(bucket_count(DedupConfig())))  # (37 bands + the exact key) × 4 hash ranges
    steps = pending_steps(planned)
    assert [(s.name, s.tasks) for s in steps] == [("extract", [0, 1, 2]), ("bucket", buckets), ("cluster+tokenizer", None),
                                                  ("tokenize", [0, 1, 2]), ("pack", [0, 1, 2]), ("manifest", None)]
    for index in (0, 2):
        mark_done(planned, "extract", index)
    assert pending_steps(planned)[0] == Step(("extract",), [1])
    mark_done(planned, "extract", 1)
    for index in buckets[:-1]:
        mark_done(planned, "bucket", index)
    assert pending_steps(planned)[0] == Step(("bucket",), [buckets[-1]])
    mark_done(planned, "bucket", buckets[-1])
    mark_done(planned, "cluster")
    mark_done(planned, "tokenize", 1)
    mark_done(planned, "pack", 0)
    assert [(s.name, s.tasks) for s in pending_steps(planned)] == [("tokenizer", None), ("tokenize", [0, 2]), ("pack", [1, 2]),
                                                                   ("manifest", None)]


def test_data_dry_run_shows_each_job_and_its_dependency(planned, no_slurm, capsys, corpora):
    mark_done(planned, "extract", 0)
    code = main(["slurm", "data", "--time", "01:00:00", "--array-parallelism", "2", "--partition", "cpu", "--dry-run",
                 *inputs(corpora), "--output", str(planned), "--train-tokenizer", "512", "--seq-len", "64", "--task-mb", "1"])
    out = capsys.readouterr().out
    assert code == 0
    sections = out.split("# ---- ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "extract: array of 2 (plan tasks 1-2) ----", "bucket: array of 152 (plan tasks 0-151) ----",
        "cluster+tokenizer: one job ----", "tokenize: array of 3 (plan tasks 0-2) ----", "pack: array of 3 (plan tasks 0-2) ----",
        "manifest: one job ----"]
    assert "#SBATCH --array=0-1%2" in sections[0] and "--dependency" not in sections[0]
    assert f"# element 0: python -m data_tools run {planned} --stage extract --task 1" in sections[0]
    assert "#SBATCH --dependency='afterok:<job id of extract>'" in sections[1]
    assert "#SBATCH --kill-on-invalid-dep=yes" in sections[1]
    assert f"# element 151: python -m data_tools run {planned} --stage bucket --task 151" in sections[1]
    assert "#SBATCH --dependency='afterok:<job id of bucket>'" in sections[2]
    assert "#SBATCH --array=0-2%2" in sections[3] and "#SBATCH --partition=cpu" in sections[5]
    assert not (planned / "slurm").exists()


def test_a_data_job_published_elsewhere_ends_with_the_publish_step(planned, no_slurm, capsys, corpora, tmp_path):
    """With --work-dir (as for an s3:// --output), the last job publishes the products; its marker removes the step."""
    products = tmp_path / "products"
    code = main(["slurm", "data", "--time", "01:00:00", "--dry-run", *inputs(corpora), "--output", str(products),
                 "--work-dir", str(planned), "--train-tokenizer", "512", "--seq-len", "64", "--task-mb", "1"])
    sections = capsys.readouterr().out.split("# ---- ")[1:]
    assert code == 0 and sections[-1].splitlines()[0] == "manifest+publish: one job ----"
    assert (f"# runs: python -m data_tools run {planned} --stage manifest; "
            f"python -m data_tools publish {planned} --output {products}") in sections[-1]
    mark_done(planned, "manifest")
    assert pending_steps(planned, str(products))[-1] == Step(("publish",))
    (planned / "_done" / "publish.json").write_text(json.dumps({"output": str(products)}))
    assert pending_steps(planned, str(products))[-1] == Step(("pack",), [0, 1, 2])

# ---------------------------------------------------------------------- status and the local launcher


def test_status_of_a_requeued_run(tmp_path, no_slurm):
    run_dir = tmp_path / "run"
    sbatch.record(run_dir, "12", "train", nodes=2, tasks_per_node=8, command=[], max_requeues=10)
    events = [{"time": "t0", "event": "start", "job_id": "12", "restart": 0},
              {"time": "t1", "event": "stop", "job_id": "12", "restart": 0, "signal": "SIGUSR2", "checkpoint": "step_000300",
               "action": "requeued (1 of at most 10)"},
              {"time": "t2", "event": "start", "job_id": "12", "restart": 1}]
    (run_dir / "slurm" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_000300\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 310, "loss": 2.5}\n{"step": 310, "eval_loss": 2.7}\n')
    submitted = sbatch.submissions(run_dir)[0]["time"]
    assert status(run_dir)[1:] == [
        f"job:        12 unknown (neither sacct nor squeue knows it here) (submitted {submitted}; 2 nodes × 8 tasks)",
        "requeues:   1 (at most 10)",
        "            t1  SIGUSR2 at step_000300: requeued (1 of at most 10)",
        f"log:        tail -f {run_dir}/slurm/12/12_0_log.err",
        "checkpoint: step_000300",
        "last step:  310 (loss 2.5000)",
    ]


def test_status_of_a_missing_directory(no_slurm, capsys):
    assert main(["status", str(no_slurm / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {no_slurm / 'nope'}: no such directory\n"


def test_local_command_lines(tmp_path):
    config = tmp_path / "c.yaml"
    assert command(config, ["a.b=1"], 4, "torchrun", 29500) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", "29500", "-m", "trainer",
        "--config", str(config), "a.b=1"]
    assert command(config, [], 2, "deepspeed", 29500)[1:] == ["--num_gpus", "2", "--master_port", "29500", "--module", "trainer",
                                                             "--config", str(config)]
    assert cpu_environment(cuda=True, nproc=2, cores=2) == {}


@pytest.mark.parametrize(("nproc", "threads"), [(1, "2"), (2, "1"), (4, "1")])
def test_local_processes_share_the_cores(monkeypatch, nproc, threads):
    """One process gets both cores, two one each (not torchrun's 1 for any count, nor 2 x 2 on 2 cores)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert cpu_environment(cuda=False, nproc=nproc, cores=2) == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}
