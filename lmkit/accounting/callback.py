"""The ``compute_accounting`` callback: model FLOPs, tokens, achieved FLOP/s, MFU, energy and CO2e of a run."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import lightning as L

from lmkit.accounting.energy import (DEFAULT_PUE, ENERGY_METHODS, carbon_intensity, check_country, emissions_kg,
                                     make_meter)
from lmkit.accounting.flops import flops_from_model
from lmkit.accounting.hardware import detect_accelerator, find_accelerator, matmul_precision
from lmkit.errors import ConfigError
from lmkit.strategies import data_parallel_world

_KEY = "callback_options.compute_accounting"


@dataclass
class ComputeAccountingConfig:
    """Options of ``compute_accounting``.

    ``energy``: how energy is measured: ``auto`` (codecarbon's offline tracker when installed,
    else NVML's GPU counters, else board power × time), ``codecarbon``, ``nvml``, ``power``
    or ``none``. ``pue``: the facility's power usage effectiveness. ``carbon_intensity``: kg
    CO2e per kWh (null: the country's grid from codecarbon's data when ``country_iso_code``
    is set, else the world average 0.475). ``country_iso_code``: 3-letter ISO code (USA, FRA,
    ...). ``power_w``: board power per device for ``power`` (null: the hardware table's).
    ``hardware``: the accelerator name for the peak and power when the device name is not
    recognised (e.g. ``h100``). ``force_cpu_power``/``force_ram_power``: watts handed to
    codecarbon where it cannot measure (no RAPL). ``measure_power_secs``: codecarbon's interval.
    """

    energy: str = "auto"
    pue: float = DEFAULT_PUE
    carbon_intensity: float | None = None
    country_iso_code: str | None = None
    power_w: float | None = None
    hardware: str | None = None
    force_cpu_power: float | None = None
    force_ram_power: float | None = None
    measure_power_secs: float = 15.0

    def __post_init__(self):
        if self.energy not in ENERGY_METHODS:
            raise ConfigError(f"{_KEY}.energy must be one of {', '.join(ENERGY_METHODS)}, got {self.energy!r}")
        _check_number("pue", self.pue, 1.0, " (facility energy / IT energy; 1.0 = no overhead)")
        for name in ("carbon_intensity", "power_w", "force_cpu_power", "force_ram_power"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), 0.0)
        _check_number("measure_power_secs", self.measure_power_secs, 0.0, strict=True)
        self.country_iso_code = check_country(self.country_iso_code)
        if self.hardware is not None:
            find_accelerator(self.hardware)


def _check_number(name: str, value, minimum: float, hint: str = "", strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ConfigError(f"{_KEY}.{name} must be a number {'>' if strict else '>='} {minimum:g}{hint}, got {value!r}")


class ComputeAccounting(L.Callback):
    """Logs ``train/flops_per_token`` (once), ``train/tokens_seen`` (cumulative, all data-parallel
    replicas), ``train/flops_per_s`` (achieved, model FLOPs), ``train/mfu`` (where the device's peak
    is known), and at the end ``train/energy_kwh`` and ``train/co2e_kg``; :meth:`summary` gives the
    totals for the run's summary line.

    FLOPs per step come from the step's batch shapes (:class:`~lmkit.accounting.flops.FlopsModel`),
    so encoder–decoder targets of any length count; nothing waits for the device. Energy is
    measured on global rank 0 for its node (codecarbon counts every GPU of the node) and
    multiplied by the number of nodes.
    """

    def __init__(self, cfg: ComputeAccountingConfig | None = None):
        self.cfg = cfg or ComputeAccountingConfig()
        self.model_flops = None
        self.tokens_seen = 0  # the whole run's (kept in checkpoints)
        self.flops_seen = 0.0
        self._tokens = 0  # this attempt's
        self._flops = 0.0
        self._step_s = 0.0
        self._logged_per_token = False
        self._meter = None
        self._result: dict | None = None

    # -- checkpoint state: a resumed run goes on counting ---------------------------------
    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "flops_seen": self.flops_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.flops_seen = float(state_dict.get("flops_seen", 0.0))

    # -- setup: before strategies shard the model -----------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.model_flops is not None:
            return
        self.model_flops = flops_from_model(pl_module.model)
        device = trainer.strategy.root_device
        name = None
        if device.type == "cuda":
            import torch

            name = torch.cuda.get_device_name(device)
        self.accelerator = find_accelerator(self.cfg.hardware) if self.cfg.hardware else detect_accelerator(name)
        self.precision = matmul_precision(trainer.precision)
        peak = self.accelerator.peak(self.precision) if self.accelerator and self.precision else None
        self.peak = peak  # per device
        if trainer.global_rank == 0:
            gpu_ids = list(getattr(trainer, "device_ids", None) or [device.index or 0]) if device.type == "cuda" else None
            self._meter = make_meter(
                self.cfg.energy, output_dir=str(trainer.default_root_dir), accelerator=self.accelerator,
                power_w=self.cfg.power_w, devices=trainer.num_devices, gpu_ids=gpu_ids,
                country=self.cfg.country_iso_code, force_cpu_power=self.cfg.force_cpu_power,
                force_ram_power=self.cfg.force_ram_power, measure_power_secs=self.cfg.measure_power_secs)
            if self._meter is not None:
                self._meter.start()

    # -- per step --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._t0
        if self.model_flops is None or not isinstance(batch, dict):
            return
        flops = tokens = 0
        for mb in batch.get("micro_batches", [batch]):  # shapes only: no device sync
            f, t = self.model_flops.batch_of(mb)
            flops, tokens = flops + f, tokens + t
        replicas = data_parallel_world(trainer)[1]
        flops, tokens = flops * replicas, tokens * replicas
        self._flops, self._tokens, self._step_s = self._flops + flops, self._tokens + tokens, self._step_s + elapsed
        self.flops_seen += flops
        self.tokens_seen += tokens
        if not self._logged_per_token and tokens:  # once: pl_module.log would repeat it every step
            for logger in trainer.loggers:
                logger.log_metrics({"train/flops_per_token": flops / tokens}, step=trainer.global_step)
            self._logged_per_token = True
        pl_module.log("train/tokens_seen", float(self.tokens_seen))
        if elapsed > 0:
            pl_module.log("train/flops_per_s", flops / elapsed)
            if self.peak:
                pl_module.log("train/mfu", flops / elapsed / (self.peak * trainer.world_size))

    # -- end -------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or self.model_flops is None:
            return
        result = {"flops": self._flops, "tokens": self._tokens, "flops_per_s": self._flops / self._step_s
                  if self._step_s > 0 else None, "mfu": None, "peak": None, "energy_kwh": None,
                  "energy_method": None, "pue": self.cfg.pue}
        if self.peak and result["flops_per_s"]:
            result["mfu"] = result["flops_per_s"] / (self.peak * trainer.world_size)
            result["peak"] = f"{self.accelerator.name} {self.precision}"
        energy = self._meter.stop() if self._meter is not None else None
        self._meter = None
        if energy is not None:
            nodes = max(1, int(getattr(trainer, "num_nodes", 1) or 1))
            intensity, source = carbon_intensity(self.cfg.carbon_intensity, self.cfg.country_iso_code)
            result.update(energy_kwh=energy.kwh * nodes, energy_method=energy.method + (
                f", node 0 × {nodes} nodes" if nodes > 1 else ""), intensity=intensity, intensity_source=source,
                co2e_kg=emissions_kg(energy.kwh * nodes, self.cfg.pue, intensity))
            for logger in trainer.loggers:
                logger.log_metrics({"train/energy_kwh": result["energy_kwh"], "train/co2e_kg": result["co2e_kg"]},
                                   step=trainer.global_step)
        self._result = result

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._meter is not None:  # the run failed before on_train_end: stop codecarbon's thread
            try:
                self._meter.stop()
            finally:
                self._meter = None

    def summary(self) -> dict | None:
        """This attempt's totals (rank 0, after training), or None: see :func:`format_compute`."""
        return self._result


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_compute(result: dict) -> str:
    """The summary line: ``compute: FLOPs, tokens, achieved FLOP/s (MFU), energy × PUE → CO2e (method)``."""
    parts = [f"{result['flops']:.3g} FLOPs", f"{result['tokens']:.3g} tokens"]
    if result.get("flops_per_s"):
        rate = _si(result["flops_per_s"], "FLOP/s") + " achieved"
        if result.get("mfu") is not None:
            rate += f" (MFU {100 * result['mfu']:.1f}% of {result['peak']})"
        parts.append(rate)
    if result.get("energy_kwh") is not None:
        parts.append(f"energy {result['energy_kwh']:.3g} kWh × PUE {result['pue']:g} → {result['co2e_kg']:.3g} kg CO2e "
                     f"at {result['intensity']:.3g} kg/kWh ({result['intensity_source']}; {result['energy_method']})")
    else:
        parts.append("energy not measured (no meter for this device; see callback_options.compute_accounting)")
    return "compute: " + ", ".join(parts)
