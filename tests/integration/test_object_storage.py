"""Object storage end to end against a real S3 server on loopback (SeaweedFS): prepare from and to s3://,
the trainer streaming s3:// shards, a corrupt shard, retries through a fault-injecting proxy, and the
one-line errors for a missing bucket and denied access."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from storage_server import FaultProxy
from trainer_runs import ENV, losses, rewind, train_cmd

from data_tools import storage
from data_tools.errors import DataError
from data_tools.manifest import ManifestError, load_manifest, verify_shard

pytestmark = pytest.mark.slow

WARCS = ("handbook-multilingual.warc.gz", "iana.warc.gz")
# --task-mb 0.3 cuts each WARC into three byte ranges, so the s3 job reads ranges of objects.
PREPARE = ["--train-tokenizer", "512", "--seq-len", "64", "--valid-fraction", "0.1", "--task-mb", "0.3"]


def start_prepare(inputs: list[str], output: str, env: dict[str, str], *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "data_tools", "-q", "prepare", "--output", output, *PREPARE, *extra]
    for item in inputs:
        args += ["--input", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a command started in the background (two at once use both cores)."""
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def prepare(inputs: list[str], output: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return finish(start_prepare(inputs, output, env, *extra))


@pytest.fixture(scope="module")
def s3_env(s3_server, monkeypatch_module):
    """The admin's credentials and the server's endpoint in this process's environment, as a user would set them."""
    for key, value in s3_server.env("admin").items():
        monkeypatch_module.setenv(key, value)
    return s3_server.env("admin")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpora, s3_server, s3_env):
    """The same prepare job on local files and from s3:// to s3:// (work directory local)."""
    s3_server.make_bucket("corpus")
    s3_server.make_bucket("out")
    for name in WARCS:
        storage.upload(corpora / name, storage.Url(f"s3://corpus/warc/{name}"))
    root = tmp_path_factory.mktemp("jobs")
    local = start_prepare([str(corpora / name) for name in WARCS], str(root / "local"), s3_env)
    remote = finish(start_prepare(["s3://corpus/warc/*.warc.gz"], "s3://out/job", s3_env, "--work-dir", str(root / "work")))
    local = finish(local)
    assert local.returncode == 0, local.stderr[-3000:]
    assert remote.returncode == 0, remote.stderr[-3000:]
    return root / "local", storage.Url("s3://out/job")


def test_prepare_from_s3_to_s3_gives_the_local_shards(jobs):
    local, remote = jobs
    assert storage.exists(remote / "_PUBLISHED.json")
    for split in ("train", "valid"):
        local_manifest, remote_manifest = load_manifest(local / "tokens" / split), load_manifest(remote / "tokens" / split)
        assert [s.sha256 for s in remote_manifest.shards] == [s.sha256 for s in local_manifest.shards]
        assert remote_manifest.shards, split
        for shard in remote_manifest.shards:
            shard_file = Path("tokens") / split / shard.path
            assert storage.read_bytes(remote / str(shard_file)) == (local / shard_file).read_bytes()
    assert storage.read_bytes(remote / "tokenizer/tokenizer.json") == (local / "tokenizer/tokenizer.json").read_bytes()
    published = json.loads(storage.read_text(remote / "_PUBLISHED.json"))["files"]
    assert "tokens/train/manifest.json" in published and "stats.json" in published and "plan.json" in published


def _config(tmp_path: Path, data: str) -> Path:
    config = {
        "run": {"name": "t", "out_dir": str(tmp_path), "seed": 3},
        "model": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "engine": {"type": "fsdp2"},
        "data": {"train": f"{data}/tokens/train", "valid": f"{data}/tokens/valid", "lanes": 4},
        "train": {"global_batch": 8, "micro_batch": 4, "max_steps": 6, "log_every": 1, "eval_every": 3, "eval_batches": 1,
                  "ckpt_every": 3},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
    }
    path = tmp_path / f"{abs(hash(data))}.yaml"
    path.write_text(json.dumps(config))
    return path


def _start_train(config: Path, run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(config, 1, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **env})


