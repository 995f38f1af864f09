#!/usr/bin/env python3
"""Evaluation reference fixtures for dpoc (tests/fixtures/eval/): TRL 1.16's DPOTrainer.evaluate().

On the committed fixture models (tiny-llama, tiny-qwen2 and their -ref models) with the training pairs of
tests/fixtures/pairs.jsonl and the training config of tools/make_fixtures.py (TRAIN_CFG), the evaluation set is
the first EVAL_PAIRS pairs of pairs.jsonl, evaluated with per_device_eval_batch_size EVAL_BATCH: 7 pairs in batches
of 4 and 3, so neither the batch size nor 2 ranks divide it. For each model and for precompute_ref_log_probs false
and true, written to OUT/<model>-<ref|precomputed>.json:

  before   trainer.evaluate() before training (its log_history row)
  after3   trainer.train() (3 optimizer steps), then trainer.evaluate()

plus OUT/eval_pairs.jsonl (the evaluation set) and OUT/MANIFEST.json (versions, sha256 of every file). Every value
comes from TRL / transformers / torch, never from dpoc. Run by tools/make-fixtures (without arguments), or alone with
the fixtures venv:

    ~/.cache/dpoc/fixenv/bin/python tools/make_eval_fixtures.py [OUTDIR]    (default tests/fixtures/eval)
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO / "tests" / "fixtures" / "eval"

# make_fixtures reads its output directory from sys.argv[1] at import time and sets the environment (1 torch
# thread, offline HF libraries, deterministic algorithms) before importing torch: import it with a bare argv.
sys.path.insert(0, str(HERE))
_argv, sys.argv = sys.argv, sys.argv[:1]
import make_fixtures as mf  # noqa: E402

sys.argv = _argv

import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402

import time  # noqa: E402

import torch  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
mf.OUT = FIXTURES  # the committed models and pairs; nothing is written there
EVAL_PAIRS = 7
EVAL_BATCH = 4
# wall-clock keys of an evaluate() row
TIMING_KEYS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def load_rows():
    with open(FIXTURES / "pairs.jsonl") as f:
        return [json.loads(line) for line in f]


def evaluate_row(trainer):
    with mf.quiet():
        metrics = trainer.evaluate()
    row = dict(trainer.state.log_history[-1])
    # evaluate() returns what it logged (plus nothing else): the two must agree
    assert all(abs(row[k] - v) <= 1e-12 * max(1.0, abs(v)) for k, v in metrics.items() if k in row), (row, metrics)
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def make_case(model_name, train_ds, eval_ds, tok, tmp, precompute):
    cfg = dict(mf.TRAIN_CFG)
    cfg.update(per_device_eval_batch_size=EVAL_BATCH, precompute_ref_log_probs=precompute, eval_strategy="no")
    policy = mf.load_model(FIXTURES / model_name)
    ref = mf.load_model(FIXTURES / f"{model_name}-ref")
    with mf.quiet():
        trainer = mf.FixtureDPOTrainer(
            model=policy, ref_model=ref, args=mf.base_args(tmp, **cfg), train_dataset=train_ds,
            eval_dataset=eval_ds, processing_class=tok,
        )
    before = evaluate_row(trainer)
    with mf.quiet():
        trainer.train()
    after3 = evaluate_row(trainer)
    assert before["step"] == 0 and after3["step"] == cfg["max_steps"], (before, after3)
    return {
        "config": {**cfg, "eval_pairs": EVAL_PAIRS},
        "before": before,
        "after3": after3,
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rows = load_rows()
    eval_rows = rows[:EVAL_PAIRS]
    assert EVAL_PAIRS % EVAL_BATCH and EVAL_PAIRS % 2
    with open(OUT / "eval_pairs.jsonl", "w") as f:
        for r in eval_rows:
            f.write(json.dumps(r) + "\n")
    train_ds, eval_ds, tok = mf.pairs_dataset(rows), mf.pairs_dataset(eval_rows), mf.build_tokenizer()
    files = ["eval_pairs.jsonl"]
    with tempfile.TemporaryDirectory(prefix="dpoc-eval-fixtures-") as tmp:
        for model_name in mf.MODELS:
            for precompute in (False, True):
                res = make_case(model_name, train_ds, eval_ds, tok, tmp, precompute)
                name = f"{model_name}-{'precomputed' if precompute else 'ref'}.json"
                mf.write_json(OUT / name, res)
                files.append(name)
                mf.log(f"{name}: eval_loss before {res['before']['eval_loss']:.6f}, after 3 steps "
                       f"{res['after3']['eval_loss']:.6f}")
    import datasets
    import transformers
    import trl

    manifest = {
        "generator": "tools/make_eval_fixtures.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__,
                     "datasets": datasets.__version__},
        "files": {f: hashlib.sha256((OUT / f).read_bytes()).hexdigest() for f in files},
    }
    mf.write_json(OUT / "MANIFEST.json", manifest)


if __name__ == "__main__":
    mf.T0 = time.monotonic()  # make_fixtures' log() counts from its own start, set only when run as a script
    main()
