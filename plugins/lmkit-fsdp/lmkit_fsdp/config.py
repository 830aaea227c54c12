"""Config dataclasses of the ``fsdp`` and ``fsdp_tp`` strategies (the ``strategy`` section).

Everything that can be checked without a model or a process group is checked here, when
lmkit validates the composed config (before any run directory or process exists). Checks
that need the model (head count, MLP width) or the world size run in
:func:`lmkit_fsdp.plugin.lmkit_configure_model` and when the Trainer is built, still before
any process group is created.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = ("none", "bf16", "fp16")


@dataclass
class FSDPConfig:
    """Options of ``strategy=fsdp`` (see ``conf/strategy/fsdp.yaml``)."""

    name: str = "fsdp"
    mixed_precision: str = "none"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    save_distributed_checkpoint: bool = True
    process_group_backend: str | None = None
    timeout_s: int = 1800

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"strategy.mixed_precision must be one of {', '.join(MIXED_PRECISION)}; "
                              f"got {self.mixed_precision!r}")
        if self.reduce_dtype not in DTYPES:
            raise ConfigError(f"strategy.reduce_dtype must be one of {', '.join(DTYPES)}; got {self.reduce_dtype!r}")
        if self.process_group_backend not in (None, "nccl", "gloo", "mpi", "ucc", "xccl", "hccl"):
            raise ConfigError(f"strategy.process_group_backend must be null, nccl or gloo (or another torch "
                              f"backend); got {self.process_group_backend!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"strategy.timeout_s must be positive, got {self.timeout_s}")

    # -- what the mesh looks like ---------------------------------------------------
    @property
    def tp(self) -> int:
        return 1

    @property
    def dp(self) -> int | None:
        return None

    def mesh_for(self, world_size: int) -> tuple[int, int]:
        """(data-parallel size, tensor-parallel size) for ``world_size`` ranks; ConfigError if they do not fit."""
        tp = self.tp
        if world_size % tp:
            raise ConfigError(
                f"strategy {self.name}: the world size {world_size} (trainer.devices x trainer.num_nodes) is not "
                f"divisible by strategy.tensor_parallel_size={tp}. Use a multiple of {tp} ranks or another "
                f"tensor_parallel_size."
            )
        dp = self.dp if self.dp is not None else world_size // tp
        if dp * tp != world_size:
            raise ConfigError(
                f"strategy {self.name}: data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp} ranks, "
                f"but the run has {world_size} (trainer.devices x trainer.num_nodes). Set "
                f"strategy.data_parallel_size=null to use every rank."
            )
        return dp, tp


@dataclass
class FSDPTPConfig(FSDPConfig):
    """Options of ``strategy=fsdp_tp``: FSDP across ``data_parallel_size`` groups of
    ``tensor_parallel_size`` tensor-parallel ranks (see ``conf/strategy/fsdp_tp.yaml``)."""

    name: str = "fsdp_tp"
    tensor_parallel_size: int = 2
    data_parallel_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"strategy.tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.data_parallel_size is not None and self.data_parallel_size < 1:
            raise ConfigError(f"strategy.data_parallel_size must be >= 1 or null (= all remaining ranks), "
                              f"got {self.data_parallel_size}")

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def dp(self) -> int | None:
        return self.data_parallel_size


def expected_world_size(devices, num_nodes, accelerator: str = "auto") -> int | None:
    """World size implied by ``trainer.devices`` x ``trainer.num_nodes`` when it is known before launch.

    ``devices`` may be an int, a list of device indices or a string like ``"2"``/``"0,1"``;
    ``"auto"``/``-1`` depend on the machine (None here, checked when the Trainer is built).
    """
    if devices is None:
        return None
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int):
        n = devices
    else:
        s = str(devices).strip()
        if s.isdigit():
            n = int(s)
        elif "," in s:
            n = len([d for d in s.split(",") if d.strip()])
        else:
            return None
    if n <= 0:
        return None
    return n * max(1, int(num_nodes or 1))
