"""`prepare-finetune`: a labelled or paired set → webdataset shards of [input ids, targets] rows.

    readers   CSV/TSV, CoNLL, JSONL, Parquet, datasets directories → records (file + line each)
    records   the fields each task reads, their checks, the label vocabulary
    tokenizer load from a path, a GGUF file or an installed package; save beside the shards
    encode    records → examples per task, counting every drop and truncation
    rows      examples → rows: one each, or (--pack, sft train) several whole ones that attend to each other
    write     seeded content-hash split, shards and manifests
    prepare   the command: options, the run, its summary line
"""