def _train(config: Path, run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return finish(_start_train(config, run_dir, env))


def test_trainer_streams_s3_shards_with_the_local_losses_and_resumes_exactly(tmp_path, jobs, s3_env):
    local, remote = jobs
    from_local = _start_train(_config(tmp_path, str(local)), tmp_path / "local", s3_env)
    s3_config = _config(tmp_path, str(remote))
    from_s3 = _train(s3_config, tmp_path / "s3", s3_env)
    from_local = finish(from_local)
    assert from_local.returncode == 0, from_local.stderr[-3000:]
    assert from_s3.returncode == 0, from_s3.stderr[-3000:]
    assert losses(tmp_path / "s3") == losses(tmp_path / "local")
    assert (tmp_path / "s3" / "checkpoints" / "step_000006" / "tokenizer.json").read_bytes() == (
        local / "tokenizer/tokenizer.json").read_bytes()
    rewind(tmp_path / "s3", tmp_path / "resumed", 3)
    resumed = _train(s3_config, tmp_path / "resumed", s3_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "s3")


def test_a_corrupt_or_missing_shard_in_the_bucket_is_refused(jobs):
    _, remote = jobs
    train = remote / "tokens" / "train"
    manifest = load_manifest(train)
    copy = storage.Url("s3://out/corrupt/tokens/train")
    data = bytearray(storage.read_bytes(train / manifest.shards[0].path))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(copy / manifest.shards[0].path, bytes(data))
    with pytest.raises(ManifestError, match=r"s3://out/corrupt/tokens/train/.*sha256 .*the shard is corrupt"):
        verify_shard(copy, manifest.shards[0])
    storage.write_bytes(copy / manifest.shards[0].path, bytes(data[:-512]))
    with pytest.raises(ManifestError, match=r"size \d+ bytes, manifest says \d+; the shard is truncated"):
        verify_shard(copy, manifest.shards[0])
    with pytest.raises(ManifestError, match=r"s3://out/corrupt/tokens/train/nothere.tar: no such key"):
        verify_shard(copy, type(manifest.shards[0])("nothere.tar", 1, 1, 1, "0"))


def test_a_transient_error_is_retried_with_backoff_and_logged(jobs, s3_server, monkeypatch, caplog):
    _, remote = jobs
    proxy = FaultProxy(s3_server.ports[3])
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
        url = remote / "tokens" / "train" / "manifest.json"
        expected = storage.read_bytes(url)
        proxy.fail_for(1.0)  # shorter than the 3.15 s that six retries wait in all
        with caplog.at_level(logging.WARNING, logger="data_tools"):
            assert storage.read_bytes(url) == expected
        retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert retries, "the outage was not noticed"
        for n, message in enumerate(retries):
            assert message.startswith(f"{url}: read failed") and f"retry {n + 1} of 6 in {0.05 * 2**n:.1f}s" in message
        proxy.fail_for(600)
        monkeypatch.setattr(storage, "RETRIES", 2)
        with pytest.raises(DataError, match=rf"^{url}: read failed 3 times, last: .*check the endpoint"):
            storage.read_bytes(url)
    finally:
        proxy.close()


def test_inspect_reads_a_published_job_from_its_url(jobs, s3_env):
    """`inspect s3://…` prints what it prints for the local job; a prefix with nothing there is one line naming it."""
    local, remote = jobs
    shown = [subprocess.run([sys.executable, "-m", "data_tools", "-q", "inspect", str(where)], capture_output=True, text=True,
                            env={**os.environ, **s3_env}, timeout=120) for where in (local, remote, remote / "nothing")]
    assert shown[1].returncode == 0, shown[1].stderr[-2000:]
    manifests_and_row = [result.stdout.partition("\ntrain:")[2] for result in shown[:2]]  # stage seconds differ
    assert "sample row" in manifests_and_row[1] and manifests_and_row[1] == manifests_and_row[0]
    assert shown[2].returncode == 2 and shown[2].stderr.startswith(f"error: {remote}/nothing: no such key or prefix")
    assert shown[2].stderr.count("\n") == 1


@pytest.mark.parametrize("who, url, message", [
    ("admin", "s3://no-such-bucket/warc/*.warc.gz", "no bucket 'no-such-bucket'"),
    ("stranger", "s3://corpus/warc/*.warc.gz", "access denied"),
])
def test_prepare_stops_at_start_naming_the_url(tmp_path, jobs, s3_server, who, url, message):
    result = prepare([url], "s3://out/never", s3_server.env(who), "--work-dir", str(tmp_path / "w"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: s3://") and message in result.stderr, result.stderr


def test_prepare_refuses_an_output_bucket_it_cannot_write(tmp_path, corpora, jobs, s3_server):
    for who, output, message in [("admin", "s3://no-such-bucket/out", "no bucket"), ("reader", "s3://out/job2", "access denied")]:
        result = prepare([str(corpora / WARCS[1])], output, s3_server.env(who), "--work-dir", str(tmp_path / who))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {output}") and message in result.stderr, result.stderr


@pytest.mark.parametrize("who, data, message", [
    ("admin", "s3://no-such-bucket/job", "s3://no-such-bucket/job/tokens/train"),
    ("stranger", "s3://out/job", "access denied"),
])
def test_trainer_stops_at_start_naming_the_url(tmp_path, jobs, s3_server, who, data, message):
    result = _train(_config(tmp_path, data), tmp_path / "run", s3_server.env(who))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "s3://" in errors[0] and message in errors[0], result.stderr[-2000:]
