"""Build every piece of a run from a validated config, and train."""
from __future__ import annotations

import atexit
import csv
import dataclasses
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from lmkit.checkpoint import (CHECKPOINT_DIR, AtomicCheckpointIO, StepCheckpoint, check_checkpoint_fits,
                              check_same_data, read_training_state, resolve_auto_resume, resolve_resume)
from lmkit.config.validate import RunConfig
from lmkit.data.cache import default_cache_dir
from lmkit.data.datamodule import LMDataModule
from lmkit.data.mixture import build_val_source
from lmkit.errors import CheckpointError, ConfigError, did_you_mean
from lmkit.module import LMModule
from lmkit.preemption import Preemption
from lmkit.process_exit import close_process_group
from lmkit.quiet import ProgressBar, quiet_lightning
from lmkit.tokenizers.trained import load_tokenizer_file


@dataclass
class BuiltRun:
    trainer: L.Trainer
    module: LMModule
    datamodule: LMDataModule
    tokenizer: object
    ckpt_path: Path | None
    start_step: int = 0  # the checkpoint's optimizer step (0 for a fresh start)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_tokenizer(run: RunConfig, source, cache_dir: Path):
    required = getattr(run.objective_component.factory, "required_tokenizer", None)  # e.g. a distillation teacher's
    if required is not None and (tokenizer := required(run.objective)) is not None:
        return tokenizer
    needed = getattr(run.objective_component.factory, "sentinels_needed", None)
    tok_cfg = run.tokenizer
    if needed is not None:
        tok_cfg = dataclasses.replace(tok_cfg, num_sentinels=max(tok_cfg.num_sentinels, needed(run.objective, run.data.seq_len)))
    own = getattr(source, "tokenizer_for", None)  # a token store (data=litdata) brings the tokenizer it was written with
    if own is not None:
        return own(tok_cfg)
    return run.tokenizer_component.factory(tok_cfg, source, cache_dir)


def build_model(run: RunConfig, tokenizer, pm):
    model_cfg = run.model
    if getattr(model_cfg, "vocab_size", None) is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    elif model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); set model.vocab_size=null to take the tokenizer's size.")
    model = run.model_component.factory(model_cfg)
    set_chars = getattr(model, "set_token_chars", None)  # a character-level input (ELMo's char CNN) reads the tokens
    if callable(set_chars):
        set_chars(tokenizer)
    pm.configure_model(model=model, run=run)
    if getattr(model_cfg, "compile", False):
        compile_model(model, run.trainer.compile_backend, run.trainer.compile_mode)
    return model


def compile_model(model, backend: str, mode: str) -> None:
    """``torch.compile`` the model's forward in place (parameter names and checkpoints unchanged).

    Objective heads and losses stay eager: their shapes depend on the noise (e.g. the
    number of masked tokens), which would recompile the graph every step.
    """
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):  # debug backends (aot_eager, ...) are valid too
        common = torch._dynamo.list_backends()
        raise ConfigError(f"trainer.compile_backend={backend!r} is not a torch.compile backend.{did_you_mean(backend, common)} "
                          f"Common ones: {', '.join(common)} (debugging: eager, aot_eager).")
    model.compile(backend=backend, mode=None if mode == "default" else mode)


def _loggers(run: RunConfig, run_dir: Path):
    cfg = run.logger
    if cfg.name == "none":
        return False
    if cfg.name == "csv":
        return RunCSVLogger(run_dir)
    if cfg.name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(str(run_dir), name="", version="tb")
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") or _wandb_logged_in() else "offline"
    logger = WandbLogger(project=cfg.project, entity=cfg.entity, save_dir=str(run_dir), offline=mode == "offline",
                         mode=mode if mode == "disabled" else None, tags=list(cfg.tags),
                         config=OmegaConf.to_container(run.raw, resolve=True))
    # Lightning always passes wandb's deprecated `anonymous` setting (None here), and wandb then
    # warns that it has no effect: leave it out of the init arguments
    if getattr(logger, "_wandb_init", {}).get("anonymous", 0) is None:
        del logger._wandb_init["anonymous"]
    return logger


def _keep_previous_csv(path: Path) -> Path | None:
    """Keep an earlier attempt's log as ``metrics.1.csv``, ``metrics.2.csv``, ... (Lightning's
    CSVLogger would delete it); return where it went."""
    if not path.exists():
        return None
    n = 1
    while path.with_name(f"metrics.{n}.csv").exists():
        n += 1
    kept = path.with_name(f"metrics.{n}.csv")
    os.replace(path, kept)
    return kept


def _stitch_csv(kept: Path, path: Path, first_row: int) -> list[str]:
    """Start ``path`` with the rows of ``kept`` logged before step ``first_row``; return its header."""
    with open(kept, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and float(r["step"]) < first_row]
    if not header:
        return []
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return header


class RunLogWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a log already in the directory is kept (and stitched)."""

    def __init__(self, log_dir: str, resume_row: int | None):
        self.resume_row = resume_row
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv (and warns)
        path = Path(self.metrics_file_path)
        kept = _keep_previous_csv(path)
        if kept is not None and self.resume_row is not None:
            self.metrics_keys = _stitch_csv(kept, path, self.resume_row)


class RunCSVLogger(CSVLogger):
    """CSV log of the whole run in ``RUN_DIR/logs/metrics.csv``, over every attempt.

    Written at every logging step (not every 100): a killed attempt keeps its log up to the
    kill. An attempt that resumes the run in its own directory keeps the earlier log as
    ``metrics.N.csv`` (untouched), starts ``metrics.csv`` with its rows of the steps before
    ``resume_row`` (the checkpoint's data position: the step the attempt starts at), then
    appends its own rows: one log of the run, each step once. An attempt that starts fresh in
    a directory with a log keeps that log as ``metrics.N.csv`` and starts an empty one.
    """

    def __init__(self, run_dir: Path, resume_row: int | None = None):
        super().__init__(str(run_dir), name="", version="logs", flush_logs_every_n_steps=1)
        self.resume_row = resume_row

    @property
    @rank_zero_experiment
    def experiment(self) -> RunLogWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = RunLogWriter(self.log_dir, self.resume_row)
        return self._experiment


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_run(run: RunConfig, pm, run_dir: Path) -> BuiltRun:
    """Everything the run needs, checked before any training step (and before writing files)."""
    L.seed_everything(run.seed, workers=True, verbose=False)
    # the process group Lightning creates for this run outlives it; tear it down before the
    # interpreter does (for API users under torchrun; the CLI also does so when it returns)
    atexit.unregister(close_process_group)
    atexit.register(close_process_group)
    cache_dir = Path(run.data.cache_dir) if run.data.cache_dir else default_cache_dir()
    ckpt_path, notes = (None, [])
    if run.resume == "auto":  # same command for the first start and every restart (fixed hydra.run.dir)
        ckpt_path, notes = resolve_auto_resume(run_dir)
    elif run.resume:
        ckpt_path, notes = resolve_resume(str(run.resume))
    for n in notes:
        print(f"lmkit: {n}")
    ckpt_state = {}
    if ckpt_path is not None:
        print(f"lmkit: resuming from {ckpt_path}", flush=True)
        ckpt_state = read_training_state(ckpt_path)
    init = None
    if run.raw.get("init_from"):  # existing weights: the source decides the model sizes and the tokenizer
        from lmkit.interop.init import prepare_init

        init = prepare_init(run)
        run = init.run
    source = run.dataset_component.factory(run.data)
    val_source = build_val_source(run.data, run.dataset_component)  # data.val_path, or None
    read_as = getattr(run.objective_component.factory, "data_source", None)  # e.g. sft: records -> packed rows
    if read_as is not None:
        source = read_as(run.objective, run.data, source)
    tokenizer = (init.tokenizer if init is not None else None) or build_tokenizer(run, source, cache_dir)
    if ckpt_path is not None:
        saved = ckpt_path.parent.parent / "tokenizer.json"
        if saved.exists() and _saved_tokenizer(saved).fingerprint() != tokenizer.fingerprint():
            raise CheckpointError(
                f"the tokenizer of this run does not match the one the checkpoint was trained with ({saved}). "
                f"Use the same tokenizer settings as the checkpoint's run (see {saved.parent / 'config.yaml'})."
            )
    objective = run.objective_component.factory(run.objective, tokenizer)
    datamodule = None
    if getattr(objective, "example_based", False):  # one example per record: the data's classes size the heads
        datamodule = objective.make_datamodule(run, source, tokenizer, cache_dir, data_steps=lambda: module.data_steps)
    model = build_model(run, tokenizer, pm)
    objective.attach(model)
    if init is not None and ckpt_path is None:  # a resumed run's weights come from its checkpoint
        init.apply(model, objective)
    elif ckpt_path is None and callable(getattr(objective, "init_model", None)):  # e.g. a student from its teacher
        objective.init_model(model)
    plan = run.strategy_component.factory(run.strategy)
    opt_c, sched_c = run.optimizer_component, run.scheduler_component
    module = LMModule(
        model, objective,
        optimizer_factory=lambda groups: opt_c.factory(groups, run.optimizer),
        scheduler_factory=lambda opt, total: sched_c.factory(opt, run.scheduler, total),
        weight_decay=getattr(run.optimizer, "weight_decay", 0.0),
        gradient_clip=run.trainer.gradient_clip, max_nonfinite_steps=run.trainer.max_nonfinite_steps,
        parallelize=(lambda m: plan.parallelize(m, run)) if plan.parallelize else None,
        plan_forward_backward=plan.forward_backward, plan_evaluate=plan.evaluate,
    )
    if ckpt_path is not None:
        check_checkpoint_fits(module, ckpt_path)
    if getattr(model, "stream_order", False) and datamodule is not None:  # its own records: no stream to follow
        raise ConfigError(f"model.memory_len={getattr(model, 'memory_len', '?')}: the recurrence memory needs the "
                          f"packed text stream, but objective '{run.objective_component.name}' serves separate "
                          f"examples; set model.memory_len=0")
    if datamodule is None:
        from lmkit.data.litdata_store import LitdataStore

        datamodule_cls = LMDataModule
        if isinstance(source, LitdataStore):  # data=litdata: streamed by litdata's loader
            from lmkit.data.litdata_module import LitdataDataModule as datamodule_cls
        datamodule = datamodule_cls(run.data, source, tokenizer, objective, run.data.seq_len, run.seed, cache_dir,
                                  run.trainer.val_batches, data_steps=lambda: module.data_steps,
                                  stream_order=getattr(model, "stream_order", False),  # recurrence memory
                                  val_source=val_source)
    datamodule.prepare()
    module.data_fingerprint = datamodule.fingerprint()  # saved in checkpoints, compared on resume
    if getattr(datamodule, "mixture", None) is not None:  # val/<name>/loss per source
        module.val_by_source = datamodule.mixture.metrics(getattr(objective, "scores_every_byte", False))
    if getattr(datamodule, "val_lengths", None):  # val/len<L>/loss per extra validation length
        from lmkit.data.mixture import SourceMetrics
        from lmkit.data.val_lengths import metric_names

        module.val_by_length = SourceMetrics(metric_names(datamodule.val_lengths),
                                             getattr(objective, "scores_every_byte", False))
    if ckpt_path is not None:
        note = check_same_data(ckpt_state["lmkit"].get("data"), module.data_fingerprint, ckpt_path,
                               allow_change=bool(run.raw.get("resume_allow_data_change", False)))
        if note:
            print(f"lmkit: warning: {note}", file=sys.stderr, flush=True)
    trainer = build_trainer(run, run_dir, plan)
    in_own_dir = ckpt_path is not None and ckpt_path.parent.parent.resolve() == Path(run_dir).resolve()
    if in_own_dir:  # the run goes on in its own directory: its log from the checkpoint's step, its checkpoints
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.resume_row = int(ckpt_state["lmkit"]["data_steps"])
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, StepCheckpoint):
                callback.resumes_own_dir = True
    return BuiltRun(trainer, module, datamodule, tokenizer, ckpt_path, int(ckpt_state.get("global_step", 0)))


def _saved_tokenizer(path: Path):
    """The tokenizer a resumed checkpoint was trained with (its run directory's tokenizer.json)."""
    try:
        return load_tokenizer_file(path)
    except Exception as e:  # not JSON, not a tokenizer, unreadable
        raise CheckpointError(
            f"'{path}', the tokenizer the checkpoint was trained with, is damaged ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}). Restore it from a copy, or delete it to resume without "
            f"comparing tokenizers (the tokenizer settings are in {path.parent / 'config.yaml'})."
        ) from None


def build_trainer(run: RunConfig, run_dir: Path, plan) -> L.Trainer:
    t = run.trainer
    callbacks = [
        StepCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=t.keep_last_k, monitor="global_step",
                        mode="max", save_last=True),
    ]
    callbacks += [Preemption()] + [c.factory(run.callback_configs.get(c.name)) for c in run.callbacks]
    if t.progress_bar:
        callbacks.append(ProgressBar())
    quiet_lightning()
    plugins = [AtomicCheckpointIO()] if getattr(plan, "atomic_checkpoints", True) else []
    trainer = L.Trainer(
        max_steps=t.max_steps, max_time=t.max_time, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, precision=t.precision,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=plan.strategy,
        logger=_loggers(run, run_dir), callbacks=callbacks, enable_progress_bar=t.progress_bar,
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False, default_root_dir=str(run_dir),
        plugins=plugins, enable_model_summary=False,
        inference_mode=False,  # metric states are reset inside validation; inference tensors could not be updated later
    )
    set_dist_timeout(trainer.strategy, t.dist_timeout_s)
    return trainer


def set_dist_timeout(strategy, seconds: float) -> None:
    """``trainer.dist_timeout_s`` as the process-group timeout of any Lightning strategy that has one.

    A rank that dies or hangs then makes the others' next collective fail after this long
    instead of torch's default 30 minutes. Set after the Trainer resolved its strategy (so
    ``strategy=auto`` and plugin strategies get it too) and before ``fit`` creates the group.
    """
    if hasattr(strategy, "_timeout"):
        strategy._timeout = timedelta(seconds=seconds)


def save_run_files(run: RunConfig, built: BuiltRun, run_dir: Path) -> None:
    """The resolved config and the tokenizer, next to the checkpoints."""
    if built.trainer.global_rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(run.raw, resolve=True))
    tmp = run_dir / f".tokenizer.json.tmp{os.getpid()}"
    built.tokenizer.save(tmp)
    os.replace(tmp, run_dir / "tokenizer.json")


