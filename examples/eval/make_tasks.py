"""Build the downstream task files in this directory from the held-out documents of a `data_tools prepare` run.

    python -m data_tools prepare --input 'examples/corpora/*.warc.gz' --input examples/corpora/enwiki-sample.xml.bz2 \
        --output runs/demo/data --train-tokenizer 4096 --seq-len 256 --valid-fraction 0.05      # as `make demo` does
    python examples/eval/make_tasks.py --prepared runs/demo/data --out examples/eval

Held out means the documents prepare put in the valid split (chosen by content hash, so the same for any tokenizer,
seq_len or worker count at the same --valid-fraction): a run trained on that data never saw them.

    wiki-lastword.jsonl       cloze: a sentence of a held-out Wikipedia article, in its paragraph, without its last
                              word; the target is that word (LAMBADA's form)
    wiki-continuation.jsonl   multiple choice: a sentence of a held-out Wikipedia article; the choices are the
                              sentence that follows it and three of similar length from other held-out documents

Deterministic: the documents are read in id order and every random choice comes from --seed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from data_tools.shards import read_tar

SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")
LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][a-z]{2,})[.!?]$", re.S)
WIKIPEDIA = "enwiki"  # the source name of the Wikipedia sample's documents starts so
CONTEXT_CHARS = 400  # the cloze context keeps the sentence and as many whole sentences before it as fit


def held_out(prepared: Path) -> list[dict]:
    """The valid split's English documents ({id, source, text}), in id order."""
    docs = []
    for shard in sorted((prepared / "docs").glob("*.tar")):
        for _, sample in read_tar(shard):
            meta = json.loads(sample["json"])
            if meta["split"] == "valid" and meta.get("lang") == "en":
                docs.append({"id": meta["id"], "source": meta["source"], "text": sample["txt"].decode()})
    return sorted(docs, key=lambda doc: doc["id"])


def paragraphs(text: str) -> list[list[str]]:
    """Each paragraph (a line of prose) as its sentences."""
    return [SENTENCE_END.split(line.strip()) for line in text.splitlines() if len(line.split()) >= 12]


def lastword_examples(docs: list[dict], limit: int) -> list[dict]:
    examples = []
    for doc in docs:
        if doc["source"].startswith(WIKIPEDIA):
            for sentences in paragraphs(doc["text"]):
                for i, sentence in enumerate(sentences):
                    match = LAST_WORD.match(sentence)
                    if match and len(sentence.split()) >= 8:
                        before = list(sentences[:i])
                        while before and len(" ".join([*before, match[1]])) > CONTEXT_CHARS:
                            before.pop(0)
                        examples.append({"context": " ".join([*before, match[1]]), "target": " " + match[2]})
    return examples[:limit]


def continuation_examples(docs: list[dict], limit: int, rng: np.random.Generator) -> list[dict]:
    """True next sentence against three sentences of the nearest lengths from other documents."""
    pool = [(doc["id"], s) for doc in docs for sentences in paragraphs(doc["text"]) for s in sentences if _usable(s)]
    lengths = np.array([len(s) for _, s in pool])
    examples = []
    for doc in docs:
        if not doc["source"].startswith(WIKIPEDIA):
            continue
        for sentences in paragraphs(doc["text"]):
            for first, second in zip(sentences, sentences[1:]):
                if not (_usable(first) and _usable(second)):
                    continue
                others = [j for j in np.argsort(np.abs(lengths - len(second)), kind="stable") if pool[j][0] != doc["id"]]
                distractors = [pool[j][1] for j in rng.choice(others[:20], size=3, replace=False)]
                label = int(rng.integers(4))
                choices = [" " + s for s in distractors[:label] + [second] + distractors[label:]]
                examples.append({"context": first, "choices": choices, "label": label})
    return examples[:limit]


def _usable(sentence: str) -> bool:
    return 6 <= len(sentence.split()) and len(sentence) <= 200 and sentence[-1] in ".!?"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="a `data_tools prepare` output directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--limit", type=int, default=300, help="examples per task at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = held_out(args.prepared)
    tasks = {"wiki-lastword": lastword_examples(docs, args.limit),
             "wiki-continuation": continuation_examples(docs, args.limit, np.random.default_rng(args.seed))}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, examples in tasks.items():
        write_jsonl(args.out / f"{name}.jsonl", examples)
        print(f"{args.out / name}.jsonl: {len(examples)} examples")


if __name__ == "__main__":
    main()
