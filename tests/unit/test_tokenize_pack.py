"""Tokenizers (GPT-2 files, training), EOS-separated encoding, packing into rows across tasks,
the two-level shuffle, shard writing, the manifest contract and its integrity checks."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from data_tools.errors import DataError
from data_tools.manifest import (
    FORMAT_VERSION,
    STARTS_DTYPE,
    STARTS_EXT,
    Manifest,
    ManifestError,
    TokenizerInfo,
    file_sha256,
    index_shard,
    iter_blocks,
    load_manifest,
    shard_stem,
    verify_shard,
)
from data_tools.pack import Rows, TokenStream, cut_rows, row_order, write_shard
from data_tools.shards import json_bytes, npy_bytes, read_tar, write_tar
from data_tools.tokenize import encode_documents, load_tokenizer, train_tokenizer

SEQ_LEN = 128


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_tokenizer(gpt2_dir)


@pytest.fixture(scope="module")
def texts(_enwiki_docs):
    """Twelve real articles, short and long."""
    return [d.text for d in _enwiki_docs[:12]]


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("which", ["directory", "vocab.json"])
def test_gpt2_tokenizer_loads(gpt2_dir, which):
    """vocab.json + merges.txt (given as their folder or as vocab.json) load as GPT-2: "Hello world"
    is [15496, 995], <|endoftext|> is 50256, 50257 tokens."""
    tok = load_tokenizer(gpt2_dir if which == "directory" else gpt2_dir / "vocab.json")
    assert tok.tokenizer.encode("Hello world").ids == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257 and tok.name == "gpt2"


def test_gpt2_round_trips_real_text(gpt2, texts):
    """Byte-level BPE decodes an article back to exactly its text."""
    assert gpt2.tokenizer.decode(gpt2.tokenizer.encode(texts[0]).ids) == texts[0]


def test_tokenizer_json_saved_and_reloaded(gpt2, tmp_path, texts):
    """A tokenizer saved as tokenizer.json loads back (file or folder) with the same ids and EOS."""
    gpt2.tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        tok = load_tokenizer(path)
        assert tok.eos_id == 50256
        assert tok.tokenizer.encode(texts[1]).ids == gpt2.tokenizer.encode(texts[1]).ids


def test_tokenizer_errors_name_the_path(gpt2_dir, tmp_path):
    """Missing path, vocab.json without merges.txt, a non-tokenizer JSON file and a vocabulary
    without an end-of-text token are DataErrors naming what was given."""
    with pytest.raises(DataError, match=r"--tokenizer .*no-such-dir: no such file or directory"):
        load_tokenizer(tmp_path / "no-such-dir")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "vocab.json").write_bytes((gpt2_dir / "vocab.json").read_bytes())
    with pytest.raises(DataError, match=r"lonely.*vocab.json with merges.txt beside it"):
        load_tokenizer(lonely)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=r"tokenizer.json: not a tokenizers JSON file"):
        load_tokenizer(bad)
    no_eos = tmp_path / "no-eos"
    no_eos.mkdir()
    vocab = json.loads((gpt2_dir / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (no_eos / "vocab.json").write_text(json.dumps(vocab))
    (no_eos / "merges.txt").write_bytes((gpt2_dir / "merges.txt").read_bytes())
    with pytest.raises(DataError, match=r"no-eos.*none of the end-of-text tokens"):
        load_tokenizer(no_eos)


@pytest.mark.parametrize("vocab_size", [600, 1000])
def test_train_tokenizer_size_and_determinism(texts, vocab_size):
    """Training on real text gives exactly the requested vocabulary, <|endoftext|> as EOS, and the
    same tokenizer twice; the result round-trips text."""
    first, second = train_tokenizer(texts, vocab_size), train_tokenizer(texts, vocab_size)
    assert first.vocab_size == vocab_size and first.name == f"bpe-{vocab_size}"
    assert first.tokenizer.id_to_token(first.eos_id) == "<|endoftext|>"
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    ids = first.tokenizer.encode(texts[2]).ids
    assert len(ids) < len(texts[2].encode()) / 2 and first.tokenizer.decode(ids) == texts[2]


def test_encode_documents_appends_eos(gpt2, texts):
    """Each document's ids are followed by one EOS; lengths count it; nothing else is EOS."""
    tokens, lengths = encode_documents(gpt2, texts)
    assert tokens.dtype == np.uint32 and lengths.tolist() == [len(gpt2.tokenizer.encode(t).ids) + 1 for t in texts]
    ends = np.cumsum(lengths)
    assert (tokens[ends - 1] == 50256).all() and (tokens == 50256).sum() == len(texts)
    for text, end, length in zip(texts, ends, lengths):
        assert gpt2.tokenizer.decode(tokens[end - length : end - 1].tolist()) == text


