"""Programmatic runs: the same compose → validate → train path as the CLI, without Hydra's launcher.

A script that runs distributed (under torchrun) should end with
``lmkit.process_exit.exit_process(0)``, as the CLI does, so that a finished rank is not
aborted during interpreter finalization (see that module).
"""
from __future__ import annotations

from pathlib import Path

from lmkit.config.compose import compose_config
from lmkit.config.validate import RunConfig, resolve_run
from lmkit.plugins import get_plugin_manager


def load_run_config(overrides: list[str]) -> RunConfig:
    """Validated run config for ``overrides`` (as on the command line), objective default model included."""
    from lmkit.commands.train import prepare

    pm = get_plugin_manager()
    args = prepare(overrides, pm)
    return resolve_run(compose_config(pm.config_dirs(), args.overrides), pm,
                       model_choice=args.group_choices.get("model", [None])[0])


def run(overrides: list[str], run_dir) -> dict:
    """Train with ``overrides`` writing into ``run_dir``; returns the summary of :func:`lmkit.train.train`."""
    from lmkit.train import train

    return train(load_run_config(overrides), get_plugin_manager(), Path(run_dir))


def build(overrides: list[str], run_dir):
    """Build (without training) the trainer, module and datamodule for ``overrides``."""
    from lmkit.train import build_run

    return build_run(load_run_config(overrides), get_plugin_manager(), Path(run_dir))
