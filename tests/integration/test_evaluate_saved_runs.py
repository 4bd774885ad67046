"""Evaluation during training and after it: per-source losses and downstream tasks in the loop (2 FSDP2 processes), and
`python -m trainer evaluate` on the saved checkpoint and export giving the in-loop numbers of that step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.manifest import load_manifest
from tests.integration.conftest import STEPS
from tests.integration.trainer_runs import ENV, metrics, train
from trainer.compress.evaluate import evaluate as evaluate_packed
from trainer.evaluate import evaluate_saved

ROOT = Path(__file__).resolve().parents[2]
TASKS = [str(ROOT / "examples" / "eval" / name) for name in ("wiki-continuation.jsonl", "wiki-lastword.jsonl")]

pytestmark = pytest.mark.slow


def evaluate(*args: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-m", "trainer", "evaluate", *args], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def trained(config_file, token_data, tmp_path_factory) -> tuple[Path, dict[int, dict[str, float]]]:
    """A 2-process FSDP2 run with two validation sources and both downstream tasks, the best checkpoint by one of
    them; (run directory, the eval scalars logged at each eval step)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    sources = {"web": str(token_data / "tokens/valid"), "train": str(token_data / "tokens/train")}
    train(config_file, 2, run, "engine.type=fsdp2", f"data.valid={json.dumps(sources)}", f"eval.tasks={json.dumps(TASKS)}",
          "eval.max_examples=24", "eval.batch_size=10", "train.best_metric=eval/wiki-lastword/perplexity", "train.best_mode=min")
    logged = {m["step"]: {k.removeprefix("eval_"): v for k, v in m.items() if k.startswith("eval_")}
              for m in metrics(run) if any(k.startswith("eval_") for k in m)}
    return run, logged


def test_evaluate_on_a_checkpoint_and_its_export_equals_the_in_loop_values(trained):
    run, logged = trained
    assert sorted(logged) == [4, STEPS]
    expected = {f"{s}/{m}" for s in ("web", "train") for m in ("loss", "perplexity")} | {
        "wiki-continuation/acc", "wiki-continuation/acc_norm", "wiki-lastword/acc", "wiki-lastword/perplexity"}
    assert set(logged[4]) == expected and logged[4] != logged[STEPS]
    assert logged[4]["web/loss"] != logged[4]["train/loss"]

    at_4 = evaluate("--checkpoint", str(run / "checkpoints" / "step_000004"))  # one process; the run had two
    assert set(at_4) == {f"eval/{k}" for k in expected}
    for name, value in logged[4].items():
        assert at_4[f"eval/{name}"] == pytest.approx(value, rel=1e-6, abs=1e-9), name
        if name.endswith("acc") or name.endswith("acc_norm"):
            assert at_4[f"eval/{name}"] == value, name  # counts: exactly

    best = min(logged, key=lambda step: logged[step]["wiki-lastword/perplexity"])
    assert (run / "checkpoints" / "best").read_text().strip() == f"step_{best:06d}"
    exported = evaluate_saved(run / "export", False, TASKS, 24)  # the run exported its best checkpoint
    assert set(exported) == {f"eval/{k}" for k in expected if k.startswith("wiki-")}
    for name, value in exported.items():
        assert value == pytest.approx(logged[best][name.removeprefix("eval/")], rel=1e-6), name


def short_tasks(directory: Path, examples: int = 24) -> Path:
    """The first examples of both tasks with each choice cut to its first four words: the test model takes 64
    tokens and lm-eval refuses a continuation longer than that (this one cuts it)."""
    directory.mkdir()
    choice = [json.loads(line) for line in Path(TASKS[0]).read_text().splitlines()[:examples]]
    for example in choice:
        example["choices"] = [" " + " ".join(c.split()[:4]) for c in example["choices"]]
    (directory / "wiki-continuation.jsonl").write_text("".join(json.dumps(e) + "\n" for e in choice))
    (directory / "wiki-lastword.jsonl").write_text("".join(Path(TASKS[1]).read_text().splitlines(True)[:examples]))
    return directory


def test_lm_eval_harness_scores_the_export_as_the_trainer_does(trained, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")
    run, _ = trained
    tasks = short_tasks(tmp_path / "tasks")
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "lm_eval_side.py"), str(run / "export"), str(tasks)],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.splitlines()[-1])
    files = [str(tasks / name) for name in ("wiki-continuation.jsonl", "wiki-lastword.jsonl")]
    ours = evaluate_saved(run / "export", False, files, None)
    choice, cloze = theirs["wiki_continuation"], theirs["wiki_lastword"]
    assert (ours["eval/wiki-continuation/acc"], ours["eval/wiki-continuation/acc_norm"]) == (choice["acc"], choice["acc_norm"])
    assert ours["eval/wiki-lastword/acc"] == cloze["acc"]
    assert ours["eval/wiki-lastword/perplexity"] == pytest.approx(cloze["perplexity"], rel=1e-5)  # lm-eval sums in fp32


def test_evaluate_scores_packed_rows_per_document_as_the_loop_does(config_file, token_data, tmp_path):
    """`evaluate MODEL --data VALID` on a checkpoint of a document-attention run gives the loop's eval/loss: one lane and
    as many eval batches as valid rows make the loop score every row once, in forwards of one row each, weighted by
    their targets (fewer where documents start). The same checkpoint with its run's data.doc_attention set false is
    scored across documents."""
    valid = token_data / "tokens/valid"
    rows = sum(shard.rows for shard in load_manifest(valid).shards)
    run = tmp_path / "run"
    train(config_file, 1, run, "engine.type=fsdp2", "data.lanes=1", "train.max_steps=2", "train.eval_every=2",
          "train.ckpt_every=2", f"train.eval_batches={rows}")
    logged = next(m["eval_loss"] for m in metrics(run) if "eval_loss" in m)
    checkpoint = run / "checkpoints" / "step_000002"
    assert evaluate_packed(checkpoint, valid).metrics["loss"] == pytest.approx(logged, rel=1e-6)

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["config"]["data"]["doc_attention"] = False
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    across = evaluate_packed(checkpoint, valid).metrics["loss"]
    assert across != pytest.approx(logged, rel=1e-6)
