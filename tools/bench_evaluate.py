"""Evaluation speed: lmkit's scorer vs lm-eval's HF backend on the same exported model and task, and task
accuracy of a trained run vs the same model at initialisation.

    python tools/bench_evaluate.py RUN_DIR [--task shakespeare_next_line] [--batch 8] [--repeats 3]

Both sides score the same (context, continuation) requests, built by lmkit's task code (lm-eval
would build the same ones, see tests/evaluation/test_lm_eval.py), in one process on this
machine's CPU threads; each timing is the best of ``--repeats`` rounds, the sides alternating within a round. lm-eval's side is
``HFLM(pretrained=EXPORT).loglikelihood`` at batch size 1 (its default) and at ``--batch``;
lmkit's is :meth:`lmkit.evaluation.scorer.Scorer.loglikelihood` at ``--batch``. Prints a table and
writes JSON next to this file's docs (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _requests(task, limit):
    prompts = task.prompts(0, limit=limit)
    if task.output_type == "multiple_choice":
        return [(p, task.target_delimiter + c) for d, p in prompts for c in task.choices(d)]
    return [(p, str(task.target(d))) for d, p in prompts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--task", default="shakespeare_next_line")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench_evaluate.json"))
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmkit.evaluation.run import load_model
    from lmkit.evaluation.scorer import Scorer
    from lmkit.evaluation.tasks import evaluate_task, load_task
    from lmkit.interop.exporter import export_model

    task = load_task(args.task)
    requests = _requests(task, args.limit)
    loaded = load_model(args.run)
    scorer = Scorer(loaded.model, loaded.tokenizer, loaded.architecture, batch_size=args.batch)
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(loaded.model, loaded.tokenizer, Path(tmp) / "hf")
        instances = [Instance("loglikelihood", {}, req, i) for i, req in enumerate(requests)]
        sides = {f"lm-eval hf, batch {b}": (lambda lm=HFLM(pretrained=str(Path(tmp) / "hf"), device="cpu", batch_size=b):
                                            lm.loglikelihood(instances, disable_tqdm=True)) for b in (1, args.batch)}
        sides[f"lmkit scorer, batch {args.batch}"] = lambda: scorer.loglikelihood(requests)
        for _ in range(args.repeats):  # rounds alternate the sides: the shared VM's speed drifts between minutes
            for name, fn in sides.items():
                seconds, _ = _best(fn, 1)
                rows[name] = min(rows.get(name, float("inf")), seconds)

    trained = evaluate_task(scorer, task, limit=args.limit)
    torch.manual_seed(0)
    fresh_model = type(loaded.model)(loaded.model.cfg).eval()
    fresh = evaluate_task(Scorer(fresh_model, loaded.tokenizer, loaded.architecture, batch_size=args.batch), task,
                          limit=args.limit)

    print(f"{args.task}: {len(requests)} requests; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    base = rows[f"lm-eval hf, batch {args.batch}"]
    for name, seconds in rows.items():
        print(f"  {name:<24} {seconds:7.3f} s  {len(requests) / seconds:8.1f} req/s  "
              f"{base / seconds:5.2f}x lm-eval at batch {args.batch}")
    keys = [k for k in ("acc", "acc_norm", "exact_match") if k in trained]
    print("  accuracy, trained vs initialisation: " + ", ".join(f"{k} {trained[k]:.3f} vs {fresh[k]:.3f}" for k in keys)
          + (f" (chance {trained['chance']:.3f})" if "chance" in trained else ""))
    record = {"task": args.task, "requests": len(requests), "seconds": rows, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "trained": {k: trained[k] for k in keys}, "initialisation": {k: fresh[k] for k in keys},
              "run": str(args.run)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