# ----------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def streams(gpt2, texts):
    """Three inputs' (tokens, document lengths, source): real articles, one input a single short
    document that cannot fill a row alone."""
    groups = {"a.warc.gz": texts[:5], "b.xml.bz2": [texts[5][:200]], "c.jsonl": texts[6:]}
    return [(*encode_documents(gpt2, group), source) for source, group in groups.items()]


def expected_rows(streams, seq_len):
    """Rows, document starts and first-token sources computed straight from the streams."""
    tokens = np.concatenate([t for t, _, _ in streams])
    lengths = np.concatenate([n for _, n, _ in streams])
    sources = [s for _, n, s in streams for _ in n]
    starts = np.cumsum(lengths) - lengths
    n_rows = len(tokens) // seq_len
    doc_starts = [[int(s - r * seq_len) for s in starts if r * seq_len <= s < (r + 1) * seq_len] for r in range(n_rows)]
    row_sources = [sources[np.searchsorted(starts, r * seq_len, side="right") - 1] for r in range(n_rows)]
    return tokens[: n_rows * seq_len].reshape(n_rows, seq_len), doc_starts, row_sources, len(tokens) - n_rows * seq_len


@pytest.fixture(scope="module")
def rows(streams):
    stats = Counter()
    return cut_rows(streams, SEQ_LEN, stats), stats


def test_cut_rows(streams, rows):
    """Rows are the concatenated streams cut every seq_len tokens, with each row's document starts
    and the source of its first token; the incomplete tail is counted as dropped."""
    packed, stats = rows
    tokens, doc_starts, sources, tail = expected_rows(streams, SEQ_LEN)
    assert packed.tokens.shape == (len(tokens), SEQ_LEN) and len(tokens) > 100
    assert np.array_equal(packed.tokens, tokens)
    assert packed.doc_starts == doc_starts and packed.sources == sources
    assert {"a.warc.gz", "c.jsonl"} <= set(sources)
    assert stats == {"tokens_dropped_tail": tail} and 0 < tail < SEQ_LEN


@pytest.mark.parametrize("seq_len", [7, 4096])
def test_cut_rows_other_lengths(streams, seq_len):
    """The same holds for rows much shorter and longer than a document."""
    stats = Counter()
    packed = cut_rows(streams, seq_len, stats)
    tokens, doc_starts, sources, tail = expected_rows(streams, seq_len)
    assert np.array_equal(packed.tokens, tokens) and packed.doc_starts == doc_starts and packed.sources == sources
    assert stats["tokens_dropped_tail"] == tail


def test_rows_in_any_order_match_the_rows_in_stream_order(streams, rows):
    """Reading rows by global index, shuffled and repeated, gives the same rows (tokens, document
    starts, sources) as cutting the streams in order; also when tasks are cut at other points."""
    packed, _ = rows
    ids = np.random.default_rng(0).permutation(len(packed))[:30].repeat(2)
    assert_rows_equal(TokenStream.from_arrays(streams, SEQ_LEN).rows(ids), packed.take(ids))
    tokens, lengths, source = streams[0]
    cut = int(np.cumsum(lengths)[1])  # the first input as two tasks, the first with two documents
    split = [(tokens[:cut], lengths[:2], source), (tokens[cut:], lengths[2:], source), *streams[1:]]
    assert_rows_equal(TokenStream.from_arrays(split, SEQ_LEN).rows(ids), packed.take(ids))


def assert_rows_equal(got: Rows, expected: Rows) -> None:
    assert np.array_equal(got.tokens, expected.tokens)
    assert got.doc_starts == expected.doc_starts and got.sources == expected.sources


