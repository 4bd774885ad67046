"""lm-evaluation-harness's `hf` model on a dstrain export, offline: `python lm_eval_side.py EXPORT TASK_DIR`.

TASK_DIR holds wiki-continuation.jsonl (multiple choice) and wiki-lastword.jsonl (cloze) in dstrain's task format;
this writes lm-eval task YAMLs reading them through the `json` dataset builder and prints lm-eval's results as JSON.
Run as its own process: the offline switches must be set before `datasets` and `transformers` are imported.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CHOICE = """task: wiki_continuation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
CLOZE = """task: wiki_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: target
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main(export: str, task_dir: str) -> None:
    tasks = Path(task_dir)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tasks / "hf"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    (tasks / "wiki_continuation.yaml").write_text(CHOICE.format(path=tasks / "wiki-continuation.jsonl"))
    (tasks / "wiki_lastword.yaml").write_text(CLOZE.format(path=tasks / "wiki-lastword.jsonl"))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", device="cpu", batch_size=8,
                                  tasks=["wiki_continuation", "wiki_lastword"], num_fewshot=0, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    print(json.dumps({task: {k.split(",")[0]: v for k, v in scores.items() if k.endswith(",none")}
                      for task, scores in out["results"].items()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
