"""The lanes contract of trainer.data, on real token shards made from the shipped corpora.

Expected batches are rebuilt from the rules alone (rows read with data_tools' own `iter_blocks`,
range order from numpy's default_rng([seed, epoch, lane])), so the loader is checked against the
contract, not against itself.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_tools.manifest import STARTS_EXT, file_sha256, load_manifest
from data_tools.shards import write_tar
from trainer.config import ConfigError, load_config
from trainer.data import DataError, Lane, LanesLoader, Source, batch_digest, deal_rows, lane_shares
from trainer.loop import read_manifests

from token_splits import SEQ_LEN, Corpus, take

SEED = 0


def load_sources(sources: list[Source], **overrides) -> LanesLoader:
    layout = dict(global_batch=16, lanes=4, seed=SEED, rank=0, world_size=1, prefetch=2)
    return LanesLoader(sources, **(layout | overrides))


def make_loader(corpus: Corpus, **overrides) -> LanesLoader:
    return load_sources([Source(str(corpus.directory))], **overrides)


def reference_stream(corpus: Corpus, lane: Lane, seed: int, rows: int, part: str = "rows") -> np.ndarray:
    """A lane's first `rows` rows by the contract: ranges in default_rng([seed, epoch, lane]) order, epoch after epoch.
    `part`: the rows' tokens ("rows") or their document positions ("positions")."""
    parts, epoch, have = [], 0, 0
    while have < rows:
        for i in np.random.default_rng([seed, epoch, lane.index]).permutation(len(lane.ranges)):
            r = lane.ranges[i]
            parts.append(getattr(corpus, part)(r.shard, r.first, r.stop))
            have += r.stop - r.first
        epoch += 1
    return np.concatenate(parts)[:rows]


def lane_rows(batches: list[np.ndarray], position: int, k: int) -> np.ndarray:
    """The rows at `position` (in lane order) of each batch, concatenated: one lane's stream."""
    return np.concatenate([b[position * k : (position + 1) * k] for b in batches])


def row_counts(rows: np.ndarray) -> Counter:
    """How often each row occurs (rows compared as int64, whatever the shard's dtype)."""
    return Counter(row.tobytes() for row in rows.astype(np.int64))


# --- dealing rows to lanes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shard_rows", "lanes"),
    [([500] * 5 + [408], 4), ([500] * 5 + [408], 3), ([500] * 5 + [408], 64), ([178], 8), ([10, 0, 7], 5)],
)
def test_deal_rows_cuts_the_corpus_in_order_into_balanced_contiguous_runs(shard_rows, lanes):
    dealt = deal_rows(shard_rows, lanes)
    assert len(dealt) == lanes
    sizes = [sum(r.stop - r.first for r in ranges) for ranges in dealt]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(shard_rows)
    walked = [(r.shard, row) for ranges in dealt for r in ranges for row in range(r.first, r.stop)]
    assert walked == [(s, row) for s, n in enumerate(shard_rows) for row in range(n)]


def test_deal_rows_gives_whole_shards_to_lanes_of_a_large_corpus_and_splits_a_small_one():
    large = deal_rows([100] * 8, 2)
    assert [[(r.first, r.stop) for r in ranges] for ranges in large] == [[(0, 100)] * 4] * 2
    small = deal_rows([178], 4)
    cuts = [(r.shard, r.first, r.stop) for ranges in small for r in ranges]
    assert cuts == [(0, 0, 44), (0, 44, 89), (0, 89, 133), (0, 133, 178)]


