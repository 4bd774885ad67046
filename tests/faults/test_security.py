"""Nobody gets in: unsafe shard members, pickles in token arrays and checkpoints, YAML tags,
remote code, and secrets from the environment leaking into what a run writes."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_runs import ENV, train_cmd

from data_tools.manifest import ManifestError, file_sha256, iter_blocks, load_manifest
from trainer.config import ModelConfig, load_config
from trainer.data import DataError, LanesLoader, Source

SECRETS = {"HF_TOKEN": "secret123hf", "AWS_SECRET_ACCESS_KEY": "secret456aws", "WANDB_API_KEY": "secret789wandb"}


def rewrite_shard(shard: Path, change: Callable[[list[tuple[tarfile.TarInfo, bytes]]], None]) -> None:
    """Rewrite a shard's members through `change`, then its manifest entry, so size and sha256 still pass."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    change(members)
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    manifest = load_manifest(shard.parent)
    entry = next(s for s in manifest.shards if s.path == shard.name)
    entry.bytes, entry.sha256 = shard.stat().st_size, file_sha256(shard)
    manifest.save(shard.parent)


def _renamed(name: str) -> Callable:
    def change(members):
        members[0][0].name = name + members[0][0].name
    return change


def _special(kind: bytes, **fields) -> Callable:
    def change(members):
        special = tarfile.TarInfo(members[0][0].name.replace(".npy", ".json"))
        special.type = kind
        for key, value in fields.items():
            setattr(special, key, value)
        members.insert(0, (special, b""))
    return change


def _pickled_npy(members):
    """The first block's .npy replaced by an object array: loading it would unpickle."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"rows": 1}, None], dtype=object), allow_pickle=True)
    member, _ = members[0]
    member.size = len(buffer.getvalue())
    members[0] = (member, buffer.getvalue())


UNSAFE = {
    "absolute-path": _renamed("/tmp/"),
    "dot-dot": _renamed("../"),
    "symlink": _special(tarfile.SYMTYPE, linkname="/etc/passwd"),
    "hardlink": _special(tarfile.LNKTYPE, linkname="/etc/passwd"),
    "device": _special(tarfile.CHRTYPE, devmajor=1, devminor=3),
    "fifo": _special(tarfile.FIFOTYPE),
}


@pytest.fixture
def shard_copy(tmp_path, token_data) -> Path:
    shutil.copytree(token_data / "tokens/train", tmp_path / "train")
    return next((tmp_path / "train").glob("shard-*.tar"))


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_tar_members_are_refused_by_both_readers(shard_copy, kind):
    rewrite_shard(shard_copy, UNSAFE[kind])
    with pytest.raises(ManifestError, match="unsafe tar member"):
        next(iter_blocks(shard_copy))
    loader = LanesLoader([Source(str(shard_copy.parent))], global_batch=8, lanes=4, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="unsafe tar member"), loader:
        next(loader.batches(0))


def test_a_pickled_object_array_is_refused_by_both_readers(shard_copy):
    rewrite_shard(shard_copy, _pickled_npy)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        next(iter_blocks(shard_copy))
    loader = LanesLoader([Source(str(shard_copy.parent))], global_batch=8, lanes=4, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="object"), loader:
        next(loader.batches(0))


def test_yaml_tags_do_not_construct_objects_and_remote_code_is_off(tmp_path, config_file):
    marker = tmp_path / "ran"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run: {tag}\n")
    with pytest.raises(Exception, match="python/object"):
        load_config(config, [])
    with pytest.raises(Exception, match="python/object"):
        load_config(config_file, [f"run.name={tag}"])
    assert not marker.exists()
    assert ModelConfig().trust_remote_code is False


class WritesMarker:
    """Unpickling this runs open(path, "w"): what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def short_run(run_dir: Path, config_file: Path, *overrides: str, env: dict | None = None) -> str:
    """A 1-process run of 2 steps, a checkpoint at 2; its output."""
    cmd = train_cmd(config_file, 1, run_dir, "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=2", *overrides)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, config_file) -> tuple[Path, str]:
    """A short DeepSpeed run with secrets in its environment: (run dir, its output)."""
    run_dir = tmp_path_factory.mktemp("secret") / "run"
    return run_dir, short_run(run_dir, config_file, env={**ENV, **SECRETS})


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, config_file) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    short_run(run_dir, config_file, "engine.type=fsdp2")
    return run_dir


@pytest.mark.slow
def test_secrets_in_the_environment_appear_in_nothing_a_run_writes(secret_run):
    run_dir, output = secret_run
    status = subprocess.run([sys.executable, "-m", "launch", "status", str(run_dir)], capture_output=True, text=True,
                            env={**ENV, **SECRETS}, timeout=120)
    files = [p.read_bytes().decode("latin-1") for p in run_dir.rglob("*") if p.is_file()]
    written = [output, status.stdout + status.stderr, *files]
    assert any("step_000002" in text for text in written[1:2]), status.stdout  # status did read the run
    for name, value in SECRETS.items():
        assert not any(value in text for text in written), name


def poison_deepspeed(checkpoint: Path, marker: Path) -> Path:
    states = checkpoint / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=False), "evil": WritesMarker(marker)}, states)
    return states


def poison_dcp(checkpoint: Path, marker: Path) -> Path:
    metadata = checkpoint / "dcp" / ".metadata"
    loaded = pickle.loads(metadata.read_bytes())
    loaded.evil = WritesMarker(marker)
    metadata.write_bytes(pickle.dumps(loaded))
    return metadata


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "export"])
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_a_checkpoint_with_a_malicious_pickle_is_refused_and_never_runs(request, tmp_path, config_file, engine, how):
    run_dir = tmp_path / "run"
    source = request.getfixturevalue("secret_run")[0] if engine == "deepspeed" else request.getfixturevalue("fsdp2_run")
    shutil.copytree(source, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    poisoned = (poison_deepspeed if engine == "deepspeed" else poison_dcp)(checkpoint, marker)
    if how == "resume":
        cmd = train_cmd(config_file, 1, run_dir, f"engine.type={engine}", "train.max_steps=3")
    else:
        cmd = [sys.executable, "-m", "trainer", "export", str(checkpoint), str(tmp_path / "hf")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {poisoned}: refused, it is not a plain tensor checkpoint" in result.stderr
    assert not marker.exists()
