"""Structured configs of the sections that are not pluggable components."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkit.config.checks import check_choice, check_int, check_non_negative, check_positive
from lmkit.errors import ConfigError, did_you_mean

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: trainer.accelerator values Lightning knows (plugins may register more in its AcceleratorRegistry)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
PROCESS_GROUP_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl", "hccl")
#: what Lightning's Timer accepts for trainer.max_time: "DD:HH:MM:SS", or a dict of timedelta arguments
MAX_TIME_PATTERN = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")
MAX_TIME_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")
NAME_MAX = 255  # bytes in one file name (Linux, macOS)
PATH_MAX = 4096  # bytes in a whole path (Linux)


def check_path_length(key: str, path) -> None:
    """A path the OS would refuse with ENAMETOOLONG, refused first with the key that holds it."""
    text = os.fsencode(os.path.expanduser(str(path)))
    longest = max(text.split(b"/"), key=len, default=b"")
    if len(longest) > NAME_MAX:
        shown = os.fsdecode(longest[:40]) + "..."
        raise ConfigError(f"{key}: the name '{shown}' in the path is {len(longest)} bytes long; file systems allow at "
                          f"most {NAME_MAX} bytes per name (ENAMETOOLONG). Use a shorter file or directory name.")
    if len(text) > PATH_MAX - 1:
        raise ConfigError(f"{key}: the path is {len(text)} bytes long; the OS allows at most {PATH_MAX - 1} "
                          f"(ENAMETOOLONG). Use a shorter path.")


def check_creatable_dir(key: str, path) -> None:
    """``path`` is a directory or can be created: no existing part of it is a regular file."""
    check_path_length(key, path)
    p = Path(os.path.expanduser(str(path)))
    for part in [p, *p.parents]:
        try:
            if part.is_dir():
                if not os.access(part, os.W_OK | os.X_OK):
                    raise ConfigError(f"{key}={str(path)!r} cannot be created: '{part}' is not writable. "
                                      f"Point {key} at a directory you can write to.")
                return
            if part.exists() or part.is_symlink():
                what = "a file" if part.is_file() else ("a broken symbolic link" if part.is_symlink() else "not a directory")
                raise ConfigError(f"{key}={str(path)!r} cannot be created: '{part}' is {what}. "
                                  f"Point {key} at a directory (or somewhere one can be made).")
        except OSError as e:
            raise ConfigError(f"{key}={str(path)!r} cannot be used: {e.strerror or e} ('{part}').") from None


@dataclass
class DataConfig:
    """Where text comes from and how it is batched."""

    source: str = "tinyshakespeare"  # a registered dataset source
    path: Any = None  # file, directory or list of them (text, jsonl, hf)
    text_field: str = "text"
    hf_builder: str | None = None
    doc_separator: str | None = None
    val_fraction: float = 0.1
    val_path: Any = None  # a separate validation set (same kind as data.path); training then reads all of data.path
    mixture: Any = None  # data.source=mixture: [{source, path, weight, ...}, ...] (lmkit.data.mixture)
    seq_len: int = 128
    batch_size: int = 32  # micro-batch, per rank
    grad_accum: int = 1
    batch_ramp_start: int = 1  # micro-batches per step at the start of the ramp
    batch_ramp_steps: int = 0  # 0 = no ramp
    # earlier phases at other lengths: [{until_step: N, seq_len: S}, ...]; data.seq_len after the last (BERT's 128 -> 512)
    seq_len_schedule: Any = None
    val_seq_lens: Any = None  # validate at these lengths too: val/len<L>/loss (lmkit.data.val_lengths)
    num_workers: int = 0
    cache_dir: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise ConfigError(f"data.grad_accum must be >= 1, got {self.grad_accum}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        check_int("data.batch_ramp_start", self.batch_ramp_start, minimum=1,
                  hint=" (micro-batches per step at the start of the ramp)")
        check_int("data.batch_ramp_steps", self.batch_ramp_steps, minimum=0, hint=" (0 = no ramp)")
        from lmkit.data.seq_len_schedule import check_schedule

        self.seq_len_schedule = check_schedule(self.seq_len_schedule)
        from lmkit.data.val_lengths import check_val_seq_lens

        self.val_seq_lens = check_val_seq_lens(self.val_seq_lens)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"data.text_field must name the JSON field or column holding the text, got {self.text_field!r}")
        self.path = _check_data_path(self.path)
        from lmkit.data.mixture import check_data_config

        check_data_config(self)  # data.val_path, data.mixture
        if self.cache_dir not in (None, ""):
            check_creatable_dir("data.cache_dir", self.cache_dir)


def _check_data_path(path):
    """``data.path``: a path or a list of paths (a bare number is a file name); too long names refused."""
    if path is None or path == "":
        return path
    if isinstance(path, (int, float)) and not isinstance(path, bool):
        path = str(path)
    items = [path] if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(p, (str, os.PathLike, int)) and not isinstance(p, bool) for p in items):
        raise ConfigError(f"data.path must be a file or directory, or a list of them, got {path!r}")
    for item in items:
        check_path_length("data.path", item)
    return path if isinstance(path, (str, os.PathLike)) else [str(p) if isinstance(p, int) else p for p in items]


@dataclass
class TokenizerConfig:
    name: str = "byte"
    vocab_size: int = 4096  # trained tokenizers only
    min_frequency: int = 2
    num_sentinels: int = 0  # raised automatically to what the objective needs

    def __post_init__(self):
        from lmkit.tokenizers.base import MAX_VOCAB_SIZE, MIN_TRAINED_VOCAB_SIZE, SPECIAL_TOKENS

        trained = self.name in ("bpe", "wordpiece", "unigram")
        if isinstance(self.vocab_size, int) and self.vocab_size > MAX_VOCAB_SIZE:
            hint = (" (2**21; the largest vocabularies in use are about 1M tokens, and a larger one makes the tokenizer "
                    "trainer and the embedding allocate tens of GB)")
        elif trained:
            hint = (f" (a trained tokenizer's vocabulary holds the 256 byte-level symbols and the {len(SPECIAL_TOKENS)} "
                    f"special tokens, plus at least one learned token)")
        else:
            hint = ""
        check_int("tokenizer.vocab_size", self.vocab_size, minimum=MIN_TRAINED_VOCAB_SIZE if trained else 1,
                  maximum=MAX_VOCAB_SIZE, hint=hint)
        check_int("tokenizer.min_frequency", self.min_frequency, minimum=0,
                  hint=" (merges or pieces seen fewer times are not learned)")
        check_int("tokenizer.num_sentinels", self.num_sentinels, minimum=0,
                  maximum=MAX_VOCAB_SIZE - 256 - len(SPECIAL_TOKENS))


@dataclass
class TrainerConfig:
    """How long and how the loop runs."""

    max_steps: int = 1000
    max_time: Any = None  # "DD:HH:MM:SS", or a dict of timedelta arguments ({hours: 12})
    val_check_interval: int = 250
    val_batches: int = 16
    validate_at_start: bool = True
    log_every_n_steps: int = 10
    precision: str = "32"
    gradient_clip: float = 1.0
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    checkpoint_every_n_steps: int = 250
    keep_last_k: int = 2
    progress_bar: bool = True
    max_nonfinite_steps: int = 10  # steps with a NaN/inf loss skipped before the run is stopped
    dist_timeout_s: float = 1800.0  # process-group timeout: how long ranks wait for a dead or hung peer
    # how model.compile=true compiles: torch.compile backend and mode
    compile_backend: str = "inductor"
    compile_mode: str = "default"

    def __post_init__(self):
        if self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.gradient_clip < 0:
            raise ConfigError(f"trainer.gradient_clip must be >= 0 (0 = off), got {self.gradient_clip}")
        if self.val_check_interval < 1 or self.checkpoint_every_n_steps < 1:
            raise ConfigError("trainer.val_check_interval and trainer.checkpoint_every_n_steps must be >= 1")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"trainer.max_nonfinite_steps must be >= 0 (0 = stop at the first NaN/inf loss), "
                              f"got {self.max_nonfinite_steps}")
        check_choice("trainer.compile_mode", self.compile_mode, COMPILE_MODES)
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"trainer.dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")
        check_positive("trainer.dist_timeout_s", self.dist_timeout_s, " (seconds)")
        check_non_negative("trainer.gradient_clip", self.gradient_clip, " (0 = off)")
        check_int("trainer.val_batches", self.val_batches, minimum=0, hint=" (0 = the whole validation split)")
        check_int("trainer.log_every_n_steps", self.log_every_n_steps, minimum=0, hint=" (0 = no logging)")
        check_int("trainer.num_nodes", self.num_nodes, minimum=1, hint=" (machines the run spans)")
        check_int("trainer.keep_last_k", self.keep_last_k, minimum=-1,
                  hint=" (-1 = keep every checkpoint, 0 = only last.ckpt, k = the last k and last.ckpt)")
        self.max_time = _check_max_time(self.max_time)
        self.accelerator = _check_accelerator(self.accelerator)
        self.devices = _check_devices(self.devices)
        check_launch_environment(os.environ)


def _check_max_time(value):
    """``trainer.max_time``: what Lightning's Timer accepts (else it raises deep inside the Trainer)."""
    fix = "write DD:HH:MM:SS (e.g. trainer.max_time=00:12:00:00) or a dict (trainer.max_time={hours:12})"
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = [k for k in value if k not in MAX_TIME_KEYS]
        if unknown:
            raise ConfigError(f"trainer.max_time has unknown key '{unknown[0]}'.{did_you_mean(str(unknown[0]), MAX_TIME_KEYS)} "
                              f"Its keys are {', '.join(MAX_TIME_KEYS)}")
        for k, v in value.items():
            check_non_negative(f"trainer.max_time.{k}", v)
        if sum(value.values()) <= 0:
            raise ConfigError(f"trainer.max_time={value} is no time at all; {fix}, or null for no limit")
        return dict(value)
    if isinstance(value, str):
        match = MAX_TIME_PATTERN.fullmatch(value.strip())
        if match is None:
            raise ConfigError(f"trainer.max_time={value!r} is not a duration: {fix}, or null for no limit")
        if not any(int(g) for g in match.groups()):
            raise ConfigError(f"trainer.max_time={value!r} is no time at all; {fix}, or null for no limit")
        return value.strip()
    raise ConfigError(f"trainer.max_time={value!r} is not a duration: {fix}, or null for no limit")


