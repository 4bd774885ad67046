"""datatrove half of the dedup-at-scale benchmark (bench/data_scale_bench.py): datatrove 0.10's
multi-stage MinHash pipeline over the same JSONL files, as its documentation runs it.

    signatures (one task per file) → buckets (one task per band) → cluster (one task) → filter (one task per file)

Each stage is a LocalPipelineExecutor run after the previous one, `workers` processes at once, with
the same shingle size, bands, rows and seed as the dstrain side. Runs in bench/.venv-datatrove
(`make bench-data` builds it); the caller times the whole process, imports included, as it times
`python -m data_tools prepare`. The ids of the documents the filter keeps go to `<workdir>/kept.txt`.

usage: datatrove_dedup_side.py INPUT_DIR WORKDIR NGRAM BANDS ROWS SEED WORKERS
"""

import gzip
import json
import os
import sys


def run(input_dir: str, workdir: str, ngram: int, bands: int, rows: int, seed: int, workers: int) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    files = len([name for name in os.listdir(input_dir) if name.endswith(".jsonl")])
    config = MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows, seed=seed)
    path = lambda *parts: os.path.join(workdir, *parts)  # noqa: E731

    def reader():
        return JsonlReader(input_dir, glob_pattern="*.jsonl")

    stages = [
        ([reader(), MinhashDedupSignature(output_folder=path("signatures"), config=config)], files),
        ([MinhashDedupBuckets(input_folder=path("signatures"), output_folder=path("buckets"), config=config)], bands),
        ([MinhashDedupCluster(input_folder=path("buckets"), output_folder=path("remove_ids"), config=config)], 1),
        ([reader(), MinhashDedupFilter(input_folder=path("remove_ids")), JsonlWriter(path("kept"))], files),
    ]
    for n, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=path("logs", str(n))).run()
    kept = 0
    with open(path("kept.txt"), "w") as out:
        for name in sorted(os.listdir(path("kept"))):
            with gzip.open(path("kept", name), "rt") as f:
                for line in f:
                    out.write(json.loads(line)["id"] + "\n")
                    kept += 1
    return kept


if __name__ == "__main__":
    input_dir, workdir, *numbers = sys.argv[1:]
    print(json.dumps({"kept": run(input_dir, workdir, *map(int, numbers))}))
