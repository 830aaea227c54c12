"""``python -m lmkit [COMMAND] [ARGS]``: dispatch to a verb, with one error handler for all of them.

Every verb raises :class:`lmkit.errors.LmkitError` for what the user can fix (names, keys,
values, data, checkpoints, plugins); it is printed as one ``lmkit: error:`` line and the
exit status is 2. The verbs live in :mod:`lmkit.commands`.
"""
from __future__ import annotations

import os
import sys
import warnings

from lmkit.errors import LmkitError

EXIT_USAGE = 2
EXIT_PREEMPTED = 3


def _fail(message: str) -> int:
    """Print the one error line (under torchrun/SLURM only rank 0 prints: every rank checks the same input)."""
    from lmkit.launch import is_rank_zero

    if is_rank_zero():
        print(f"lmkit: error: {' '.join(str(message).split()) or 'failed'}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _quiet_third_party() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    for pattern in (".*does not have many workers.*", ".*`isinstance.*LeafSpec.*", ".*torch.jit.*",
                    ".*The number of training batches.*", ".*GPU available but not used.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    try:
        from lmkit.config.schema import check_launch_environment

        check_launch_environment(os.environ)  # before anything imports Lightning, which reads RANK & co.
        from lmkit.commands import select_verb
        from lmkit.commands.help import main as show_help, version_main
        from lmkit.plugins import get_plugin_manager

        if argv[:1] in (["--help"], ["-h"], ["help"]):
            return show_help(argv[1:])
        if argv[:1] in (["--version"], ["-V"]):
            return version_main(argv[1:])
        if argv[:1] == ["--hydra-help"]:
            return _hydra_help()
        verb, rest = select_verb(argv, get_plugin_manager)
        return verb.run(rest)
    except LmkitError as e:
        return _fail(str(e))
    except BrokenPipeError:  # output piped into e.g. `head`, which exited: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:  # a path the user named that cannot be written or read
        return _fail(f"{e.strerror or e} ({e.filename})" if getattr(e, "filename", None) else str(e))


def _hydra_help() -> int:
    from lmkit.commands.train import hydra_help

    return hydra_help()


def entry() -> None:
    """The ``lmkit`` command and ``python -m lmkit``: :func:`main`, then an exit safe after distributed runs."""
    from lmkit.process_exit import exit_cli

    exit_cli(main())


if __name__ == "__main__":
    entry()
