"""Compute accounting: model FLOPs per token, accelerator peaks, MFU, energy and emissions.

* :mod:`lmkit.accounting.flops`: ``6N + 12·L·H·Q·T`` per token, from a built model or a config;
* :mod:`lmkit.accounting.hardware`: dense peaks and board power of common accelerators;
* :mod:`lmkit.accounting.energy`: codecarbon (offline) / NVML / board-power meters, CO2e;
* :mod:`lmkit.accounting.callback`: the ``compute_accounting`` training callback;
* :mod:`lmkit.accounting.estimate`: FLOPs, time, energy and CO2e of a planned run (``lmkit estimate``).
"""
from lmkit.accounting.energy import DEFAULT_PUE, WORLD_CARBON_INTENSITY, carbon_intensity, emissions_kg
from lmkit.accounting.flops import FlopsModel, flops_from_config, flops_from_model, six_nd
from lmkit.accounting.hardware import ACCELERATORS, Accelerator, detect_accelerator, find_accelerator

__all__ = ["ACCELERATORS", "Accelerator", "DEFAULT_PUE", "FlopsModel", "WORLD_CARBON_INTENSITY", "carbon_intensity",
           "detect_accelerator", "emissions_kg", "find_accelerator", "flops_from_config", "flops_from_model", "six_nd"]
