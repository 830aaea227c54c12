"""``python -m lmkit [train] [overrides]``: compose a run with Hydra, validate it, train.

Everything the user can get wrong (names, keys, values, combinations, every job of a sweep)
is checked before Hydra creates a run directory. A resumed run continues in the directory
of the run it resumes (``fork=true`` starts a new one); under torchrun or SLURM every rank
uses the one directory rank 0 chose.
"""
from __future__ import annotations

import shutil
import sys
from datetime import datetime
from pathlib import Path

from lmkit.errors import ConfigError, LmkitError

EXIT_USAGE = 2
EXIT_PREEMPTED = 3
RUN_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def prepare(argv: list[str], pm):
    """Parsed and checked arguments, with the objective's natural model filled in when none is named."""
    from lmkit.config.compose import check_overrides, split_args

    args = check_overrides(split_args(list(argv)), pm.config_dirs(), pm.registries["model_extension"].names(),
                           pm=pm)
    if "objective" in args.group_choices and "model" not in args.group_choices:
        defaults = {pm.get("objective", o).meta.get("default_model") for o in args.group_choices["objective"]}
        defaults.discard(None)
        if len(defaults) == 1:
            default = defaults.pop()
            args.overrides.append(f"model={default}")
            args.group_choices["model"] = [default]
    return args


def preflight(args, pm) -> None:
    """Compose and validate every job (each combination of a sweep) before anything is written."""
    from lmkit.config.compose import compose_config, expand_sweeps
    from lmkit.config.validate import resolve_run
    from lmkit.launch import apply_launch

    config_dirs = pm.config_dirs()
    for overrides in expand_sweeps(args.overrides):
        choice = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("model=")), None)
        run = resolve_run(compose_config(config_dirs, overrides), pm, model_choice=choice)
        apply_launch(run.trainer)  # explicit devices/num_nodes must agree with torchrun/SLURM


def main(argv: list[str]) -> int:
    from lmkit.plugins import get_plugin_manager

    pm = get_plugin_manager()
    args = prepare(argv, pm)
    if "--help" in args.hydra_flags or "-h" in args.hydra_flags:
        from lmkit.commands.help import main as show_help

        return show_help([])
    if "--version" in args.hydra_flags:
        from lmkit.commands.help import version_main

        return version_main([])
    preflight(args, pm)
    if "--cfg" not in args.hydra_flags and "-c" not in args.hydra_flags:  # --cfg only prints the config
        _choose_run_dir(args)
        _check_output_dirs(args)
    return _run_hydra(pm.config_dirs(), args)


def hydra_help() -> int:
    """Hydra's own ``--hydra-help`` (its flags), for the config tree lmkit composes."""
    from lmkit.config.compose import ParsedArgs
    from lmkit.plugins import get_plugin_manager

    return _run_hydra(get_plugin_manager().config_dirs(), ParsedArgs([], ["--hydra-help"]))


def _override_value(overrides: list[str], key: str) -> str | None:
    for o in reversed(overrides):
        k, _, v = o.lstrip("+").partition("=")
        if k == key:
            return v
    return None


def _resume_run_dir(resume: str) -> Path | None:
    """The run directory a resume continues in: the run of the checkpoint (None when it has none).

    ``resume=RUN_DIR``, ``resume=last`` and ``resume=RUN_DIR/checkpoints/X.ckpt`` continue in
    ``RUN_DIR``; a checkpoint elsewhere starts a new directory. A path the file system cannot
    look up (a name too long, a file used as a directory) is refused here, before Hydra runs.
    """
    from lmkit.checkpoint import CHECKPOINT_DIR, check_resume_path, newest_run_dir

    resume = resume.strip("'\"")
    if resume in ("", "null", "None", "auto"):
        return None
    if resume == "last":
        return newest_run_dir()
    check_resume_path(resume)
    p = Path(resume)
    for run_dir in (p, p.parent.parent if p.parent.name == CHECKPOINT_DIR else None):
        if run_dir is not None and (run_dir / CHECKPOINT_DIR).is_dir():
            return run_dir
    return None


def _choose_run_dir(args) -> None:
    """Add ``hydra.run.dir``/``hydra.sweep.dir`` overrides: the resumed run's own directory, and the same
    directory for every rank of a distributed launch."""
    from lmkit.launch import detect_launch, shared_run_dir

    if any(o.lstrip("+").startswith(RUN_DIR_KEYS) for o in args.overrides):
        return  # the user chose
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    chosen = None
    resume = _override_value(args.overrides, "resume")
    fork = (_override_value(args.overrides, "fork") or "false").lower() == "true"
    now = datetime.now()
    if resume and not args.multirun:
        run_dir = _resume_run_dir(resume)
        if run_dir is not None and not fork:
            chosen = str(run_dir)
        elif run_dir is not None:  # a fork started within the second its run started must not land in it
            fresh = Path(f"outputs/{now:%Y-%m-%d}/{now:%H-%M-%S}")
            n = 0
            while (fresh.with_name(f"{fresh.name}-{n}") if n else fresh).exists():
                n += 1
            chosen = str(fresh.with_name(f"{fresh.name}-{n}")) if n else None
    if detect_launch() is not None:
        default = chosen or f"{'multirun' if args.multirun else 'outputs'}/{now:%Y-%m-%d}/{now:%H-%M-%S}"
        chosen = shared_run_dir(default)
    if chosen is not None:
        args.overrides.append(f"{key}={_quote(chosen)}")


