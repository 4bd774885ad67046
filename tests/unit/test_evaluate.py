"""Evaluation pieces on a tiny random Llama: downstream scores and per-source losses against a direct computation.

The task files are the committed ones (examples/eval); the valid splits are real token shards written with the
packer's own writer from the Wikipedia sample. A one-process gloo group stands in for the world.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_tools.common import ConfigError, DataError
from data_tools.manifest import Manifest, TokenizerInfo, file_sha256, iter_blocks, load_manifest
from data_tools.pack import Rows, write_shard
from data_tools.tokenize import load_tokenizer
from trainer.config import load_config
from trainer.downstream import Scorer, encode_pair, load_task
from trainer.evaluate import Evaluator, LoadedModel, evaluate_saved, validation_parts
from trainer.tasks import TaskContext, build_task

pytestmark = pytest.mark.usefixtures("one_process_group")

ROOT = Path(__file__).resolve().parents[2]
TASKS = [ROOT / "examples" / "eval" / "wiki-continuation.jsonl", ROOT / "examples" / "eval" / "wiki-lastword.jsonl"]
POSITIONS = 48  # short, so that long contexts are cut from the left as lm-eval cuts them
SEQ_LEN = 32


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_tokenizer(gpt2_dir).tokenizer


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=POSITIONS, eos_token_id=50256)
    return LlamaForCausalLM(config).eval()


def config_for(*overrides: str):
    return load_config(None, ["data.train=unused", "train.micro_batch=3", *overrides])


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward per pair, tokenized as lm-eval's HFLM does (the pair whole, split at the context)."""
    context_ids = tokenizer.encode(context.rstrip(), add_special_tokens=False).ids
    spaces = context[len(context.rstrip()):]
    whole = tokenizer.encode(context.rstrip() + spaces + continuation, add_special_tokens=False).ids
    target = whole[len(context_ids):]
    ids = whole[-(POSITIONS + 1):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -len(target):]
    log_probs = torch.log_softmax(logits.float(), -1)
    picked = log_probs[torch.arange(len(target)), torch.tensor(target)]
    return float(picked.double().sum()), bool((log_probs.argmax(-1) == torch.tensor(target)).all())


