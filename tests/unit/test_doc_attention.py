"""Document attention: a packed row computes what its documents compute one by one.

The rows go through the tasks' own `inputs` (positions from `trainer.data.doc_positions`, as the
loader builds them) into tiny Hugging Face models in fp32; the references run each document alone
with no position ids and no mask, so they share no code path with the packed forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config, LlamaConfig

from data_tools.manifest import doc_starts_array
from data_tools.tokenize import load_tokenizer
from trainer.config import ConfigError, load_config
from trainer.data import doc_positions
from trainer import document_attention
from trainer.document_attention import NAME, attend_within_documents
from trainer.models import attention_kernel
from trainer.tasks import TaskContext, build_task, doc_attention

pytestmark = pytest.mark.usefixtures("one_process_group")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
SEQ_LEN, VOCAB = 48, 300
# documents per row, as lengths; the first continues a document from the previous row (no start at 0)
ROWS = [[7, 12, 1, 20, 8], [30, 18], [48]]


def packed_rows(lengths: list[list[int]]) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """[rows, 2, SEQ_LEN] rows as the loader gives them (tokens, document positions) and each row's document spans."""
    tokens = torch.randint(0, VOCAB, (len(lengths), SEQ_LEN), generator=torch.Generator().manual_seed(1))
    spans = [[(sum(row[:i]), sum(row[: i + 1])) for i in range(len(row))] for row in lengths]
    starts = [[first for first, _ in row[1:]] for row in spans]  # where the pack step records a document start
    positions = torch.from_numpy(doc_positions(doc_starts_array(starts), SEQ_LEN).astype(np.int64))
    return torch.stack([tokens, positions], 1), spans


def task_for(task_type: str, tokenizer=None):
    config = load_config(DEMO, [f"task.type={task_type}"])
    return build_task(TaskContext(config, SEQ_LEN, tokenizer, 0, 0, [], None, doc_attention=True))


def test_doc_positions_count_from_each_start_and_from_the_row_start():
    positions = doc_positions(doc_starts_array([[3, 5], [], [1]]), 7)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]]


def decoder(arch: str, kernel: str) -> torch.nn.Module:
    """A tiny decoder in fp32 (Llama with grouped KV heads) attending through `kernel`: transformers' SDPA with its
    dense document mask, or SDPA per document span (trainer.document_attention)."""
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ_LEN)
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=SEQ_LEN)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    assert attend_within_documents(model) if kernel == NAME else kernel == "sdpa"
    return model


@pytest.mark.parametrize("kernel", ["sdpa", NAME])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_row_loss_is_the_token_weighted_loss_of_its_documents_run_alone(arch, kernel):
    model = decoder(arch, kernel)
    rows, spans = packed_rows(ROWS)
    task = task_for("causal_lm")
    with torch.no_grad():
        packed = model(**task.inputs(rows, 0)).loss.item()
        task.one_row = True  # how flash-attn gets the rows (one row end to end): the same documents, the same loss
        one_row = model(**task.inputs(rows, 0)).loss.item()
        total = count = 0.0
        for row, row_spans in zip(rows[:, 0], spans):
            for first, stop in row_spans:
                if stop - first > 1:  # a one-token document has no target
                    doc = row[None, first:stop]
                    total += model(input_ids=doc, labels=doc).loss.item() * (stop - first - 1)
                    count += stop - first - 1
        plain = model(input_ids=rows[:, 0], labels=rows[:, 0]).loss.item()
    assert packed == pytest.approx(total / count, rel=1e-5) and one_row == pytest.approx(total / count, rel=1e-5)
    assert abs(plain - packed) > 1e-3  # attending across documents is measurably different


def test_per_span_sdpa_gives_the_dense_mask_gradients_and_runs_no_dense_mask(monkeypatch):
    """Backward too: the documents kernel's loss and every gradient match transformers' dense-mask SDPA, and the per-document
    path really ran (document indices reached the attention, no [rows, 1, L, L] mask was built)."""
    rows, _ = packed_rows(ROWS)
    inputs = task_for("causal_lm").inputs(rows, 0)
    masks = []
    spans = document_attention.document_spans
    monkeypatch.setattr(document_attention, "document_spans", lambda documents: masks.append(documents) or spans(documents))
    results = {}
    for kernel in ("sdpa", NAME):
        model = decoder("llama", kernel).train()
        loss = model(**inputs).loss
        loss.backward()
        results[kernel] = loss, {name: p.grad for name, p in model.named_parameters()}
    assert len(masks) == 2 and all(m.dtype == torch.long and m.shape == (len(ROWS), SEQ_LEN) for m in masks)
    (dense_loss, dense_grads), (span_loss, span_grads) = results["sdpa"], results[NAME]
    torch.testing.assert_close(span_loss, dense_loss, rtol=1e-5, atol=0)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(span_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_documents_kernel_is_plain_sdpa_for_unpacked_and_padded_rows():
    """One document per row: no mask at all (SDPA's is_causal); a padding mask: transformers' own dense path."""
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    padding = torch.ones_like(ids)
    padding[1, 40:] = 0
    plain, documents = decoder("llama", "sdpa"), decoder("llama", NAME)
    with torch.no_grad():
        for kwargs in ({"position_ids": torch.arange(5, 5 + SEQ_LEN).expand(2, -1)}, {"attention_mask": padding}):
            torch.testing.assert_close(documents(input_ids=ids, use_cache=False, **kwargs).logits,
                                       plain(input_ids=ids, use_cache=False, **kwargs).logits, rtol=0, atol=0)
    assert document_attention.document_mask(2, 4, 4) is None
    assert document_attention.document_mask(2, 4, 4, attention_mask=padding[:, :4].bool()) is None  # all real tokens
    assert document_attention.document_mask(2, SEQ_LEN, SEQ_LEN, attention_mask=padding.bool()).shape == (2, 1, SEQ_LEN, SEQ_LEN)


def test_models_the_documents_kernel_was_not_checked_on_keep_the_dense_mask():
    other = AutoModelForMaskedLM.from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, vocab_size=VOCAB))
    other.config.model_type = "roberta"  # a model type whose masks were not checked against the per-span kernel
    assert not attend_within_documents(other) and other.config._attn_implementation == "sdpa"
    eager = decoder("gpt2", "sdpa")
    eager.config._attn_implementation = "eager"
    assert not attend_within_documents(eager) and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("kernel", ["sdpa", NAME])
