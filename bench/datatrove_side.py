"""datatrove half of the dstrain-vs-datatrove preprocessing benchmark.

Why: to compare dstrain's pipeline against a widely used reference on the same
WARCs with the same stages (WARC read -> HTML extraction -> fastText lid.176 ->
Gopher quality + repetition -> MinHash signatures), we run datatrove 0.10 in one
process and time only the work, not its executor's logging/stats/completion files.

Runs in its own venv (`make bench` builds bench/.venv-datatrove), not dstrain's:
datatrove[processing] pulls fasttext-numpy2-wheel, which ships the same `fasttext` package
files as fasttext-predict and would overwrite them. Installed with
  pip install 'datatrove[processing]==0.10.*' warcio faust-cchardet python-magic spacy lxml_html_clean
(WarcReader needs warcio, faust-cchardet and python-magic, the part of the [io] extra
without pyarrow/datasets; the Gopher and MinHash steps tokenize English with
spacy.blank("en"); the local lxml wheel lacks the html_clean extra, and without
lxml_html_clean every extraction silently "times out".)
Choices made, and their effect on the comparison:
- WarcReader keeps response records whose WARC-Identified-Payload-Type is HTML, else
  whose payload libmagic sniffs as HTML: iana.warc.gz has no such header, so 4 of its
  20 text/html responses (2 sniffed as JavaScript, 2 empty) are not read.
- Extraction is Trafilatura: datatrove 0.10.1 has no resiliparse extractor. It always
  runs in one forked sandbox child (datatrove's design, not optional). Its
  per-document timeout is raised from 1 s to 10 s: iana.org/protocols (655 KB) takes
  ~0.85 s, so on a busy machine it was dropped on some runs and not others.
- LanguageFilter(label_only=True) labels every document and drops none.
- The lid model is datatrove's FT176LID with its MODEL_URL set, per instance (as
  datatrove's own GlotLID does), to the local file; datatrove then "downloads" it
  with fsspec's local filesystem, i.e. copies it into HF_ASSETS_CACHE, which we
  point into workdir so nothing touches the network or ~/.cache. The .ftz is the
  quantized lid.176 (same labels as the .bin datatrove would fetch).
"""

import os
import time


def run_datatrove(warc_paths: list[str], lid_model_path: str, workdir: str) -> dict:
    """Run the pipeline over warc_paths in this process (rank 0 of 1).

    docs_in: HTML documents WarcReader produced; docs_out: documents that passed both
    Gopher filters and were given MinHash signatures (written under workdir/minhash_sigs);
    seconds: wall time from building the steps to the sorted signature files, imports excluded.
    """
    # Must be set before huggingface_hub is first imported (it reads it at import).
    os.environ.setdefault("HF_ASSETS_CACHE", os.path.join(workdir, "hf_assets"))
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.readers import WarcReader

    paths = [os.path.abspath(p) for p in warc_paths]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    os.makedirs(workdir, exist_ok=True)
    paths_file = os.path.join(workdir, "warc_paths.txt")
    with open(paths_file, "w") as f:
        f.write("".join(os.path.relpath(p, root) + "\n" for p in paths))

    start = time.perf_counter()
    reader = WarcReader(root, paths_file=paths_file)
    lid = LanguageFilter(languages=None, label_only=True)
    lid.model.MODEL_URL = os.path.abspath(lid_model_path)
    minhash = MinhashDedupSignature(
        output_folder=os.path.join(workdir, "minhash_sigs"),
        config=MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8),
    )
    data = None
    extract = Trafilatura(timeout=10.0)
    for step in (reader, extract, lid, GopherQualityFilter(), GopherRepetitionFilter()):
        data = step(data, rank=0, world_size=1)
    minhash.run(data, rank=0, world_size=1)  # a plain function, not a generator: drains the chain
    seconds = time.perf_counter() - start
    return {
        "docs_in": int(reader.stats["documents"].total),
        "docs_out": int(minhash.stats["total"].total),
        "seconds": seconds,
    }


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    # usage: datatrove_side.py LID_MODEL WARC [WARC …]; prints one JSON line
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_datatrove(sys.argv[2:], sys.argv[1], tmp)))
