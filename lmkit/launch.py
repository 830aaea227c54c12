"""What the launcher (torchrun, SLURM's srun) already decided: process counts and one shared run directory.

Under a launcher, ``trainer.devices``/``trainer.num_nodes`` left at their defaults are taken
from its environment, so ``torchrun --nproc-per-node 2 -m lmkit strategy=ddp`` needs nothing
else; values that contradict the environment are refused. All ranks of a job write into one
run directory, chosen once by rank 0 and shared through the launcher's TCP store (torchrun)
or derived from the job id (SLURM).
"""
from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timedelta

from lmkit.errors import ConfigError

RUN_DIR_KEY = "lmkit/run_dir"


@dataclasses.dataclass(frozen=True)
class Launch:
    """Processes started by an external launcher: ``devices`` per node on ``num_nodes`` nodes."""

    launcher: str  # "torchrun" | "slurm"
    devices: int
    num_nodes: int
    rank: int


def detect_launch(env=None) -> Launch | None:
    """The launcher that started this process with more than one rank, or None for a plain process."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        return Launch("torchrun", local, max(1, world // max(1, local)), int(env.get("RANK", 0)))
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if ntasks > 1 and "SLURM_PROCID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env.get("SLURM_NNODES", "1") or 1)
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        devices = int(per_node) if per_node.isdigit() else max(1, ntasks // nodes)
        return Launch("slurm", devices, nodes, int(env["SLURM_PROCID"]))
    return None


def _requested_count(devices) -> int | None:
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    s = str(devices).strip()
    if s.isdigit():
        return int(s)
    if "," in s:
        return len([d for d in s.split(",") if d.strip()])
    return None  # "auto", "-1": let the launcher decide


def apply_launch(trainer_cfg, launch: Launch | None = None, strict: bool = True):
    """``trainer_cfg`` with devices and num_nodes left at their defaults taken from the launcher.

    ``strict``: raise ConfigError when explicit values contradict the launcher (the CLI does;
    API code under torchrun may build a one-process reference run that never trains).
    """
    launch = detect_launch() if launch is None else launch
    if launch is None:
        return trainer_cfg
    asked = _requested_count(trainer_cfg.devices)
    if not strict:
        return dataclasses.replace(trainer_cfg, devices=launch.devices if asked is None else trainer_cfg.devices,
                                   num_nodes=launch.num_nodes if trainer_cfg.num_nodes == 1 else trainer_cfg.num_nodes)
    if asked is not None and asked != launch.devices:
        raise ConfigError(
            f"trainer.devices={trainer_cfg.devices} but {launch.launcher} started {launch.devices} processes per node; "
            f"drop trainer.devices (it is taken from the launcher) or launch {asked} processes per node."
        )
    if trainer_cfg.num_nodes not in (1, launch.num_nodes):
        raise ConfigError(
            f"trainer.num_nodes={trainer_cfg.num_nodes} but {launch.launcher} started {launch.num_nodes} node(s); "
            f"drop trainer.num_nodes (it is taken from the launcher)."
        )
    devices = launch.devices if asked is None else trainer_cfg.devices
    return dataclasses.replace(trainer_cfg, devices=devices, num_nodes=launch.num_nodes)


def _torchrun_store(timeout_s: float = 300.0):
    """A client of the TCP store torchrun's ranks rendezvous through (the one the process group reuses)."""
    from torch.distributed import TCPStore

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ.get("RANK", 0))
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                    is_master=(not agent_store and rank == 0), timeout=timedelta(seconds=timeout_s),
                    multi_tenant=True)


def shared_run_dir(default: str, launch: Launch | None = None) -> str:
    """The run directory every rank of this job uses: ``default`` as rank 0 chose it.

    ``default`` is what this rank would choose on its own (it contains a time stamp, which
    differs between ranks started a second apart).
    """
    launch = detect_launch() if launch is None else launch
    if launch is None:
        return default
    if launch.launcher == "slurm":
        job = os.environ.get("SLURM_JOB_ID", "job")
        step = os.environ.get("SLURM_STEP_ID")
        start = os.environ.get("SLURM_JOB_START_TIME")
        day = datetime.fromtimestamp(int(start)).strftime("%Y-%m-%d") if start and start.isdigit() else "slurm"
        return f"outputs/{day}/slurm-{job}" + (f".{step}" if step not in (None, "0") else "")
    store = _torchrun_store()
    if launch.rank == 0:
        store.set(RUN_DIR_KEY, default)
        return default
    return store.get(RUN_DIR_KEY).decode()


def is_rank_zero() -> bool:
    """True for the process that prints summaries and errors (rank 0, or a plain process).

    A garbled launcher environment counts as rank 0: its error must still be printed.
    """
    try:
        launch = detect_launch()
    except ValueError:
        return True
    return launch is None or launch.rank == 0
