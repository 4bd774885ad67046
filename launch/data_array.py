"""data_tools stages as SLURM jobs: `python -m launch slurm data <prepare options>`.

The plan is written on the login node (`data_tools prepare --plan-only`). Then each stage that
still has work is one job: a per-task stage (extract, bucket, tokenize, pack; `pipeline.STAGES`
and `Job.task_count` say which and how many) is a job array over the tasks without a completion
marker, at most `--array-parallelism` running at once; consecutive single steps (cluster +
tokenizer, manifest) share one job. Each job depends on the one before with `afterok` (SLURM
starts it when the previous one succeeded, and cancels it if that failed), so nothing waits on
the login node. Running the same command again submits only what has no marker yet: after a
failed or cancelled array element, that task and the steps after it.

When the products go elsewhere than the work directory (an `s3://` --output, or --work-dir given), the
last job also publishes them (`data_tools publish`, skipped once its marker says it is done).

A stage larger than the cluster's `MaxArraySize` (`--max-array-size`, 1001 by default) is split
into several arrays, at most `--array-parallelism` elements running in all (data_tools.arrays);
the next job waits for every one of them.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_tools.arrays import ArrayChunk, split_array
from launch import sbatch

ELEMENTS_SHOWN = 3  # a dry run lists the first and last few elements of each array
PUBLISH = "publish"  # the step after the stages that copies the products to --output (data_tools.publish)


@dataclass
class Step:
    """One job of the chain: `stages` in order, once (tasks is None) or as an array over `tasks`."""

    stages: tuple[str, ...]
    tasks: list[int] | None = None

    @property
    def name(self) -> str:
        return "+".join(self.stages)


def pending_steps(out: Path, output: str | None = None) -> list[Step]:
    """The jobs still to run for the data job in `out`, from its plan and completion markers; `output` is where the
    products are published at the end, or None when `out` is the output itself."""
    from data_tools.pipeline import PER_TASK_STAGES, STAGES, Job
    from data_tools.publish import is_published

    job = Job(out)
    publish = output is not None and not is_published(out, output)
    steps: list[Step] = []
    for stage in (*STAGES, PUBLISH):
        if stage in PER_TASK_STAGES:
            if pending := job.pending(stage):
                steps.append(Step((stage,), pending))
        elif publish if stage == PUBLISH else not job.is_done(stage):
            if steps and steps[-1].tasks is None:
                steps[-1].stages += (stage,)
            else:
                steps.append(Step((stage,)))
    return steps


def stage_args(out: str, stage: str, task: int | None, output: str | None = None) -> list[str]:
    """The `python -m data_tools` arguments that run one stage (one task of it), or publish the products to `output`."""
    if stage == PUBLISH:
        return [PUBLISH, out, "--output", output]
    return ["run", out, "--stage", stage, *(["--task", str(task)] if task is not None else [])]


def run_step(out: str, stages: tuple[str, ...], task: int | None, output: str | None = None) -> None:
    """What a job (or one array element) runs: `python -m data_tools run` for each stage, then maybe `publish`."""
    from data_tools.cli import main

    for stage in stages:
        args = stage_args(out, stage, task, output)
        if main(args):
            raise RuntimeError(f"python -m data_tools {shlex.join(args)} failed (the error is above)")


@dataclass
class DataJobs:
    """The chain of jobs for one data directory."""

    prepare_args: list[str]
    array_parallelism: int
    resources: sbatch.Resources
    max_array_size: int = 1001

    def __post_init__(self) -> None:
        from data_tools.cli import build_parser, is_published_elsewhere, work_dir

        args = build_parser().parse_args(["prepare", *self.prepare_args])
        self.out: Path = work_dir(args.output, args.work_dir).resolve()  # the job directory the stages run in
        self.output: str | None = args.output if is_published_elsewhere(args.output, self.out) else None  # to publish to

    def plan(self) -> int:
        """Write (or check) plan.json; the exit code of `data_tools prepare --plan-only`."""
        from data_tools.cli import main

        slurm = ["--array-parallelism", str(self.array_parallelism), "--max-array-size", str(self.max_array_size)]
        return main(["prepare", *self.prepare_args, *slurm, "--plan-only"])

    def parameters(self, step: Step, chunk: ArrayChunk | None, after: list[str]) -> dict:
        extra: dict = {}
        if after:
            extra.update(dependency="afterok:" + ":".join(after), additional_parameters={"kill-on-invalid-dep": "yes"})
        if chunk is not None:
            extra["array_parallelism"] = chunk.throttle
        return self.resources.parameters(job_name=f"{self.out.name}-{step.name}", **extra)

    def chain(self, steps: list[Step], submit: Callable[[Step, ArrayChunk | None, str, dict], str]) -> None:
        """Walk the jobs in order: `submit(step, array, job name, sbatch parameters)` returns the job's id. An array
        waits for the step before it and for its lane's previous array; the next step waits for each lane's last."""
        previous: list[str] = []
        for step in steps:
            chunks = [None] if step.tasks is None else split_array(len(step.tasks), self.array_parallelism, self.max_array_size)
            ids: list[str] = []
            for j, chunk in enumerate(chunks):
                name = step.name if len(chunks) == 1 else f"{step.name}[{j + 1}/{len(chunks)}]"
                after = previous + ([ids[chunk.after]] if chunk is not None and chunk.after is not None else [])
                ids.append(submit(step, chunk, name, self.parameters(step, chunk, after)))
            waited = {chunk.after for chunk in chunks if chunk is not None}
            previous = [job_id for j, job_id in enumerate(ids) if j not in waited]  # each lane's last array

    def describe(self, steps: list[Step]) -> str:
        """The dry run: each job's sbatch script and what its elements run."""
        lines = [f"data job: {self.out}",
                 f"logs:     {sbatch.folder(self.out)}/ (%j = the job id, <array id>_<element> for arrays)"]

        def show(step: Step, chunk: ArrayChunk | None, name: str, params: dict) -> str:
            tasks = step.tasks[chunk.first : chunk.first + chunk.count] if chunk else [None]
            array = len(tasks) if len(tasks) > 1 else None  # submitit submits one call as a plain job
            lines.extend(["", f"# ---- {summary(step, name, tasks)} ----", sbatch.script(self.out, params, array).rstrip()])
            for element, task in enumerate(tasks):
                if ELEMENTS_SHOWN <= element < len(tasks) - ELEMENTS_SHOWN:
                    if element == ELEMENTS_SHOWN:
                        lines.append(f"# elements {element}-{len(tasks) - ELEMENTS_SHOWN - 1}: likewise")
                    continue
                prefix = f"# element {element}: " if chunk else "# runs: "
                runs = (shlex.join(stage_args(str(self.out), s, task, self.output)) for s in step.stages)
                lines.append(prefix + "; ".join(f"python -m data_tools {args}" for args in runs))
            return f"<job id of {name}>"

        self.chain(steps, show)
        return "\n".join(lines)

    def submit(self, steps: list[Step]) -> list[tuple[Step, str, list[int] | None, str, str]]:
        """Submit the chain; (step, job name, its plan tasks, job id, id of its first task's job) for each job."""
        submitted = []

        def send(step: Step, chunk: ArrayChunk | None, name: str, params: dict) -> str:
            if chunk is None:
                job_id = first = sbatch.submit(self.out, params, run_step, str(self.out), step.stages, None, self.output)
                tasks = None
            else:
                tasks = step.tasks[chunk.first : chunk.first + chunk.count]
                job_id, first = sbatch.submit_array(self.out, params, run_step, [(str(self.out), step.stages, t) for t in tasks])
            sbatch.record(self.out, job_id, step.name, tasks=tasks, dependency=params.get("dependency"))
            submitted.append((step, name, tasks, job_id, first))
            return job_id

        self.chain(steps, send)
        return submitted


def summary(step: Step, name: str | None = None, tasks: list[int] | None = None) -> str:
    """`name: one job`, or `name: array of N (plan tasks …)` for `tasks` (default: all the step's tasks)."""
    name = name or step.name
    tasks = step.tasks if tasks is None else tasks
    if step.tasks is None:
        return f"{name}: one job"
    return f"{name}: array of {len(tasks)} (plan tasks {_ranges(tasks)})"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2,5,7-8'."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
