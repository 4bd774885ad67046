"""Dedup at scale: quality, memory, linearity and parallel speedup of `data_tools prepare` on prose with
planted duplicates, side by side with datatrove 0.10's multi-stage MinHash pipeline on the same files.

The corpus: sentences of the real text shipped in examples/corpora (the Wikipedia excerpt, the
English pages of the handbook WARC, the IANA crawl) recombined by a seeded RNG into documents of
8-20 sentences in paragraphs, so two generated documents share almost no 5-gram. Then copies are
planted later in input order than their original: exact copies (case and whitespace changed) and
near copies (~2% of the words replaced, one sentence added: Jaccard of 5-gram shingles ≈ 0.75).
The truth (which document copies which) is known, so the bench reports, at each size:
- recall (planted copies removed) and precision (removed documents that are planted copies), and
  whether a cluster (an original and its copies) lost every member;
- peak RSS of any process of the job (psutil polls the whole process tree) and its growth;
- wall time per document, whole process, imports included;
- 2 workers against 1 on the same multi-file input;
- datatrove's signatures → buckets → cluster → filter, same shingle size, bands, rows and seed,
  whole-process wall time and recall/precision.
Quality and language filters are off (language ID still labels, dropping nothing), so only dedup
removes. dstrain's time includes tokenize + pack, which the datatrove side does not do.

    make bench-data                                  # 10k, 40k, 160k documents
    python bench/data_scale_bench.py --sizes 2000    # a quick run
    python bench/data_scale_bench.py --threshold 0.6 --datatrove-sizes none --speedup-sizes none   # recall at another cut
    python bench/data_scale_bench.py --cluster-shards 1,8,32   # the cluster stage's peak memory by shard count
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from data_tools.config import DedupConfig

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
OUT = ROOT / "bench" / "out" / "data_scale"
DATATROVE_PYTHON = ROOT / "bench" / ".venv-datatrove" / "bin" / "python"
MIB = 2**20
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# ---------------------------------------------------------------------------------------- corpus


def sentence_pool() -> list[str]:
    """Distinct English prose sentences of 6-60 words from the shipped corpora, in a fixed order."""
    from data_tools.config import ExtractConfig
    from data_tools.extract import ExtractText
    from data_tools.readers import detect_format, get_reader
    from data_tools.stats import StageStats

    seen: dict[str, None] = {}
    for name in ("enwiki-sample.xml.bz2", "handbook-multilingual.warc.gz", "iana.warc.gz"):
        path = CORPORA / name
        docs = ExtractText(ExtractConfig())(get_reader(detect_format(path))(path, StageStats(), lambda message: None))
        for doc in docs:
            if "handbook" in name and "/en-US/" not in doc.url:
                continue
            for paragraph in doc.text.split("\n"):
                for sentence in _SENTENCE_END.split(paragraph.strip()):
                    if 6 <= len(sentence.split()) <= 60 and sentence[-1:] in ".!?":
                        seen.setdefault(" ".join(sentence.split()))
    return list(seen)


def handbook_near_copies(dedup: DedupConfig) -> dict[str, list[str]]:
    """The handbook WARC's pages dropped as near copies, with `dedup.same_language` on (the default) and off, over the
    same pipeline as the bench (filters off, language ID labelling only): which translations the guard keeps."""
    from dataclasses import replace

    import numpy as np

    from data_tools.config import ExtractConfig, GopherQualityConfig, LangConfig
    from data_tools.dedup import DedupSignatures, find_duplicates, language_keys
    from data_tools.extract import ExtractText
    from data_tools.lang import LanguageFilter
    from data_tools.readers import detect_format, get_reader
    from data_tools.stats import StageStats

    path = CORPORA / "handbook-multilingual.warc.gz"
    pages = get_reader(detect_format(path))(path, StageStats(), lambda message: None)
    labelled = LanguageFilter(LangConfig(threshold=0.0))(ExtractText(ExtractConfig())(pages))
    docs = list(DedupSignatures(dedup, GopherQualityConfig().unspaced_langs)(labelled))
    task = (np.stack([np.frombuffer(d.meta["exact"], np.uint8) for d in docs]), np.stack([d.meta["minhash"] for d in docs]),
            language_keys(d.lang for d in docs))
    found = {}
    for same_language in (True, False):
        exact_only = find_duplicates([task], replace(dedup, same_language=same_language, near=False), StageStats())[0]
        dropped = find_duplicates([task], replace(dedup, same_language=same_language), StageStats())[0]
        found[f"same_language={same_language}"] = [f"{docs[i].url.split('/browse/')[1]} ({docs[i].lang})"
                                                   for i in np.setdiff1d(dropped, exact_only)]
    return found


def _exact_copy(text: str, rng: random.Random) -> str:
    """The same normalised text: another case, doubled spaces, paragraph breaks changed."""
    text = rng.choice((str.upper, str.lower, str.title))(text)
    words = text.split(" ")
    text = " ".join(w + (" " if rng.random() < 0.1 else "") for w in words)
    return "  " + text.replace("\n\n", "\n \n") + "\n"


def _near_copy(text: str, rng: random.Random, vocabulary: list[str], sentences: list[str]) -> str:
    """~2% of the words replaced by other words, one sentence added at a paragraph break."""
    paragraphs = [p.split(" ") for p in text.split("\n\n")]
    for words in paragraphs:
        for i in range(len(words)):
            if rng.random() < 0.02:
                words[i] = rng.choice(vocabulary)
    paragraphs.insert(rng.randrange(len(paragraphs) + 1), [rng.choice(sentences)])
    return "\n\n".join(" ".join(words) for words in paragraphs)


@dataclass
class Truth:
    copies: dict[str, str]  # copy id → original id
    kinds: dict[str, str]  # copy id → "exact" | "near"
    ids: list[str]  # every document, in input order


def generate(n_docs: int, files: int, seed: int, out_dir: Path, sentences: list[str],
             exact_rate: float = 0.08, near_rate: float = 0.08) -> Truth:
    """Write `n_docs` documents as `files` JSONL files (input order = file order, then line order)."""
    rng = random.Random(seed)
    vocabulary = sorted({w for s in sentences for w in s.split() if w.isalpha()})
    docs, originals = [], []
    truth = Truth({}, {}, [])
    for n in range(n_docs):
        doc_id = f"d{n:07d}"
        roll = rng.random()
        if originals and roll < exact_rate + near_rate:
            source_id, source_text = rng.choice(originals)
            exact = roll < exact_rate
            text = _exact_copy(source_text, rng) if exact else _near_copy(source_text, rng, vocabulary, sentences)
            truth.copies[doc_id], truth.kinds[doc_id] = source_id, "exact" if exact else "near"
        else:
            picked = rng.sample(sentences, rng.randint(8, 20))
            cuts = sorted(rng.sample(range(1, len(picked)), min(len(picked) - 1, rng.randint(1, 4))))
            text = "\n\n".join(" ".join(picked[a:b]) for a, b in zip([0, *cuts], [*cuts, len(picked)]))
            originals.append((doc_id, text))
        docs.append({"id": doc_id, "text": text})
        truth.ids.append(doc_id)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    per_file = -(-n_docs // files)
    for f in range(files):
        with open(out_dir / f"part-{f:03d}.jsonl", "w") as out:
            out.writelines(json.dumps(d) + "\n" for d in docs[f * per_file : (f + 1) * per_file])
    return truth


# ---------------------------------------------------------------------------------------- running


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # user + sys of the job's processes: what the wall time would be alone on one core
    peak_rss_mib: float  # the largest RSS any single process of the job reached
    peak_process: str
    kept: set[str]


def run_measured(cmd: list[str], env: dict[str, str], poll_s: float = 0.05) -> tuple[float, float, float, str]:
    """Run `cmd` to completion; (wall seconds, CPU seconds, peak RSS MiB of any process in its tree, that process).
    CPU time comes from getrusage of the waited-for children: on a shared machine it is steadier than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak, who = 0, ""
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                rss = p.memory_info().rss
                if rss > peak:
                    peak, who = rss, " ".join(p.cmdline()[1:4])[:60]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        time.sleep(poll_s)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stderr = proc.stderr.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} … failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, peak / MIB, who