def test_a_packed_bert_row_attends_within_each_document_both_ways(gpt2_dir, kernel):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(gpt2_dir).tokenizer
    model = AutoModelForMaskedLM.from_config(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB + 1,
        max_position_embeddings=SEQ_LEN)).float().eval()
    assert attend_within_documents(model) if kernel == NAME else kernel == "sdpa"
    rows, spans = packed_rows(ROWS)
    inputs = task_for("mlm", tokenizer).inputs(rows, 0)
    assert torch.equal(inputs["position_ids"], rows[:, 1])
    ids = torch.where(inputs["input_ids"] < VOCAB, inputs["input_ids"], VOCAB)  # the [MASK] id past the tiny vocabulary
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=inputs["position_ids"]).logits
        for r, row_spans in enumerate(spans):
            for first, stop in row_spans:
                alone = model(input_ids=ids[r : r + 1, first:stop]).logits[0]
                torch.testing.assert_close(packed[r, first:stop], alone, rtol=1e-5, atol=1e-5)


def test_the_first_token_of_each_document_is_no_target():
    rows, spans = packed_rows(ROWS)
    labels = task_for("causal_lm").inputs(rows, 0)["labels"]
    for r, row_spans in enumerate(spans):
        assert [int(i) for i in (labels[r] == -100).nonzero()] == [first for first, _ in row_spans]


class _Split:
    """A manifest's two attributes `doc_attention` reads."""

    def __init__(self, has_doc_starts: bool, directory: str = "data/train") -> None:
        self.has_doc_starts, self.directory, self.format_version = has_doc_starts, directory, 2 if has_doc_starts else 1


@pytest.mark.parametrize(
    ("overrides", "splits", "expected"),
    [
        ([], [True, True], True),
        ([], [True, False], False),  # an old valid split: off, as before
        (["data.doc_attention=false"], [True], False),
        (["task.type=mlm"], [True], True),
        (["task.type=mlm", "task.sentence_task=sop"], [True], False),
        (["task.type=classification"], [False], False),
    ],
)
def test_doc_attention_is_on_by_default_where_every_split_has_document_starts(overrides, splits, expected):
    config = load_config(DEMO, overrides)
    assert doc_attention(config, [_Split(s) for s in splits]) is expected


@pytest.mark.parametrize(
    ("overrides", "splits", "message"),
    [
        ([], [True, False], r"data.doc_attention true: data/train has no document starts \(format_version 1\); prepare it "
                            r"again with this dstrain, or set it false"),
        (["task.type=sft"], [False], r"data.doc_attention true: task.type sft reads no packed rows"),
        (["task.type=mlm", "task.sentence_task=nsp"], [True], r"task.sentence_task nsp pairs the two halves of a row"),
    ],
)
def test_doc_attention_on_where_it_cannot_apply_is_refused_in_one_line(overrides, splits, message):
    config = load_config(DEMO, [*overrides, "data.doc_attention=true"])
    with pytest.raises(ConfigError, match=message) as err:
        doc_attention(config, [_Split(s) for s in splits])
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusals")
@pytest.mark.parametrize(("kernel", "message"), [
    ("flex_attention", r"model.attention flex_attention: torch .* has no flex attention backward on CPU; use sdpa or auto"),
    ("flash_attention_2", r"model.attention flash_attention_2: needs CUDA, precision bf16 and the flash-attn package"),
])
def test_attention_kernels_that_cannot_train_here_are_refused(kernel, message):
    assert attention_kernel(load_config(DEMO)) == {}  # auto on CPU: the model's default (SDPA)
    assert attention_kernel(load_config(DEMO, ["model.attention=sdpa"])) == {"attn_implementation": "sdpa"}
    with pytest.raises(ConfigError, match=message):
        attention_kernel(load_config(DEMO, [f"model.attention={kernel}"]))
