"""lm-evaluation-harness, offline: the lmkit backend gives the log-likelihoods lmkit's own evaluator gives on the
same task (1e-5), ``--model hf`` runs on an exported directory, and the lmkit-lm-eval command line works."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _lm_eval(tmp_path, model, model_args, task, limit, num_fewshot=0):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lmkit.evaluation.lm_eval_backend  # noqa: F401
    from lmkit.evaluation.tasks import lm_eval_yaml

    include = tmp_path / "tasks"
    lm_eval_yaml(task, include)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                                   num_fewshot=num_fewshot, log_samples=True,
                                   task_manager=TaskManager(include_path=str(include)))


def _their_loglikelihoods(result, task):
    """(context, continuation) -> log-likelihood, from lm-eval's logged samples."""
    out = {}
    for sample in result["samples"][task]:
        for args, resp in zip(sample["arguments"], sample["resps"]):
            args = tuple(args.values()) if isinstance(args, dict) else tuple(args)
            out[args[:2]] = resp[0][0]
    return out


@pytest.mark.parametrize("task", ["shakespeare_next_line", "shakespeare_last_word"])
def test_lmkit_backend_equals_lmkit_evaluator(eval_run, tmp_path, task):
    from lmkit.evaluation.run import load_model
    from lmkit.evaluation.scorer import Scorer
    from lmkit.evaluation.tasks import evaluate_task, load_task

    result = _lm_eval(tmp_path, "lmkit", f"run={eval_run}", task, limit=8)
    theirs = _their_loglikelihoods(result, task)
    loaded = load_model(eval_run)
    t = load_task(task)
    scorer = Scorer(loaded.model, loaded.tokenizer, loaded.architecture)
    ours = evaluate_task(scorer, t, limit=8)
    prompts = t.prompts(0, limit=8)
    requests = ([(p, t.target_delimiter + c) for d, p in prompts for c in t.choices(d)]
                if t.output_type == "multiple_choice" else [(p, str(t.target(d))) for d, p in prompts])
    assert set(theirs) == set(requests)  # the same prompts and continuations
    for request, ll in zip(requests, ours["loglikelihoods"]):
        assert theirs[request] == pytest.approx(ll, abs=1e-5)
    metrics = result["results"][task]
    assert metrics["acc,none"] == pytest.approx(ours["acc"])


def test_lm_eval_hf_backend_loads_an_exported_run(eval_run, tmp_path):
    import lmkit.cli

    assert lmkit.cli.main(["export", str(eval_run), str(tmp_path / "hf")]) == 0
    result = _lm_eval(tmp_path, "hf", f"pretrained={tmp_path / 'hf'},device=cpu", "shakespeare_next_line", limit=4)
    metrics = result["results"]["shakespeare_next_line"]
    assert 0 <= metrics["acc,none"] <= 1 and len(result["samples"]["shakespeare_next_line"]) == 4


def test_lmkit_lm_eval_command_line(eval_run, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmkit.evaluation.lm_eval_cli", "--model", "lmkit", "--model_args",
                          f"run={eval_run}", "--tasks", "arithmetic_2ds", "--limit", "3"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "arithmetic_2ds" in out.stdout and "exact_match" in out.stdout
