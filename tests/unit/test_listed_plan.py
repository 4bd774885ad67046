"""Planning a Common Crawl snapshot from its listing (warc.paths.gz) without touching the listed files:
tasks, SLURM arrays split at MaxArraySize with a concurrency throttle, cost estimates, the sbatch chain,
and one-line errors for a bad listing. The listed files do not exist, so any open or stat would fail."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_tools.arrays import split_array
from data_tools.cli import main as data_main

SNAPSHOT = 90_000  # files in one Common Crawl snapshot
CC = "https://data.commoncrawl.org/"


def write_listing(path: Path, n: int) -> Path:
    lines = (f"crawl-data/CC-MAIN-2024-10/segments/17079{i // 900:05d}.{i % 900}/warc/CC-MAIN-2024-{i:05d}.warc.gz\n"
             for i in range(n))
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    return path


@pytest.fixture(scope="module")
def snapshot_listing(tmp_path_factory) -> Path:
    return write_listing(tmp_path_factory.mktemp("cc") / "warc.paths.gz", SNAPSHOT)


def prepare(listing: Path, out: Path, gpt2_dir: Path, *extra: str) -> int:
    return data_main(["-q", "prepare", "--plan-only", "--input-list", str(listing), "--output", str(out),
                      "--tokenizer", str(gpt2_dir), "--seq-len", "2048", *extra])


def test_a_snapshot_listing_is_planned_with_arrays_and_estimates(snapshot_listing, tmp_path, gpt2_dir, capsys):
    out = tmp_path / "cc"
    assert prepare(snapshot_listing, out, gpt2_dir, "--input-prefix", CC, "--array-parallelism", "64") == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["tasks"]) == SNAPSHOT
    assert plan["tasks"][1] == {"path": CC + "crawl-data/CC-MAIN-2024-10/segments/1707900000.1/warc/CC-MAIN-2024-00001.warc.gz",
                                "format": "warc", "start": 0, "end": None}
    stages = {stage["name"]: stage for stage in plan["estimate"]["stages"]}
    assert list(stages) == ["extract", "bucket", "cluster", "tokenizer", "tokenize", "pack", "manifest"]
    assert stages["bucket"]["slurm_arrays"] == [f"0-{stages['bucket']['tasks'] - 1}%64"]
    assert stages["cluster"]["slurm_arrays"] == []
    for name in ("extract", "tokenize", "pack"):
        assert stages[name]["tasks"] == SNAPSHOT
        assert stages[name]["slurm_arrays"] == ["0-1000%64"] * 89 + ["0-910%64"]  # 89 × 1001 + 911
        assert stages[name]["array_first_tasks"][:3] == [0, 1001, 2002]
    assert all(stage["peak_mib_per_task"] > 0 for stage in stages.values())
    # 35,000 documents a WARC (~30 KiB each), 3.15e9 in all: a bucket task of 4 per band holds a quarter of their hashes
    assert 30 * 1024 < stages["bucket"]["peak_mib_per_task"] < 40 * 1024
    assert stages["cluster"]["peak_mib_per_task"] < 100 * 1024
    assert all(stage["core_hours"] > 0 for name, stage in stages.items() if name != "tokenizer")  # a given tokenizer: no cost
    assert stages["extract"]["intermediate_gib"] > 0 and stages["pack"]["final_gib"] > 0
    volume = plan["estimate"]["volume"]
    assert volume["docs_in"] == SNAPSHOT * 35_000 and volume["input_mib"] == SNAPSHOT * 1024
    assert "90000 tasks" in printed and "90 arrays, 64 at once" in printed and "total" in printed


def test_rerunning_with_another_slurm_layout_keeps_the_job(tmp_path, gpt2_dir):
    listing = write_listing(tmp_path / "warc.paths.gz", 2500)
    out = tmp_path / "cc"
    assert prepare(listing, out, gpt2_dir, "--input-prefix", "s3://commoncrawl/", "--assume-file-mb", "512") == 0
    assert prepare(listing, out, gpt2_dir, "--input-prefix", "s3://commoncrawl/", "--assume-file-mb", "512",
                   "--array-parallelism", "2000", "--max-array-size", "1000") == 0
    stages = json.loads((out / "plan.json").read_text())["estimate"]["stages"]
    assert stages[0]["slurm_arrays"] == ["0-999%1000", "0-999%1000", "0-499%500"]
    assert json.loads((out / "plan.json").read_text())["estimate"]["volume"]["input_mib"] == 2500 * 512
    assert prepare(listing, out, gpt2_dir, "--input-prefix", "s3://other/") == 2  # other inputs: another job


def test_arrays_bound_both_the_array_size_and_the_elements_running():
    one_lane = split_array(2500, 64, 1001)
    assert [(c.first, c.count, c.throttle, c.after) for c in one_lane] == [(0, 1001, 64, None), (1001, 1001, 64, 0),
                                                                            (2002, 498, 64, 1)]
    three_lanes = split_array(9000, 2500, 1000)  # 3 lanes of arrays queued at once, 833 running in each
    assert [c.after for c in three_lanes] == [None, None, None, 0, 1, 2, 3, 4, 5]
    assert {c.throttle for c in three_lanes} == {833} and 3 * 833 <= 2500
    assert all(c.count <= 1000 for c in three_lanes) and sum(c.count for c in three_lanes) == 9000


@pytest.mark.parametrize("content, where, says", [
    (b"crawl/a.warc.gz\ncrawl/b.warc.gz\n/abs/c.warc.gz\n", ":3:", "not a relative path"),
    (b"crawl/a.warc.gz\ncrawl/b c.warc.gz\n", ":2:", "not a relative path"),
    (b"https://data.commoncrawl.org/crawl/a.warc.gz\n", ":1:", "--input-prefix"),
    (b"crawl/a.warc.gz\ncrawl/\xff.warc.gz\n", ":2:", "not UTF-8"),
    (b"crawl/a.warc.gz\ncrawl/readme.txt\n", ":2:", "cannot tell the format"),
    (b"\n\n", "", "holds no path"),
    (b"", "", "holds no path"),
])
def test_a_bad_listing_stops_with_one_line_naming_the_file_and_line(tmp_path, gpt2_dir, capsys, content, where, says):
    listing = tmp_path / "warc.paths"
    listing.write_bytes(content)
    assert prepare(listing, tmp_path / "out", gpt2_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{listing}{where}" in err and says in err
    assert not (tmp_path / "out" / "plan.json").exists()


def test_the_sbatch_chain_of_a_listing_splits_large_stages(tmp_path, gpt2_dir, capsys, monkeypatch):
    from launch.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sbatch: a dry run needs none
    listing = write_listing(tmp_path / "warc.paths.gz", 2500)
    out = tmp_path / "cc"
    code = main(["slurm", "data", "--time", "04:00:00", "--dry-run", "--array-parallelism", "10", "--max-array-size", "1000",
                 "--input-list", str(listing), "--input-prefix", CC, "--output", str(out), "--tokenizer", str(gpt2_dir),
                 "--seq-len", "2048"])
    assert code == 0
    sections = capsys.readouterr().out.split("# ---- ")[1:]
    split = ["{}[1/3]: array of 1000 (plan tasks 0-999) ----", "{}[2/3]: array of 1000 (plan tasks 1000-1999) ----",
             "{}[3/3]: array of 500 (plan tasks 2000-2499) ----"]
    assert [s.splitlines()[0] for s in sections] == [
        *(line.format("extract") for line in split), "bucket: array of 152 (plan tasks 0-151) ----",
        "cluster+tokenizer: one job ----", *(line.format("tokenize") for line in split),
        *(line.format("pack") for line in split), "manifest: one job ----"]
    assert "#SBATCH --array=0-999%10" in sections[0] and "--dependency" not in sections[0]
    assert "#SBATCH --dependency='afterok:<job id of extract[1/3]>'" in sections[1]
    assert "#SBATCH --array=0-499%10" in sections[2]
    assert f"# element 0: python -m data_tools run {out} --stage extract --task 1000" in sections[1]
    assert "# elements 3-996: likewise" in sections[1]
    assert "#SBATCH --dependency='afterok:<job id of extract[3/3]>'" in sections[3]  # the lane's last array
    assert "#SBATCH --array=0-151%10" in sections[3]
    assert "#SBATCH --dependency='afterok:<job id of cluster+tokenizer>'" in sections[5]
    assert "#SBATCH --dependency='afterok:<job id of cluster+tokenizer>:<job id of tokenize[1/3]>'" in sections[6]
    assert "#SBATCH --dependency='afterok:<job id of pack[3/3]>'" in sections[11]