def test_downstream_scores_equal_a_direct_computation(model, gpt2):
    config = config_for(f"eval.tasks={json.dumps([str(t) for t in TASKS])}", "eval.max_examples=10", "eval.batch_size=7")
    scalars = Evaluator(config, gpt2, 50256, POSITIONS, []).evaluate(LoadedModel(model)).scalars
    assert set(scalars) == {"wiki-continuation/acc", "wiki-continuation/acc_norm", "wiki-lastword/acc",
                            "wiki-lastword/perplexity"}
    choice, cloze = (load_task(t, 10) for t in TASKS)
    hits = hits_norm = 0
    for example in choice.examples:
        lls = np.array([direct_loglikelihood(model, gpt2, example.context, c)[0] for c in example.continuations])
        hits += int(np.argmax(lls)) == example.label
        hits_norm += int(np.argmax(lls / np.array([len(c) for c in example.continuations]))) == example.label
    assert scalars["wiki-continuation/acc"] == hits / 10 and scalars["wiki-continuation/acc_norm"] == hits_norm / 10
    results = [direct_loglikelihood(model, gpt2, ex.context, ex.continuations[0]) for ex in cloze.examples]
    assert scalars["wiki-lastword/acc"] == sum(greedy for _, greedy in results) / 10
    assert scalars["wiki-lastword/perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in results) / 10), rel=1e-5)


def test_downstream_results_do_not_depend_on_the_number_of_ranks(model, gpt2):
    """Batches are fixed groups of examples, dealt round-robin: 3 ranks together score exactly what one rank does."""
    scorer = Scorer(load_task(TASKS[0], 11), gpt2, 50256, POSITIONS, batch_size=9)
    assert len(scorer.batches) == 6 and all(len(b) == 2 for b in scorer.batches[:5])  # 4 choices each: 2 examples per batch
    one = scorer.local_results(model, 0, 1)
    three = sorted(r for rank in range(3) for r in scorer.local_results(model, rank, 3))
    assert three == sorted(one) and [i for i, *_ in three] == list(range(11))
    assert scorer.local_results(model, 1, 3, leader=False) == []  # a tensor-parallel peer counts nothing


def test_trailing_spaces_of_the_context_move_to_the_continuation(gpt2):
    assert encode_pair(gpt2, "The capital of France is ", "Paris") == encode_pair(gpt2, "The capital of France is", " Paris")
    context, continuation = encode_pair(gpt2, "The capital of France is", " Paris")
    assert gpt2.decode(continuation) == " Paris" and gpt2.decode(context) == "The capital of France is"


@pytest.mark.parametrize("lines, message", [
    (None, "no such file"),
    (['{"context": "a", "target": " b"', ], r"bad.jsonl:1: not valid JSON"),
    (['{"context": "a", "target": " b"}', '{"context": "a", "choices": [" b", " c"], "label": 0}'], "mixes multiple-choice"),
    (['{"context": "a", "choices": [" b", " c"], "label": 2}'], r"bad.jsonl:1: 'label' must be the index of the right choice"),
    (['', '{"context": "", "target": " b"}'], r"bad.jsonl:2: needs a non-empty string 'context'"),
    (['{"context": "a", "choices": [" b"], "label": 0}'], "two or more non-empty strings"),
], ids=["missing", "json", "mixed", "label", "context", "one-choice"])
def test_bad_task_files_are_named_with_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_task(path)


def test_downstream_tasks_need_a_causal_lm_and_distinct_names(gpt2):
    with pytest.raises(ConfigError, match="eval.tasks: downstream tasks score a causal LM; task.type is mlm"):
        Evaluator(config_for("task.type=mlm", f"eval.tasks=[{TASKS[0]}]"), gpt2, 50256, POSITIONS, [])
    with pytest.raises(ConfigError, match="two tasks .* named 'wiki-lastword'"):
        Evaluator(config_for(f"eval.tasks=[{TASKS[1]}, {TASKS[1]}]"), gpt2, 50256, POSITIONS, [])
    with pytest.raises(ConfigError, match="'data.valid' source name 'web/x' is not a plain word"):
        config_for('data.valid={"web/x": somewhere}')


def valid_split(directory: Path, tokenizer, gpt2_file: Path, text: str, rows: int) -> Path:
    """A valid split of `rows` packed rows of the text, written by the packer's shard writer."""
    directory.mkdir()
    ids = np.array(tokenizer.encode(text).ids[: rows * SEQ_LEN]).reshape(rows, SEQ_LEN)
    info = write_shard(Rows(ids, [[0]] * rows, ["wiki"] * rows), directory, 0, "uint16", 4)
    tokenizer_info = TokenizerInfo("gpt2", 50257, 50256, file_sha256(gpt2_file), "tokenizer.json")
    Manifest(seq_len=SEQ_LEN, dtype="uint16", tokenizer=tokenizer_info,
             shards=[info], split="valid", rows_per_sample=4).save(directory)
    return directory


def test_per_source_losses_equal_a_direct_computation(tmp_path, model, gpt2):
    """data.valid as a mapping: eval/<source>/loss each, the mean row loss over the rows eval_batches × lanes cover
    (here the whole split: 4 batches × 2 lanes = 8 rows), as one forward per row gives it."""
    gpt2.save(str(tmp_path / "tokenizer.json"))
    texts = [json.loads(line)["context"] for line in TASKS[1].read_text().splitlines()]
    splits = {name: valid_split(tmp_path / name, gpt2, tmp_path / "tokenizer.json", " ".join(part), 8)
              for name, part in (("early", texts[:60]), ("late", texts[-60:]))}
    config = config_for(f"data.valid={json.dumps({k: str(v) for k, v in splits.items()})}", "data.lanes=2",
                        "train.eval_batches=4", "data.verify=true")
    manifests = {name: load_manifest(path) for name, path in splits.items()}
    ctx = TaskContext(config, SEQ_LEN, gpt2, 50256, 50256, [], None)
    evaluator = Evaluator(config, gpt2, 50256, POSITIONS, validation_parts(None, ctx, manifests))
    try:
        scalars = evaluator.evaluate(LoadedModel(model)).scalars
    finally:
        evaluator.close()
    assert set(scalars) == {"early/loss", "early/perplexity", "late/loss", "late/perplexity"}
    for name, path in splits.items():
        rows = torch.from_numpy(_rows(manifests[name]))
        with torch.no_grad():
            direct = float(np.mean([model(input_ids=row[None], labels=row[None]).loss.item() for row in rows]))
        assert scalars[f"{name}/loss"] == pytest.approx(direct, rel=1e-6)
        assert scalars[f"{name}/perplexity"] == pytest.approx(math.exp(direct), rel=1e-6)
    assert scalars["early/loss"] != scalars["late/loss"]


def _rows(manifest: Manifest) -> np.ndarray:
    blocks = [rows for shard in manifest.shards for rows, _ in iter_blocks(manifest.shard_path(shard))]
    return np.concatenate(blocks).astype(np.int64)


def test_evaluate_on_an_export_needs_tasks_and_scores_as_the_loop(tmp_path, model, gpt2):
    model.save_pretrained(tmp_path)
    gpt2.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="nothing to score; give --tasks FILE"):
        evaluate_saved(tmp_path, False, None, None)
    config = config_for(f"eval.tasks=[{TASKS[1]}]", "eval.max_examples=5")
    in_loop = Evaluator(config, gpt2, 50256, POSITIONS, []).evaluate(LoadedModel(model)).scalars
    assert evaluate_saved(tmp_path, False, [str(TASKS[1])], 5) == {f"eval/{k}": v for k, v in in_loop.items()}


