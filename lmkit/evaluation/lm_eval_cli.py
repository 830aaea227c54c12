"""``lmkit-lm-eval ARGS`` (or ``python -m lmkit.evaluation.lm_eval_cli ARGS``): lm-eval's own command line,
with the ``lmkit`` model backend registered and lmkit's shipped tasks on the include path.

lm-eval 0.4.x finds no backends outside its source tree, so ``lm_eval --model lmkit`` needs
this wrapper there (releases with entry-point discovery find lmkit's ``lm_eval.models`` entry
point by themselves). The arguments are lm-eval's, unchanged::

    lmkit-lm-eval --model lmkit --model_args run=outputs/RUN --tasks shakespeare_next_line

The shipped task YAMLs are copied with absolute data paths (lm-eval reads relative ones from
the working directory) and added with ``--include_path``; the hub is switched off
(``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``), so nothing is fetched.
"""
from __future__ import annotations

import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    import lmkit.evaluation.lm_eval_backend  # noqa: F401  (registers --model lmkit)
    from lmkit.evaluation.tasks import lm_eval_yaml, shipped_tasks

    with tempfile.TemporaryDirectory(prefix="lmkit-tasks-") as tmp:
        for name in shipped_tasks():
            lm_eval_yaml(name, tmp)
        extra = ["--include_path", tmp]
        if "--include_path" in argv:  # lm-eval takes one include path: keep the user's, add ours beside it
            i = argv.index("--include_path")
            for f in os.listdir(argv[i + 1]) if os.path.isdir(argv[i + 1]) else []:
                if f.endswith((".yaml", ".yml")):
                    os.symlink(os.path.abspath(os.path.join(argv[i + 1], f)), os.path.join(tmp, f))
            argv[i + 1] = tmp
            extra = []
        from lm_eval.__main__ import cli_evaluate

        from lmkit.errors import LmkitError

        sys.argv = ["lm_eval", *argv, *extra]
        try:
            cli_evaluate()
        except SystemExit as e:
            return int(e.code or 0) if not isinstance(e.code, str) else 1
        except LmkitError as e:
            print(f"lmkit: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
