"""Energy of a run and its emissions: ``CO2e = energy (kWh) × PUE × grid carbon intensity``.

Energy is measured, in order of preference, by codecarbon's ``OfflineEmissionsTracker``
(CPU, RAM and NVIDIA GPUs; it makes no network calls, unlike ``EmissionsTracker``, which
looks up the machine's location online), by NVML's GPU energy counters, or estimated as
board power × devices × time. The energy is that of the machine (IT equipment); the
data centre's overhead enters through the PUE, and the grid's carbon intensity turns the
facility energy into CO2-equivalent.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from lmkit.errors import ConfigError, did_you_mean

#: kg CO2e per kWh: IEA's 2019 world average electricity intensity (475 g/kWh), codecarbon's
#: fallback too; used when neither carbon_intensity nor a country is given
WORLD_CARBON_INTENSITY = 0.475
#: power usage effectiveness (facility energy / IT energy): the average reported in Uptime
#: Institute's 2023 Global Data Center Survey. lmkit cannot know the facility; hyperscale
#: clouds report about 1.1 (set pue=1.1 there), a desk machine has none (pue=1.0)
DEFAULT_PUE = 1.58
ENERGY_METHODS = ("auto", "codecarbon", "nvml", "power", "none")


def emissions_kg(energy_kwh: float, pue: float, intensity: float) -> float:
    """kg CO2e of ``energy_kwh`` of IT energy in a facility of ``pue`` on a grid of ``intensity`` kg/kWh."""
    return energy_kwh * pue * intensity


def _quiet_codecarbon() -> None:
    """Import codecarbon with its logger at ERROR (it logs INFO lines while a tracker is built, and sets
    its level from CODECARBON_LOG_LEVEL when first imported). Raises ImportError without it."""
    os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
    import codecarbon  # noqa: F401

    logging.getLogger("codecarbon").setLevel(logging.ERROR)


def _energy_mix() -> dict | None:
    try:
        _quiet_codecarbon()
        from codecarbon.input import DataSource
    except ImportError:
        return None
    return DataSource().get_global_energy_mix_data()


def check_country(code: str | None) -> str | None:
    """``code`` upper-cased if codecarbon's energy-mix data knows it (3-letter ISO, e.g. USA, FRA, CAN)."""
    if code in (None, ""):
        return None
    mix = _energy_mix()
    if mix is None:
        raise ConfigError(f"country_iso_code={code} needs codecarbon's grid data: pip install codecarbon "
                          f"(or lmkit[energy]), or give carbon_intensity in kg CO2e/kWh instead.")
    code = str(code).upper()
    if code not in mix:
        raise ConfigError(f"unknown country_iso_code '{code}'.{did_you_mean(code, mix)} Use the 3-letter ISO code "
                          f"(USA, FRA, CAN, DEU, ...).")
    return code


def carbon_intensity(explicit: float | None, country: str | None) -> tuple[float, str]:
    """(kg CO2e/kWh, where it comes from): the explicit value, the country's grid, or the world average."""
    if explicit is not None:
        return float(explicit), "given"
    if country:
        mix = _energy_mix() or {}
        if country in mix:
            return float(mix[country]["carbon_intensity"]) / 1000.0, f"{country} grid, codecarbon data"
    return WORLD_CARBON_INTENSITY, "world average"


@dataclass
class Energy:
    """Measured or estimated energy (kWh, IT equipment only) and how it was obtained."""

    kwh: float
    method: str


class PowerMeter:
    """Board power × devices × elapsed time (no meter: the estimate of last resort)."""

    def __init__(self, power_w: float, devices: int, what: str):
        self.power_w, self.devices, self.what = power_w, devices, what

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> Energy:
        hours = (time.perf_counter() - self._t0) / 3600
        return Energy(self.power_w * self.devices * hours / 1000, f"{self.what} {self.power_w:g} W × {self.devices} × time")


class NvmlMeter:
    """NVML's cumulative energy counters (Volta and newer) of the given GPUs, differenced."""

    def __init__(self, indices: list[int]):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._read()  # raises NVMLError_NotSupported on GPUs without the counter

    def _read(self) -> int:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)  # mJ

    def start(self) -> None:
        self._mj = self._read()

    def stop(self) -> Energy:
        return Energy((self._read() - self._mj) / 3.6e9, f"NVML energy counters, {len(self._handles)} GPU(s)")


