"""The Lightning strategy: ``ModelParallelStrategy`` (FSDP2 + DTensor, works on CPU/gloo) plus

* the mesh checked against the world size when the Trainer is built (a ConfigError, before
  any process group exists), data parallel = world / tensor parallel;
* checkpoints always in the plain model's layout (see :mod:`lmkit_fsdp.layout`), written
  with ``torch.distributed.checkpoint`` into a temporary directory that replaces the old one
  only when complete, and loaded from either a sharded directory (any number of ranks) or a
  single-file checkpoint;
* gradient-norm clipping that works when parameters live on different meshes (tensor-parallel
  weights on the 2-D mesh, layer norms and embeddings on the data-parallel one).
"""
from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lmkit.errors import CheckpointError
from lmkit_fsdp.layout import CheckpointLayout, optimizer_state_to_fqns, optimizer_state_to_ids

META_FILE = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint directory


def is_sharded_checkpoint(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


class LmkitModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` configured by a :class:`lmkit_fsdp.config.FSDPConfig`."""

    strategy_name = "lmkit_fsdp"

    def __init__(self, cfg):
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size="auto",
            save_distributed_checkpoint=cfg.save_distributed_checkpoint,
            process_group_backend=cfg.process_group_backend, timeout=timedelta(seconds=cfg.timeout_s),
        )
        self.cfg = cfg
        self.layout = CheckpointLayout()

    # -- mesh ---------------------------------------------------------------------
    def _resolve_mesh(self) -> None:
        world = self.num_nodes * self.num_processes
        if world < 1:
            return
        dp, tp = self.cfg.mesh_for(world)
        if tp > 1 and self.num_processes % tp and self.num_nodes > 1:
            import warnings

            warnings.warn(f"strategy.tensor_parallel_size={tp} does not divide the {self.num_processes} devices per "
                          f"node: tensor-parallel groups span nodes, whose links are usually much slower", stacklevel=2)
        self._data_parallel_size, self._tensor_parallel_size = dp, tp

    def _configure_launcher(self) -> None:
        self._resolve_mesh()  # at Trainer construction: a clear error before any process is launched
        super()._configure_launcher()

    def setup_environment(self) -> None:
        self._resolve_mesh()
        super().setup_environment()

    def setup(self, trainer) -> None:
        super().setup(trainer)
        precision = self.precision_plugin
        if not getattr(precision, "_lmkit_fsdp_clip", False):
            from lmkit_fsdp.parallelize import clip_grad_norm_

            def clip_grad_by_norm(optimizer, clip_val, norm_type=2.0):
                clip_grad_norm_(list(precision.main_params(optimizer)), clip_val, norm_type)

            precision.clip_grad_by_norm = clip_grad_by_norm
            precision._lmkit_fsdp_clip = True

    # -- saving -------------------------------------------------------------------
    def _state_dict_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = not self._save_distributed_checkpoint
        # Sharded saves keep tensors where they are when some must be fused: the fusing
        # collectives run on the mesh's device (DCP copies to disk from the device itself).
        return StateDictOptions(full_state_dict=full, cpu_offload=full or not self.layout)

    def lightning_module_state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=self._state_dict_options())
        return self.layout.fuse_state(state, to_cpu=True)

    def optimizer_state(self, optimizer):
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        osd = get_optimizer_state_dict(self.model, optimizer, options=self._state_dict_options())
        osd = self.layout.fuse_optimizer_state(osd, to_cpu=True)
        if not self._save_distributed_checkpoint and self.global_rank == 0:
            osd = optimizer_state_to_ids(osd)  # what a plain run's Optimizer.load_state_dict takes
        return osd

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            old = path.with_name(f".{path.name}.old")
            if path.is_dir():
                os.replace(path, old)
            elif path.exists():
                path.unlink()
            os.replace(tmp, path)
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    # -- loading ------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_path, weights_only=None):
        path = Path(self.broadcast(str(checkpoint_path)))
        strict = self.lightning_module.strict_loading
        if is_sharded_checkpoint(path):
            return self._load_sharded(path, strict, weights_only)
        if path.is_file():
            return self._load_full(path, strict, weights_only)
        raise CheckpointError(f"'{path}' is neither a sharded checkpoint directory (with .metadata and {META_FILE}) "
                              f"nor a checkpoint file")

    def _load_sharded(self, path: Path, strict: bool, weights_only):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
        )

        module = self.model
        reference = get_model_state_dict(module)
        state = {"state_dict": self.layout.placeholders(reference)}
        dcp.load(state, checkpoint_id=path)
        module.load_state_dict(self.layout.split_state(state["state_dict"], reference), strict=strict)
        for idx, optimizer in enumerate(self.optimizers):
            ref_osd = get_optimizer_state_dict(module, optimizer)
            key = f"optimizer_{idx}"
            state = {key: self.layout.optimizer_placeholders(ref_osd)}
            dcp.load(state, checkpoint_id=path)
            osd = self.layout.split_optimizer_state(state[key], ref_osd)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=osd, options=StateDictOptions(cpu_offload=True))
        return torch.load(path / META_FILE, map_location="cpu", weights_only=True if weights_only is None else weights_only)

    def _load_full(self, path: Path, strict: bool, weights_only):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
        )

        checkpoint = torch.load(path, map_location="cpu", mmap=True,
                                weights_only=True if weights_only is None else weights_only)
        if "state_dict" not in checkpoint:
            raise CheckpointError(f"'{path}' is not a Lightning checkpoint (no state_dict)")
        module = self.model
        reference = get_model_state_dict(module)
        module.load_state_dict(self.layout.split_state(checkpoint.pop("state_dict"), reference), strict=strict)
        saved = checkpoint.pop("optimizer_states", [])
        for idx, optimizer in enumerate(self.optimizers):
            if idx >= len(saved):
                break
            ref_osd = get_optimizer_state_dict(module, optimizer)
            names = self.layout.plain_names([n for g in ref_osd["param_groups"] for n in g["params"]])
            osd = saved[idx]
            if osd.get("state") and isinstance(next(iter(osd["state"])), int) or (
                    osd.get("param_groups") and osd["param_groups"][0]["params"]
                    and isinstance(osd["param_groups"][0]["params"][0], int)):
                osd = optimizer_state_to_fqns(osd, names)
            osd = self.layout.split_optimizer_state(osd, ref_osd)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=osd, options=StateDictOptions(cpu_offload=True))
        return checkpoint


def check_world(cfg, devices, num_nodes) -> None:
    """ConfigError when ``devices`` x ``num_nodes`` ranks cannot form the configured mesh (if known before launch)."""
    from lmkit_fsdp.config import expected_world_size

    world = expected_world_size(devices, num_nodes)
    if world is not None:
        cfg.mesh_for(world)


__all__ = ["LmkitModelParallelStrategy", "is_sharded_checkpoint", "check_world"]
