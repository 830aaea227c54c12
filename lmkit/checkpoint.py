"""Checkpoint files: atomic writes, safe loading, and finding what to resume from."""
from __future__ import annotations

import errno
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

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


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that has the step's log row written before it saves that step.

    Lightning calls the callbacks' ``on_train_batch_end`` (checkpoint callbacks last) before its
    logger connector hands the step's metrics to the loggers. A process killed while a
    checkpoint was being written, or right after, lost the log row of the step that checkpoint
    holds, and the log stitched over the killed and the resumed attempt missed that step. Every
    step a checkpoint holds has its log row: the row is written first (once; Lightning's own
    call for the same batch then does nothing).

    ``resumes_own_dir``: the run resumes in its own directory, whose checkpoints are expected
    (Lightning's "Checkpoint directory ... exists and is not empty" warning is left out then).
    """

    resumes_own_dir = False

    @property
    def state_key(self) -> str:
        # one key whatever trainer.checkpoint_every_n_steps (Lightning's includes it): a resume that
        # changes the interval still restores which files are last.ckpt and the kept steps (else
        # Lightning writes last-v1.ckpt and never removes the earlier attempt's step files)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Find this callback's state under another key: another interval, or Lightning's ModelCheckpoint."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        same = f"{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}"
        for key, state in list(states.items()):
            name, _, rest = str(key).partition("{")
            if name in ("ModelCheckpoint", type(self).__qualname__) and ("{" + rest).startswith(same):
                states[self.state_key] = state
                return

    def setup(self, trainer, pl_module, stage) -> None:
        with warnings.catch_warnings():
            if self.resumes_own_dir:
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        log_step_now(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def log_step_now(trainer) -> None:
    """Hand the current training step's metrics to the loggers now, and only once per batch."""
    connector = trainer._logger_connector
    if not trainer.loggers:
        return
    if not getattr(connector, "_lmkit_once_per_batch", False):
        original = connector.update_train_step_metrics
        done = {"batch": None}

        def update_train_step_metrics() -> None:
            batch = trainer.fit_loop.epoch_loop.batch_progress.total.ready  # counts every batch once
            if done["batch"] == batch:
                return
            done["batch"] = batch
            original()

        connector.update_train_step_metrics = update_train_step_metrics
        connector._lmkit_once_per_batch = True
    connector.update_train_step_metrics()


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
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): a write that never finished, or a full disk. "
                              f"Resume from an earlier checkpoint in {path.resolve().parent}.")
    if not _looks_like_torch_save(path):
        raise CheckpointError(
            f"'{path}' is not a checkpoint ({size} bytes, neither torch's zip format nor a pickle): damaged, or "
            f"another kind of file. Resume from an lmkit checkpoint (RUN_DIR/{CHECKPOINT_DIR}/*.ckpt)."
        )
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
    _check_training_checkpoint(state, path)
    return state


def _looks_like_torch_save(path: Path) -> bool:
    """Starts like what torch.save writes: a zip archive (whole or truncated), or a pickle stream
    (the legacy format, protocol 2 or later)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _weights_only_hint(path) -> str:
    from lmkit.config.schema import TOP_LEVEL_KEYS

    if "init_from" in TOP_LEVEL_KEYS:
        return f"To start a new run from its weights, use init_from={path} instead of resume=."
    return ("Its weights cannot be resumed as a run: resume= needs an lmkit checkpoint "
            f"(RUN_DIR/{CHECKPOINT_DIR}/*.ckpt), and lmkit has no weights-only start yet.")


def _check_training_checkpoint(state, path) -> None:
    """A Lightning training checkpoint: a dict whose ``state_dict`` maps names to tensors."""
    if isinstance(state, Mapping) and "state_dict" not in state and state and all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"'{path}' holds only weights (a bare state_dict of {len(state)} tensors, as torch.save(model.state_dict()) "
            f"writes), not an lmkit training checkpoint (no lmkit state: data position, RNG states; no optimizer or step). "
            f"{_weights_only_hint(path)}"
        )
    if not isinstance(state, Mapping) or "state_dict" not in state:
        what = f"a {type(state).__name__}" if not isinstance(state, Mapping) else "a dict without a state_dict"
        raise CheckpointError(f"'{path}' is not an lmkit/Lightning training checkpoint: it holds {what}. "
                              f"Resume from an lmkit checkpoint (RUN_DIR/{CHECKPOINT_DIR}/*.ckpt).")
    weights = state["state_dict"]
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"checkpoint '{path}' is damaged: its state_dict is a {type(weights).__name__}, not a "
                              f"mapping of parameter names to tensors. Resume from an earlier checkpoint.")
    if not weights:
        raise CheckpointError(f"checkpoint '{path}' is damaged: its state_dict is empty (no weights). "
                              f"Resume from an earlier checkpoint.")
    for key in ("pytorch-lightning_version", "global_step"):
        if key not in state:
            raise CheckpointError(f"'{path}' is not an lmkit/Lightning training checkpoint (no '{key}'). "
                                  f"{_weights_only_hint(path)}")


def missing_lmkit_state(checkpoint) -> list[str]:
    """What of lmkit's own training state (saved by LMModule.on_save_checkpoint) ``checkpoint`` lacks:
    nothing when it has lmkit's block with the data position (the RNG states are restored when present)."""
    state = checkpoint.get("lmkit") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        return ["data position", "RNG states"]
    if isinstance(state.get("data_steps"), int):
        return []
    return ["data position"] + ([] if state.get("rng") else ["RNG states"])