@pytest.mark.parametrize("n_rows, window, chunk", [(1000, 64, 16), (1003, 100, 7), (5, 64, 16)])
def test_row_order_is_a_two_level_permutation_of_all_rows(n_rows, window, chunk):
    """The output order is a permutation of all rows: chunks of consecutive rows are moved across
    the corpus, then each window is mixed; the same for the same seed, another for another seed,
    and any range of output positions equals that slice of the whole order (so pack tasks can
    split the shards any way)."""
    order = row_order(n_rows, 0, n_rows, window, chunk, seed=3)
    assert sorted(order.tolist()) == list(range(n_rows))
    if n_rows > window:
        assert not np.array_equal(order, np.arange(n_rows))
        first = order[:window]
        assert len(set((first // chunk).tolist())) <= window // chunk + 2  # a window holds a few chunks...
        assert np.ptp(first) > window  # ...taken from across the corpus
        assert not np.array_equal(row_order(n_rows, 0, n_rows, window, chunk, seed=4), order)
    assert np.array_equal(row_order(n_rows, 0, n_rows, window, chunk, seed=3), order)
    for start, stop in ((0, 1), (3, 250), (window - 1, window + 1), (n_rows - 2, n_rows)):
        start, stop = min(start, n_rows), min(stop, n_rows)
        assert np.array_equal(row_order(n_rows, start, stop, window, chunk, seed=3), order[start:stop])


# ----------------------------------------------------------------------------- shards and manifest


@pytest.fixture
def shards(rows, tmp_path):
    packed, _ = rows
    packed = packed.take(slice(0, 25))
    infos = [write_shard(packed.take(slice(first, first + 10)), tmp_path, index, "uint16", 4)
             for index, first in enumerate((0, 10, 20))]
    return packed, infos, tmp_path


def test_write_shards_sizes_and_contents(shards):
    """25 rows at 10 per shard: shards of 10, 10 and 5 rows, 4-row samples, read back identical
    (uint16), with per-sample doc starts and per-source row counts; sizes and checksums recorded."""
    packed, infos, directory = shards
    assert [s.path for s in infos] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [s.rows for s in infos] == [10, 10, 5] and [s.tokens for s in infos] == [10 * SEQ_LEN, 10 * SEQ_LEN, 5 * SEQ_LEN]
    blocks, metas = [], []
    for info in infos:
        path = directory / info.path
        assert info.bytes == path.stat().st_size and info.sha256 == file_sha256(path)
        for block, meta in iter_blocks(path):
            blocks.append(block)
            metas.append(meta)
    assert [len(b) for b in blocks] == [4, 4, 2, 4, 4, 2, 4, 1]
    assert all(b.dtype == np.uint16 for b in blocks)
    assert np.array_equal(np.concatenate(blocks), packed.tokens)
    assert [s for m in metas for s in m["doc_starts"]] == packed.doc_starts
    assert sum((Counter(m["sources"]) for m in metas), Counter()) == Counter(packed.sources)


def packed_manifest(infos, directory):
    return Manifest(
        seq_len=SEQ_LEN,
        dtype="uint16",
        tokenizer=TokenizerInfo("gpt2", 50257, 50256, "ab" * 32, "tokenizer/tokenizer.json"),
        shards=infos,
        split="valid",
        rows_per_sample=4,
        stats={"extract": {"docs_in": 3}},
        pipeline={"seed": 0},
        directory=directory,
    )


def test_manifest_round_trip(shards):
    """Manifest.save writes manifest.json that load_manifest reads back equal, totals included."""
    _, infos, directory = shards
    manifest = packed_manifest(infos, directory)
    path = manifest.save(directory)
    assert path == directory / "manifest.json" and not list(directory.glob("*.tmp"))
    assert load_manifest(directory) == manifest == load_manifest(path)
    data = json.loads(path.read_text())
    assert data["total_rows"] == 25 and data["total_tokens"] == 25 * SEQ_LEN and data["format_version"] == FORMAT_VERSION
    for info in manifest.shards:
        verify_shard(directory, info)


def test_each_block_records_its_rows_document_starts_where_the_index_finds_them(shards):
    """`<key>.starts.npy` beside every block: int32 [rows, widest row] padded with -1, equal to the
    metadata's lists; `index_shard` finds each one's data span so the trainer reads it in one read."""
    packed, infos, directory = shards
    manifest = packed_manifest(infos, directory)
    assert manifest.has_doc_starts
    found = []
    for info in infos:
        index = index_shard(manifest, info)
        assert len(index.starts_spans) == len(index.block_spans)
        with open(directory / info.path, "rb") as f:
            for (offset, size, width), (_, block_bytes) in zip(index.starts_spans, index.block_spans):
                f.seek(offset)
                starts = np.frombuffer(f.read(size), STARTS_DTYPE).reshape(block_bytes // (2 * SEQ_LEN), width)
                found += [[int(s) for s in row if s >= 0] for row in starts]
    assert found == packed.doc_starts and any(found)


def test_a_format_2_shard_without_document_starts_is_refused(shards):
    _, infos, directory = shards
    path = directory / infos[0].path
    kept = [(key, {ext: data}) for key, ext, data in _members(path) if ext != STARTS_EXT]
    write_tar(path, kept)
    with pytest.raises(ManifestError, match=r"shard-00000.tar: 0 of 3 blocks have a starts.npy member, format 2 needs one each"):
        index_shard(packed_manifest(infos, directory), infos[0])


def _members(path):
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            yield key, ext, tar.extractfile(member).read()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no manifest here"),
        ("{not json", "not valid JSON"),
        ('{"format_version": 99}', "format_version 99"),
        ('{"format_version": 1}', "missing or malformed field"),
    ],
    ids=["missing", "bad-json", "version", "fields"],
)
def test_load_manifest_errors_name_the_file(tmp_path, content, message):
    """Unreadable manifests are ManifestErrors naming the file."""
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=f"manifest.json: {message}"):
        load_manifest(tmp_path)


def flip_byte(data):
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (flip_byte, "sha256 .* the shard is corrupt"),
        (lambda d: d[:-512], "size .* truncated or replaced"),
        (None, "shard listed in the manifest is missing"),
    ],
    ids=["flipped-byte", "truncated", "missing"],
)
def test_verify_shard_refuses_damaged_shard(shards, damage, message):
    """A flipped byte, a truncation or a missing file is a ManifestError naming the shard; the
    other shards still verify."""
    _, infos, directory = shards
    path = directory / infos[1].path
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ManifestError, match=f"shard-00001.tar: {message}"):
        verify_shard(directory, infos[1])
    verify_shard(directory, infos[0])
    verify_shard(directory, infos[2])


