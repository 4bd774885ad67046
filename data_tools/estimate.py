"""What a planned job will cost, before it runs: core-hours, disk and peak memory per task, per stage.

A plan of 90,000 files is written without reading them, so the estimate is a model, not a
measurement: the input volume (documents, MiB) times per-document costs of this pipeline on one
core (`COSTS`), and the fractions that survive the filters and dedup, taken as typical web-crawl
values. The peak memory of a task is the plan's own (`Plan.peak_mb`, from the memory knobs).
Every assumption is written into `plan.json` next to the numbers, so a reader can redo the
arithmetic with their own. The point is the order of magnitude (is it 1e3 or 1e5 core-hours, does
a task fit in 4 GiB, how much scratch disk), and which stage dominates, not a bill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from data_tools.config import PipelineConfig

MIB = 2**20


@dataclass(frozen=True)
class Costs:
    """Per-unit costs on one core, and the fractions of documents that go on."""

    extract_ms_per_doc: dict  # read + extract + lang + quality + PII + signatures, by input format
    text_kb_per_doc: float  # cleaned text of a kept document
    kept_after_filters: dict  # documents that pass lang + quality, by input format
    kept_after_dedup: float
    bytes_per_token: float  # of cleaned text, for a byte-level BPE of ~50k on English
    tokenize_mb_per_s: float  # text encoded per core
    pack_mb_per_s: float  # token rows shuffled and written per core
    bucket_us_per_hash: float  # one band hash read, sorted and compared in a bucket task
    cluster_us_per_pair: float  # one confirmed pair through the sharded connected components, all rounds
    manifest_ms_per_task: float  # one input task's markers, shard list and histograms in the report


COSTS = Costs(
    extract_ms_per_doc={"warc": 25.0, "wikipedia": 15.0, "jsonl": 10.0, "parquet": 10.0, "hf_dataset": 10.0},
    text_kb_per_doc=4.0,
    kept_after_filters={"warc": 0.35, "wikipedia": 0.8},
    kept_after_dedup=0.7,
    bytes_per_token=4.2,
    tokenize_mb_per_s=1.0,
    pack_mb_per_s=200.0,
    bucket_us_per_hash=0.5,
    cluster_us_per_pair=4.0,
    manifest_ms_per_task=20.0,
)
DEFAULT_KEPT = 0.9  # formats not in kept_after_filters: text that was cleaned already


@dataclass(frozen=True)
class Volume:
    """How much flows through the job: documents in, after the filters, after dedup; text and tokens."""

    docs_in: int
    input_mib: float
    docs_kept: int
    docs_unique: int
    text_mib: float  # of the unique documents
    tokens: int

    @classmethod
    def of(cls, docs_by_format: dict[str, int], input_mib: float, costs: Costs = COSTS) -> Volume:
        docs_in = sum(docs_by_format.values())
        kept = sum(round(n * costs.kept_after_filters.get(fmt, DEFAULT_KEPT)) for fmt, n in docs_by_format.items())
        unique = round(kept * costs.kept_after_dedup)
        text_mib = unique * costs.text_kb_per_doc * 1024 / MIB
        return cls(docs_in, input_mib, kept, unique, text_mib, round(text_mib * MIB / costs.bytes_per_token))


@dataclass(frozen=True)
class StageEstimate:
    name: str
    tasks: int
    core_hours: float
    peak_mib_per_task: float
    intermediate_gib: float  # under _work/, deleted-able once the job is done
    final_gib: float  # docs/ and tokens/


def estimate_stages(
    stages: list[tuple[str, int, float]], volume: Volume, extract_ms_per_doc: float, config: PipelineConfig,
    token_bytes: int, train_tokenizer: bool, costs: Costs = COSTS,
) -> list[StageEstimate]:
    """One estimate per (stage name, task count, expected peak MiB of a task), in order. The peak comes from
    the plan (pipeline.expected_peak_mb, the memory knobs); a stage the model does not know costs no time."""
    gib, hour = 1 / 1024, 3600
    signature_bytes = 16 + 4 * config.dedup.bands * config.dedup.rows_per_band + 8 * (config.dedup.bands + 1)
    kept_text_mib = volume.docs_kept * costs.text_kb_per_doc * 1024 / MIB
    pairs = volume.docs_kept - volume.docs_unique
    tokens_mib = volume.tokens * token_bytes / MIB
    model = {  # stage: (core-hours, scratch GiB under _work/, final GiB)
        "extract": (volume.docs_in * extract_ms_per_doc / 1000 / hour,
                    (kept_text_mib + volume.docs_kept * signature_bytes / MIB) * gib, 0.0),
        "bucket": (volume.docs_kept * (config.dedup.bands + 1) * costs.bucket_us_per_hash / 1e6 / hour,
                   pairs * 16 / MIB * gib, 0.0),
        # each pair both ways in the graph of all pairs and (exact ones) in that of exact pairs: 16 B each
        "cluster": (pairs * costs.cluster_us_per_pair / 1e6 / hour, pairs * 64 / MIB * gib, 0.0),
        "tokenizer": ((kept_text_mib / costs.tokenize_mb_per_s / hour) if train_tokenizer else 0.0, 0.0, 0.0),
        "tokenize": (volume.text_mib / costs.tokenize_mb_per_s / hour, volume.tokens * 4 / MIB * gib, volume.text_mib * gib),
        "pack": (tokens_mib / costs.pack_mb_per_s / hour, 0.0, tokens_mib * gib),
        "manifest": (max(tasks for _, tasks, _ in stages) * costs.manifest_ms_per_task / 1000 / hour, 0.0, 0.0),
    }
    out = []
    for name, tasks, peak in stages:
        hours, scratch, final = model.get(name, (0.0, 0.0, 0.0))
        out.append(StageEstimate(name, tasks, hours, float(peak), scratch, final))
    return out


def estimate_dict(stages: list[StageEstimate], volume: Volume, costs: Costs = COSTS) -> dict:
    """What `plan.json` holds under "estimate": the volume, each stage, the totals and the assumptions."""
    rounded = [{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(s).items()} for s in stages]
    return {
        "volume": {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(volume).items()},
        "stages": rounded,
        "total": {
            "core_hours": round(sum(s.core_hours for s in stages), 3),
            "intermediate_gib": round(sum(s.intermediate_gib for s in stages), 3),
            "final_gib": round(sum(s.final_gib for s in stages), 3),
            "peak_mib_per_task": round(max(s.peak_mib_per_task for s in stages), 1),
        },
        "assumptions": asdict(costs),
    }


def plan_estimate(
    stages: list[tuple[str, int, float]], docs_by_format: dict[str, int], input_mib: float, config: PipelineConfig,
    token_bytes: int, train_tokenizer: bool, parallelism: int, max_array_size: int,
) -> dict:
    """The "estimate" of `plan.json`: `estimate_dict` plus, for each stage of several tasks, its SLURM arrays."""
    from data_tools.arrays import split_array

    volume = Volume.of(docs_by_format, input_mib)
    docs_in = max(volume.docs_in, 1)
    ms_per_doc = sum(COSTS.extract_ms_per_doc.get(fmt, 10.0) * n for fmt, n in docs_by_format.items()) / docs_in
    estimate = estimate_dict(estimate_stages(stages, volume, ms_per_doc, config, token_bytes, train_tokenizer), volume)
    for stage in estimate["stages"]:
        chunks = split_array(stage["tasks"], parallelism, max_array_size) if stage["tasks"] > 1 else []
        stage["slurm_arrays"] = [chunk.spec for chunk in chunks]
        stage["array_first_tasks"] = [chunk.first for chunk in chunks]
    estimate["slurm"] = {"array_parallelism": parallelism, "max_array_size": max_array_size}
    return estimate


def summary(estimate: dict) -> str:
    """The short human version of `plan.json`'s estimate: one line per stage, then the totals."""
    v, t = estimate["volume"], estimate["total"]
    lines = [
        f"inputs: {v['docs_in']:,} documents in {_size(v['input_mib'] / 1024)} → ~{v['docs_unique']:,} kept "
        f"after filters and dedup, ~{v['tokens']:.2g} tokens",
        f"{'stage':<12}{'tasks':>8}  {'SLURM arrays':<28}{'core-h':>10}{'peak/task':>11}{'scratch':>10}{'final':>10}",
    ]
    parallelism = estimate["slurm"]["array_parallelism"]
    for stage in estimate["stages"]:
        arrays = stage["slurm_arrays"]
        shown = f"--array={arrays[0]}" if len(arrays) == 1 else f"{len(arrays)} arrays, {parallelism} at once"
        shown = shown if arrays else "one job"
        lines.append(
            f"{stage['name']:<12}{stage['tasks']:>8}  {shown:<28}{stage['core_hours']:>10,.1f}"
            f"{_size(stage['peak_mib_per_task'] / 1024):>11}{_size(stage['intermediate_gib']):>10}{_size(stage['final_gib']):>10}"
        )
    lines.append(
        f"{'total':<12}{'':>8}  {'':<28}{t['core_hours']:>10,.1f}{_size(t['peak_mib_per_task'] / 1024):>11}"
        f"{_size(t['intermediate_gib']):>10}{_size(t['final_gib']):>10}"
    )
    lines.append("(a model of typical per-document costs, not a measurement: the assumptions are in plan.json)")
    return "\n".join(lines)


def _size(gib: float) -> str:
    if gib >= 1024:
        return f"{gib / 1024:,.1f} TiB"
    return f"{gib:,.1f} GiB" if gib >= 1 else f"{gib * 1024:,.0f} MiB"
