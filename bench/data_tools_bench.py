"""data_tools throughput against references, measured in one run on the same input.

1. Document stages on the sample WARCs (HTML extraction, lid.176 language ID, Gopher quality
   and repetition, MinHash signatures), one process each: dstrain vs datatrove 0.10 (run from
   its own venv, bench/.venv-datatrove, by bench/datatrove_side.py). Prints docs/s and the ratio.
2. Tokenize + pack (EOS, rows, windowed shuffle, shard writing) vs a bare `tokenizers`
   `encode_batch` of the same documents. Prints tokens/s and the ratio.

Run with `make bench` (it installs both environments).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
WARCS = [CORPORA / "iana.warc.gz", CORPORA / "handbook-multilingual.warc.gz"]
DATATROVE_PYTHON = ROOT / "bench" / ".venv-datatrove" / "bin" / "python"
REPEATS = 3


def dstrain_document_stages() -> dict:
    """The same stages as the datatrove side: keep every language (label only), no C4/PII."""
    from data_tools.config import PipelineConfig
    from data_tools.dedup import DedupSignatures
    from data_tools.extract import ExtractText
    from data_tools.lang import LanguageFilter
    from data_tools.quality import GopherQuality, GopherRepetition
    from data_tools.readers.warc import read_warc
    from data_tools.stats import StageStats

    config = PipelineConfig()
    config.lang.threshold = 0.0
    start = time.perf_counter()
    read = StageStats()
    docs = (doc for path in WARCS for doc in read_warc(path, read, lambda message: None))
    for step in (
        ExtractText(config.extract),
        LanguageFilter(config.lang),
        GopherQuality(config.quality.gopher_quality),
        GopherRepetition(config.quality.gopher_repetition),
        DedupSignatures(config.dedup, config.quality.gopher_quality.unspaced_langs),
    ):
        docs = step(docs)
    docs_out = sum(1 for _ in docs)
    return {"docs_in": read.docs_out, "docs_out": docs_out, "seconds": time.perf_counter() - start}


def datatrove_document_stages() -> dict:
    from data_tools.lang import model_path

    cmd = [str(DATATROVE_PYTHON), str(ROOT / "bench" / "datatrove_side.py"), model_path(), *map(str, WARCS)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def sample_texts() -> list[str]:
    """Cleaned text of every sample corpus, repeated to a few MB so timings are stable."""
    from data_tools.config import ExtractConfig
    from data_tools.extract import ExtractText
    from data_tools.readers import detect_format, get_reader
    from data_tools.stats import StageStats

    texts = []
    for path in [*WARCS, CORPORA / "enwiki-sample.xml.bz2"]:
        docs = get_reader(detect_format(path))(path, StageStats(), lambda message: None)
        texts += [doc.text for doc in ExtractText(ExtractConfig())(docs)]
    return texts * 4


def tokenize_and_pack(texts: list[str], out: Path) -> tuple[int, float]:
    from data_tools.config import PackConfig
    from data_tools.pack import cut_rows, shuffle_windows, write_shards
    from data_tools.tokenize import encode_documents, load_tokenizer

    tok = load_tokenizer(CORPORA / "tokenizers" / "gpt2")
    pack = PackConfig()
    start = time.perf_counter()
    streams = (encode_documents(tok, texts[i : i + 256]) + ("bench",) for i in range(0, len(texts), 256))
    rows = shuffle_windows(cut_rows(streams, 2048, Counter()), pack.shuffle_window, pack.seed)
    shards = write_shards(rows, out, "uint16", pack.rows_per_shard, pack.rows_per_sample)
    return sum(s.tokens for s in shards), time.perf_counter() - start


def bare_encode(texts: list[str], method: str) -> tuple[int, float]:
    from data_tools.tokenize import load_tokenizer

    encode = getattr(load_tokenizer(CORPORA / "tokenizers" / "gpt2").tokenizer, method)
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in encode(texts, add_special_tokens=False))
    return tokens, time.perf_counter() - start


def median_run(fn, *args) -> tuple:
    runs = [fn(*args) for _ in range(REPEATS)]
    key = (lambda r: r["seconds"]) if isinstance(runs[0], dict) else (lambda r: r[1])
    return sorted(runs, key=key)[REPEATS // 2]


def main() -> None:
    if not DATATROVE_PYTHON.exists():
        sys.exit(f"{DATATROVE_PYTHON} is missing; run `make bench`, which builds it")
    ours, theirs = median_run(dstrain_document_stages), median_run(datatrove_document_stages)
    ours_rate, theirs_rate = ours["docs_in"] / ours["seconds"], theirs["docs_in"] / theirs["seconds"]
    texts = sample_texts()
    with tempfile.TemporaryDirectory() as tmp:
        packed_tokens, packed_s = median_run(tokenize_and_pack, texts, Path(tmp))
    bare = {method: median_run(bare_encode, texts, method) for method in ("encode_batch", "encode_batch_fast")}
    print(f"document stages on {len(WARCS)} WARCs (extract, lid.176, Gopher quality+repetition, MinHash), 1 process, "
          f"median of {REPEATS}")
    print(f"{'':24}{'docs in':>9}{'docs out':>10}{'seconds':>9}{'docs/s':>9}")
    print(f"{'dstrain':24}{ours['docs_in']:>9}{ours['docs_out']:>10}{ours['seconds']:>9.2f}{ours_rate:>9.1f}")
    print(f"{'datatrove 0.10':24}{theirs['docs_in']:>9}{theirs['docs_out']:>10}{theirs['seconds']:>9.2f}{theirs_rate:>9.1f}")
    print(f"ratio dstrain / datatrove (docs/s): {ours_rate / theirs_rate:.2f}x  (target >= 1.5x)\n")
    print(f"tokenize + pack, GPT-2 BPE, {len(texts)} documents, seq_len 2048, median of {REPEATS}")
    print(f"{'':24}{'tokens':>12}{'seconds':>9}{'tokens/s':>12}")
    print(f"{'dstrain tokenize+pack':24}{packed_tokens:>12}{packed_s:>9.2f}{packed_tokens / packed_s:>12.0f}")
    for method, (tokens, seconds) in bare.items():
        print(f"{'bare ' + method:24}{tokens:>12}{seconds:>9.2f}{tokens / seconds:>12.0f}")
    fastest = max(tokens / seconds for tokens, seconds in bare.values())
    print(f"ratio to the faster bare encode (tokens/s): {(packed_tokens / packed_s) / fastest:.2f}x  (target >= 0.8x)")


if __name__ == "__main__":
    main()
