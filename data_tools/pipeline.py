"""A data job: a plan of tasks and the stages that turn inputs into token shards.

    extract   (one task per input range)      read → extract → lang → quality → PII → signatures, band hashes
    bucket    (one per band × hash range)     candidate duplicate pairs of one bucket, confirmed from signatures
    cluster   (once; one shard at a time)     connected components of the pairs: all but each first are dropped
    tokenizer (once)                          load the given tokenizer, or train BPE on the corpus
    tokenize  (one task per input range)      drop duplicates, document shards, token streams, valid split
    pack      (one task per input range)      the token shards this task owns, rows read by memory map
    manifest  (once; O(tasks + shards))       manifest.json of each split, stats.json, tensorboard

Every stage writes its outputs under temporary names, renames them, then writes a completion
marker `_done/<stage>[-<task>].json` holding its counters. Rerunning skips what has a marker, so a
killed job resumes where it stopped; the per-task stages do not know whether a process pool or a
SLURM array runs them. Everything is ordered by global document or row index, so results do not
depend on how many processes ran the tasks, and the token shards not on how inputs were cut into tasks.
`STAGES` and `Job.task_count` are the plan every runner (local pool, SLURM chain, status) follows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from data_tools import storage
from data_tools.config import PipelineConfig, from_dict
from data_tools.doc import Doc
from data_tools.errors import DataError
from data_tools.manifest import Manifest, ShardInfo, TokenizerInfo, file_sha256
from data_tools.pack import TokenStream
from data_tools.shards import json_bytes, read_tar, write_tar
from data_tools.stats import StageStats, merge_stage_stats
from data_tools.taskfiles import load_npy, save_npy

log = logging.getLogger("data_tools")

STAGES = ("extract", "bucket", "cluster", "tokenizer", "tokenize", "pack", "manifest")
PER_TASK_STAGES = ("extract", "bucket", "tokenize", "pack")  # the others run once
BASE_MB = 100  # a task process before its data: the interpreter, numpy, tokenizers, the language model
REPORT_MB = 150  # torch, imported by the manifest step's tensorboard writer
TEXT_BYTES_PER_TOKEN = 4  # cleaned text per token, for the rows the pack estimate assumes
MARKER_BYTES = 2048  # one pack task's marker as Python objects in the manifest step
SHARD_ENTRY_BYTES = 1024  # one shard's ShardInfo and its JSON in manifest.json
TEXT_BYTES_PER_DOC = 4096  # cleaned text of a document, whatever its input kind (a WARC record is mostly markup)
Progress = Callable[[int], None]


@dataclass
class Plan:
    """Everything that determines a job's output; saved as `plan.json` and checked on rerun."""

    tasks: list[dict]  # [{"path", "format", "start", "end"}]: inputs or ranges of them, in order
    seq_len: int
    tokenizer: str | None = None
    train_tokenizer: int | None = None
    valid_fraction: float = 0.005
    config: PipelineConfig = field(default_factory=PipelineConfig)
    task_mb: float = 128.0  # the --task-mb the inputs were cut with
    peak_mb: dict[str, int] = field(default_factory=dict)  # expected peak RSS of one task of each stage
    estimate: dict = field(default_factory=dict)  # data_tools.estimate: core-hours, disk, SLURM arrays per stage

    def __post_init__(self) -> None:
        if not self.peak_mb:
            self.peak_mb = expected_peak_mb(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        config = from_dict(PipelineConfig, data.pop("config"), where="plan.json", prefix="config.")
        return cls(config=config, **data)


def expected_peak_mb(plan: Plan) -> dict[str, int]:
    """Peak memory of one task of each stage from the knobs (README, "Memory"); none grows with the corpus:
    bucket follows docs / buckets_per_band, cluster the documents of tasks_per_cluster_shard tasks."""
    from data_tools.dedup import CLUSTER_CHUNK, PAIR_BATCH
    from data_tools.listing import assumed_docs

    dedup, pack, mib = plan.config.dedup, plan.config.pack, 2**20
    perm = dedup.bands * dedup.rows_per_band
    # Documents of a task of --task-mb by its input kind (listing.assumed_docs: ~30 KiB a WARC record, ~1.5 KiB a
    # compressed JSONL line); at most, as whole small files count as one task each and the filters drop none.
    task_docs = [assumed_docs(Path(task["path"]).name, task["format"], plan.task_mb) for task in plan.tasks]
    docs = sum(task_docs)
    shard = dedup.tasks_per_cluster_shard
    shard_docs = max((sum(task_docs[i : i + shard]) for i in range(0, len(task_docs), shard)), default=0)
    rows = docs * TEXT_BYTES_PER_DOC / TEXT_BYTES_PER_TOKEN / plan.seq_len
    estimates = {
        "extract": 2 * plan.task_mb,  # one document at a time, signatures of the task
        "bucket": docs / dedup.buckets_per_band * 48 / mib + PAIR_BATCH * perm * 8 / mib,
        # a shard's pairs (if half its documents were duplicates) both ways and sorted, a label, component and flag
        # for each of its documents, and one chunk of pairs being added
        "cluster": shard_docs * (0.5 * 64 + 24) / mib + CLUSTER_CHUNK * 16 * 4 / mib,
        "tokenizer": 0.0,
        "tokenize": 3 * plan.task_mb,  # the task's token streams
        "pack": (pack.rows_per_shard * plan.seq_len * 8 + rows / pack.shuffle_chunk * 24 + pack.shuffle_window * 16) / mib,
        # every pack task's marker and every shard's entry in the manifest; the other markers are read one at a time
        "manifest": REPORT_MB + (len(task_docs) * MARKER_BYTES + rows / pack.rows_per_shard * SHARD_ENTRY_BYTES) / mib,
    }
    return {stage: BASE_MB + round(estimates[stage]) for stage in STAGES}


def task_count(plan: Plan, stage: str) -> int:
    """How many tasks `stage` of `plan` has (1 for a stage that runs once); a function of the plan alone, so
    the cost estimate of a plan not yet written uses the same counts as the runners."""
    if stage in ("extract", "tokenize", "pack"):
        return len(plan.tasks)
    if stage == "bucket":
        from data_tools.dedup import bucket_count

        return bucket_count(plan.config.dedup)
    if stage in STAGES:
        return 1
    raise DataError(f"--stage {stage}: not a stage; choose one of {', '.join(STAGES)}")


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _differences(old: object, new: object, path: str = "") -> list[str]:
    """The dotted keys where two plan.json values differ: a key one lacks (another version) or another value."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [path.rstrip(".") or "the whole plan"]
    found = []
    for key in sorted(old.keys() | new.keys(), key=str):
        one_lacks = (key in old) != (key in new)
        found += [f"{path}{key}"] if one_lacks else _differences(old[key], new[key], f"{path}{key}.")
    return found


class Job:
    """One output directory and the stages that fill it."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.done = self.out / "_done"
        self.work = self.out / "_work"
        self._plan: Plan | None = None
        self._name_width: int | None = None

    # ----------------------------------------------------------------- plan and markers

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            path = self.out / "plan.json"
            if not path.exists():
                raise DataError(f"{self.out}: no plan.json; start the job with `python -m data_tools prepare`")
            self._plan = Plan.from_dict(json.loads(path.read_text()))
        return self._plan

    def create(self, plan: Plan) -> None:
        """Write the plan, or check that an existing one is the same job."""
        try:
            for folder in (self.out, self.done, self.work):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self.work / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise DataError(f"--output {self.out}: not writable ({err.strerror}); choose another directory") from None
        path = self.out / "plan.json"
        new = json.loads(json.dumps(plan.to_dict()))
        if path.exists():
            old = json.loads(path.read_text())
            derived = {"estimate": None, "peak_mb": None}  # follow from the rest, and from the version's cost model
            if changed := _differences({**old, **derived}, {**new, **derived}):
                raise DataError(
                    f"--output {self.out}: holds a job with other inputs, settings or data_tools version (plan.json "
                    f"differs in {', '.join(changed[:3])}{', …' if len(changed) > 3 else ''}); use a new directory or delete it"
                )
            log.info("resuming the job in %s", self.out)
        if not path.exists() or old != new:
            _write_json(path, plan.to_dict())
        self._plan = plan

    def task_name(self, index: int) -> str:
        """`t00042`: zero-padded to the widest task index of any stage (at least 5 digits, so names sort as numbers
        and a small job's names never change), a function of the plan alone."""
        if self._name_width is None:
            most = max(task_count(self.plan, stage) for stage in PER_TASK_STAGES)
            self._name_width = max(5, len(str(most - 1)))
        return f"t{index:0{self._name_width}d}"

    def marker(self, stage: str, index: int | None = None) -> Path:
        suffix = "" if index is None else "-" + self.task_name(index)
        return self.done / f"{stage}{suffix}.json"

    def is_done(self, stage: str, index: int | None = None) -> bool:
        return self.marker(stage, index).exists()

    def read_marker(self, stage: str, index: int | None = None) -> dict:
        return json.loads(self.marker(stage, index).read_text())

    def task_count(self, stage: str) -> int:
        """How many tasks `stage` has (1 for a stage that runs once)."""
        return task_count(self.plan, stage)

    def pending(self, stage: str) -> list[int]:
        return [i for i in range(self.task_count(stage)) if not self.is_done(stage, i)]

    # ----------------------------------------------------------------- stage: extract

    def run_extract(self, index: int, progress: Progress = lambda n: None) -> None:
        from data_tools.dedup import SIGNATURE_DTYPE, DedupSignatures, band_hashes, language_keys
        from data_tools.extract import ExtractText
        from data_tools.lang import LanguageFilter
        from data_tools.pii import MaskPII
        from data_tools.quality import C4Lines, GopherQuality, GopherRepetition
        from data_tools.readers import get_reader

        plan, config = self.plan, self.plan.config
        item = plan.tasks[index]
        unspaced = config.quality.gopher_quality.unspaced_langs
        steps = [
            ExtractText(config.extract),
            LanguageFilter(config.lang),
            *([GopherRepetition(config.quality.gopher_repetition)] if config.quality.gopher_repetition.enabled else []),
            *([GopherQuality(config.quality.gopher_quality)] if config.quality.gopher_quality.enabled else []),
            *([C4Lines(config.quality.c4, unspaced)] if config.quality.c4.enabled else []),
            *([MaskPII(config.pii)] if config.pii.enabled else []),
            DedupSignatures(config.dedup, unspaced),
        ]
        read_stats = StageStats()
        start = time.perf_counter()
        reader = get_reader(item["format"])
        docs: Iterator[Doc] = reader(storage.location(item["path"]), read_stats, log.warning, item["start"], item["end"])
        for step in steps:
            docs = step(docs)
        out_dir = self.work / "extract"
        out_dir.mkdir(parents=True, exist_ok=True)
        name = self.task_name(index)
        exact, signatures, langs = [], [], []

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            for n, doc in enumerate(docs):
                exact.append(np.frombuffer(doc.meta.pop("exact"), dtype=np.uint8))
                signatures.append(doc.meta.pop("minhash"))
                langs.append(doc.lang)
                meta = {"id": doc.id, "url": doc.url, "source": doc.source, "lang": doc.lang, **doc.meta}
                if n % 64 == 63:
                    progress(64)
                yield f"{name}-{n:07d}", {"txt": doc.text.encode(), "json": json_bytes(meta)}

        write_tar(out_dir / f"{name}.tar", samples())
        read_stats.seconds = time.perf_counter() - start - sum(s.stats.seconds for s in steps)
        n_perm = config.dedup.bands * config.dedup.rows_per_band
        exact = np.array(exact, dtype=np.uint8).reshape(-1, 16)
        minhash = np.array(signatures, dtype=SIGNATURE_DTYPE).reshape(-1, n_perm)
        save_npy(out_dir / f"{name}.exact.npy", exact)
        save_npy(out_dir / f"{name}.minhash.npy", minhash)
        save_npy(out_dir / f"{name}.bands.npy", band_hashes(exact, minhash, language_keys(langs), config.dedup))
        stages = {"read": read_stats.to_dict(), **{s.name: s.stats.to_dict() for s in steps}}
        _write_json(self.marker("extract", index), {"task": item, "docs": len(exact), "stages": stages})

    # ----------------------------------------------------------------- stages: bucket, cluster

    def signature_file(self, index: int, kind: str) -> Path:
        """`kind` of extract task `index`: exact (keys), minhash (signatures) or bands (hashes, band-major)."""
        return self.work / "extract" / f"{self.task_name(index)}.{kind}.npy"

    def doc_offsets(self) -> np.ndarray:
        """Global index of each extract task's first document (and the total last), from the markers."""
        return np.cumsum([0] + [self.read_marker("extract", i)["docs"] for i in range(len(self.plan.tasks))])

    def run_bucket(self, index: int, progress: Progress = lambda n: None) -> None:
        from data_tools.dedup import RowLookup, bucket_pairs

        config = self.plan.config.dedup
        band = index // config.buckets_per_band
        offsets = self.doc_offsets()
        rows = {kind: RowLookup(offsets, lambda t, kind=kind: load_npy(self.signature_file(t, kind)))
                for kind in ("exact", "minhash")}
        band_rows = (load_npy(self.signature_file(t, "bands"))[band] for t in range(len(self.plan.tasks)))
        start = time.perf_counter()
        pairs = bucket_pairs(index, config, band_rows, offsets, rows["exact"], rows["minhash"])
        out_dir = self.work / "buckets"
        out_dir.mkdir(parents=True, exist_ok=True)
        save_npy(out_dir / f"{self.task_name(index)}.npy", pairs)
        progress(int(offsets[-1]))
        _write_json(self.marker("bucket", index), {"pairs": len(pairs), "seconds": round(time.perf_counter() - start, 3)})

    def run_cluster(self) -> None:
        from data_tools.dedup import cluster_duplicates

        config = self.plan.config.dedup
        offsets = self.doc_offsets()
        out_dir = self.work / "dedup"
        out_dir.mkdir(parents=True, exist_ok=True)
        stats = StageStats()
        start = time.perf_counter()
        buckets = range(self.task_count("bucket"))
        pairs = ((i // config.buckets_per_band == config.bands, load_npy(self.work / "buckets" / f"{self.task_name(i)}.npy"))
                 for i in buckets)  # (exact?, memory-mapped pairs) of each bucket task
        for index, dropped in enumerate(cluster_duplicates(self.work / "cluster", offsets, config, pairs, stats)):
            save_npy(out_dir / f"{self.task_name(index)}.npy", dropped)
        stats.seconds = time.perf_counter() - start
        _write_json(self.marker("cluster"), {"stages": {"dedup": stats.to_dict()}})

    def kept_docs(self, index: int) -> Iterator[tuple[str, dict, str]]:
        """(text, metadata, split) of task `index`'s documents that survived dedup."""
        name = self.task_name(index)
        dropped = set(np.load(self.work / "dedup" / f"{name}.npy").tolist())
        # The held-out split is chosen by content hash: stable across runs and task layouts.
        hashes = np.ascontiguousarray(load_npy(self.signature_file(index, "exact"))[:, :8]).view("<u8")[:, 0]
        threshold = int(self.plan.valid_fraction * 2**64)
        for n, (_, sample) in enumerate(read_tar(self.work / "extract" / f"{name}.tar")):
            if n not in dropped:
                split = "valid" if int(hashes[n]) < threshold else "train"
                yield sample["txt"].decode(), json.loads(sample["json"]), split

    # ----------------------------------------------------------------- stage: tokenizer

    def tokenizer_path(self) -> Path:
        return self.out / "tokenizer" / "tokenizer.json"

    def run_tokenizer(self) -> None:
        from data_tools.tokenize import load_tokenizer, train_tokenizer

        plan = self.plan
        start = time.perf_counter()
        if plan.train_tokenizer:
            texts = (
                text for index in range(len(plan.tasks)) for text, _, split in self.kept_docs(index) if split == "train"
            )
            tok = train_tokenizer(texts, plan.train_tokenizer)
        else:
            tok = load_tokenizer(plan.tokenizer)
        path = self.tokenizer_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.tokenizer.save(str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        info = TokenizerInfo(tok.name, tok.vocab_size, tok.eos_id, file_sha256(path), "")
        _write_json(self.marker("tokenizer"), {"tokenizer": asdict(info), "seconds": round(time.perf_counter() - start, 3)})

    def tokenizer_info(self) -> TokenizerInfo:
        return TokenizerInfo(**self.read_marker("tokenizer")["tokenizer"])

    # ----------------------------------------------------------------- stage: tokenize

    def run_tokenize(self, index: int, progress: Progress = lambda n: None, batch: int = 256) -> None:
        from tokenizers import Tokenizer

        from data_tools.report import DocSummary
        from data_tools.tokenize import LoadedTokenizer, encode_documents

        info = self.tokenizer_info()
        tok = LoadedTokenizer(Tokenizer.from_file(str(self.tokenizer_path())), info.name, info.eos_id)
        name = self.task_name(index)
        docs_dir = self.out / "docs"
        out_dir = self.work / "tokens"
        for folder in (docs_dir, out_dir):
            folder.mkdir(parents=True, exist_ok=True)
        streams: dict[str, tuple[list, list]] = {"train": ([], []), "valid": ([], [])}
        summary = DocSummary()
        stats = StageStats()
        start = time.perf_counter()

        def encode(pending: list[tuple[str, dict, str]]) -> None:
            tokens, lengths = encode_documents(tok, [text for text, _, _ in pending])
            ends = np.cumsum(lengths)
            for (text, meta, split), end, length in zip(pending, ends, lengths):
                streams[split][0].append(tokens[end - length : end])
                streams[split][1].append(length)
            summary.add((len(text) for text, _, _ in pending), lengths, (meta["lang"] for _, meta, _ in pending))
            progress(len(pending))

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            pending = []
            for n, (text, meta, split) in enumerate(self.kept_docs(index)):
                stats.docs_in += 1
                stats.docs_out += 1
                stats.events[f"{split}_docs"] += 1
                pending.append((text, meta, split))
                if len(pending) == batch:
                    encode(pending)
                    pending = []
                yield f"{name}-{n:07d}", {"txt": text.encode(), "json": json_bytes({**meta, "split": split})}
            if pending:
                encode(pending)

        write_tar(docs_dir / f"{name}.tar", samples())
        counts = {}
        for split, (parts, lengths) in streams.items():
            tokens = np.concatenate(parts) if parts else np.empty(0, np.uint32)
            lengths = np.asarray(lengths, dtype=np.int64)
            save_npy(self.stream_file(index, split, "tokens"), tokens)
            save_npy(self.stream_file(index, split, "starts"), np.cumsum(lengths) - lengths)
            counts[split] = int(tokens.size)
            stats.events[f"{split}_tokens"] += counts[split]
        stats.seconds = time.perf_counter() - start
        _write_json(self.marker("tokenize", index),
                    {"tokens": counts, "stages": {"tokenize": stats.to_dict()}, "docs": asdict(summary)})

    def stream_file(self, index: int, split: str, kind: str) -> Path:
        """Tokenize task `index`'s `split` tokens (uint32) or document start offsets in them (int64)."""
        return self.work / "tokens" / f"{self.task_name(index)}.{split}.{kind}.npy"

    # ----------------------------------------------------------------- stages: pack, manifest

    def token_stream(self, split: str) -> TokenStream:
        """All tokenize tasks' `split` streams as one, read by memory map."""
        n_tasks = range(len(self.plan.tasks))
        counts = [self.read_marker("tokenize", i)["tokens"][split] for i in n_tasks]
        sources = [Path(item["path"]).name for item in self.plan.tasks]

        def load(index: int) -> tuple[np.ndarray, np.ndarray]:
            return load_npy(self.stream_file(index, split, "tokens")), load_npy(self.stream_file(index, split, "starts"))

        return TokenStream(counts, sources, load, self.plan.seq_len)

    def owned_shards(self, index: int, n_shards: int) -> range:
        """The output shards pack task `index` writes: a contiguous share, whatever the number of tasks."""
        n_tasks = self.task_count("pack")
        return range(index * n_shards // n_tasks, (index + 1) * n_shards // n_tasks)

    def shard_dtype(self) -> str:
        return "uint16" if self.tokenizer_info().vocab_size <= 2**16 else "uint32"

    def run_pack(self, index: int, progress: Progress = lambda n: None) -> None:
        from data_tools.pack import row_order, shard_count, write_shard

        pack = self.plan.config.pack
        dtype = self.shard_dtype()
        written: dict[str, list[dict]] = {}
        start = time.perf_counter()
        for split in ("train", "valid"):
            stream = self.token_stream(split)
            out_dir = self.out / "tokens" / split
            out_dir.mkdir(parents=True, exist_ok=True)
            seed = pack.seed + (split == "valid")
            written[split] = []
            n_shards = shard_count(stream.n_rows, pack.rows_per_shard)
            for shard in self.owned_shards(index, n_shards):
                first, stop = shard * pack.rows_per_shard, min((shard + 1) * pack.rows_per_shard, stream.n_rows)
                order = row_order(stream.n_rows, first, stop, pack.shuffle_window, pack.shuffle_chunk, seed)
                info = write_shard(stream.rows(order), out_dir, shard, dtype, pack.rows_per_sample, n_shards)
                written[split].append(asdict(info))
                progress(len(order))
        _write_json(self.marker("pack", index), {"shards": written, "seconds": round(time.perf_counter() - start, 3)})

    def run_manifest(self) -> None:
        from data_tools.report import DocSummary, write_tensorboard

        plan, pack = self.plan, self.plan.config.pack
        info = self.tokenizer_info()
        stats = self.collect_stats()
        markers = [self.read_marker("pack", i) for i in range(self.task_count("pack"))]
        seconds, dtype = [marker["seconds"] for marker in markers], self.shard_dtype()
        for split in ("train", "valid"):
            stream = self.token_stream(split)
            out_dir = self.out / "tokens" / split
            out_dir.mkdir(parents=True, exist_ok=True)
            shards = [ShardInfo(**shard) for marker in markers for shard in marker["shards"][split]]
            tok_info = TokenizerInfo(**{**asdict(info), "path": os.path.relpath(self.tokenizer_path(), out_dir)})
            manifest = Manifest(plan.seq_len, dtype, tok_info, shards, split, pack.rows_per_sample, stats, plan.to_dict())
            manifest.save(out_dir)
            stats["pack"][split] = {
                "rows": manifest.total_rows,
                "tokens": manifest.total_tokens,
                "shards": len(shards),
                "tokens_dropped_tail": stream.tail,
                "seconds": round(sum(seconds), 3),
            }
            if not shards:
                log.warning("%s split has no complete row of %d tokens; add data or lower --seq-len", split, plan.seq_len)
        _write_json(self.out / "stats.json", stats)
        docs = DocSummary()
        for index in range(len(plan.tasks)):
            docs.merge(DocSummary.from_dict(self.read_marker("tokenize", index)["docs"]))
        write_tensorboard(self.out, stats, docs)
        _write_json(self.marker("manifest"), {"stats": stats["pack"]})

    def collect_stats(self) -> dict:
        """Stage counters summed over tasks, in pipeline order, plus job-level totals."""
        n_tasks = range(len(self.plan.tasks))
        stages = merge_stage_stats(chain(  # one marker at a time: memory does not grow with the tasks
            (self.read_marker("extract", i)["stages"] for i in n_tasks),
            [self.read_marker("cluster")["stages"]],
            (self.read_marker("tokenize", i)["stages"] for i in n_tasks),
        ))
        return {
            "stages": {name: s.to_dict() for name, s in stages.items()},
            "tokenizer": self.read_marker("tokenizer")["tokenizer"],
            "inputs": list(dict.fromkeys(item["path"] for item in self.plan.tasks)),
            "pack": {},
        }
