"""Checkpoint files: atomic writes, safe loading, and finding what to resume from."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lmkit.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, fsyncs, then renames.

    A process killed while saving leaves the previous checkpoint untouched (at worst a
    stray ``.tmp`` file, which is ignored).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        return load_checkpoint_file(path, map_location=map_location)


def load_checkpoint_file(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error for anything unsafe or damaged."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        raise CheckpointError(
            f"'{path}' is a sharded checkpoint (a directory of per-rank shards): resume it with a sharding strategy "
            f"(e.g. strategy=fsdp, any number of ranks), or consolidate it into one file first "
            f"(python -m lmkit_fsdp.consolidate {path} OUT.ckpt)."
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it contains objects other than tensors and plain data "
            f"({str(e).splitlines()[0][:200]}). lmkit loads checkpoints with weights_only=True so that a "
            f"file cannot run code; only use checkpoints written by lmkit."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupted ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Resume from an earlier checkpoint in {path.parent}."
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"'{path}' is not an lmkit/Lightning training checkpoint (no state_dict)")
    return state


def is_sharded_checkpoint(path) -> bool:
    """A directory written by torch.distributed.checkpoint through Lightning (one shard per rank + meta.pt)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def check_checkpoint(path) -> None:
    """Raise CheckpointError unless ``path`` is a loadable checkpoint file or sharded checkpoint directory."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        load_checkpoint_file(path)
        return
    try:  # the shards are read by the strategy; the metadata must load safely
        torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"sharded checkpoint '{path}' is damaged or unsafe ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def _candidates(run_dir: Path) -> list[Path]:
    ckpt_dir = run_dir / CHECKPOINT_DIR
    steps = sorted((p for p in ckpt_dir.glob("step*.ckpt")), key=lambda p: p.stat().st_mtime, reverse=True)
    last = ckpt_dir / LAST
    return ([last] if last.exists() else []) + steps


def newest_run_dir(outputs_root: Path = Path("outputs")) -> Path:
    runs = [p.parent.parent for p in outputs_root.glob(f"*/*/{CHECKPOINT_DIR}/*.ckpt")]
    if not runs:
        raise CheckpointError(f"resume=last: no run with checkpoints under '{outputs_root.resolve()}'")
    return max(set(runs), key=lambda p: max(c.stat().st_mtime for c in (p / CHECKPOINT_DIR).glob("*.ckpt")))


def resolve_resume(resume: str, outputs_root: Path = Path("outputs")) -> tuple[Path, list[str]]:
    """The checkpoint file to resume from, and warnings about damaged ones skipped.

    ``resume`` is a checkpoint file, a run directory, or ``last`` (newest run). For a
    directory or ``last``, a damaged newest checkpoint falls back to the previous good one.
    """
    if resume == "last":
        run_dir = newest_run_dir(outputs_root)
    else:
        p = Path(resume)
        if p.is_file() or is_sharded_checkpoint(p):
            check_checkpoint(p)
            return p, []
        if not p.exists():
            raise CheckpointError(f"resume='{resume}' does not exist: give a .ckpt file, a run directory, or 'last'")
        run_dir = p
    warnings = []
    for cand in _candidates(run_dir):
        try:
            check_checkpoint(cand)
            return cand, warnings
        except CheckpointError as e:
            warnings.append(f"skipping damaged checkpoint: {e}")
    raise CheckpointError(f"no usable checkpoint in '{run_dir / CHECKPOINT_DIR}'" + (f" ({'; '.join(warnings)})" if warnings else ""))
