"""What a finished job tells its user: a table of stage counters and TensorBoard summaries.

TensorBoard gets the stage funnel (documents left after each stage, as a curve over stage
number), drop reasons per stage, language shares, and histograms of characters and tokens per
document, so a user can look rather than read.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np


def stage_table(stats: dict) -> str:
    """One row per stage: documents in/out, the biggest drop reasons, seconds."""
    rows = [("stage", "in", "out", "dropped (top reasons)", "s")]
    for name, s in stats["stages"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(s["dropped"]).most_common(4))
        events = ", ".join(f"{k} {v}" for k, v in Counter(s.get("events", {})).most_common(3))
        detail = "; ".join(x for x in (reasons, events) if x)
        rows.append((name, str(s["docs_in"]), str(s["docs_out"]), detail, f"{s['seconds']:.1f}"))
    for split, p in stats.get("pack", {}).items():
        detail = f"{p['tokens']} tokens in {p['shards']} shards, tail dropped {p['tokens_dropped_tail']}"
        rows.append((f"pack/{split}", "", f"{p['rows']} rows", detail, f"{p['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i in (0, 3) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join(line(r) for r in rows)


def write_tensorboard(out: Path, stats: dict, token_files: list[Path]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    logdir = out / "tensorboard"
    shutil.rmtree(logdir, ignore_errors=True)  # a rerun of pack rewrites the report, never adds to it
    char_lens, token_lens, langs = [], [], []
    for path in token_files:
        with np.load(path) as data:
            char_lens.append(data["char_lens"])
            token_lens.append(data["token_lens"])
            langs.extend(data["langs"].tolist())
    with SummaryWriter(str(logdir)) as writer:
        for step, (name, s) in enumerate(stats["stages"].items()):
            writer.add_scalar("funnel/docs_out", s["docs_out"], step)
            for reason, count in s["dropped"].items():
                writer.add_scalar(f"dropped/{name}/{reason}", count, 0)
        total = max(len(langs), 1)
        for lang, count in Counter(langs).most_common():
            writer.add_scalar(f"languages/{lang}", count / total, 0)
        if char_lens and sum(map(len, char_lens)):
            writer.add_histogram("docs/chars", np.concatenate(char_lens), 0)
            writer.add_histogram("docs/tokens", np.concatenate(token_lens), 0)
        writer.add_text("stages", "```\n" + stage_table(stats) + "\n```", 0)
    return logdir
