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
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # e.g. disk full: do not leave a partial file taking the space
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        # integrity (CRC) was verified when the run resolved what to resume (resolve_resume)
        return load_checkpoint_file(path, map_location=map_location, verify=False)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (a power loss right after it keeps the new name, not only the old file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


def _verify_crc(path: Path) -> None:
    """Check every record's CRC-32 (torch.save writes them; torch.load does not check them).

    Catches bit rot or a partly overwritten file that still loads: a flipped byte inside a
    tensor would otherwise resume silently from wrong weights.
    """
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format (truncated files land here too: torch.load reports them)
    try:
        with zipfile.ZipFile(path) as z:
            if all(info.CRC == 0 for info in z.infolist() if info.file_size):
                return  # written with CRCs disabled (torch.serialization.config.save.compute_crc32=False)
            bad = z.testzip()
    except Exception as e:  # a damaged directory or header: the caller reports it as corrupted
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupted: record '{bad}' does not match the CRC-32 written with it "
            f"(damaged on disk or in transfer). Resume from an earlier checkpoint in {path.resolve().parent}."
        )


def load_checkpoint_file(path, map_location="cpu", verify: bool = True, mmap: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error for anything unsafe or damaged.

    ``verify``: check the CRC-32 of every record first. ``mmap``: map tensors instead of
    reading them (a cheap check that the file unpickles safely).
    """
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
        if verify:
            _verify_crc(path)
        state = torch.load(path, map_location=map_location, weights_only=True,
                           mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it contains objects other than tensors and plain data "
            f"({str(e).splitlines()[0][:200]}). lmkit loads checkpoints with weights_only=True so that a "
            f"file cannot run code; only use checkpoints written by lmkit."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupted ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Resume from an earlier checkpoint in {path.resolve().parent}."
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
        load_checkpoint_file(path, mmap=True)  # CRC-checked, unpickled safely; tensors not read twice
        return
    try:  # the shards are read by the strategy; the metadata must load safely
        torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"sharded checkpoint '{path}' is damaged or unsafe ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def check_checkpoint_fits(module, path) -> None:
    """Refuse a checkpoint whose tensors do not have ``module``'s shapes (another vocabulary or model size)."""
    path = Path(path)
    if not path.is_file():
        return  # a sharded checkpoint: its strategy checks the shards
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))["state_dict"]
    except Exception:
        return  # the load itself reports it
    diffs = [(k, list(saved[k].shape), list(v.shape)) for k, v in module.state_dict().items()
             if hasattr(saved.get(k), "shape") and tuple(saved[k].shape) != tuple(v.shape)]
    if diffs:
        key, theirs, ours = diffs[0]
        more = f" (and {len(diffs) - 1} more tensors)" if len(diffs) > 1 else ""
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model: {key} has shape {theirs} in the checkpoint but {ours} "
            f"here{more}. Resume with the model and tokenizer settings of the run that wrote it (another tokenizer "
            f"or vocabulary size changes the embedding's shape)."
        )


def _candidates(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first (``last*.ckpt`` before a step file written at the same time).

    By modification time rather than ``last.ckpt`` first: a resumed run writing into the same
    directory may name its last checkpoint ``last-v1.ckpt``, leaving an older ``last.ckpt``.
    """
    ckpt_dir = run_dir / CHECKPOINT_DIR
    found = [p for p in ckpt_dir.glob("*.ckpt")
             if not p.name.startswith(".") and (p.is_file() or is_sharded_checkpoint(p))]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")), reverse=True)


def newest_run_dir(outputs_root: Path = Path("outputs")) -> Path:
    runs = [p.parent.parent for p in outputs_root.glob(f"*/*/{CHECKPOINT_DIR}/*.ckpt")]
    if not runs:
        raise CheckpointError(f"resume=last: no run with checkpoints under '{outputs_root.resolve()}'")
    return max(set(runs), key=lambda p: max(c.stat().st_mtime for c in (p / CHECKPOINT_DIR).glob("*.ckpt")))


def resolve_auto_resume(run_dir: Path) -> tuple[Path | None, list[str]]:
    """``resume=auto``: the newest good checkpoint of ``run_dir`` itself, or None (start fresh) if it has none.

    For jobs that are restarted with the very same command (torchrun ``--max-restarts``,
    SLURM requeue): give the run a fixed directory (``hydra.run.dir=...``).
    """
    if not _candidates(Path(run_dir)):
        return None, [f"resume=auto: no checkpoint in '{Path(run_dir) / CHECKPOINT_DIR}' yet; starting from scratch"]
    return resolve_resume(str(run_dir))


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