def member(name, payload=b"", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, io.BytesIO(payload)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: member("/etc/00000-00000.npy", b"x"),
        lambda: member("../00000-00000.npy", b"x"),
        lambda: member("00000-00000.npy", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    ],
    ids=["absolute-path", "dot-dot", "symlink"],
)
def test_iter_blocks_rejects_unsafe_members(tmp_path, rows, bad):
    """A shard holding an absolute path, a '..' member or a symlink is refused by name."""
    packed, _ = rows
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(*member("00000-00000.npy", npy_bytes(packed.tokens[:2].astype("uint16"))))
        tar.addfile(*member("00000-00000.json", json_bytes({"doc_starts": packed.doc_starts[:2]})))
        tar.addfile(*bad())
    blocks = iter_blocks(path)
    first, _ = next(blocks)  # the safe sample before it is read
    assert np.array_equal(first, packed.tokens[:2])
    with pytest.raises(ManifestError, match=r"shard.tar: unsafe tar member '.*00000-00000.npy'"):
        next(blocks)


def test_iter_blocks_reports_incomplete_sample(tmp_path, rows):
    """A sample whose .json is missing (a truncated shard) is named."""
    packed, _ = rows
    path = tmp_path / "shard.tar"
    write_tar(path, [("00000-00000", {"npy": npy_bytes(packed.tokens[:2])})])
    with pytest.raises(ManifestError, match=r"incomplete samples \['00000-00000'\]"):
        list(iter_blocks(path))


