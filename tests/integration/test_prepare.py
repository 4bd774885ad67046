"""`python -m data_tools prepare` end to end on the shipped corpora, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prepare_runs import WARCS, outputs, prepare_cmd, run

from data_tools.cli import main as data_main
from data_tools.manifest import iter_blocks, load_manifest, verify_shard
from data_tools.pipeline import PER_TASK_STAGES, STAGES, Job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_job(tmp_path_factory, corpora, gpt2_dir) -> Path:
    out = tmp_path_factory.mktemp("full") / "job"
    result = run(prepare_cmd(corpora, out, "--tokenizer", str(gpt2_dir), "--workers", "2", "--valid-fraction", "0.05"))
    assert result.returncode == 0, result.stderr
    return out


def test_prepare_writes_the_contract(full_job: Path):
    """Manifests have the documented keys, shards verify, rows are equal-sized and decode to text."""
    for split in ("train", "valid"):
        data = json.loads((full_job / "tokens" / split / "manifest.json").read_text())
        for key in ("format_version", "seq_len", "dtype", "tokenizer", "shards", "total_rows", "total_tokens", "stats"):
            assert key in data, key
        assert set(data["tokenizer"]) >= {"name", "vocab_size", "eos_id", "sha256"}
        assert data["tokenizer"]["vocab_size"] == 50257 and data["tokenizer"]["eos_id"] == 50256
        assert data["dtype"] == "uint16" and data["seq_len"] == 256
        manifest = load_manifest(full_job / "tokens" / split)
        assert manifest.total_rows > 0
        for shard in manifest.shards:
            verify_shard(full_job / "tokens" / split, shard)
        rows = [r for shard in manifest.shards for r, _ in iter_blocks(full_job / "tokens" / split / shard.path)]
        assert sum(len(r) for r in rows) == manifest.total_rows
        assert all(r.shape[1] == 256 and str(r.dtype) == "uint16" for r in rows)
    train = load_manifest(full_job / "tokens" / "train")
    assert train.total_tokens > 500_000
    assert train.tokenizer.sha256 == __import__("data_tools.manifest").manifest.file_sha256(
        full_job / "tokens" / "train" / train.tokenizer.path
    )


def test_prepare_counts_every_stage(full_job: Path):
    """stats.json holds each stage in pipeline order; duplicates and redirects are counted."""
    stats = json.loads((full_job / "stats.json").read_text())
    names = list(stats["stages"])
    assert names == [
        "read", "extract", "lang", "gopher_repetition", "gopher_quality", "c4", "pii", "dedup_signatures", "dedup", "tokenize"
    ]
    read, dedup = stats["stages"]["read"], stats["stages"]["dedup"]
    assert read["dropped"]["redirect"] >= 99 and read["dropped"]["revisit"] == 123
    assert dedup["dropped"]["exact_duplicate"] >= 3  # 2 alias pages in the handbook, 1 in iana
    assert stats["stages"]["tokenize"]["docs_out"] == dedup["docs_out"]
    docs = sum(1 for tar in (full_job / "docs").glob("*.tar") for _ in __import__("tarfile").open(tar)) // 2
    assert docs == dedup["docs_out"]
    assert list((full_job / "tensorboard").glob("events.out.tfevents.*"))


def test_inspect_prints_summary_and_a_decoded_row(full_job: Path):
    result = run([sys.executable, "-m", "data_tools", "inspect", str(full_job)])
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "tokenizer gpt2" in result.stdout
    assert "sample row" in result.stdout and "dedup" in result.stdout


def test_shards_do_not_depend_on_workers_or_task_size(tmp_path, corpora):
    """Byte-identical shards with 1 or 2 workers (trained tokenizer too); token shards also when
    the WARCs are cut into 100 KiB ranges (8 tasks each) instead of one task per file."""
    runs = {}
    for name, workers, task_mb in (("w1", "1", "128"), ("w2", "2", "128"), ("ranges", "2", "0.1")):
        out = tmp_path / name
        args = ["--train-tokenizer", "1024", "--workers", workers, "--task-mb", task_mb, "--valid-fraction", "0.1"]
        result = run(prepare_cmd(corpora, out, *args, inputs=WARCS))
        assert result.returncode == 0, result.stderr
        runs[name] = outputs(out)
    assert runs["w1"] == runs["w2"]
    assert len(runs["w1"]) >= 5
    assert len(json.loads((tmp_path / "ranges" / "plan.json").read_text())["tasks"]) == 16
    tokens = lambda found: {k: v for k, v in found.items() if not k.startswith("docs/")}  # noqa: E731
    assert tokens(runs["ranges"]) == tokens(runs["w1"])


def test_bad_inputs_are_counted_and_skipped(tmp_path, corpora, gpt2_dir):
    """A corrupt WARC member, a broken wiki page, non-UTF-8 JSONL and an empty file: warned, counted, rest kept."""
    warc = bytearray((corpora / "handbook-multilingual.warc.gz").read_bytes())
    middle = len(warc) // 2
    member = warc.find(b"\x1f\x8b\x08", middle)
    warc[member + 40 : member + 80] = b"\x00" * 40
    (tmp_path / "broken.warc.gz").write_bytes(bytes(warc))
    import bz2

    xml = bz2.decompress((corpora / "enwiki-sample.xml.bz2").read_bytes()).decode()
    second = xml.index("<page>", xml.index("<page>") + 1)
    third = xml.index("<page>", second + 1)
    xml = xml[:second] + xml[second:third].replace("</title>", "", 1) + xml[third:]
    (tmp_path / "broken-wiki.xml.bz2").write_bytes(bz2.compress(xml.encode()))
    text = (corpora / "finetune" / "sentiment-movie-reviews.csv").read_text().splitlines()[1:200]
    lines = [json.dumps({"text": " ".join(text[i : i + 40])}).encode() for i in range(0, 160, 40)]
    lines.insert(2, b'{"text": "caf\xe9 au lait"}')
    (tmp_path / "reviews.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.warc.gz").write_bytes(b"")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "data_tools", "prepare", "--output", str(out), "--seq-len", "128", "--tokenizer", str(gpt2_dir)]
    for name in ("broken.warc.gz", "broken-wiki.xml.bz2", "reviews.jsonl", "empty.warc.gz"):
        args += ["--input", str(tmp_path / name)]
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert f"broken.warc.gz: malformed WARC record at byte {member}" in result.stderr
    assert "broken-wiki.xml.bz2: malformed XML in page 2" in result.stderr
    assert "reviews.jsonl:3: bytes that are not UTF-8" in result.stderr
    assert "empty.warc.gz: empty file" in result.stderr
    read = json.loads((out / "stats.json").read_text())["stages"]["read"]
    assert read["dropped"]["malformed_record"] == 1
    assert read["dropped"]["malformed_page"] == 1
    assert read["dropped"]["non_utf8"] == 1
    assert read["dropped"]["empty_file"] == 1
    assert read["docs_out"] >= 120 + 100 + 4  # the rest of every file was read


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_input", "--input {tmp}/nope.warc.gz: no such file or directory"),
        ("unknown_dir", "{tmp}/somedir: directory of unknown format"),
        ("unwritable_output", "--output {tmp}/a-file/out: not writable"),
        ("unknown_lang", "--langs: unknown language code 'xx'"),
        ("missing_tokenizer", "--tokenizer {tmp}/no-tokenizer: no such file or directory"),
        ("seq_len", "--seq-len 1: must be at least 2"),
        ("other_plan", "holds a job with other inputs, settings or data_tools version (plan.json differs in seq_len)"),
    ],
)
def test_bad_arguments_fail_with_one_line(tmp_path, corpora, gpt2_dir, case, message):
    """Each mistake exits non-zero with one line naming what is wrong, and no output claims completeness."""
    (tmp_path / "somedir").mkdir()
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "out"
    base = {"--input": str(corpora / "iana.warc.gz"), "--output": str(out), "--tokenizer": str(gpt2_dir), "--seq-len": "64"}
    change = {
        "missing_input": {"--input": f"{tmp_path}/nope.warc.gz"},
        "unknown_dir": {"--input": f"{tmp_path}/somedir"},
        "unwritable_output": {"--output": f"{tmp_path}/a-file/out"},
        "unknown_lang": {"--langs": "en,xx"},
        "missing_tokenizer": {"--tokenizer": f"{tmp_path}/no-tokenizer"},
        "seq_len": {"--seq-len": "1"},
        "other_plan": {},
    }[case]
    if case == "other_plan":
        first = [sys.executable, "-m", "data_tools", "prepare", "--plan-only"] + [x for kv in base.items() for x in kv]
        assert run(first).returncode == 0
        change = {"--seq-len": "128"}
    args = [sys.executable, "-m", "data_tools", "prepare"] + [x for kv in {**base, **change}.items() for x in kv]
    result = run(args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr
    assert not (out / "stats.json").exists()


def test_stages_run_one_by_one_as_a_cluster_would(tmp_path, corpora, gpt2_dir):
    """--plan-only, then each stage (and each task, by --task or $SLURM_ARRAY_TASK_ID) as its own
    process: the result is the one `prepare` gives in one go."""
    args = ["--tokenizer", str(gpt2_dir), "--valid-fraction", "0.1"]
    whole, staged = tmp_path / "whole", tmp_path / "staged"
    assert run(prepare_cmd(corpora, whole, *args, inputs=WARCS)).returncode == 0
    assert run(prepare_cmd(corpora, staged, *args, "--plan-only", inputs=WARCS)).returncode == 0
    stage = [sys.executable, "-m", "data_tools", "run", str(staged), "--stage"]
    for name in ("extract", "tokenize"):
        assert run(stage + [name]).returncode == 2  # a per-task stage needs its task index
    for name in STAGES:
        if name in PER_TASK_STAGES:
            tasks = Job(staged).task_count(name)
            assert run(stage + [name, "--task", "0"]).returncode == 0
            env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
            assert subprocess.run(stage + [name], env=env, capture_output=True).returncode == 0
            for task in range(2, tasks):  # the rest (152 bucket tasks) in this process, to keep the test short
                assert data_main(["run", str(staged), "--stage", name, "--task", str(task)]) == 0
        else:
            result = run(stage + [name])
            assert result.returncode == 0, result.stderr
    assert outputs(staged) == outputs(whole)
    assert list((staged / "tensorboard").glob("events.out.tfevents.*"))
