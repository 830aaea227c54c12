"""``callbacks=[...,task_eval]``: few-shot tasks scored every N optimizer steps during training, and logged.

Options (``+callback_options.task_eval.KEY=VALUE``): ``tasks`` (shipped names or task YAML
paths), ``every_n_steps``, ``num_fewshot``, ``limit`` (documents per task), ``batch_size``,
``seed``. Logged as ``tasks/<task>/<metric>`` (acc, acc_norm, exact_match, perplexity).

Every rank runs the same forward passes (so a sharded model works; the numbers are the same
on each) and the model is put back in training mode afterwards. Scoring draws no random
numbers (greedy decoding), so runs resume exactly with the callback on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L

from lmkit.errors import ConfigError

METRICS = ("acc", "acc_norm", "exact_match", "perplexity")


@dataclass
class TaskEvalConfig:
    """Options of ``task_eval`` (see the module docstring)."""

    tasks: list = field(default_factory=lambda: ["shakespeare_next_line"])
    every_n_steps: int = 250
    num_fewshot: int = 0
    limit: int | None = 100
    batch_size: int = 8
    seed: int = 1234

    def __post_init__(self):
        from lmkit.evaluation.tasks import load_task

        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if not self.tasks:
            raise ConfigError("callback_options.task_eval.tasks is empty: name at least one task")
        for name in ("every_n_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"callback_options.task_eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_fewshot < 0:
            raise ConfigError(f"callback_options.task_eval.num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"callback_options.task_eval.limit must be >= 1 (or null: all), got {self.limit}")
        for t in self.tasks:  # a misspelled or malformed task fails before training starts
            load_task(t)


class TaskEval(L.Callback):
    """Scores :attr:`TaskEvalConfig.tasks` every ``every_n_steps`` steps and at the end of training."""

    def __init__(self, cfg: TaskEvalConfig | None = None):
        self.cfg = cfg or TaskEvalConfig()
        self._tasks = None
        self._last_step = -1
        self.history: list[dict] = []  # {"step", "<task>/<metric>": value, ...} of each evaluation

    def on_fit_start(self, trainer, pl_module):
        from lmkit.evaluation.tasks import check_task_fits, load_task

        self._tasks = [load_task(t) for t in self.cfg.tasks]
        for task in self._tasks:
            check_task_fits(task, pl_module.model.kind)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0 and step != self._last_step:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module) -> None:
        from lmkit.evaluation.scorer import Scorer
        from lmkit.evaluation.tasks import evaluate_task

        model = pl_module.model
        tokenizer = trainer.datamodule.tokenizer
        was_training = model.training
        model.eval()
        try:
            scorer = Scorer(model, tokenizer, getattr(model.cfg, "name", ""), batch_size=self.cfg.batch_size)
            record = {"step": trainer.global_step}
            for task in self._tasks:
                result = evaluate_task(scorer, task, self.cfg.num_fewshot, self.cfg.seed, self.cfg.limit)
                for metric in METRICS:
                    if metric in result:
                        record[f"{task.name}/{metric}"] = float(result[metric])
        finally:
            model.train(was_training)
        self._last_step = trainer.global_step
        self.history.append(record)
        metrics = {f"tasks/{k}": v for k, v in record.items() if k != "step"}
        for logger in trainer.loggers:
            if trainer.is_global_zero:
                logger.log_metrics(metrics, step=trainer.global_step)


def build_task_eval(cfg: TaskEvalConfig | None) -> L.Callback:
    return TaskEval(cfg)
