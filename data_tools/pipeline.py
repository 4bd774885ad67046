"""A data job: a plan of tasks and the five stages that turn inputs into token shards.

    extract   (one task per input range)  read → extract → lang → quality → PII → signatures
    dedup     (once)                     exact + MinHash-LSH duplicates across all tasks
    tokenizer (once)                     load the given tokenizer, or train BPE on the corpus
    tokenize  (one task per input range)  final document shards, token streams, valid split
    pack      (once)                     rows, windowed shuffle, shards, manifests, stats

Every stage writes its outputs under temporary names, renames them, then writes a completion
marker `_done/<stage>[-<task>].json` holding its counters. Rerunning skips what has a marker, so a
killed job resumes where it stopped; the per-task stages do not know whether a process pool or a
SLURM array runs them. Everything is ordered by task index, so results do not depend on how many
processes ran the tasks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_tools import storage
from data_tools.config import PipelineConfig, from_dict
from data_tools.doc import Doc
from data_tools.errors import DataError
from data_tools.manifest import Manifest, TokenizerInfo, file_sha256
from data_tools.shards import json_bytes, read_tar, write_tar
from data_tools.stats import StageStats, merge_stage_stats

log = logging.getLogger("data_tools")

PER_TASK_STAGES = ("extract", "tokenize")
STAGES = ("extract", "dedup", "tokenizer", "tokenize", "pack")
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        config = from_dict(PipelineConfig, data.pop("config"), where="plan.json", prefix="config.")
        return cls(config=config, **data)


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


class Job:
    """One output directory and the stages that fill it."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.done = self.out / "_done"
        self.work = self.out / "_work"
        self._plan: Plan | None = None

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
        if path.exists():
            if json.loads(path.read_text()) != json.loads(json.dumps(plan.to_dict())):
                raise DataError(
                    f"--output {self.out}: holds a job with other inputs or settings (plan.json); use a new directory or delete it"
                )
            log.info("resuming the job in %s", self.out)
        else:
            _write_json(path, plan.to_dict())
        self._plan = plan

    def task_name(self, index: int) -> str:
        return f"t{index:05d}"

    def marker(self, stage: str, index: int | None = None) -> Path:
        suffix = "" if index is None else "-" + self.task_name(index)
        return self.done / f"{stage}{suffix}.json"

    def is_done(self, stage: str, index: int | None = None) -> bool:
        return self.marker(stage, index).exists()

    def read_marker(self, stage: str, index: int | None = None) -> dict:
        return json.loads(self.marker(stage, index).read_text())

    def pending(self, stage: str) -> list[int]:
        return [i for i in range(len(self.plan.tasks)) if not self.is_done(stage, i)]

    # ----------------------------------------------------------------- stage: extract

    def run_extract(self, index: int, progress: Progress = lambda n: None) -> None:
        from data_tools.dedup import SIGNATURE_DTYPE, DedupSignatures
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
        exact, signatures = [], []

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            for n, doc in enumerate(docs):
                exact.append(np.frombuffer(doc.meta.pop("exact"), dtype=np.uint8))
                signatures.append(doc.meta.pop("minhash"))
                meta = {"id": doc.id, "url": doc.url, "source": doc.source, "lang": doc.lang, **doc.meta}
                if n % 64 == 63:
                    progress(64)
                yield f"{name}-{n:07d}", {"txt": doc.text.encode(), "json": json_bytes(meta)}

        write_tar(out_dir / f"{name}.tar", samples())
        read_stats.seconds = time.perf_counter() - start - sum(s.stats.seconds for s in steps)
        n_perm = config.dedup.bands * config.dedup.rows_per_band
        np.savez(
            out_dir / f"{name}.sig.tmp.npz",
            exact=np.array(exact, dtype=np.uint8).reshape(-1, 16),
            minhash=np.array(signatures, dtype=SIGNATURE_DTYPE).reshape(-1, n_perm),
        )
        os.replace(out_dir / f"{name}.sig.tmp.npz", out_dir / f"{name}.sig.npz")
        stages = {"read": read_stats.to_dict(), **{s.name: s.stats.to_dict() for s in steps}}
        _write_json(self.marker("extract", index), {"task": item, "stages": stages})

    # ----------------------------------------------------------------- stage: dedup

    def run_dedup(self) -> None:
        from data_tools.dedup import find_duplicates

        n_tasks = len(self.plan.tasks)
        out_dir = self.work / "dedup"
        out_dir.mkdir(parents=True, exist_ok=True)
        stats = StageStats()
        start = time.perf_counter()

        def signatures() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for index in range(n_tasks):
                with np.load(self.work / "extract" / f"{self.task_name(index)}.sig.npz") as data:
                    yield data["exact"], data["minhash"]

        for index, dropped in enumerate(find_duplicates(signatures(), self.plan.config.dedup, stats)):
            np.save(out_dir / f"{self.task_name(index)}.npy", dropped)
        stats.seconds = time.perf_counter() - start
        _write_json(self.marker("dedup"), {"stages": {"dedup": stats.to_dict()}})

    def kept_docs(self, index: int) -> Iterator[tuple[str, dict, str]]:
        """(text, metadata, split) of task `index`'s documents that survived dedup."""
        name = self.task_name(index)
        dropped = set(np.load(self.work / "dedup" / f"{name}.npy").tolist())
        with np.load(self.work / "extract" / f"{name}.sig.npz") as data:
            # The held-out split is chosen by content hash: stable across runs and task layouts.
            hashes = data["exact"][:, :8].copy().view("<u8")[:, 0]
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

        from data_tools.tokenize import LoadedTokenizer, encode_documents

        info = self.tokenizer_info()
        tok = LoadedTokenizer(Tokenizer.from_file(str(self.tokenizer_path())), info.name, info.eos_id)
        name = self.task_name(index)
        docs_dir = self.out / "docs"
        out_dir = self.work / "tokens"
        for folder in (docs_dir, out_dir):
            folder.mkdir(parents=True, exist_ok=True)
        streams: dict[str, tuple[list, list]] = {"train": ([], []), "valid": ([], [])}
        char_lens, token_lens, langs = [], [], []
        stats = StageStats()
        start = time.perf_counter()

        def encode(pending: list[tuple[str, dict, str]]) -> None:
            tokens, lengths = encode_documents(tok, [text for text, _, _ in pending])
            ends = np.cumsum(lengths)
            for (text, meta, split), end, length in zip(pending, ends, lengths):
                streams[split][0].append(tokens[end - length : end])
                streams[split][1].append(length)
                char_lens.append(len(text))
                token_lens.append(int(length))
                langs.append(meta["lang"])
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
        arrays = {}
        for split, (parts, lengths) in streams.items():
            arrays[f"{split}_tokens"] = np.concatenate(parts) if parts else np.empty(0, np.uint32)
            arrays[f"{split}_lengths"] = np.asarray(lengths, dtype=np.int64)
            stats.events[f"{split}_tokens"] += int(arrays[f"{split}_tokens"].size)
        arrays.update(char_lens=np.asarray(char_lens, np.int64), token_lens=np.asarray(token_lens, np.int64), langs=np.asarray(langs, dtype=str))
        np.savez(out_dir / f"{name}.tmp.npz", **arrays)
        os.replace(out_dir / f"{name}.tmp.npz", out_dir / f"{name}.npz")
        stats.seconds = time.perf_counter() - start
        _write_json(self.marker("tokenize", index), {"stages": {"tokenize": stats.to_dict()}})

    # ----------------------------------------------------------------- stage: pack

    def token_streams(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
        for index, item in enumerate(self.plan.tasks):
            with np.load(self.work / "tokens" / f"{self.task_name(index)}.npz") as data:
                yield data[f"{split}_tokens"], data[f"{split}_lengths"], Path(item["path"]).name

    def run_pack(self) -> None:
        from data_tools.pack import cut_rows, shuffle_windows, write_shards
        from data_tools.report import write_tensorboard

        plan, pack = self.plan, self.plan.config.pack
        info = self.tokenizer_info()
        dtype = "uint16" if info.vocab_size <= 2**16 else "uint32"
        stats = self.collect_stats()
        tokens_root = self.out / "tokens"
        if tokens_root.exists():
            shutil.rmtree(tokens_root)  # a half-written pack from a killed run
        for split in ("train", "valid"):
            start = time.perf_counter()
            out_dir = tokens_root / split
            out_dir.mkdir(parents=True)
            counters: Counter = Counter()
            rows = shuffle_windows(cut_rows(self.token_streams(split), plan.seq_len, counters), pack.shuffle_window, pack.seed + (split == "valid"))
            shards = write_shards(rows, out_dir, dtype, pack.rows_per_shard, pack.rows_per_sample)
            tok_info = TokenizerInfo(**{**asdict(info), "path": os.path.relpath(self.tokenizer_path(), out_dir)})
            manifest = Manifest(plan.seq_len, dtype, tok_info, shards, split, pack.rows_per_sample, stats, plan.to_dict())
            manifest.save(out_dir)
            stats["pack"][split] = {
                "rows": manifest.total_rows,
                "tokens": manifest.total_tokens,
                "shards": len(shards),
                "tokens_dropped_tail": counters["tokens_dropped_tail"],
                "seconds": round(time.perf_counter() - start, 3),
            }
            if not shards:
                log.warning("%s split has no complete row of %d tokens; add data or lower --seq-len", split, plan.seq_len)
        _write_json(self.out / "stats.json", stats)
        write_tensorboard(self.out, stats, [self.work / "tokens" / f"{self.task_name(i)}.npz" for i in range(len(plan.tasks))])
        _write_json(self.marker("pack"), {"stats": stats["pack"]})

    def collect_stats(self) -> dict:
        """Stage counters summed over tasks, in pipeline order, plus job-level totals."""
        n_tasks = range(len(self.plan.tasks))
        stages = merge_stage_stats(
            [self.read_marker("extract", i)["stages"] for i in n_tasks]
            + [self.read_marker("dedup")["stages"]]
            + [self.read_marker("tokenize", i)["stages"] for i in n_tasks]
        )
        return {
            "stages": {name: s.to_dict() for name, s in stages.items()},
            "tokenizer": self.read_marker("tokenizer")["tokenizer"],
            "inputs": list(dict.fromkeys(item["path"] for item in self.plan.tasks)),
            "pack": {},
        }
