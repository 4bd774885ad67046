"""Document attention at the cost of plain causal attention: SDPA run over each document's span of a packed row.

Given restarting position ids, Hugging Face models build a dense block-diagonal boolean mask [rows, 1, L, L],
and SDPA with a mask attends every query to every key of the row: on CPU it loses the causal block skipping
of `is_causal` and costs 0.75× the tokens/s of the unmasked row. Registered here under the attention
implementation `sdpa_documents` (transformers' AttentionInterface and AttentionMaskInterface, no change to
the model classes):

- the mask builder returns each token's document index ([rows, L] int64) instead of the dense mask, read
  once per forward from the model's own mask function (two neighbours are in one document exactly when the
  later may attend to the earlier), so the rule that splits documents stays transformers' own;
- the attention runs SDPA with `is_causal` (without it for encoders, whose modules say `is_causal = False`)
  on each document's span, so the work is the sum of the squared document lengths instead of L²; rows that
  hold one document go through one batched call, as without document attention.

Anything else (a padding mask, a cache, queries shorter than keys, no packed rows in the batch) takes
transformers' SDPA path unchanged, so the implementation computes what `sdpa` does for every input.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

NAME = "sdpa_documents"
# model types whose masks come from transformers' causal / bidirectional mask functions with no window or
# overlay (a sliding window would be lost by splitting into whole documents); checked exact in the tests
MODEL_TYPES = ("llama", "gpt2", "bert")


def document_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                  device: torch.device | str = "cpu", **kwargs) -> torch.Tensor | None:
    """The document index of every token ([rows, L] int64), None where every row is one document; a dense
    mask from transformers' `sdpa_mask` where a padding mask or a cache is involved."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded or q_offset or kv_offset or q_length != kv_length:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         device=device, **kwargs)
    rows = torch.arange(batch_size, device=device)[:, None]
    later = torch.arange(1, q_length, device=device)[None]
    continues = mask_function(rows, torch.zeros_like(rows), later, later - 1).expand(batch_size, q_length - 1)
    if bool(continues.all()):
        return None
    return torch.nn.functional.pad((~continues).long(), (1, 0)).cumsum(1)


def document_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA per document span when `attention_mask` holds document indices (`document_mask`), else transformers' SDPA."""
    if attention_mask is None or attention_mask.dtype != torch.long:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return attend_per_document(query, key, value, attention_mask, dropout, scaling, causal), None


@torch.compiler.disable  # the spans are data: traced, every new layout of documents would compile the block again
def attend_per_document(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, documents: torch.Tensor,
                        dropout: float, scaling: float | None, causal: bool) -> torch.Tensor:
    """[rows, L, heads, head_dim] attention output of SDPA run on each document's span of each row."""
    grouped = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=causal,
                                                                **grouped)

    whole, lengths = document_spans(documents)
    # rows by unbind, documents by split, results by cat and stack: their backward passes concatenate gradients,
    # where a slice's would fill a zero tensor of the whole input for every document
    rows = [t.unbind(0) for t in (query, key, value)]
    out: list[torch.Tensor | None] = [None] * len(query)
    if whole:
        together = attend(*(torch.stack([part[row] for row in whole]) for part in rows))
        for row, result in zip(whole, together.unbind(0)):
            out[row] = result
    for row, sizes in lengths.items():  # 4-d spans: CPU SDPA takes its flash kernel for 4-d inputs only, else the math path
        spans = zip(*(part[row].split(sizes, 1) for part in rows))
        out[row] = torch.cat([attend(q[None], k[None], v[None])[0] for q, k, v in spans], 1)
    return torch.stack(out).transpose(1, 2).contiguous()


def document_spans(documents: torch.Tensor) -> tuple[list[int], dict[int, list[int]]]:
    """(rows holding a single document, {row: its documents' lengths} of the other rows) from document indices."""
    length = documents.shape[1]
    starts: dict[int, list[int]] = {}
    for row, offset in (documents[:, 1:] != documents[:, :-1]).nonzero().tolist():
        starts.setdefault(row, [0]).append(offset + 1)
    whole = [row for row in range(len(documents)) if row not in starts]
    return whole, {row: [stop - first for first, stop in zip(firsts, [*firsts[1:], length])] for row, firsts in starts.items()}


AttentionInterface.register(NAME, document_sdpa)
AttentionMaskInterface.register(NAME, document_mask)


def attend_within_documents(model: torch.nn.Module) -> bool:
    """Switch a model that attends with SDPA to the per-document kernel (True); other kernels (flash-attn's varlen,
    eager) and other model types keep transformers' own document mask, exact but dense (False)."""
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not models or any(m.config.model_type not in MODEL_TYPES or m.config._attn_implementation != "sdpa" for m in models):
        return False
    for m in models:
        m.config._attn_implementation = NAME
    return True