CLUSTER_PAIRS = 1 << 21  # star-shaped duplicate pairs over 2 × as many documents, added in chunks as bucket files are


def cluster_graph(shards: int) -> None:
    """The cluster stage's connected components over CLUSTER_PAIRS pairs in `shards` shards (run in a child process,
    whose peak RSS the parent measures): memory follows one shard's pairs."""
    import tempfile

    import numpy as np

    from data_tools.components import ShardedGraph

    rng, n_docs, chunk = np.random.default_rng(0), 2 * CLUSTER_PAIRS, 1 << 18
    with tempfile.TemporaryDirectory() as folder:
        graph = ShardedGraph(Path(folder) / "graph", np.linspace(0, n_docs, shards + 1).astype(np.int64))
        for _ in range(CLUSTER_PAIRS // chunk):
            keepers, copies = rng.integers(0, n_docs, chunk // 2), rng.integers(0, n_docs, (chunk // 2, 2))
            pairs = np.concatenate([np.stack([keepers, copies[:, 0]], 1), np.stack([keepers, copies[:, 1]], 1)])
            graph.add(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1))
        sum(len(ids) for ids in graph.non_keepers())


def cluster_memory(shard_counts: list[int]) -> None:
    """Peak RSS and CPU time of the cluster stage's components at each shard count, on the same pairs."""
    print(f"cluster stage, {CLUSTER_PAIRS:,} pairs over {2 * CLUSTER_PAIRS:,} documents:")
    for shards in shard_counts:
        cmd = [sys.executable, __file__, "--cluster-child", str(shards)]
        seconds, cpu, peak, _ = run_measured(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"  {shards:>4} shards: peak RSS {peak:>5.0f} MiB, {cpu:.1f} s CPU ({1e6 * cpu / CLUSTER_PAIRS:.1f} µs a pair)")


def dstrain_config(path: Path, dedup: DedupConfig) -> Path:
    """Quality, PII and language filters off (language ID only labels): only dedup removes, with `dedup`'s threshold."""
    path.write_text(
        "lang: {threshold: 0.0}\n"
        "quality:\n  gopher_repetition: {enabled: false}\n  gopher_quality: {enabled: false}\n  c4: {enabled: false}\n"
        f"pii: {{enabled: false}}\ndedup: {{threshold: {dedup.threshold}}}\n"
    )
    return path


def run_dstrain(corpus: Path, work: Path, workers: int, dedup: DedupConfig) -> Run:
    from data_tools.shards import read_tar

    out = work / f"dstrain-w{workers}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare", "--input", str(corpus / "*.jsonl"), "--output", str(out),
           "--tokenizer", str(CORPORA / "tokenizers" / "gpt2"), "--seq-len", "1024", "--workers", str(workers),
           "--config", str(dstrain_config(work / "pipeline.yaml", dedup))]
    seconds, cpu, peak, who = run_measured(cmd, {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    kept = {json.loads(sample["json"])["id"] for tar in sorted((out / "docs").glob("*.tar")) for _, sample in read_tar(tar)}
    return Run(seconds, cpu, peak, who, kept)


def run_datatrove(corpus: Path, work: Path, workers: int, dedup) -> Run:
    out = work / f"datatrove-w{workers}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    numbers = (dedup.ngram, dedup.bands, dedup.rows_per_band, dedup.seed, workers)
    cmd = [str(DATATROVE_PYTHON), str(ROOT / "bench" / "datatrove_dedup_side.py"), str(corpus), str(out), *map(str, numbers)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    seconds, cpu, peak, who = run_measured(cmd, {**env, "OMP_NUM_THREADS": "1", "HF_HOME": str(out / "hf")})
    return Run(seconds, cpu, peak, who, set((out / "kept.txt").read_text().split()))


def score(truth: Truth, kept: set[str]) -> dict:
    dropped = set(truth.ids) - kept
    planted = set(truth.copies)
    found = dropped & planted
    clusters = defaultdict(list)
    for copy, original in truth.copies.items():
        clusters[original].append(copy)
    lost = sum(1 for original, copies in clusters.items() if not ({original, *copies} & kept))
    near = {c for c, kind in truth.kinds.items() if kind == "near"}
    return {
        "recall": len(found) / max(1, len(planted)),
        "precision": len(found) / max(1, len(dropped)),
        "near_recall": len(found & near) / max(1, len(near)),
        "dropped": len(dropped),
        "planted": len(planted),
        "clusters_lost": lost,
    }


# ---------------------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,40000,160000", help="documents per corpus, comma-separated")
    parser.add_argument("--files", type=int, default=8, help="JSONL files per corpus (tasks of the job)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datatrove-sizes", help="sizes to run the datatrove side at (default: every size; 'none' to skip)")
    parser.add_argument("--speedup-sizes", help="sizes to run 2 workers at (default: every size; 'none' to skip)")
    parser.add_argument("--threshold", type=float, help="dedup.threshold of the dstrain side (default: the config's)")
    parser.add_argument("--report", action="store_true", help="print the table of the last run (bench/out/data_scale.json)")
    parser.add_argument("--cluster-shards", help="only measure the cluster stage's memory at these shard counts (e.g. 1,8,32)")
    parser.add_argument("--cluster-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cluster_child:
        return cluster_graph(args.cluster_child)
    if args.cluster_shards:
        return cluster_memory([int(s) for s in args.cluster_shards.split(",")])
    if args.report:
        return report(json.loads((OUT.parent / "data_scale.json").read_text()))
    from data_tools.config import DedupConfig

    dedup = DedupConfig() if args.threshold is None else DedupConfig(threshold=args.threshold)
    sizes = [int(s) for s in args.sizes.split(",")]
    at = lambda given: sizes if given is None else [] if given == "none" else [int(s) for s in given.split(",")]  # noqa: E731
    datatrove_sizes, speedup_sizes = at(args.datatrove_sizes), at(args.speedup_sizes)
    if datatrove_sizes and not DATATROVE_PYTHON.exists():
        sys.exit(f"{DATATROVE_PYTHON} is missing; run `make bench-data`, which builds it (or pass --datatrove-sizes none)")
    sentences = sentence_pool()
    print(f"machine: {platform.node()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"{platform.processor() or platform.machine()}; python {platform.python_version()}")
    print(f"corpus: {len(sentences)} distinct sentences from examples/corpora; {args.files} JSONL files; "
          f"dedup {dedup.ngram}-gram shingles, {dedup.bands} bands × {dedup.rows_per_band} rows, seed {dedup.seed}, "
          f"threshold {dedup.threshold}")
    for setting, pages in handbook_near_copies(dedup).items():
        print(f"handbook WARC, near copies dropped with dedup.{setting}: {len(pages)}: {', '.join(pages)}")
    results = []
    for size in sizes:
        work = OUT / f"n{size}"
        truth = generate(size, args.files, args.seed, work / "corpus", sentences)
        row: dict = {"docs": size, "planted": len(truth.copies)}
        one = run_dstrain(work / "corpus", work, 1, dedup)
        row["dstrain"] = {"seconds": one.seconds, "cpu_seconds": one.cpu_seconds, "peak_rss_mib": one.peak_rss_mib,
                          "peak_process": one.peak_process, **score(truth, one.kept)}
        if size in speedup_sizes:
            two = run_dstrain(work / "corpus", work, 2, dedup)
            row["dstrain_w2"] = {"seconds": two.seconds, "cpu_seconds": two.cpu_seconds, "peak_rss_mib": two.peak_rss_mib,
                                 "same_output": two.kept == one.kept}
        if size in datatrove_sizes:
            theirs = run_datatrove(work / "corpus", work, 1, dedup)
            row["datatrove"] = {"seconds": theirs.seconds, "cpu_seconds": theirs.cpu_seconds, "peak_rss_mib": theirs.peak_rss_mib,
                                **score(truth, theirs.kept)}
        results.append(row)
        print(json.dumps(row), flush=True)
        (OUT.parent / "data_scale.json").write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(work)  # the corpus and outputs of the big sizes are GBs
    report(results)


def report(results: list[dict]) -> None:
    """The table (wall and CPU seconds, whole process) and a PASS/FAIL line per target."""
    print(f"\n{'docs':>7} {'recall':>7} {'prec.':>6} {'lost':>4} {'peak RSS':>9} {'wall s':>7} {'cpu s':>7} {'ms/doc':>7}"
          f" {'2w/1w':>6} | {'datatrove':>9} {'cpu s':>7} {'recall':>7} {'prec.':>6} {'peak RSS':>9} {'dt/ds':>6} {'cpu':>6}")
    for r in results:
        d, w2, dt = r["dstrain"], r.get("dstrain_w2"), r.get("datatrove")
        speedup = f"{d['seconds'] / w2['seconds']:.2f}x" if w2 else "-"
        theirs = "-" if not dt else (
            f"{dt['seconds']:>9.1f} {dt['cpu_seconds']:>7.1f} {dt['recall']:>7.4f} {dt['precision']:>6.4f}"
            f" {dt['peak_rss_mib']:>5.0f} MiB {dt['seconds'] / d['seconds']:>5.2f}x"
            f" {dt['cpu_seconds'] / d['cpu_seconds']:>5.2f}x")
        print(f"{r['docs']:>7} {d['recall']:>7.4f} {d['precision']:>6.4f} {d['clusters_lost']:>4} {d['peak_rss_mib']:>5.0f} MiB"
              f" {d['seconds']:>7.1f} {d['cpu_seconds']:>7.1f} {1000 * d['seconds'] / r['docs']:>7.2f} {speedup:>6} | {theirs}")
    checks = [
        ("recall >= 0.95 at every size", all(r["dstrain"]["recall"] >= 0.95 for r in results)),
        ("precision >= 0.99 at every size", all(r["dstrain"]["precision"] >= 0.99 for r in results)),
        ("no cluster lost entirely", all(r["dstrain"]["clusters_lost"] == 0 for r in results)),
        ("peak RSS of any process <= 1 GiB", all(r["dstrain"]["peak_rss_mib"] <= 1024 for r in results)),
    ]
    by_size = {r["docs"]: r for r in results}
    if 40000 in by_size and 160000 in by_size:
        growth = by_size[160000]["dstrain"]["peak_rss_mib"] / by_size[40000]["dstrain"]["peak_rss_mib"] - 1
        checks.append((f"peak RSS growth 40k -> 160k <= 10% ({100 * growth:+.1f}%)", growth <= 0.10))
    if len(results) > 1:
        first, last = results[0], results[-1]
        for key, what in (("seconds", "wall"), ("cpu_seconds", "cpu")):
            ratio = (last["dstrain"][key] / last["docs"]) / (first["dstrain"][key] / first["docs"])
            name = f"{what} time per doc flat within 15% ({first['docs']} -> {last['docs']}: {ratio:.2f}x)"
            checks.append((name, ratio <= 1.15))
    with_two = [r for r in results if "dstrain_w2" in r]
    if with_two:
        r = with_two[-1]
        speedup = r["dstrain"]["seconds"] / r["dstrain_w2"]["seconds"]
        checks.append((f"2 workers >= 1.6x one at {r['docs']} ({speedup:.2f}x wall)", speedup >= 1.6))
        checks.append(("2 workers give the same kept documents", all(r["dstrain_w2"]["same_output"] for r in with_two)))
    with_dt = [r for r in results if "datatrove" in r]
    if with_dt:
        r = with_dt[-1]
        ratio, cpu = (r["datatrove"][k] / r["dstrain"][k] for k in ("seconds", "cpu_seconds"))
        checks.append((f">= 1.5x faster than datatrove whole-process at {r['docs']} ({ratio:.2f}x wall, {cpu:.2f}x cpu)",
                       ratio >= 1.5))
        checks.append(("recall >= datatrove's at every size",
                       all(r["dstrain"]["recall"] >= r["datatrove"]["recall"] for r in with_dt)))
    print()
    for name, ok in checks:
        print(f"{verdict(ok)}  {name}")


if __name__ == "__main__":
    main()
