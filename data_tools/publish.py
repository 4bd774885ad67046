"""Copy a finished job's products from its working directory to the output location (a URL or a directory).

The job runs in a working directory on a file system (`--work-dir`; shared between nodes on a
cluster), where its intermediate files (`_work/`) and stage markers (`_done/`) live. Only the
products are published: tokens/ (shards, then each split's manifest.json), tokenizer/, docs/,
stats.json and plan.json. Each file is written whole (one PUT, or a temp file renamed), the
manifests after their shards, and `_PUBLISHED.json` (every file with its size) last: a reader
that finds the marker finds every product complete. The local marker `_done/publish.json` makes a
rerun skip the copy; a killed publish is redone from the start.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from data_tools import storage

log = logging.getLogger("data_tools")

PRODUCTS = ("tokens", "tokenizer", "docs", "stats.json", "plan.json")
PUBLISHED_MARKER = "_PUBLISHED.json"


def product_files(work: Path) -> list[str]:
    """Relative paths to publish, manifests last so none names a shard not yet written."""
    files = []
    for name in PRODUCTS:
        path = work / name
        if path.is_dir():
            files += [f"{name}/{rel}" for rel in storage.list_files(path)]
        elif path.exists():
            files.append(name)
    return sorted(files, key=lambda rel: (rel.endswith("manifest.json"), rel))


def is_published(work: Path, output: str) -> bool:
    """Whether the local marker says the products of the job in `work` were published to `output`."""
    marker = work / "_done" / "publish.json"
    return marker.exists() and json.loads(marker.read_text()).get("output") == output


def publish(work: Path, output: str) -> None:
    """Upload the products of the job in `work` to `output`, unless its local marker says that is done."""
    if is_published(work, output):
        return
    marker = work / "_done" / "publish.json"
    start, target = time.perf_counter(), storage.location(output)
    files = product_files(work)
    for rel in files:
        storage.upload(work / rel, target / rel)
    listing = {rel: (work / rel).stat().st_size for rel in files}
    storage.write_bytes(target / PUBLISHED_MARKER, (json.dumps({"files": listing}, indent=1) + "\n").encode())
    log.info("published %d files (%.1f MiB) to %s in %.1fs", len(files), sum(listing.values()) / 2**20, output,
             time.perf_counter() - start)
    storage.write_bytes(marker, json.dumps({"output": output, "files": len(files)}).encode())
