"""``python -m lmkit [overrides]``: compose a run with Hydra, validate it, train.

Everything the user can get wrong (names, keys, values, combinations, data, checkpoints)
is checked before Hydra creates the run directory; errors print one message and exit 2.
"""
from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

from lmkit.errors import LmkitError

EXIT_USAGE = 2
EXIT_PREEMPTED = 3


def _fail(message: str) -> int:
    print(f"lmkit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _quiet_third_party() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    for pattern in (".*does not have many workers.*", ".*`isinstance.*LeafSpec.*", ".*torch.jit.*",
                    ".*The number of training batches.*", ".*GPU available but not used.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    if argv[:1] == ["plugins"]:
        from lmkit.plugins import main as list_plugins

        return list_plugins()
    try:
        from lmkit.config.compose import check_overrides, compose_config, first_values, split_args
        from lmkit.config.validate import resolve_run
        from lmkit.plugins import get_plugin_manager

        pm = get_plugin_manager()
        config_dirs = pm.config_dirs()
        args = check_overrides(split_args(argv), config_dirs, pm.registries["model_extension"].names())
        if "objective" in args.group_choices and "model" not in args.group_choices:
            objective = pm.get("objective", args.group_choices["objective"][0])
            if objective.meta.get("default_model"):
                args.overrides.append(f"model={objective.meta['default_model']}")
                args.group_choices["model"] = [objective.meta["default_model"]]
        if "--help" not in args.hydra_flags and "-h" not in args.hydra_flags:
            # pre-flight: compose and validate every choice before Hydra writes anything
            sweep_models = args.group_choices.get("model", [None])
            for choice in sweep_models:
                overrides = first_values(args.overrides)
                if choice is not None:
                    overrides = [o for o in overrides if not o.startswith("model=")] + [f"model={choice}"]
                resolve_run(compose_config(config_dirs, overrides), pm, model_choice=choice)
    except LmkitError as e:
        return _fail(str(e))
    return _run_hydra(config_dirs, args)


def _report_preemption(info: dict, run_dir: Path, overrides: list[str]) -> int:
    """One line on stderr: which signal stopped the run, where its checkpoint is, how to resume."""
    kept = [o for o in overrides if not o.lstrip("+").startswith(("resume=", "hydra.searchpath"))]
    command = " ".join(["python -m lmkit", *kept, f"resume={run_dir.resolve()}"])
    print(f"lmkit: stopped by {info.get('signal', 'SIGTERM')} at step {info.get('step')}; checkpoint saved: "
          f"{info.get('checkpoint')}. Resume with: {command}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def _remove_if_nothing_saved(run_dir: Path) -> None:
    """A run refused before its first checkpoint leaves no directory behind.

    Only a directory holding nothing but Hydra's own files (``.hydra/``, ``*.log``) is
    removed, so a user's existing directory given as ``hydra.run.dir`` is never deleted.
    """
    if not run_dir.exists() or any(p.name not in (".hydra",) and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _run_hydra(config_dirs: list[str], args) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    searchpath = [f"hydra.searchpath=[{','.join('file://' + d for d in config_dirs[1:])}]"] if len(config_dirs) > 1 else []
    state = {"rc": 0}

    @hydra.main(config_path=config_dirs[0], config_name="config", version_base="1.3")
    def task(cfg):
        from omegaconf import OmegaConf

        from lmkit.config.validate import resolve_run
        from lmkit.plugins import get_plugin_manager
        from lmkit.train import format_summary, train

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        choice = HydraConfig.get().runtime.choices.get("model")
        OmegaConf.set_struct(cfg, False)
        try:
            run = resolve_run(cfg, get_plugin_manager(), model_choice=choice)
            print(f"lmkit: run directory {run_dir}", flush=True)
            summary = train(run, get_plugin_manager(), run_dir)
            if summary["preempted"]:
                state["rc"] = _report_preemption(summary["preempted"], run_dir, args.overrides)
                raise SystemExit(state["rc"])
            print(format_summary(summary), flush=True)
            return summary["end"]["val/loss"] if summary["end"] else None
        except LmkitError as e:
            _remove_if_nothing_saved(run_dir)
            state["rc"] = _fail(str(e))
            if not HydraConfig.get().mode.name == "MULTIRUN":
                raise SystemExit(state["rc"])
            return None

    sys.argv = [sys.argv[0]] + args.hydra_flags + args.overrides + searchpath
    try:
        task()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else _fail(e.code)
    finally:
        from lmkit.process_exit import close_process_group

        close_process_group()
    return state["rc"]


def entry() -> None:
    """The ``lmkit`` command and ``python -m lmkit``: :func:`main`, then an exit safe after distributed runs."""
    from lmkit.process_exit import exit_cli

    exit_cli(main())


if __name__ == "__main__":
    entry()