class DataRank(LoadedModel):
    """The model as data rank `rank` of `world` sees it; the one-process group's all-reduce adds nothing."""

    def __init__(self, model: torch.nn.Module, rank: int, world: int) -> None:
        super().__init__(model)
        self.data_rank, self.data_world = rank, world


@pytest.fixture
def wiki_valid(tmp_path, gpt2) -> Manifest:
    gpt2.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(json.loads(line)["context"] for line in TASKS[1].read_text().splitlines()[:80])
    return load_manifest(valid_split(tmp_path / "valid", gpt2, tmp_path / "tokenizer.json", text, 8))


@pytest.mark.parametrize("kind", ["causal_lm", "mlm"])
def test_eval_scores_the_same_rows_and_masks_at_a_world_size_the_lanes_do_not_divide(wiki_valid, gpt2, kind):
    """8 lanes over 3 data ranks: every rank runs the same forwards (3, 3 and 2 rows + one padding row whose labels
    count nothing), and together they score world 1's rows with world 1's labels (an MLM's masks included)."""
    config = config_for(f"task.type={kind}", "data.lanes=8", "train.eval_batches=1", "train.micro_batch=2")
    task = build_task(TaskContext(config, SEQ_LEN, gpt2, 50256, 50256, [], wiki_valid))
    try:
        def shares(rank: int, world: int) -> list[tuple[dict, torch.Tensor]]:
            return list(task.valid_micro_batches(DataRank(None, rank, world)))

        whole = shares(0, 1)
        ranks = [shares(rank, 3) for rank in range(3)]
    finally:
        task.close()
    assert [len(share) for share in ranks] == [2, 2, 2]  # forwards per rank: ceil(ceil(8 / 3) / 2)
    labels_of = lambda batches: torch.cat([inputs["labels"] for inputs, _ in batches])  # noqa: E731
    assert torch.equal(labels_of(ranks[2])[-1], torch.full((SEQ_LEN,), -100))  # rank 2's padding row
    real = {r: torch.cat([kept for _, kept in share]) for r, share in enumerate(ranks)}
    assert [int(k.sum()) for k in real.values()] == [3, 3, 2]
    dealt = torch.empty(8, SEQ_LEN, dtype=torch.long)
    for r, share in enumerate(ranks):  # rank r holds rows r, r + 3, …
        dealt[r::3] = labels_of(share)[real[r]]
    assert torch.equal(dealt, labels_of(whole))
    if kind == "mlm":
        assert (labels_of(whole) != -100).any()


def test_mlm_eval_loss_is_the_masked_token_mean(wiki_valid, gpt2):
    """Micro-batches with different numbers of masked tokens: the loss weighs each token once, not each batch."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=50258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=SEQ_LEN)).eval()
    config = config_for("task.type=mlm", "data.lanes=8", "train.eval_batches=1", "train.micro_batch=3")
    task = build_task(TaskContext(config, SEQ_LEN, gpt2, 50256, 50256, [], wiki_valid))
    try:
        scalars = task.evaluate(LoadedModel(bert)).scalars
        batches = list(task.valid_micro_batches(LoadedModel(bert)))
    finally:
        task.close()
    with torch.no_grad():
        logits = torch.cat([bert(**inputs).logits for inputs, _ in batches])
    labels = torch.cat([inputs["labels"] for inputs, _ in batches])
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert scalars["loss"] == pytest.approx(direct.item(), rel=1e-6)
