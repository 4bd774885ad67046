"""data_tools stages as SLURM jobs: `python -m launch slurm data <prepare options>`.

The plan is written on the login node (`data_tools prepare --plan-only`). Then each stage that
still has work is one job: a per-task stage (extract, bucket, tokenize, pack; `pipeline.STAGES`
and `Job.task_count` say which and how many) is a job array over the tasks without a completion
marker, at most `--array-parallelism` running at once; consecutive single steps (cluster +
tokenizer, manifest) share one job. Each job depends on the one before with `afterok` (SLURM
starts it when the previous one succeeded, and cancels it if that failed), so nothing waits on
the login node. Running the same command again submits only what has no marker yet: after a
failed or cancelled array element, that task and the steps after it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from launch import sbatch


@dataclass
class Step:
    """One job of the chain: `stages` in order, once (tasks is None) or as an array over `tasks`."""

    stages: tuple[str, ...]
    tasks: list[int] | None = None

    @property
    def name(self) -> str:
        return "+".join(self.stages)


def pending_steps(out: Path) -> list[Step]:
    """The jobs still to run for the data job in `out`, from its plan and completion markers."""
    from data_tools.pipeline import PER_TASK_STAGES, STAGES, Job

    job = Job(out)
    steps: list[Step] = []
    for stage in STAGES:
        if stage in PER_TASK_STAGES:
            if pending := job.pending(stage):
                steps.append(Step((stage,), pending))
        elif not job.is_done(stage):
            if steps and steps[-1].tasks is None:
                steps[-1].stages += (stage,)
            else:
                steps.append(Step((stage,)))
    return steps


def stage_args(out: str, stage: str, task: int | None) -> list[str]:
    """The `python -m data_tools` arguments that run one stage (one task of it)."""
    return ["run", out, "--stage", stage, *(["--task", str(task)] if task is not None else [])]


def run_step(out: str, stages: tuple[str, ...], task: int | None) -> None:
    """What a job (or one array element) runs: `python -m data_tools run` for each stage."""
    from data_tools.cli import main

    for stage in stages:
        if main(stage_args(out, stage, task)):
            raise RuntimeError(f"python -m data_tools {shlex.join(stage_args(out, stage, task))} failed (the error is above)")


@dataclass
class DataJobs:
    """The chain of jobs for one data directory."""

    prepare_args: list[str]
    array_parallelism: int
    resources: sbatch.Resources

    def __post_init__(self) -> None:
        from data_tools.cli import build_parser

        self.out: Path = build_parser().parse_args(["prepare", *self.prepare_args]).output.resolve()

    def plan(self) -> int:
        """Write (or check) plan.json; the exit code of `data_tools prepare --plan-only`."""
        from data_tools.cli import main

        return main(["prepare", *self.prepare_args, "--plan-only"])

    def parameters(self, step: Step, after: str | None) -> dict:
        extra: dict = {}
        if after:
            extra.update(dependency=f"afterok:{after}", additional_parameters={"kill-on-invalid-dep": "yes"})
        if step.tasks is not None:
            extra["array_parallelism"] = self.array_parallelism
        return self.resources.parameters(job_name=f"{self.out.name}-{step.name}", **extra)

    def describe(self, steps: list[Step]) -> str:
        """The dry run: each job's sbatch script and what its elements run."""
        lines = [f"data job: {self.out}",
                 f"logs:     {sbatch.folder(self.out)}/ (%j = the job id, <array id>_<element> for arrays)"]
        after = None
        for step in steps:
            array = len(step.tasks) if step.tasks and len(step.tasks) > 1 else None  # submitit submits one call as a plain job
            lines += ["", f"# ---- {summary(step)} ----", sbatch.script(self.out, self.parameters(step, after), array).rstrip()]
            for element, task in enumerate(step.tasks or [None]):
                prefix = f"# element {element}: " if step.tasks else "# runs: "
                lines.append(prefix + "; ".join(f"python -m data_tools {shlex.join(stage_args(str(self.out), s, task))}"
                                                 for s in step.stages))
            after = f"<job id of {step.name}>"
        return "\n".join(lines)

    def submit(self, steps: list[Step]) -> list[tuple[Step, str, str]]:
        """Submit the chain; (step, job id, id of its first task's job) for each step."""
        submitted, after = [], None
        for step in steps:
            params = self.parameters(step, after)
            if step.tasks is None:
                job_id = first = sbatch.submit(self.out, params, run_step, str(self.out), step.stages, None)
            else:
                calls = [(str(self.out), step.stages, task) for task in step.tasks]
                job_id, first = sbatch.submit_array(self.out, params, run_step, calls)
            sbatch.record(self.out, job_id, step.name, tasks=step.tasks, dependency=after)
            submitted.append((step, job_id, first))
            after = job_id
        return submitted


def summary(step: Step) -> str:
    if step.tasks is None:
        return f"{step.name}: one job"
    return f"{step.name}: array of {len(step.tasks)} (plan tasks {_ranges(step.tasks)})"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2,5,7-8'."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