def _check_accelerator(value):
    names = list(ACCELERATORS)
    try:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        names += [n for n in AcceleratorRegistry.available_accelerators() if n not in names]
    except Exception:  # Lightning's registry is a nicety: the built-in names are enough to check
        pass
    if isinstance(value, str) and value.lower() in names:
        return value.lower()
    hint = did_you_mean(str(value).lower(), names)
    raise ConfigError(f"unknown trainer.accelerator {value!r}.{hint} Choose one of {', '.join(names)} "
                      f"(auto picks a GPU when one is visible, else the CPU).")


def _check_devices(value):
    """``trainer.devices``: auto, a count (>= 1, or -1 for all), or device indices (a list or "0,1")."""
    fix = ("trainer.devices is auto, a number of devices (>= 1, or -1 for every visible one), or a list of "
           "device indices such as [0,1] or \"0,1\"")
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return text
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        elif re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text):
            return text
        else:
            raise ConfigError(f"{fix}; got {value!r}")
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{fix}; got {value!r}")
    if isinstance(value, int):
        if value == 0 or value < -1:
            raise ConfigError(f"{fix}; got {value} (0 devices cannot train: use trainer.accelerator=cpu "
                              f"trainer.devices=1 for one CPU process)")
        return value
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
            raise ConfigError(f"{fix}; got {list(value)}")
        if len(set(value)) != len(value):
            raise ConfigError(f"trainer.devices lists a device twice: {list(value)}")
        return list(value)
    raise ConfigError(f"{fix}; got {value!r}")