def check_lmkit_state(checkpoint, path) -> None:
    """Refuse a checkpoint without lmkit's state: resuming it would restart the data at batch 0, silently."""
    missing = missing_lmkit_state(checkpoint)
    if missing:
        what = f"checkpoint '{path}'" if path else "the checkpoint"
        raise CheckpointError(
            f"{what} is not an lmkit training checkpoint (no lmkit state: {', '.join(missing)}): "
            f"written by another program, or weights only. Resuming it would restart the data at batch 0 and skip "
            f"the RNG restore. {_weights_only_hint(path)}"
        )


#: entries of LMDataModule.fingerprint that decide the data order; the others only explain a corpus change
DATA_KEYS = ("corpus", "tokenizer", "seed", "data.seq_len", "data.val_fraction", "data.seq_len_schedule",
             "val_corpus", "data.mixture")  # val_corpus: data.val_path's tokens; data.mixture: names and shares


def check_same_data(saved: dict | None, current: dict, path, allow_change: bool = False) -> str | None:
    """Refuse resuming ``path`` (whose ``lmkit.data`` is ``saved``) on other data than it was trained on.

    Returns a note when ``allow_change`` lets a change through; checkpoints written before lmkit
    saved the data settings have none and are not compared.
    """
    if not saved:
        return None
    differs = [k for k in DATA_KEYS if k in saved and saved[k] != current.get(k)]
    if not differs:
        return None
    if "corpus" in differs or "tokenizer" in differs:
        differs += [k for k in current if k not in DATA_KEYS and k in saved and saved[k] != current[k]]
    details = "; ".join(f"{k} is {_value(current.get(k))} here but {_value(saved[k])} in the checkpoint" for k in differs)
    if allow_change:
        return f"resume_allow_data_change=true: continuing on other data than the checkpoint's ({details})"
    config = Path(path).resolve().parent.parent / "config.yaml"
    see = f" (see {config})" if config.is_file() else ""
    raise CheckpointError(
        f"checkpoint '{path}' was trained on other data: {details}. Resuming would not continue its data order. "
        f"Resume with the data settings of the checkpoint's run{see}, or set resume_allow_data_change=true to go on "
        f"with this data anyway."
    )


def _value(v) -> str:
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    return repr(v) if isinstance(v, str) else str(v)


def is_sharded_checkpoint(path) -> bool:
    """A directory written by torch.distributed.checkpoint through Lightning (one shard per rank + meta.pt)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def check_checkpoint(path) -> dict:
    """Raise CheckpointError unless ``path`` is a checkpoint file or sharded checkpoint directory that
    lmkit can resume; return its training state (without the model and optimizer tensors)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        state = load_checkpoint_file(path, mmap=True)  # CRC-checked, unpickled safely; tensors not read twice
    else:
        try:  # the shards are read by the strategy; the metadata must load safely
            state = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"sharded checkpoint '{path}' is damaged or unsafe ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"sharded checkpoint '{path}' is damaged: its meta.pt holds a {type(state).__name__}")
    check_lmkit_state(state, path)
    return {k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")}


def read_training_state(path) -> dict:
    """A checked checkpoint's training state without its tensors of weights and optimizer (no CRC pass:
    :func:`resolve_resume` did that), for the checks and reports of a resumed run."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return dict(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    return {k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")}


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


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:60]}…({len(text)} characters)…{text[-40:]}"


def check_resume_path(resume: str) -> None:
    """Refuse a ``resume=`` path the file system cannot look up (a name too long, a file used as a directory)."""
    try:
        os.stat(resume)
    except FileNotFoundError:
        return  # said by resolve_resume, with what resume= accepts
    except NotADirectoryError:
        blocker = next((p for p in reversed(Path(resume).parents) if p.is_file()), None)
        raise CheckpointError(f"resume='{_short(resume)}' does not exist: '{_short(str(blocker))}' is a file, not a "
                              f"directory. Give a .ckpt file, a run directory, or 'last'.") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise CheckpointError(f"resume='{_short(resume)}' is not a usable path: a name in it is longer than the "
                                  f"file system allows ({e.strerror}, ENAMETOOLONG). Give a .ckpt file, a run directory, or 'last'."
                                  ) from None
        raise CheckpointError(f"resume='{_short(resume)}' cannot be read ({e.strerror or e})") from None


def resolve_resume(resume: str, outputs_root: Path = Path("outputs")) -> tuple[Path, list[str]]:
    """The checkpoint file to resume from, and warnings about damaged ones skipped.

    ``resume`` is a checkpoint file, a run directory, or ``last`` (newest run). For a
    directory or ``last``, a damaged newest checkpoint falls back to the previous good one.
    """
    if resume == "last":
        run_dir = newest_run_dir(outputs_root)
    else:
        check_resume_path(resume)
        p = Path(resume)
        if p.is_file() or is_sharded_checkpoint(p):
            check_checkpoint(p)
            return p, []
        if not p.exists():
            raise CheckpointError(f"resume='{_short(resume)}' does not exist: give a .ckpt file, a run directory, or 'last'")
        run_dir = p
    warnings = []
    for cand in _candidates(run_dir):
        try:
            check_checkpoint(cand)
            return cand, warnings
        except CheckpointError as e:
            warnings.append(f"skipping damaged checkpoint: {e}")
    raise CheckpointError(f"no usable checkpoint in '{run_dir / CHECKPOINT_DIR}'" + (f" ({'; '.join(warnings)})" if warnings else ""))
