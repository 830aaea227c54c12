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
    when the user names none. ``meta["needs"]`` (optional) names the optional architecture
    inputs the objective passes (:data:`lmkit.models.base.CAPABILITIES`: ``attn_mask``,
    ``token_type_ids``, ``document_ids``, ``decoder_input_ids``, ``pooled``): a collection,
    or a callable ``(validated cfg, architecture kind) -> collection`` when it depends on
    options (``document_mask=true`` needs ``document_ids``). Without it, a factory that
    subclasses ``Objective`` answers with its ``needs_for`` classmethod; any other needs
    nothing. An architecture that lacks a needed capability is refused at compose time.
    """


@hookspec
def lmkit_register_architectures():
    """Return architectures.

    ``factory(cfg) -> nn.Module`` following :mod:`lmkit.models.base`. ``config_cls`` is the
    architecture's config dataclass, best a subclass of
    :class:`lmkit.models.base.ArchitectureConfig`: the core reads ``vocab_size`` (None = the
    tokenizer's, filled in with ``dataclasses.replace`` before ``factory`` is called),
    ``max_seq_len`` (``data.seq_len`` may not exceed it) and ``compile`` (True = the core
    compiles it with ``torch.compile``), each with ``getattr``. ``meta["kind"]`` is its kind
    (``decoder``/``encoder``/``encoder_decoder``); ``meta["accepts"]`` the capabilities
    (:data:`lmkit.models.base.CAPABILITIES`) it honours. Without ``meta["accepts"]``, a class
    factory's ``accepts`` attribute or else its ``forward`` keyword parameters are used, and
    a function factory is not checked (:func:`lmkit.models.base.architecture_accepts`).
    """


@hookspec
def lmkit_register_optimizers():
    """Return optimizers: ``factory(param_groups, cfg) -> torch.optim.Optimizer``.

    ``param_groups`` already separates parameters with and without weight decay: the core
    reads ``cfg.weight_decay`` (with ``getattr``, 0.0 when absent) for the first group and
    gives the second (biases, norms, embeddings, 1-d parameters) 0.0. ``config_cls`` is best
    a subclass of :class:`lmkit.optim.OptimizerConfigBase` (``name``, ``lr``, ``weight_decay``).
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
    """Return Lightning callbacks: ``factory(cfg) -> lightning.Callback``, enabled by name in ``callbacks``.

    ``cfg`` is the callback's validated options: an instance of its ``config_cls`` built from
    ``callback_options.<name>`` (``+callback_options.NAME.KEY=VALUE`` on the command line;
    unknown keys and wrong types are refused), or None when the callback has no
    ``config_cls``. Callbacks may read ``pl_module.last_step_tokens`` (input tokens of the
    latest training step on this rank, :class:`lmkit.module.LMModule`).
    """


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
