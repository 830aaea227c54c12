"""Consolidate a sharded checkpoint into one file a single-process run can resume.

    python -m lmkit_fsdp.consolidate RUN_DIR/checkpoints/last.ckpt out.ckpt [--no-optimizer]
    lmkit-fsdp-consolidate RUN_DIR/checkpoints/last.ckpt out.ckpt   (console script, same arguments)
    python -m lmkit resume=out.ckpt ...                   (a plain single-process run)

The sharded checkpoint is a directory written by ``torch.distributed.checkpoint`` (one
``__R_0.distcp`` per rank, ``.metadata``, and Lightning's ``meta.pt`` with the loop,
scheduler and lmkit state). lmkit-fsdp always writes it in the plain model's layout, so
consolidation only gathers the shards into whole tensors and renumbers the optimizer
state the way ``torch.optim.Optimizer.state_dict()`` does. It runs in one process without
a process group, reads every shard (needs memory for the whole model and optimizer state)
and writes atomically; the result loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lmkit.errors import CheckpointError, LmkitError
from lmkit_fsdp.layout import optimizer_state_to_ids
from lmkit_fsdp.strategy import META_FILE, is_sharded_checkpoint


def load_sharded(path) -> dict:
    """Every entry of a sharded checkpoint as whole tensors: ``{"state_dict": ..., "optimizer_0": ..., ...}``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state


def consolidate(src, dst, optimizer: bool = True) -> Path:
    """Write ``src`` (a sharded checkpoint directory) as the single-file Lightning checkpoint ``dst``."""
    src, dst = Path(src), Path(dst)
    if not is_sharded_checkpoint(src):
        if src.is_file():
            raise CheckpointError(f"'{src}' is already a single-file checkpoint; nothing to consolidate")
        raise CheckpointError(f"'{src}' is not a sharded checkpoint directory (expected .metadata and {META_FILE} in it)")
    try:
        checkpoint = torch.load(src / META_FILE, map_location="cpu", weights_only=True)
        shards = load_sharded(src)
    except LmkitError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read sharded checkpoint '{src}' ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]})") from None
    if "state_dict" not in shards:
        raise CheckpointError(f"'{src}' has no model state (state_dict)")
    checkpoint["state_dict"] = {k: _plain(v) for k, v in shards["state_dict"].items()}
    if optimizer:
        n = len([k for k in shards if k.startswith("optimizer_")])
        checkpoint["optimizer_states"] = [optimizer_state_to_ids(_plain(shards[f"optimizer_{i}"])) for i in range(n)]
    else:
        checkpoint.pop("optimizer_states", None)
        checkpoint.pop("lr_schedulers", None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return dst


def _plain(obj):
    """Tensors as contiguous plain CPU tensors (no views into a shared buffer); containers recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().contiguous().clone()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmkit_fsdp.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="sharded checkpoint directory, e.g. RUN_DIR/checkpoints/last.ckpt")
    parser.add_argument("out", help="single-file checkpoint to write, e.g. consolidated.ckpt")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="weights and training progress only (smaller; the optimizer restarts when resumed)")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out, optimizer=not args.no_optimizer)
    except LmkitError as e:
        print(f"lmkit-fsdp: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); resume with: python -m lmkit resume={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
