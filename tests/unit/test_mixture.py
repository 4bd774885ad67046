"""Weighted mixtures (`data.sources`, trainer.mixture): exact per-batch shares by the carried largest
remainder, weight schedules, world-size independence, resume from the step alone, exhaustion, config errors.

The counts are checked against an exact (fractions) rebuild of the rule, and batches against each source's
stream rebuilt from the contract (ranges from `deal_rows`, read in default_rng([seed, epoch, source]) order).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from data_tools.common import CheckpointError
from data_tools.manifest import load_manifest
from trainer.checkpoint import TrainerState
from trainer.config import ConfigError, load_config
from trainer.data import DataError, batch_digest, deal_rows
from trainer.loop import check_data, read_manifests
from trainer.mixture import MixtureLoader, WeightedSource
from trainer.mixture_weights import RowCounts, WeightSchedule, largest_remainder

from token_splits import SEQ_LEN, Corpus, take

SEED = 0


def exact_counts(weights: list, batch: int, steps: int) -> list[list[int]]:
    """C_s(t) for t = 0..steps by the rule in exact arithmetic: each step's quota is the exact target after the
    step minus the rows given so far; floors (none below 0), then one row each to the largest remainders."""
    schedules = [WeightSchedule.parse(w, "w") for w in weights]
    counts, target, out = [0] * len(weights), [Fraction(0)] * len(weights), [[0] * len(weights)]
    for step in range(steps):
        at = [Fraction(s.at(step)) for s in schedules]
        target = [t + batch * w / sum(at) for t, w in zip(target, at)]
        quota = [t - c for t, c in zip(target, counts)]
        rows = [max(0, q.numerator // q.denominator) for q in quota]
        for s in sorted(range(len(rows)), key=lambda s: (rows[s] - quota[s], s))[: batch - sum(rows)]:
            rows[s] += 1
        counts = [c + n for c, n in zip(counts, rows)]
        out.append(counts)
    return out


@pytest.mark.parametrize(
    ("weights", "batch"),
    [
        ([0.7, 0.3], 8),
        ([1, 1, 1], 8),  # ties every step: the earlier source takes the spare row
        ([[[0, 0.9], [20, 0.9], [40, 0.1]], 0.3, [[0, 0], [30, 1]]], 16),  # a ramp down, a constant, a ramp up from 0
        ([5, 0.01], 4),  # a source owed less than a row per step
    ],
)
def test_counts_are_the_carried_largest_remainder_and_never_a_row_off_target(weights, batch):
    steps = 60
    counts = RowCounts([WeightSchedule.parse(w, "w") for w in weights], batch)
    assert [counts.at(t) for t in range(steps + 1)] == exact_counts(weights, batch, steps)
    target = np.zeros(len(weights))
    for step, before, after in counts.from_step(0):
        if step == steps:
            break
        rows = np.subtract(after, before)
        assert rows.sum() == batch and rows.min() >= 0
        target += batch * np.array(counts.shares(step))
        assert np.abs(np.array(after) - target).max() <= 1
    assert counts.at(7) == exact_counts(weights, batch, 7)[7]  # an earlier step after a later one: recomputed


def test_counts_by_hand_for_seven_tenths_of_eight_rows():
    counts = RowCounts([WeightSchedule.parse(0.7, "w"), WeightSchedule.parse(0.3, "w")], 8)
    per_step = [np.subtract(after, before).tolist() for _, before, after in _take(counts.from_step(0), 5)]
    assert per_step == [[6, 2], [5, 3], [6, 2], [5, 3], [6, 2]]  # 5.6 rows a step: 6, 11, 17, 22, 28 after 1..5 steps


def test_a_schedule_switches_at_the_named_step():
    web = WeightSchedule.parse([[0, 1], [4, 1], [5, 0]], "w")
    counts = RowCounts([web, WeightSchedule.parse(1, "w")], 8)
    rows = [np.subtract(after, before).tolist() for _, before, after in _take(counts.from_step(0), 7)]
    assert rows == [[4, 4]] * 5 + [[0, 8]] * 2  # steps 0..4 half and half, from step 5 on the second source only
    assert web.at(4) == 1 and web.at(5) == 0 and web.at(10**6) == 0


def test_largest_remainder_takes_a_row_back_when_sources_owed_nothing_took_none():
    assert largest_remainder([-0.5, -0.5, 9.0], 8) == [0, 0, 8]
    assert largest_remainder([2.4, 5.6], 8) == [2, 6]


def _take(iterator, n: int) -> list:
    """The first `n` items of an endless iterator."""
    return [item for _, item in zip(range(n), iterator)]


# --- the loader --------------------------------------------------------------------------------------


def mixture(sources: list[tuple[str, Corpus, object]], **overrides) -> MixtureLoader:
    weighted = [WeightedSource(name, load_manifest(c.directory), WeightSchedule.parse(w, name),
                               overrides.pop(f"exhaust_{name}", "wrap")) for name, c, w in sources]
    layout = dict(global_batch=8, pieces=4, seed=SEED, rank=0, world_size=1, prefetch=2)
    return MixtureLoader(weighted, **(layout | overrides))


def source_stream(corpus: Corpus, index: int, pieces: int, rows: int, part: str = "rows") -> np.ndarray:
    """A source's first `rows` stream rows by the contract: its ranges (deal_rows into `pieces`, in order), read in
    default_rng([seed, epoch, source index]) order, epoch after epoch."""
    ranges = [r for cut in deal_rows([len(s) for s in corpus.shards], pieces) for r in cut]
    parts, epoch, have = [], 0, 0
    while have < rows:
        for i in np.random.default_rng([SEED, epoch, index]).permutation(len(ranges)):
            parts.append(getattr(corpus, part)(ranges[i].shard, ranges[i].first, ranges[i].stop))
            have += ranges[i].rows
        epoch += 1
    return np.concatenate(parts)[:rows].astype(np.int64)


SCHEDULE = [[0, 0.7], [40, 0.7], [60, 0.2]]  # web: 70% for 40 steps, then down to 20% by step 60


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_together_read_each_sources_rows_in_source_order_at_any_world_size(train, valid, world_size):
    sources, steps = [("web", train, SCHEDULE), ("small", valid, 0.3)], 90  # small: 178 rows, wraps twice
    ranks = [mixture(sources, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [take(loader, 0, steps) for loader in ranks]
    counts = RowCounts([WeightSchedule.parse(SCHEDULE, "w"), WeightSchedule.parse(0.3, "w")], 8)
    streams = [source_stream(c, i, 4, counts.at(steps)[i]) for i, (_, c, _) in enumerate(sources)]
    for step in range(steps):
        before, after = counts.at(step), counts.at(step + 1)
        expected = np.concatenate([stream[b:a] for stream, b, a in zip(streams, before, after)])
        np.testing.assert_array_equal(np.concatenate([batches[step] for batches in per_rank]), expected)
        summed = sum(loader.local_lane_digests(batches[step]) for loader, batches in zip(ranks, per_rank))
        assert batch_digest(summed) == batch_digest(mixture(sources).local_lane_digests(expected))
    assert {loader.fingerprint() for loader in ranks} == {mixture(sources).fingerprint()}


@pytest.mark.parametrize("start", [1, 41, 59, 74, 130])  # inside the ramp, at its end, around small's epoch 1 (step 74)
def test_resume_at_a_step_gives_the_batches_of_an_uninterrupted_run(train, valid, start):
    sources = [("web", train, SCHEDULE), ("small", valid, 0.3)]
    uninterrupted = take(mixture(sources, rank=1, world_size=2), 0, start + 3)
    for got, expected in zip(take(mixture(sources, rank=1, world_size=2), start, 3), uninterrupted[start:], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_an_epoch_of_a_source_reads_each_of_its_rows_once_and_its_wrap_is_logged_once(train, valid, caplog):
    loader = mixture([("web", train, 0.7), ("small", valid, 0.3)])
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        batches = take(loader, 0, 100)
    counts = RowCounts([WeightSchedule.parse(0.7, "w"), WeightSchedule.parse(0.3, "w")], 8)
    small_rows = [counts.at(t + 1)[1] - counts.at(t)[1] for t in range(100)]  # small's rows end each batch
    small = np.concatenate([batch[8 - n :] for batch, n in zip(batches, small_rows)])
    assert Counter(r.tobytes() for r in small[:178]) == Counter(r.tobytes() for r in valid.all_rows.astype(np.int64))
    wrap_step = next(t for t in range(1, 101) if counts.at(t)[1] > 178)  # the first batch holding its row 178
    wraps = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert wraps == [f"data.sources small: epoch 1 starts in the batch of step {wrap_step} (its rows reshuffled)"]
    assert loader.source_state(100) == {"web": {"rows": 560, "epoch": 0}, "small": {"rows": 240, "epoch": 1}}
    record = loader.source_record(100)
    assert record["data/small/rows"] == 240 and record["data/small/tokens"] == 240 * SEQ_LEN
    assert record["data/web/weight"] == 0.7


def test_a_source_with_exhaust_stop_ends_the_run_at_its_last_full_step(train, valid):
    loader = mixture([("web", train, 0.7), ("small", valid, 0.3)], exhaust_small="stop")
    counts = RowCounts([WeightSchedule.parse(0.7, "w"), WeightSchedule.parse(0.3, "w")], 8)
    last = loader.end_step(0, 1000)
    assert counts.at(last)[1] <= 178 < counts.at(last + 1)[1]
    assert loader.end_step(last - 3, 1000) == last  # resumed before it
    assert loader.end_step(last + 2, 1000) == last + 2  # resumed after it ran out: the run ends at once
    assert loader.end_step(0, 10) == 10
    assert mixture([("web", train, 0.7), ("small", valid, 0.3)]).end_step(0, 1000) == 1000  # wrap: no end
    assert loader.fingerprint() == mixture([("web", train, 0.7), ("small", valid, 0.3)]).fingerprint()


def test_a_checkpoint_is_refused_when_its_rows_per_source_are_not_the_mixtures_at_its_step(train, valid, tmp_path):
    loader = mixture([("web", train, 0.7), ("small", valid, 0.3)])
    state = TrainerState(4, 4 * 8 * SEQ_LEN, loader.fingerprint(), 2, "fsdp2", None, {}, sources=loader.source_state(4))
    check_data(tmp_path / "step_000004", state, loader)
    state.sources["web"]["rows"] += 1
    with pytest.raises(CheckpointError, match=r"step_000004: per-source rows \{'web': \{'rows': 23, 'epoch': 0\}.* differ "
                                              r"from the .* the mixture gives at step 4; use a new run.name") as err:
        check_data(tmp_path / "step_000004", state, loader)
    assert "\n" not in str(err.value)
    state.data_fingerprint = mixture([("web", train, 0.6), ("small", valid, 0.4)]).fingerprint()
    with pytest.raises(CheckpointError, match=r"step_000004: written for other data, seed, global batch or lanes"):
        check_data(tmp_path / "step_000004", state, loader)


def test_document_positions_come_with_each_sources_rows(train, valid):
    sources = [("web", train, 0.5), ("small", valid, 0.5)]
    batch = take(mixture(sources, doc_positions=True), 0, 1)[0]
    assert batch.shape == (8, 2, SEQ_LEN)
    np.testing.assert_array_equal(batch[:4, 0], source_stream(train, 0, 4, 4))
    np.testing.assert_array_equal(batch[:4, 1], source_stream(train, 0, 4, 4, part="positions"))
    np.testing.assert_array_equal(batch[4:, 1], source_stream(valid, 1, 4, 4, part="positions"))
    assert batch_digest(mixture(sources, doc_positions=True).local_lane_digests(batch)) == batch_digest(
        mixture(sources).local_lane_digests(np.ascontiguousarray(batch[:, 0])))


def test_a_shard_is_verified_when_a_rank_first_reads_it(train, valid, tmp_path):
    shutil.copytree(valid.directory, tmp_path / "small")
    shard = next((tmp_path / "small").glob("shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[:-1])
    copy = Corpus(tmp_path / "small", valid.shards)
    loader = mixture([("web", train, 0.5), ("small", copy, 0.5)])  # opening it reads no shard
    with pytest.raises(DataError, match=rf"{shard.name}") as err:
        take(loader, 0, 1)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"small: every shard is missing or corrupt"):
        mixture([("web", train, 0.5), ("small", copy, 0.5)], on_corrupt="skip")


# --- the config -----------------------------------------------------------------------------------


def mixture_config(train, valid, *sources: dict, extra: tuple[str, ...] = ()):
    given = list(sources) or [{"name": "web", "train": str(train.directory), "weight": SCHEDULE},
                              {"name": "small", "train": str(valid.directory), "valid": str(valid.directory)}]
    return load_config(None, [f"data.sources={json.dumps(given)}", *extra])


def test_a_mixture_config_reads_its_manifests_once_and_scores_each_sources_valid(train, valid):
    config = mixture_config(train, valid)
    assert [s.path for s in config.data.train_sources()] == [str(train.directory), str(valid.directory)]
    assert config.data.valid_sources() == {"small": str(valid.directory)}
    assert list(read_manifests(config).named_valid) == ["small"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "web"}, r"'data.sources\[1\].name' 'web' is empty, repeated or not a plain word"),
        ({"name": "a b"}, r"'data.sources\[1\].name' 'a b' is empty, repeated or not a plain word"),
        ({"weight": -1}, r"'data.sources\[1\].weight': weight -1.0 at step 0 must be a finite number >= 0"),
        ({"weight": [[0, 1], [5, 1], [3, 0]]}, r"'data.sources\[1\].weight': steps \[0, 5, 3\] must be ascending"),
        ({"weight": [[0.5, 1]]}, r"'data.sources\[1\].weight': step 0.5 must be a whole number >= 0"),
        ({"train": ""}, r"'data.sources\[1\].train' is empty"),
    ],
)
def test_a_bad_source_is_refused_in_one_line_naming_its_key(train, valid, change, message):
    sources = [{"name": "web", "train": str(train.directory)}, {"name": "small", "train": str(valid.directory), **change}]
    with pytest.raises(ConfigError, match=message) as err:
        mixture_config(train, valid, *sources)
    assert "\n" not in str(err.value)


def test_weights_all_zero_at_a_step_and_mixed_keys_are_refused(train, valid):
    zero = [{"name": "web", "train": str(train.directory), "weight": [[0, 1], [10, 0]]},
            {"name": "small", "train": str(valid.directory), "weight": [[0, 1], [5, 1], [6, 0]]}]
    with pytest.raises(ConfigError, match=r"the weights of data.sources \(web, small\) are all zero at step 10"):
        mixture_config(train, valid, *zero)
    with pytest.raises(ConfigError, match=r"'data.train' and 'data.sources' are both set"):
        mixture_config(train, valid, extra=(f"data.train={train.directory}",))
    with pytest.raises(ConfigError, match=r"task.type multitask reads 'data.train' as a list of sources"):
        mixture_config(train, valid, extra=("task.type=multitask",))
    with pytest.raises(ConfigError, match=r"'data.sources\[1\].valid' and 'data.valid.small' both name eval/small"):
        mixture_config(train, valid, extra=(f"data.valid={json.dumps({'small': str(valid.directory)})}",))


def test_sources_of_another_tokenizer_are_refused_naming_the_source(train, valid, tmp_path):
    shutil.copytree(valid.directory, tmp_path / "other")
    manifest = load_manifest(tmp_path / "other")
    manifest.tokenizer.sha256 = "f" * 64
    manifest.save(tmp_path / "other")
    sources = [{"name": "web", "train": str(train.directory)}, {"name": "other", "train": str(tmp_path / "other")}]
    with pytest.raises(ConfigError, match=r"data.sources\[1\].train .*other: seq_len 64 / tokenizer .* differ from the "
                                          r"first source's"):
        read_manifests(mixture_config(train, valid, *sources))


def test_the_example_mixture_anneals_towards_wikipedia():
    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "mixture.yaml")
    counts = RowCounts([WeightSchedule.parse(s.weight, s.name) for s in config.data.sources], config.train.global_batch)
    assert [s.name for s in config.data.sources] == ["web", "wiki"]
    assert counts.shares(0) == pytest.approx([0.7, 0.3]) and counts.shares(240) == pytest.approx([0.7, 0.3])
    assert counts.shares(config.train.max_steps) == pytest.approx([0.3, 0.7])
    assert config.data.valid_sources() == {"web": "runs/mixture/web/tokens/valid", "wiki": "runs/mixture/wiki/tokens/valid"}