#: integer variables a launcher (torchrun, SLURM) sets; garbage in them would fail deep inside torch or Lightning
_LAUNCH_INTS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_PORT",
                "SLURM_NTASKS", "SLURM_PROCID", "SLURM_NNODES", "SLURM_LOCALID", "SLURM_NODEID")


def check_launch_environment(env) -> None:
    """The launcher's environment variables are integers that agree with each other.

    Refused: a non-integer (``LOCAL_WORLD_SIZE=abc``), a rank outside its world
    (``RANK=3`` with ``WORLD_SIZE=2``), and ``WORLD_SIZE`` > 1 without ``RANK`` or ``LOCAL_RANK``
    (a half-set launch: the process would train alone while the user expects several).
    """
    values = {}
    for name in _LAUNCH_INTS:
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        text = raw.strip().split("(")[0] if name.startswith("SLURM_") else raw.strip()
        if not re.fullmatch(r"\d+", text):
            raise ConfigError(f"the environment variable {name}={raw!r} is not a non-negative integer. A launcher "
                              f"(torchrun, srun) sets it; unset it (unset {name}) or fix the launch command.")
        values[name] = int(text)
    for size in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NNODES"):
        if values.get(size) == 0:
            raise ConfigError(f"the environment variable {size}=0: a launch has at least one process. "
                              f"Unset it (unset {size}) or fix the launch command.")
    for rank, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                       ("SLURM_NODEID", "SLURM_NNODES")):
        if rank in values and size in values and values[rank] >= values[size]:
            raise ConfigError(f"the environment says {rank}={values[rank]} but {size}={values[size]}: ranks count "
                              f"from 0 to {size}-1. Fix the launch command, or unset both for a single process.")
    if values.get("WORLD_SIZE", 1) > 1 and "RANK" not in values and "LOCAL_RANK" not in values:
        raise ConfigError(f"the environment sets WORLD_SIZE={values['WORLD_SIZE']} but not RANK: this process would "
                          f"train alone. Launch the processes with torchrun (torchrun --nproc-per-node "
                          f"{values['WORLD_SIZE']} -m lmkit ...), which sets both, or unset WORLD_SIZE.")


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | tensorboard | wandb | none
    project: str = "lmkit"
    entity: str | None = None
    mode: str = "auto"  # wandb: auto (offline without an API key) | online | offline | disabled
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.name not in ("csv", "tensorboard", "wandb", "none"):
            raise ConfigError(f"logger.name must be csv, tensorboard, wandb or none; got {self.name!r}."
                              f"{did_you_mean(str(self.name), ('csv', 'tensorboard', 'wandb', 'none'))}".rstrip("."))
        check_choice("logger.mode", self.mode, LOGGER_MODES)


@dataclass
class StrategyConfig:
    """Built-in strategies: ``auto`` (Lightning's choice) and ``ddp``."""

    name: str = "auto"
    process_group_backend: str | None = None  # nccl / gloo; None = Lightning's default
    find_unused_parameters: bool = False

    def __post_init__(self):
        backend = self.process_group_backend
        if backend is None:
            return
        # torch also takes per-device pairs: "cpu:gloo,cuda:nccl"
        for part in str(backend).split(","):
            name = part.split(":", 1)[-1].strip()
            if name not in PROCESS_GROUP_BACKENDS:
                raise ConfigError(f"unknown strategy.process_group_backend {backend!r}.{did_you_mean(name, PROCESS_GROUP_BACKENDS)} "
                                  f"Choose nccl (GPUs), gloo (CPU), mpi or ucc, or null for Lightning's choice.")


TOP_LEVEL_KEYS = {
    "model", "objective", "optimizer", "scheduler", "data", "tokenizer", "trainer", "strategy", "logger",
    "seed", "resume", "fork", "resume_allow_data_change", "callbacks", "callback_options", "output_dir", "experiment",
    "init_from",
}
