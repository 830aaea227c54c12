"""lmkit plugin entry point of the ``lmkit-moe`` distribution (entry-point group ``lmkit``).

* :class:`MoEConfig`: the ``model.moe.*`` settings (``num_experts=0`` = off), registered as
  the model extension ``moe`` (valid on every architecture).
* :func:`apply_moe`: swaps the ``.mlp`` of every ``every``-th block of
  ``model.transformer_blocks()`` for a :class:`~lmkit_moe.layer.MoELayer` sized from the
  dense MLP, and installs the hooks that hand the model call's padding mask to the layers;
  run by the ``lmkit_configure_model`` hook.
* ``strategy=expert_parallel`` (:mod:`lmkit_moe.strategy`, config in ``lmkit_moe/conf``) and
  the ``moe_balance`` callback (:mod:`lmkit_moe.balance`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from torch import nn

from lmkit_moe.layer import MaskSource, MoEConfigError, MoELayer, validate_moe_args


@dataclass
class MoEConfig:
    """Mixture-of-experts settings (``model.moe.*``). Invalid values raise MoEConfigError (a ValueError).

    ``every``: blocks ``every-1, 2·every-1, …`` (0-based) get an MoE FFN, e.g. ``every=2``
    makes every other block sparse starting with the second (Switch Transformer's layout, and
    the default: with ``every=1`` on the byte-level default run the first block's router tends
    to collapse onto byte identity and starve an expert; ``every=2`` stays balanced).
    ``dispatch``: ``auto`` (``torch._grouped_mm`` on CUDA when it is present and passes a
    correctness probe for the dtype; padded batched ``bmm`` otherwise, including on CPU
    where the grouped kernel is correct but slower), or force ``grouped_mm`` / ``bmm``.
    ``expert_parallel``: shard experts over the data-parallel ranks; takes effect when
    :func:`lmkit_moe.parallel.apply_expert_parallel` is called once the process group exists.
    """

    num_experts: int = 0
    every: int = 2
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    dropless: bool = False
    jitter: float = 0.01
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    expert_parallel: bool = False
    dispatch: str = "auto"

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise MoEConfigError(f"moe.num_experts must be an int >= 0 (0 = off), got {self.num_experts!r}")
        if self.num_experts:
            validate_moe_args(self.num_experts, self.top_k, self.capacity_factor, self.eval_capacity_factor,
                              self.jitter, self.dispatch, self.every)

    @classmethod
    def from_any(cls, cfg) -> "MoEConfig":
        """From a MoEConfig, a mapping (dict, OmegaConf DictConfig) or None (= off)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, Mapping):
            data = {str(k): cfg[k] for k in cfg}
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise MoEConfigError(f"unknown moe setting(s) {unknown}; known: {sorted(known)}")
            return cls(**data)
        raise MoEConfigError(f"moe config must be a mapping or MoEConfig, got {type(cfg).__name__}")

    def layer_kwargs(self) -> dict:
        d = asdict(self)
        for key in ("num_experts", "every", "expert_parallel"):
            d.pop(key)
        return d


def _mask_key(block_name: str, model: nn.Module) -> str:
    """Which model-call mask a block's tokens follow: decoder blocks of an encoder–decoder
    use ``decoder_padding_mask``; everything else ``padding_mask``."""
    if getattr(model, "kind", None) == "encoder_decoder":
        parts = block_name.split(".")
        if any(p.startswith("dec") for p in parts):
            return "decoder_padding_mask"
    return "padding_mask"


def apply_moe(model: nn.Module, moe_cfg) -> nn.Module:
    """Replace the dense ``.mlp`` of every ``every``-th transformer block by an MoE layer.

    ``moe_cfg``: :class:`MoEConfig` or a mapping of its fields; ``num_experts=0`` returns
    ``model`` unchanged. Layer sizes (d_model, d_ff from the dense ``fc`` Linear),
    activation, bias and dropout come from each replaced MLP.

    Padding: a forward pre-hook on ``model`` (``with_kwargs=True``) stores the call's
    ``padding_mask`` / ``decoder_padding_mask`` keyword arguments in a :class:`MaskSource`
    that the layers read. The masks stay set after the forward (so that activation
    checkpointing's recompute in backward routes the same tokens) and are replaced by
    the next call of ``model`` (None when the call passes none).
    """
    cfg = MoEConfig.from_any(moe_cfg)
    if cfg.num_experts == 0:
        return model
    if not hasattr(model, "transformer_blocks"):
        raise MoEConfigError(f"{type(model).__name__} has no transformer_blocks(); cannot place MoE layers")
    if getattr(model, "_lmkit_moe_source", None) is not None:
        raise MoEConfigError("apply_moe was already applied to this model")
    names = {id(m): n for n, m in model.named_modules()}
    source = MaskSource()
    swapped = 0
    for i, block in enumerate(model.transformer_blocks()):
        if (i + 1) % cfg.every:
            continue
        layer = MoELayer.from_dense(block.mlp, cfg.num_experts, **cfg.layer_kwargs())
        layer.mask_source = source
        layer.mask_key = _mask_key(names.get(id(block), ""), model)
        layer.expert_parallel_requested = cfg.expert_parallel
        block.mlp = layer
        swapped += 1
    if swapped == 0:
        raise MoEConfigError(
            f"moe.every={cfg.every} selects no block of the {len(model.transformer_blocks())} the model has")

    def capture(module, args, kwargs):
        source.masks = {key: kwargs.get(key) for key in ("padding_mask", "decoder_padding_mask")}

    model.register_forward_pre_hook(capture, with_kwargs=True)
    model._lmkit_moe_source = source
    return model


__all__ = ["MoEConfig", "apply_moe"]


# -- lmkit hooks ----------------------------------------------------------------------
import lmkit  # noqa: E402


@lmkit.hookimpl
def lmkit_register_model_extensions():
    """``model.moe.*``: mixture-of-experts feed-forward layers for any built-in transformer."""
    return [lmkit.Component("moe", None, MoEConfig, "switch/top-k mixture-of-experts FFN (model.moe.num_experts=N)")]


@lmkit.hookimpl
def lmkit_configure_model(model, run):
    """Swap dense MLPs for MoE layers when ``model.moe.num_experts`` > 0."""
    cfg = run.model_extensions.get("moe")
    from lmkit_moe.strategy import check_run

    check_run(cfg, run)  # strategy=expert_parallel without experts / with indivisible experts
    if cfg is not None and cfg.num_experts > 0:
        apply_moe(model, cfg)


@lmkit.hookimpl
def lmkit_register_strategies():
    from lmkit_moe.strategy import ExpertParallelConfig, build_expert_parallel

    return [lmkit.Component("expert_parallel", build_expert_parallel, ExpertParallelConfig,
                            "DDP with MoE experts sharded over the ranks (all-to-all token exchange)")]


@lmkit.hookimpl
def lmkit_config_dirs():
    from pathlib import Path

    return [str(Path(__file__).parent / "conf")]


@lmkit.hookimpl
def lmkit_register_callbacks():
    from lmkit_moe.balance import MoEBalanceConfig, build_moe_balance

    return [lmkit.Component("moe_balance", build_moe_balance, MoEBalanceConfig,
                            description="end-of-training max/min expert load ratio per MoE layer")]