def _check_output_dirs(args) -> None:
    """The run (or sweep) directory can be created: Hydra would create it first and fail with a traceback."""
    from lmkit.config.schema import check_creatable_dir

    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    given = _override_value(args.overrides, key)
    check_creatable_dir(key, given.strip("'\"") if given else ("multirun" if args.multirun else "outputs"))


def _quote(path: str) -> str:
    """A path as a Hydra override value (quoted when it has characters Hydra's grammar reserves)."""
    if any(c in path for c in " ,=[]{}()'\"\\:$*?"):
        return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return path


def _report_preemption(info: dict, run_dir: Path, overrides: list[str]) -> int:
    """One line on stderr: which signal stopped the run, where its checkpoint is, how to resume."""
    kept = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra."))]
    command = " ".join(["python -m lmkit", *kept, f"resume={run_dir.resolve()}"])
    print(f"lmkit: stopped by {info.get('signal', 'SIGTERM')} at step {info.get('step')}; checkpoint saved: "
          f"{info.get('checkpoint')}. Resume with: {command}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def _holds_only_hydra_files(directory: Path) -> bool:
    return directory.is_dir() and not any(p.name != ".hydra" and p.suffix != ".log" for p in directory.iterdir())


def remove_if_nothing_saved(run_dir: Path, existed: bool = False) -> None:
    """A run refused before its first checkpoint leaves no directory behind.

    Only a directory holding nothing but Hydra's own files (``.hydra/``, ``*.log``) is
    removed, and never one that existed before this command (a user's ``hydra.run.dir``).
    """
    if existed or not _holds_only_hydra_files(run_dir):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    _remove_empty_parents(run_dir)


def _remove_empty_parents(path: Path) -> None:
    cwd = Path.cwd().resolve()
    parent = path.resolve().parent
    while parent != cwd and cwd in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _remove_refused_sweep(sweep_dir: Path) -> None:
    """A sweep whose every job was refused leaves no ``multirun/`` directory."""
    if not sweep_dir.is_dir():
        return
    if all(_holds_only_hydra_files(p) or p.suffix == ".yaml" for p in sweep_dir.iterdir()):
        shutil.rmtree(sweep_dir, ignore_errors=True)
        _remove_empty_parents(sweep_dir)


def _run_hydra(config_dirs: list[str], args) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    searchpath = [f"hydra.searchpath=[{','.join('file://' + d for d in config_dirs[1:])}]"] if len(config_dirs) > 1 else []
    state = {"rc": 0, "ok": 0, "sweep_dir": None, "error": None, "ends": {}}
    given_dir = _override_value(args.overrides, "hydra.run.dir")
    existed = given_dir is not None and Path(given_dir.strip("'\"")).exists()

    @hydra.main(config_path=config_dirs[0], config_name="config", version_base="1.3")
    def task(cfg):
        from omegaconf import OmegaConf

        from lmkit.config.validate import resolve_run
        from lmkit.launch import is_rank_zero
        from lmkit.plugins import get_plugin_manager
        from lmkit.train import format_summary, train

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode.name == "MULTIRUN"
        if multirun:
            state["sweep_dir"] = Path(hydra_cfg.sweep.dir)
        choice = hydra_cfg.runtime.choices.get("model")
        OmegaConf.set_struct(cfg, False)
        try:
            run = resolve_run(cfg, get_plugin_manager(), model_choice=choice)
            summary = train(run, get_plugin_manager(), run_dir)
            if summary["preempted"]:
                state["rc"] = _report_preemption(summary["preempted"], run_dir, args.overrides)
                raise SystemExit(state["rc"])
            state["ok"] += 1
            if multirun and summary["end"]:  # the sweep's table falls back on it for a job without a csv log
                state["ends"][int(hydra_cfg.job.num)] = summary["end"]
            if is_rank_zero():
                print(format_summary(summary), flush=True)
            return summary["end"]["val/loss"] if summary["end"] else None
        except LmkitError as e:
            remove_if_nothing_saved(run_dir, existed=existed and not multirun)
            if not multirun:  # leave through Hydra's runner without its error report; main raises it
                state["error"] = e
                raise SystemExit(EXIT_USAGE)
            from lmkit.cli import _fail  # the one error line of every verb (rank 0 only, one line)

            state["rc"] = _fail(str(e))
            return None

    sys.argv = [sys.argv[0]] + args.hydra_flags + args.overrides + searchpath
    try:
        task()
    except SystemExit as e:
        if state["error"] is not None:
            raise state["error"] from None
        if isinstance(e.code, str):  # Hydra's own usage errors
            raise ConfigError(e.code.strip().splitlines()[-1]) from None
        return int(e.code or 0)
    finally:
        from lmkit.process_exit import close_process_group

        close_process_group()
        if state["sweep_dir"] is not None and state["ok"] == 0:
            _remove_refused_sweep(state["sweep_dir"])
    if state["sweep_dir"] is not None and state["ok"]:
        _print_sweep_summary(state["sweep_dir"], state["ends"])
    return state["rc"]


def _print_sweep_summary(sweep_dir: Path, ends: dict[int, dict]) -> None:
    """After a multirun's last job: its jobs best first (``lmkit summarize``), printed on rank 0."""
    from lmkit.commands.summarize import report
    from lmkit.launch import is_rank_zero

    if not is_rank_zero():
        return
    try:
        print(f"sweep summary ({sweep_dir}):\n{report(sweep_dir, ends=ends)}", flush=True)
    except (LmkitError, OSError) as e:  # the jobs ran; a table that cannot be written is no reason to fail
        print(f"lmkit: warning: no sweep summary: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
