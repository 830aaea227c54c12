"""lmkit-moe: switch-routing mixture-of-experts FFN layers for lmkit, with load balancing
and expert parallelism. See :mod:`lmkit_moe.layer`, :mod:`lmkit_moe.parallel` and
:func:`lmkit_moe.plugin.apply_moe`."""
from lmkit_moe.layer import (
    GroupedExperts,
    MoEConfigError,
    MoELayer,
    Router,
    expert_capacity,
    grouped_mm_supported,
    load_balancing_loss,
    moe_layers,
    moe_metrics,
    router_z_loss,
)
from lmkit_moe.parallel import (
    all_to_all_single,
    apply_expert_parallel,
    exclude_expert_params_from_ddp,
    expert_parameter_names,
    full_expert_state_dict,
    load_full_expert_state_dict,
    validate_expert_parallel,
)
from lmkit_moe.plugin import MoEConfig, apply_moe

__version__ = "0.1.0"

__all__ = [
    "GroupedExperts", "MoEConfig", "MoEConfigError", "MoELayer", "Router", "all_to_all_single",
    "apply_expert_parallel", "apply_moe", "exclude_expert_params_from_ddp", "expert_capacity",
    "expert_parameter_names", "full_expert_state_dict", "grouped_mm_supported",
    "load_balancing_loss", "load_full_expert_state_dict", "moe_layers", "moe_metrics",
    "router_z_loss", "validate_expert_parallel",
]