#: variables Lightning's distributed strategies set in os.environ for the processes they start
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED",
                     "PL_SEED_WORKERS")


@contextmanager
def process_state_kept():
    """Leave the process as the run found it: torch's thread count and the launch variables.

    Lightning's distributed strategies set ``torch.set_num_threads(cores // local ranks)`` when
    OMP_NUM_THREADS is unset, and export MASTER_ADDR, MASTER_PORT, LOCAL_RANK ... ; a second run
    in the same process (the API, a sweep, a test suite) would otherwise compute with another
    thread count (other float rounding: not the same losses) and see a half-set launch.
    """
    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARIABLES}
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(run: RunConfig, pm, run_dir: Path) -> dict:
    """Train; return a summary with the validation metrics at the start and the end.

    A run stopped by SIGTERM/SIGUSR1 returns early with ``summary["preempted"]`` =
    ``{"signal", "step", "checkpoint"}`` (see :mod:`lmkit.preemption`); otherwise it is None.
    The process's thread count and launch variables are as before the run when it returns.
    """
    with process_state_kept():
        return _train(run, pm, run_dir)


def _train(run: RunConfig, pm, run_dir: Path) -> dict:
    built = build_run(run, pm, run_dir)
    save_run_files(run, built, run_dir)
    if built.trainer.global_rank == 0:
        print(f"lmkit: run directory {run_dir}", flush=True)
    trainer, module, dm = built.trainer, built.module, built.datamodule
    # counted before fit: parallelism plugins then leave each rank only its shard or stage
    n_params = sum(p.numel() for p in module.model.parameters())
    start = end = preempted = None
    try:
        validates = getattr(dm, "has_validation", run.data.val_fraction > 0)  # val_fraction, val_path or a mixture's
        if built.ckpt_path is None and run.trainer.validate_at_start and validates:
            trainer.validate(module, datamodule=dm, verbose=False)
            start = module.history[-1] if module.history else None
        trainer.fit(module, datamodule=dm, ckpt_path=str(built.ckpt_path) if built.ckpt_path else None)
        if validates and (not module.history or module.history[-1]["step"] != trainer.global_step):
            trainer.validate(module, datamodule=dm, verbose=False)
        end = module.history[-1] if module.history else None
    except SIGTERMException:  # the Preemption callback saved the step just finished
        callback = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        preempted = callback.info or {"signal": callback.signal_name or "SIGTERM", "step": trainer.global_step,
                                      "checkpoint": None}
    from lmkit.accounting.callback import ComputeAccounting

    accounting = next((c for c in trainer.callbacks if isinstance(c, ComputeAccounting)), None)
    # steps: the run's optimizer steps in total; steps_trained: by this call (a resumed run started at resumed_from)
    return {"start": start, "end": end, "steps": trainer.global_step, "steps_trained": trainer.global_step - built.start_step,
            "resumed_from": built.start_step if built.ckpt_path is not None else None, "params": n_params,
            "preempted": preempted, "run_dir": str(run_dir), "checkpoint_dir": str(run_dir / CHECKPOINT_DIR),
            "compute": accounting.summary() if accounting is not None else None}


def format_summary(summary: dict) -> str:
    def fmt(m):
        if not m:
            return "n/a"
        parts = [f"loss {m['val/loss']:.4f}"]
        if "val/ppl" in m:
            parts.append(f"perplexity {m['val/ppl']:.3f}")
        if "val/bpb" in m:  # causal LM only: the other objectives score a sample of the tokens
            parts.append(f"bits/byte {m['val/bpb']:.3f}")
        return ", ".join(parts)

    trained = f"trained {summary.get('steps_trained', summary['steps'])} steps"
    if summary.get("resumed_from") is not None:  # a resume: steps trained now, and in total
        trained += f" ({summary['steps']} in total)"
    lines = [f"{trained}, {summary['params'] / 1e6:.2f}M parameters"]
    if summary["start"]:
        lines.append(f"validation at start: {fmt(summary['start'])}")
    lines.append(f"validation at end:   {fmt(summary['end'])}")
    if summary.get("compute"):
        from lmkit.accounting.callback import format_compute

        lines.append(format_compute(summary["compute"]))
    lines.append(f"checkpoints: {summary['checkpoint_dir']}")
    return "\n".join(lines)