class CodecarbonMeter:
    """codecarbon's ``OfflineEmissionsTracker`` writing ``emissions.csv`` into ``output_dir``; no network.

    Its hardware probe takes about a second, so the tracker is built and started on a thread
    while the run sets up; :meth:`stop` waits for it and scales the energy it measured to the
    whole time since :meth:`start` (its average power over the untracked first second).
    Logging is kept to errors.
    """

    def __init__(self, output_dir: str, country: str | None, gpu_ids: list[int] | None,
                 force_cpu_power: float | None, force_ram_power: float | None, measure_power_secs: float):
        _quiet_codecarbon()
        from codecarbon import OfflineEmissionsTracker

        kwargs = dict(output_dir=output_dir, output_file="emissions.csv", project_name="lmkit", log_level="error",
                      measure_power_secs=measure_power_secs, save_to_file=True, allow_multiple_runs=True)
        if country:
            kwargs["country_iso_code"] = country
        if gpu_ids is not None:
            kwargs["gpu_ids"] = gpu_ids
        if force_cpu_power is not None:
            kwargs["force_cpu_power"] = force_cpu_power
        if force_ram_power is not None:
            kwargs["force_ram_power"] = force_ram_power
        self._make = lambda: OfflineEmissionsTracker(**kwargs)
        self._tracker = self._error = None
        self._thread = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

        def run():
            try:
                self._tracker = self._make()
                self._tracker.start()
            except Exception as e:  # noqa: BLE001 - reported by stop(), the run goes on
                self._error = e

        self._thread = threading.Thread(target=run, name="lmkit-codecarbon", daemon=True)
        self._thread.start()

    def stop(self) -> Energy | None:
        self._thread.join()
        if self._tracker is None:
            return None
        self._tracker.stop()
        span = time.perf_counter() - self._t0
        data = self._tracker.final_emissions_data
        scale = span / data.duration if data.duration and data.duration > 0 else 1.0
        parts = [f"{name} {kwh * scale:.2g}" for name, kwh in (("CPU", data.cpu_energy), ("GPU", data.gpu_energy),
                                                                ("RAM", data.ram_energy)) if kwh]
        return Energy(float(data.energy_consumed) * scale,
                      "codecarbon offline" + (f": {', '.join(parts)} kWh" if parts else ""))


def make_meter(method: str, *, output_dir: str, accelerator=None, power_w: float | None = None, devices: int = 1,
               gpu_ids: list[int] | None = None, country: str | None = None, force_cpu_power: float | None = None,
               force_ram_power: float | None = None, measure_power_secs: float = 15.0):
    """The meter ``method`` asks for (``auto``: codecarbon, else NVML on GPUs, else board power), or None.

    ``accelerator``: the :class:`~lmkit.accounting.hardware.Accelerator` of the devices (its board
    power for the ``power`` method, unless ``power_w`` is given); ``devices``: how many on this node.
    """
    if method == "none":
        return None
    if method in ("auto", "codecarbon"):
        try:
            return CodecarbonMeter(output_dir, country, gpu_ids, force_cpu_power, force_ram_power, measure_power_secs)
        except ImportError:
            if method == "codecarbon":
                raise ConfigError("energy=codecarbon but codecarbon is not installed: pip install codecarbon "
                                  "(or lmkit[energy]), or use energy=auto.") from None
    if method in ("auto", "nvml") and gpu_ids:
        try:
            return NvmlMeter(gpu_ids)
        except Exception:  # noqa: BLE001 - no pynvml, no driver, or no energy counter: fall back
            if method == "nvml":
                raise ConfigError("energy=nvml but NVML's energy counters cannot be read here (pynvml missing, "
                                  "or a GPU older than Volta); use energy=auto.") from None
    power = power_w if power_w is not None else (accelerator.power_w if accelerator is not None else None)
    if power is None:
        return None  # the CPU: no board power to multiply by
    what = "given power" if power_w is not None else f"{accelerator.name} board power"
    return PowerMeter(power, devices, what)
