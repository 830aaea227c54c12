"""Structured configs of the sections that are not pluggable components."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmkit.errors import ConfigError

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    """Where text comes from and how it is batched."""

    source: str = "tinyshakespeare"  # a registered dataset source
    path: Any = None  # file, directory or list of them (text, jsonl, hf)
    text_field: str = "text"
    hf_builder: str | None = None
    doc_separator: str | None = None
    val_fraction: float = 0.1
    seq_len: int = 128
    batch_size: int = 32  # micro-batch, per rank
    grad_accum: int = 1
    batch_ramp_start: int = 1  # micro-batches per step at the start of the ramp
    batch_ramp_steps: int = 0  # 0 = no ramp
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


@dataclass
class TokenizerConfig:
    name: str = "byte"
    vocab_size: int = 4096  # trained tokenizers only
    min_frequency: int = 2
    num_sentinels: int = 0  # raised automatically to what the objective needs


@dataclass
class TrainerConfig:
    """How long and how the loop runs."""

    max_steps: int = 1000
    max_time: str | None = None  # "DD:HH:MM:SS"
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
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}")
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"trainer.dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | tensorboard | wandb | none
    project: str = "lmkit"
    entity: str | None = None
    mode: str = "auto"  # wandb: auto (offline without an API key) | online | offline | disabled
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.name not in ("csv", "tensorboard", "wandb", "none"):
            raise ConfigError(f"logger.name must be csv, tensorboard, wandb or none; got {self.name!r}")


@dataclass
class StrategyConfig:
    """Built-in strategies: ``auto`` (Lightning's choice) and ``ddp``."""

    name: str = "auto"
    process_group_backend: str | None = None  # nccl / gloo; None = Lightning's default
    find_unused_parameters: bool = False


TOP_LEVEL_KEYS = {
    "model", "objective", "optimizer", "scheduler", "data", "tokenizer", "trainer", "strategy", "logger",
    "seed", "resume", "fork", "callbacks", "callback_options", "output_dir", "experiment",
}
