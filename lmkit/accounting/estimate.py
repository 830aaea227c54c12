"""FLOPs, time, energy and CO2e of a planned run (what ``python -m lmkit estimate`` prints)."""
from __future__ import annotations

from dataclasses import dataclass

from lmkit.accounting.energy import emissions_kg
from lmkit.accounting.flops import FlopsModel, six_nd
from lmkit.accounting.hardware import Accelerator


@dataclass(frozen=True)
class Plan:
    """A planned run: the model's FLOPs form, the data, and the machines.

    ``tokens``: encoder-side (or decoder-only) training tokens; an encoder–decoder's decoder
    sees ``tokens · decoder_len / seq_len``. Exactly one of ``mfu`` (an assumed fraction of
    the peak) and ``hours`` (a known duration) sets the time.
    """

    flops: FlopsModel
    seq_len: int
    tokens: float
    accelerator: Accelerator
    precision: str
    devices: int
    pue: float
    intensity: float
    mfu: float | None = None
    hours: float | None = None
    power_w: float | None = None
    decoder_len: int | None = None
    #: ``((tokens, seq_len), ...)`` of a run whose sequence length changes (``data.seq_len_schedule``);
    #: None = all ``tokens`` at ``seq_len``
    phases: tuple[tuple[float, int], ...] | None = None


@dataclass(frozen=True)
class Estimate:
    """What a :class:`Plan` costs. Energies in kWh: ``device_kwh`` of the accelerators at board power,
    ``facility_kwh`` with the PUE folded in (what the grid supplies); ``co2e_kg`` of the latter."""

    flops_per_token: float
    flops: float
    six_nd: float
    peak: float
    seconds: float
    mfu: float
    power_w: float
    device_kwh: float
    facility_kwh: float
    co2e_kg: float


def estimate(plan: Plan) -> Estimate:
    """FLOPs ``(6N + attention)·D``, time ``FLOPs / (devices · peak · MFU)``, energy ``power · devices · time``,
    facility energy ``× PUE`` and CO2e ``× carbon intensity``."""
    f = plan.flops
    flops = dec_tokens = 0.0
    for tokens, seq_len in plan.phases or ((plan.tokens, plan.seq_len),):
        dec_len = plan.decoder_len or seq_len
        flops += tokens * f.per_token(seq_len)
        if f.decoder_layers:
            dec_tokens += tokens * dec_len / seq_len
            flops += tokens * dec_len / seq_len * f.per_decoder_token(dec_len, seq_len)
    peak = plan.accelerator.peak(plan.precision)
    if plan.hours is not None:
        seconds = plan.hours * 3600
        mfu = flops / (plan.devices * peak * seconds)
    else:
        mfu = float(plan.mfu)
        seconds = flops / (plan.devices * peak * mfu)
    power = plan.power_w if plan.power_w is not None else plan.accelerator.power_w
    device_kwh = power * plan.devices * seconds / 3600 / 1000
    return Estimate(
        flops_per_token=flops / plan.tokens, flops=flops,
        six_nd=six_nd(f.params, plan.tokens) + six_nd(f.decoder_params, dec_tokens), peak=peak, seconds=seconds,
        mfu=mfu, power_w=power, device_kwh=device_kwh, facility_kwh=device_kwh * plan.pue,
        co2e_kg=emissions_kg(device_kwh, plan.pue, plan.intensity))


def scaled(value: float, units: tuple[tuple[float, str], ...]) -> str:
    """``value`` in the largest of ``units`` (factor, name) it reaches: 3 significant digits, or whole
    numbers with thousands separators from 100 up (``1,289 MWh``)."""
    factor, name = next(((f, n) for f, n in units if abs(value) >= f), units[-1])
    x = value / factor
    return f"{x:,.0f} {name}" if abs(x) >= 100 else f"{x:.3g} {name}"


ENERGY_UNITS = ((1e3, "MWh"), (1.0, "kWh"), (1e-3, "Wh"))
MASS_UNITS = ((1e3, "t"), (1.0, "kg"), (1e-3, "g"))
TIME_UNITS = ((86400.0, "days"), (3600.0, "h"), (60.0, "min"), (1.0, "s"))