def test_write_tar_is_byte_identical(tmp_path, rows):
    """The same samples always give the same bytes and checksum (fixed metadata), written
    atomically; read_tar gives the samples back."""
    packed, _ = rows
    samples = [(f"k{i}", {"npy": npy_bytes(packed.tokens[i : i + 3]), "json": json_bytes({"i": i})}) for i in range(0, 9, 3)]
    first = write_tar(tmp_path / "a.tar", samples)
    second = write_tar(tmp_path / "b.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first == second == ((tmp_path / "a.tar").stat().st_size, file_sha256(tmp_path / "a.tar"))
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {(m.mtime, m.mode, m.uid) for m in tar} == {(0, 0o644, 0)}
    assert list(read_tar(tmp_path / "a.tar")) == samples


def test_plan_records_the_expected_peak_memory_of_each_stage():
    """plan.json's peak_mb has every stage; it follows the knobs (more hash ranges per band: smaller bucket
    tasks; smaller cluster shards: a smaller cluster stage; larger shards: larger pack tasks), and a task's input
    size, not the number of tasks, sets extract's and cluster's."""
    from data_tools.config import DedupConfig, PackConfig, PipelineConfig
    from data_tools.pipeline import STAGES, Plan

    def peak(n_tasks=10, name="x.jsonl", fmt="jsonl", **sections):
        config = PipelineConfig(**sections)
        return Plan([{"path": name, "format": fmt, "start": 0, "end": None}] * n_tasks, 2048, config=config).peak_mb

    base = peak()
    assert list(base) == list(STAGES) and all(v >= 100 for v in base.values())
    assert peak(10_000)["extract"] == base["extract"] and peak(10_000)["tokenize"] == base["tokenize"]
    assert peak(10_000, dedup=DedupConfig(buckets_per_band=64))["bucket"] < peak(10_000)["bucket"]
    # cluster holds one shard of tasks_per_cluster_shard tasks: the same for 1,000 or 100,000 tasks, smaller shards less
    smaller_shards = peak(1_000, dedup=DedupConfig(tasks_per_cluster_shard=16))["cluster"]
    assert peak(1_000)["cluster"] == peak(100_000)["cluster"] > smaller_shards
    # manifest: the task and shard lists, nothing per document (8.7e9 of them here)
    assert peak(100_000, pack=PackConfig(rows_per_shard=2**20))["manifest"] < 2 * peak(1_000)["manifest"]
    assert peak(pack=PackConfig(rows_per_shard=65536))["pack"] > base["pack"]
    # documents per MiB follow the input kind: a WARC record (~30 KiB) is ~20× a compressed JSONL line (~1.5 KiB)
    warc = peak(10_000, "crawl.warc.gz", "warc")
    assert 10 * (warc["cluster"] - 100) < peak(10_000)["cluster"] - 100 < 30 * (warc["cluster"] - 100)


def test_task_names_sort_and_stay_unique_past_99999_tasks(tmp_path):
    """Names are padded to the widest task index of the plan: a small job keeps its 5-digit names, a large one
    gets wider names that still sort in task order."""
    from data_tools.pipeline import Job, Plan

    def names(n_tasks: int, indices: list[int]) -> list[str]:
        job = Job(tmp_path / str(n_tasks))
        job._plan = Plan([{"path": "x.jsonl", "format": "jsonl", "start": 0, "end": None}] * n_tasks, 2048)
        return [job.task_name(i) for i in indices]

    assert names(10, [0, 3, 9]) == ["t00000", "t00003", "t00009"]
    assert names(100_000, [99_999]) == ["t99999"]
    large = names(250_000, [0, 9_999, 99_999, 100_000, 249_999])
    assert large == ["t000000", "t009999", "t099999", "t100000", "t249999"] and sorted(large) == large


def test_shard_names_widen_past_99999_shards_and_old_five_digit_splits_still_load_and_train(shards, tmp_path):
    """A split of more than 100,000 shards gets names as wide as its last index, so they sort in shard order; the
    same rows written the old way (5 digits, what every earlier split has) load through the manifest and give the
    trainer's loader the same batches."""
    from trainer.data import LanesLoader, Source

    packed, old_infos, old_dir = shards
    assert [shard_stem(i, 100_000) for i in (0, 99_999)] == ["00000", "99999"]
    wide = [f"shard-{shard_stem(i, 250_000)}.tar" for i in (7, 99_999, 100_000, 249_999)]
    assert wide == ["shard-000007.tar", "shard-099999.tar", "shard-100000.tar", "shard-249999.tar"] == sorted(wide)
    new_dir = tmp_path / "wide"
    new_dir.mkdir()
    new_infos = [write_shard(packed.take(slice(first, first + 10)), new_dir, index, "uint16", 4, n_shards=250_000)
                 for index, first in enumerate((0, 10, 20))]
    assert [s.path for s in new_infos] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(new_dir / new_infos[0].path) as tar:
        assert tar.getnames()[0] == "000000-00000.npy"
    batches = []
    for infos, directory in ((old_infos, old_dir), (new_infos, new_dir)):
        packed_manifest(infos, directory).save(directory)
        loader = LanesLoader([Source(str(directory))], global_batch=4, lanes=2, seed=1, rank=0, world_size=1, prefetch=1)
        stream = loader.batches(0)
        batches.append([next(stream) for _ in range(6)])
        loader.close()
    for old, new in zip(*batches, strict=True):
        np.testing.assert_array_equal(old, new)