# --- the global batch sequence ---------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_together_read_the_global_batch_of_the_contract(train, world_size):
    lanes, k, steps = 4, 4, 400  # a lane holds 727 rows: two epoch boundaries, each inside a step
    ranks = [make_loader(train, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [take(loader, 0, steps) for loader in ranks]
    single = make_loader(train)
    references = [reference_stream(train, lane, SEED, steps * k).astype(np.int64) for lane in single.plan]
    for lane in single.plan:
        owner = ranks[lane.index % world_size]
        got = lane_rows(per_rank[lane.index % world_size], lane.index // world_size, k)
        assert owner.local_lanes[lane.index // world_size].index == lane.index
        np.testing.assert_array_equal(got, references[lane.index])
    digests = []
    for step in range(steps):
        summed = sum(loader.local_lane_digests(batches[step]) for loader, batches in zip(ranks, per_rank))
        expected = np.concatenate([stream[step * k : (step + 1) * k] for stream in references])
        np.testing.assert_array_equal(summed, single.local_lane_digests(expected))
        digests.append(batch_digest(summed))
    assert len(set(digests)) == steps and all(len(d) == 16 for d in digests)
    assert {loader.fingerprint() for loader in ranks} == {single.fingerprint()}
    assert all(b.shape == (lanes * k // world_size, SEQ_LEN) and b.dtype == np.int64 for b in per_rank[-1])


@pytest.mark.parametrize("start", [1, 57, 181, 182, 400])  # lanes of 727 rows, 4 a step: epoch 1 starts in step 181
def test_resume_at_a_step_gives_the_batches_of_an_uninterrupted_run(train, start):
    uninterrupted = take(make_loader(train, rank=1, world_size=2), 0, start + 3)
    resumed = take(make_loader(train, rank=1, world_size=2), start, 3)
    for got, expected in zip(resumed, uninterrupted[start:]):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("lanes", "global_batch"), [(4, 16), (3, 15), (1, 64)])
def test_an_epoch_of_every_lane_reads_every_row_once(train, lanes, global_batch):
    loader = make_loader(train, lanes=lanes, global_batch=global_batch)
    k = global_batch // lanes
    batches = take(loader, 0, max(lane.rows for lane in loader.plan) // k + 1)
    epochs = [lane_rows(batches, lane.index, k)[: lane.rows] for lane in loader.plan]
    assert row_counts(np.concatenate(epochs)) == row_counts(train.all_rows)


def test_range_order_changes_with_the_epoch_and_the_seed_and_repeats_with_the_same_seed(train):
    n = len(train.all_rows)  # one lane of 6 ranges, one per shard: 720 possible orders

    def first_epochs(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rows = lane_rows(take(make_loader(train, lanes=1, global_batch=64, seed=seed), 0, 2 * n // 64 + 1), 0, 64)
        return rows[:n], rows[n : 2 * n]

    epoch0, epoch1 = first_epochs(SEED)
    other0, _ = first_epochs(SEED + 1)
    again0, again1 = first_epochs(SEED)
    assert row_counts(epoch0) == row_counts(epoch1) == row_counts(other0)  # same rows, another order
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, other0)
    np.testing.assert_array_equal(again0, epoch0)
    np.testing.assert_array_equal(again1, epoch1)


def test_fingerprint_follows_data_seed_batch_and_lanes_not_world_size(train):
    base = make_loader(train).fingerprint()
    assert make_loader(train, rank=3, world_size=4).fingerprint() == base
    assert load_sources([Source(str(train.directory), 1)]).fingerprint() == base  # 1 and 1.0 weigh the same
    changed = [make_loader(train, **change).fingerprint() for change in ({"seed": 1}, {"global_batch": 32}, {"lanes": 2})]
    assert len({base, *changed}) == 4


# --- document positions --------------------------------------------------------------------------


def test_document_positions_come_beside_the_tokens_and_restart_at_every_recorded_start(train):
    """Rows become [2, seq_len]: the same tokens (and batch digests) as without, and positions rebuilt
    from the samples' metadata lists, over an epoch boundary (lanes of 727 rows, 4 a step)."""
    steps, k = 190, 4
    plain, loader = make_loader(train), make_loader(train, doc_positions=True)
    with_positions, without = take(loader, 0, steps), take(plain, 0, steps)
    assert with_positions[0].shape == (16, 2, SEQ_LEN) and with_positions[0].dtype == np.int64
    for got, expected in zip(with_positions, without):
        np.testing.assert_array_equal(got[:, 0], expected)
        np.testing.assert_array_equal(loader.local_lane_digests(got), plain.local_lane_digests(expected))
    for lane in loader.plan:
        positions = lane_rows([b[:, 1] for b in with_positions], lane.index, k)
        np.testing.assert_array_equal(positions, reference_stream(train, lane, SEED, steps * k, "positions"))
    assert (np.concatenate(with_positions)[:, 1, 1:] == 0).any(1).sum() > 50  # rows where a document starts inside


def _as_format_1(corpus: Corpus, out: Path) -> Corpus:
    """The corpus as format 1 wrote it: samples without `.starts.npy`, the manifest at format_version 1."""
    shutil.copytree(corpus.directory, out)
    manifest = load_manifest(out)
    for info in manifest.shards:
        path = out / info.path
        with tarfile.open(path) as tar:
            samples: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext != STARTS_EXT:
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        info.bytes, info.sha256 = write_tar(path, samples.items())
    manifest.format_version = 1
    manifest.save(out)
    return Corpus(out, corpus.shards)


def test_format_1_shards_without_document_starts_load_and_read_as_before(train, tmp_path):
    old = _as_format_1(train, tmp_path / "old")
    manifest = load_manifest(old.directory)
    assert manifest.format_version == 1 and not manifest.has_doc_starts
    for got, expected in zip(take(make_loader(old), 0, 30), take(make_loader(train), 0, 30), strict=True):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(DataError, match=r"old: format_version 1 rows without document starts; prepare the data again") as err:
        make_loader(old, doc_positions=True)
    assert "\n" not in str(err.value)


# --- which shards a rank touches -------------------------------------------------------------------


def lane_shards(loader: LanesLoader) -> set[str]:
    """The shard files this rank's lanes read, from its plan."""
    shards = loader.corpora[0].manifest.shards
    return {Path(shards[r.shard].path).name for lane in loader.local_lanes for r in lane.ranges}


def test_a_rank_opens_only_the_shards_of_its_lanes(train, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(train.directory, data)
    copy = Corpus(data, train.shards)
    rank0, rank1 = (make_loader(copy, lanes=2, rank=r, world_size=2) for r in (0, 1))
    mine, theirs = (lane_shards(loader) for loader in (rank0, rank1))
    assert mine == {f"shard-0000{i}.tar" for i in (0, 1, 2)}  # lane 0: rows 0..1453 of 2908
    assert mine & theirs == {"shard-00002.tar"}  # the shard the cut falls in
    for shard in data.glob("shard-*.tar"):
        if shard.name not in mine:
            shard.unlink()
    take(rank0, 0, 400)  # over four epochs of its lane, verifying its shards first: none of the deleted is opened
    with pytest.raises(DataError, match="shard listed in the manifest is missing"):
        take(rank1, 0, 1)


# --- mixtures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "lanes", "shares"),
    [
        ([3, 1], 8, [6, 2]),
        ([1, 1, 1], 4, [2, 1, 1]),
        ([0.5, 0.3, 0.2], 10, [5, 3, 2]),
        ([1, 0.001], 4, [3, 1]),  # the at-least-one rule takes a lane from the largest source
        ([2.5, 1], 8, [6, 2]),  # quotas 5.71 and 2.29: the larger remainder gets the spare lane
    ],
)
def test_lane_shares_follow_weights_by_largest_remainder_with_a_lane_each(weights, lanes, shares):
    assert lane_shares(weights, lanes) == shares


def test_a_mixture_gives_each_source_its_lanes_and_each_lane_one_source(train, valid):
    sources = [Source(str(train.directory), 3), Source(str(valid.directory), 1)]
    loader = load_sources(sources, lanes=8)
    assert [lane.source for lane in loader.plan] == [0] * 6 + [1] * 2
    assert [[r.shard for r in lane.ranges] for lane in loader.plan[6:]] == [[0], [0]]  # one small shard, split
    batches = take(loader, 0, 60)  # 60 steps x 2 rows: past an epoch of the valid lanes (89 rows)
    for lane in loader.plan:
        corpus = (train, valid)[lane.source]
        np.testing.assert_array_equal(lane_rows(batches, lane.index, 2), reference_stream(corpus, lane, SEED, 120))


def test_a_mixture_refuses_a_weightless_source_and_sources_from_different_tokenizers(train, valid, tmp_path):
    with pytest.raises(DataError, match=r"valid: weight 0; a source's weight must be positive"):
        load_sources([Source(str(train.directory)), Source(str(valid.directory), 0)])
    shutil.copytree(valid.directory, tmp_path / "valid")
    manifest = load_manifest(tmp_path / "valid")
    manifest.tokenizer.sha256 = "f" * 64
    manifest.save(tmp_path / "valid")
    sources = json.dumps([{"path": str(train.directory)}, {"path": str(tmp_path / "valid")}])
    with pytest.raises(ConfigError, match=r"valid: seq_len 64 / tokenizer .* differ from the first source's 64 / .*; "
                                          r"a mixture needs one tokenizer and seq_len"):
        read_manifests(load_config(None, [f"data.train={sources}"]))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lanes": 4, "world_size": 3}, r"data.lanes 4 is not a multiple of the world size 3"),
        ({"global_batch": 10, "lanes": 4}, r"train.global_batch 10 is not a multiple of data.lanes 4"),
        ({"rank": 2, "world_size": 2}, r"rank 2: outside 0..1"),
    ],
)
def test_a_run_that_does_not_fit_the_data_is_refused_in_one_line(train, overrides, message):
    with pytest.raises(DataError, match=message) as err:
        make_loader(train, **overrides)
    assert "\n" not in str(err.value)


def test_a_missing_manifest_and_a_corpus_smaller_than_its_lanes_are_refused(valid, tmp_path):
    with pytest.raises(DataError, match=r"nope: no manifest here; run `python -m data_tools prepare` first"):
        load_sources([Source(str(tmp_path / "nope"))])
    with pytest.raises(DataError, match=r"178 rows, fewer than its 256 lanes; use fewer data.lanes or more data"):
        make_loader(valid, lanes=256, global_batch=256)


def _append_byte(shard: Path) -> None:
    with open(shard, "ab") as f:
        f.write(b"\0")


def _flip_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))


def _unsafe_member(shard: Path) -> None:
    """Rewrite the shard with a '..' member name and update the manifest so it passes verification."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[0][0].name = "../" + members[0][0].name
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    manifest = load_manifest(shard.parent)
    manifest.shards[0].bytes, manifest.shards[0].sha256 = shard.stat().st_size, file_sha256(shard)
    manifest.save(shard.parent)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_append_byte, r"shard-00000.tar: size 92161 bytes, manifest says 92160; the shard is truncated or replaced"),
        (_flip_byte, r"shard-00000.tar: sha256 [0-9a-f]{16}…, manifest says [0-9a-f]{16}…; the shard is corrupt"),
        (_unsafe_member, r"shard-00000.tar: unsafe tar member '\.\./00000-00000.npy'; shards hold plain relative files only"),
    ],
)
def test_a_damaged_shard_is_refused_before_the_first_batch(train, tmp_path, damage: Callable[[Path], None], message):
    shutil.copytree(train.directory, tmp_path / "train")
    damage(tmp_path / "train" / "shard-00000.tar")
    loader = make_loader(Corpus(tmp_path / "train", train.shards))
    with pytest.raises(DataError, match=message) as err:
        take(loader, 0, 1)
    assert "\n" not in str(err.value)


def test_on_corrupt_skip_reads_the_corpus_without_the_damaged_shards_and_says_so(train, tmp_path, caplog):
    """`data.on_corrupt: skip`: the batches are those of the same corpus with the shard left out of
    its manifest (deterministic), the skip is logged once with the checksums, the fingerprint changes."""
    shutil.copytree(train.directory, tmp_path / "damaged")
    _flip_byte(tmp_path / "damaged" / "shard-00001.tar")
    shutil.copytree(train.directory, tmp_path / "without")
    manifest = load_manifest(tmp_path / "without")
    del manifest.shards[1]
    manifest.save(tmp_path / "without")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        skipping = make_loader(Corpus(tmp_path / "damaged", train.shards), on_corrupt="skip")
    without = make_loader(Corpus(tmp_path / "without", train.shards))
    assert all(np.array_equal(a, b) for a, b in zip(take(skipping, 3, 4), take(without, 3, 4), strict=True))
    assert skipping.fingerprint() == without.fingerprint() != make_loader(train).fingerprint()
    skipped = [r.getMessage() for r in caplog.records if "shard-00001.tar" in r.getMessage()]
    assert len(skipped) == 1 and re.search(r"sha256 [0-9a-f]{16}…, manifest says [0-9a-f]{16}…", skipped[0])
    assert any("skipped 1 of" in r.getMessage() for r in caplog.records)


def test_on_corrupt_skip_refuses_a_corpus_with_no_readable_shard(train, tmp_path):
    shutil.copytree(train.directory, tmp_path / "train")
    for shard in (tmp_path / "train").glob("shard-*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match=r"every shard is missing or corrupt; prepare the data again"):
        make_loader(Corpus(tmp_path / "train", train.shards), on_corrupt="skip")


# --- the prefetch thread --------------------------------------------------------------------------


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lanes-prefetch"]


@pytest.mark.timeout(60)
def test_close_ends_the_prefetch_thread_without_hanging(train):
    loader = make_loader(train, prefetch=2)
    first = loader.batches(0)
    next(first)
    second = loader.batches(5)  # a new stream closes the previous one
    assert next(first, None) is None and len(_prefetch_threads()) == 1
    next(second)
    closer = threading.Thread(target=loader.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive() and _prefetch_threads() == []
    assert next(second, None) is None


@pytest.mark.timeout(60)
def test_a_reader_error_mid_stream_reaches_the_consumer(train, tmp_path):
    shutil.copytree(train.directory, tmp_path / "train")
    loader = make_loader(Corpus(tmp_path / "train", train.shards), lanes=1, global_batch=64, prefetch=1, verify=False)
    last = loader.plan[0].epoch_ranges(SEED, 0)[-1]  # a whole shard, the last one the lane reads in epoch 0
    stream = loader.batches(0)
    next(stream)
    with open(tmp_path / "train" / f"shard-0000{last.shard}.tar", "r+b") as f:
        f.truncate(1024)
    steps = 1
    with pytest.raises(DataError, match=rf"shard-0000{last.shard}.tar: block \d+ ends after \d+ of 8192 bytes") as err:
        for _ in stream:
            steps += 1
    assert steps == (2908 - last.rows) // 64 and "\n" not in str(err.value)  # every batch before that shard arrived
    assert _prefetch_threads() == []
