"""The hooks through which lmkit finds its components — the plugin contract.

A plugin is a module (exposed through the ``lmkit`` entry-point group of its
distribution) that implements any of these hooks with ``@lmkit.hookimpl``. lmkit's own
built-ins register through exactly the same hooks. Each ``lmkit_register_*`` hook returns
a list of :class:`lmkit.registry.Component`; the component's ``name`` is what users write
on the command line (``optimizer=adamw``, ``+objective=span_corruption``).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("lmkit")


@hookspec
def lmkit_register_objectives():
    """Return training objectives.

    ``factory(cfg, tokenizer) -> Objective`` (see :class:`lmkit.objectives.base.Objective`);
    ``config_cls`` is a dataclass of the objective's options; ``meta["kinds"]`` lists the
    architecture kinds it can train and ``meta["default_model"]`` the model config chosen
    when the user names none.
    """


@hookspec
def lmkit_register_architectures():
    """Return architectures.

    ``factory(cfg) -> nn.Module`` following :mod:`lmkit.models.base`; ``config_cls`` is the
    architecture's config dataclass; ``meta["kind"]`` is its kind
    (``decoder``/``encoder``/``encoder_decoder``).
    """


@hookspec
def lmkit_register_optimizers():
    """Return optimizers: ``factory(param_groups, cfg) -> torch.optim.Optimizer``.

    ``param_groups`` already separates parameters with and without weight decay.
    """


@hookspec
def lmkit_register_schedulers():
    """Return LR schedules: ``factory(optimizer, cfg, total_steps) -> LRScheduler`` stepped per optimizer step."""


@hookspec
def lmkit_register_strategies():
    """Return parallelism strategies: ``factory(cfg) -> lmkit.strategies.StrategyPlan``.

    ``cfg`` is the validated ``strategy`` section. The plan carries the Lightning strategy
    (object or name), an optional ``parallelize(lm_module, run)`` applied from outside in
    ``LightningModule.configure_model`` (it shards ``lm_module.model`` and the objective's
    heads in place; ``lm_module.device_mesh`` is set by mesh-aware strategies), and optional
    replacements of the step's forward/backward (pipeline schedules).
    """


@hookspec
def lmkit_register_tokenizers():
    """Return tokenizers: ``factory(cfg, source, cache_dir) -> lmkit.tokenizers.base.Tokenizer``.

    ``source`` is the run's :class:`lmkit.data.sources.Source` (``documents()`` iterates the
    corpus, ``fingerprint()`` identifies it for caching a trained tokenizer).
    """


@hookspec
def lmkit_register_datasets():
    """Return dataset sources: ``factory(data_cfg) -> lmkit.data.sources.Source``.

    Users pick one with ``data.source=NAME``; the source yields documents (strings).
    """


@hookspec
def lmkit_register_callbacks():
    """Return Lightning callbacks: ``factory(cfg) -> lightning.Callback``, enabled by name in ``callbacks``."""


@hookspec
def lmkit_config_dirs():
    """Return directories of Hydra config files this plugin contributes.

    A directory laid out like lmkit's own ``conf/`` (``objective/foo.yaml``,
    ``optimizer/bar.yaml`` ...) makes ``+objective=foo`` and ``optimizer=bar`` work.
    """


@hookspec
def lmkit_register_model_extensions():
    """Return model extensions: option blocks under ``model.<name>`` valid for every architecture.

    ``config_cls`` validates ``model.<name>.*`` (the mixture-of-experts plugin registers
    ``moe``, so ``model.moe.num_experts=8`` works on any built-in transformer). The
    extension acts in :func:`lmkit_configure_model`; ``factory`` is unused (may be None).
    """


@hookspec
def lmkit_configure_model(model, run):
    """Modify a freshly built architecture in place before the objective wraps it.

    Called for every built model with the validated run (``run.model_extensions`` holds
    each extension's validated config); return nothing. The mixture-of-experts plugin
    swaps feed-forward layers here when ``model.moe`` asks for it.
    """


@hookspec
def lmkit_register_commands():
    """Return command-line verbs: ``python -m lmkit NAME ARGS...``.

    ``factory(argv: list[str]) -> int`` runs the verb with the arguments after its name and
    returns the exit status; ``description`` is its line in ``python -m lmkit --help``. Raise
    :class:`lmkit.errors.LmkitError` (or a subclass) for anything the user can fix: the CLI
    prints it as one ``lmkit: error:`` line and exits with status 2, as for every built-in
    verb. Built-in verbs (``train``, ``plugins``, ...) cannot be replaced.
    """
