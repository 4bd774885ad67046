"""Pipeline layouts that cannot run are refused at start with one line naming the setting; stages split layers as
`trainer plan` counts them and attend within documents as the unsplit model does; FSDP2 checkpoints written before
optimizer state was keyed by parameter name still load."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import tasks
from trainer.config import ConfigError, load_config
from trainer.parallel.pipeline import DecoderStage, check_layout, stage_layers
from trainer.plan import Shape
from trainer.plan_mesh import Mesh, in_flight, layers_of_rank, layouts, plan_mesh, rank_params
from trainer.tasks import doc_attention

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"  # global batch 16, micro-batch 4
PP2 = ("engine.type=fsdp2", "parallel.pp=2")


def tiny_llama(layers: int = 4, tied: bool = False) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, tie_word_embeddings=tied))


def test_micro_batches_default_to_the_accumulation_steps():
    config = load_config(DEMO, list(PP2))
    assert check_layout(config, tiny_llama(), pp=2, local_batch=16) == 4  # 16 rows / micro-batch 4, one data-parallel rank
    assert check_layout(config, tiny_llama(), pp=2, local_batch=8) == 2  # two data-parallel ranks


@pytest.mark.parametrize(
    "overrides, model, message",
    [
        (["parallel.pp_microbatches=3"], tiny_llama(), "parallel.pp_microbatches 3 does not divide the 16 rows"),
        (["parallel.pp_schedule=interleaved_1f1b"], tiny_llama(), "set parallel.pp_stages_per_rank >= 2"),
        (["parallel.pp_stages_per_rank=2"], tiny_llama(), "parallel.pp_schedule 1f1b runs one stage per rank"),
        (["parallel.pp_microbatches=1"], tiny_llama(), "1f1b needs at least parallel.pp = 2 micro-batches, got 1"),
        (["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"], tiny_llama(layers=3),
         "3 layers do not fill parallel.pp × parallel.pp_stages_per_rank = 2 × 2 = 4 stages of at least one layer"),
        (["task.type=mlm"], tiny_llama(), "causal-LM pretraining only, not task.type mlm"),
        (["optim.layer_decay=0.9"], tiny_llama(), "layer-wise LR"),
    ],
)
def test_a_layout_that_cannot_run_is_refused_in_one_line(overrides, model, message):
    config = load_config(DEMO, [*PP2, *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check_layout(config, model, pp=2, local_batch=16)
    assert "\n" not in str(err.value)


def test_interleaved_micro_batches_must_make_whole_rounds():
    config = load_config(DEMO, [*PP2, "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2",
                                "parallel.pp_microbatches=7"])
    with pytest.raises(ConfigError, match="7 micro-batches do not make whole rounds; use a multiple of 2"):
        check_layout(config, tiny_llama(), pp=2, local_batch=14)


def test_stages_attend_within_documents_as_the_unsplit_model_does():
    """Two stages given the document positions compute the unsplit model's logits with the same positions (a mask
    per document), not those of plain causal attention over the row."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    tokens = torch.randint(0, 64, (2, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 0]])
    first, last = DecoderStage(model, [0, 1], True, False, tp=1), DecoderStage(model, [2, 3], False, True, tp=1)
    with torch.no_grad():
        want = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
        got = last(first(tokens, position_ids=positions), position_ids=positions)
        plain = last(first(tokens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, want, rtol=1e-3, atol=1e-4)  # the documents' masks and positions matter here


def test_stages_split_layers_as_plan_counts_them():
    """Uneven splits give the first stages one more layer, as trainer.plan_mesh.layers_of_rank assumes."""
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stage_layers(7, 4) == [[0, 1], [2, 3], [4, 5], [6]]
    config = load_config(DEMO, [*PP2, "model.num_layers=7", "parallel.pp_schedule=looped_bfs", "parallel.pp_stages_per_rank=2"])
    mesh = Mesh.of(config, 2)
    assert mesh.stages_per_rank == 2
    assert [layers_of_rank(Shape.of(config.model, 64, 8), mesh, r) for r in range(2)] == [4, 3]  # stages 0, 2 | 1, 3
    assert in_flight(mesh, 0) == mesh.microbatches * 2  # breadth first: every chunk's forwards before its backwards


def test_a_checkpoint_with_optimizer_state_in_param_groups_still_loads(tmp_path, one_process_group):
    """Checkpoints now key optimizer state by parameter name (any stage layout loads them); the earlier form,
    param groups as lists, is read as it was written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainer.engines.fsdp2_engine import BY_NAME, GROUPED, FSDP2Engine

    config = load_config(DEMO, ["engine.type=fsdp2", "engine.zero_stage=null", "train.micro_batch=16"])

    def engine(seed: int) -> FSDP2Engine:
        torch.manual_seed(seed)
        return FSDP2Engine(tiny_llama(), config, world_size=1, total_steps=10)

    old, rows = engine(0), torch.randint(0, 64, (2, 8))
    old.backward(old.forward(input_ids=rows, labels=rows).loss)
    old.step()
    model_state, optim_state = get_state_dict(old.model, old.optimizer, options=GROUPED)
    assert "lr" in optim_state["param_groups"][0]
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path / "step_000001" / "dcp"))
    (tmp_path / "step_000001" / "scheduler.json").write_text(json.dumps(old.scheduler.state_dict()))
    new = engine(1)
    new.load(tmp_path, "step_000001")
    want, got = (get_state_dict(e.model, e.optimizer, options=BY_NAME) for e in (old, new))
    for name, value in {**want[0], **want[1]}.items():
        loaded = {**got[0], **got[1]}[name]
        assert torch.equal(loaded.full_tensor(), value.full_tensor()) if hasattr(value, "full_tensor") else loaded == value, name


@pytest.mark.parametrize("tied", [True, False])
def test_plan_search_offers_pipelines_with_tied_and_untied_embeddings(tied):
    config = load_config(DEMO, ["engine.type=fsdp2", f"model.tie_embeddings={str(tied).lower()}"])
    pipelined = [mesh for mesh in layouts(Shape.of(config.model, 64, 8), config, 8, 8, 8) if mesh.pp > 1]
    assert pipelined


def test_plan_counts_the_tied_embeddings_copy_and_its_gradient_all_reduce():
    """Tied, the last rank holds a copy of the embedding as its head, and the first and last ranks all-reduce its fp32
    gradient shard (2 ranks: the shard's bytes) once a step on top of the stage sends."""
    mesh = Mesh(dp_shard=2, tp=2, pp=2, microbatches=4, rows=1)
    config = load_config(DEMO, ["engine.type=fsdp2"])
    tied, untied = (Shape.of(replace(config.model, tie_embeddings=flag), 96, 32) for flag in (True, False))
    embed = 96 * tied.hidden // 2
    assert rank_params(tied, mesh, 1).total == rank_params(untied, mesh, 1).total  # a copy: the untied head's size
    sends = {shape.tied: next(t for t in plan_mesh(shape, mesh, 32, "bf16", 8).traffic if t.dimension == "pp")
             for shape in (tied, untied)}
    assert sends[True].bytes - sends[False].bytes == pytest.approx(4 * embed / 2)
    assert "tied embedding" in sends[True].what


def test_a_tied_head_is_a_copy_on_the_last_stage_and_its_optimizer_state_is_saved_once():
    """The optimizer state names of the head copy map to the embedding's and back; the last stage saves none."""
    from trainer.parallel.pipeline import EMBED, HEAD, head_copy_as_embedding, untie, without_head_copy

    model = tiny_llama(tied=True)
    untie(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    state = {f"state.{HEAD}.exp_avg": 1, f"param_groups.{HEAD}.lr": 2, "state.lm_head.weight_scale.step": 3,
             "state.model.norm.weight.step": 4}
    assert without_head_copy(state) == {"state.lm_head.weight_scale.step": 3, "state.model.norm.weight.step": 4}
    request = head_copy_as_embedding(state)
    assert request == {f"state.{EMBED}.exp_avg": 1, f"param_groups.{EMBED}.lr": 2, "state.lm_head.weight_scale.step": 3,
                       "state.model.norm.weight.step": 4}
    assert head_copy_as_embedding(request, back=True) == state


class _Split:
    """A manifest with document starts, as trainer.tasks.doc_attention reads it."""

    has_doc_starts, directory, format_version = True, "data/train", 2


def test_document_attention_is_on_under_pipeline_parallel():
    assert doc_attention(load_config(DEMO, list(PP2)), [_Split()]) is True


def test_document_attention_with_flash_attn_under_pipeline_parallel_is_refused_in_one_line(monkeypatch):
    """flash-attn needs CUDA: the kernel choice `auto` makes on a GPU with it installed is stood in for here."""
    monkeypatch.setattr(tasks, "attention_kernel", lambda config: {"attn_implementation": "flash_attention_2"})
    assert doc_attention(load_config(DEMO, list(PP2)), [_Split()]) is False  # unset: off, as where it cannot apply
    with pytest.raises(ConfigError, match=re.escape("data.doc_attention true: flash-attn reads documents from one row laid "
                                                    "end to end, which pipeline stages (parallel.pp > 1) cannot split")) as err:
        doc_attention(load_config(DEMO, [*PP2, "data.doc_attention=true"]), [_Split()])
    assert "\n" not in str(err.value)
