"""Model compression after training: evaluate, prune, quantize (distillation is a training option, trainer.distill).

    python -m trainer evaluate MODEL --data VALID_DIR
    python -m trainer compress prune MODEL --sparsity 0.5 [--structured ffn|layers|heads] --out DIR [--data VALID_DIR]
    python -m trainer compress quantize MODEL --method int8-dynamic|int4-weight --out DIR [--data VALID_DIR]

MODEL is a run directory (its export/ is used), a complete checkpoint, a `save_pretrained`
directory, or a directory `compress quantize` wrote (`load_quantized`). Pruned models are plain
`save_pretrained` directories, so a recovery finetune is an ordinary run with `model.pretrained=DIR`.
"""

