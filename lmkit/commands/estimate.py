"""``python -m lmkit estimate [CONFIG OVERRIDES] hardware=NAME num_devices=N [OPTION=VALUE ...]``: cost of a planned run.

Prints the training FLOPs (6N per token plus the attention term, the form of
docs/benchmarks.md), the time at an assumed model FLOPs utilisation, the energy at board
power, and the CO2e. The model, data and trainer settings are composed from the same
config tree as a run (``model=gpt3_175b data.seq_len=2048 trainer.max_steps=...``); no model
is built. Tokens = trainer.max_steps × data.batch_size × data.grad_accum × num_devices ×
data.seq_len (data-parallel devices), unless ``tokens=`` is given.

Options (OPTION=VALUE):
  hardware=h100           accelerator (default: this machine's GPU); e.g. a100, h100, h100_pcie, h200, l4, v100
  num_devices=1           accelerators, all data-parallel
  mfu=0.4                 assumed model FLOPs utilisation, in (0, 1]
  hours=H                 a known duration instead of mfu (the MFU it implies is printed)
  tokens=D                training tokens (e.g. 3e11) instead of steps × batch × devices × seq_len
  precision=bf16          bf16, fp16, tf32 or fp32: which dense peak (default bf16; fp16 where no bf16)
  power_w=W               power per device (default: the board power of the hardware table)
  pue=1.58                the data centre's power usage effectiveness (facility / IT energy)
  carbon_intensity=C      kg CO2e per kWh (default: country_iso_code's grid, else the world average 0.475)
  country_iso_code=FRA    3-letter ISO code of the grid (codecarbon's data)
  decoder_len=T           encoder-decoders: decoder tokens per sequence (default data.seq_len)
"""
from __future__ import annotations

import math

from lmkit.errors import ConfigError, did_you_mean

USAGE = ("usage: python -m lmkit estimate [model=NAME data.seq_len=N trainer.max_steps=N data.batch_size=N ...] "
         "hardware=NAME num_devices=N [OPTION=VALUE ...]")
OPTIONS = ("hardware", "num_devices", "mfu", "hours", "tokens", "precision", "power_w", "pue", "carbon_intensity",
           "country_iso_code", "decoder_len")
_TEXT = ("hardware", "precision", "country_iso_code")


def _number(key: str, raw: str, minimum: float, *, integer: bool = False, maximum: float | None = None,
            strict: bool = True, hint: str = ""):
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(value)  # yaml reads 3e11 as a string
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or value < minimum or (strict and value == minimum) or (maximum is not None and value > maximum):
        bounds = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"estimate: {key}={raw} must be {kind} {bounds}{hint}")
    return int(value) if integer else float(value)


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(estimate options, config overrides). Unknown bare keys get a did-you-mean over both."""
    from lmkit.config.compose import GROUPS
    from lmkit.config.schema import TOP_LEVEL_KEYS

    options, overrides = {}, []
    for arg in argv:
        if arg.startswith("-"):
            raise ConfigError(f"estimate: unknown flag {arg}; options are written key=value. {USAGE}")
        if "=" not in arg:
            raise ConfigError(f"estimate: '{arg}' is not key=value. {USAGE}")
        key, raw = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare in OPTIONS:
            options[bare] = raw
        elif "." in bare or bare in GROUPS or bare in TOP_LEVEL_KEYS:
            overrides.append(arg)
        else:
            raise ConfigError(f"estimate: unknown option '{bare}'.{did_you_mean(bare, OPTIONS + tuple(TOP_LEVEL_KEYS))} "
                              f"Options: {', '.join(OPTIONS)}; config overrides are written group=name or key.path=value.")
    return options, overrides


def _vocab_size(model_cfg, tokenizer_cfg) -> int:
    if getattr(model_cfg, "vocab_size", None):
        return int(model_cfg.vocab_size)
    if tokenizer_cfg.name == "byte":
        from lmkit.tokenizers.base import SPECIAL_TOKENS

        return 256 + len(SPECIAL_TOKENS) + int(tokenizer_cfg.num_sentinels)
    return int(tokenizer_cfg.vocab_size)


def _model_flops(model_cfg, component, moe, vocab: int):
    """The analytic count for built-in architectures; others are built on the meta device (no memory)."""
    import dataclasses

    from lmkit.accounting.flops import ANALYTIC_ARCHITECTURES, flops_from_config, flops_from_model

    if getattr(model_cfg, "name", "") in ANALYTIC_ARCHITECTURES:
        return flops_from_config(model_cfg, moe=moe, vocab_size=vocab)
    import torch

    with torch.device("meta"):
        return flops_from_model(component.factory(dataclasses.replace(model_cfg, vocab_size=vocab)))


def build_plan(options: dict, overrides: list[str]):
    """Compose the config like a run and turn it and the options into a :class:`~lmkit.accounting.estimate.Plan`."""
    from lmkit.accounting.energy import DEFAULT_PUE, carbon_intensity, check_country
    from lmkit.accounting.estimate import Plan
    from lmkit.accounting.hardware import PRECISIONS, detect_accelerator, find_accelerator
    from lmkit.commands.train import prepare
    from lmkit.config.compose import compose_config
    from lmkit.config.schema import DataConfig, TrainerConfig
    from lmkit.config.validate import _component_section, _split_model_extensions, typed_section
    from lmkit.plugins import get_plugin_manager

    pm = get_plugin_manager()
    args = prepare(overrides, pm)
    cfg = compose_config(pm.config_dirs(), args.overrides)
    model_node, extensions = _split_model_extensions(cfg.get("model"), pm)
    model_cfg, model_c = _component_section(cfg, pm, "model", "architecture", node=model_node)
    tokenizer_cfg, _ = _component_section(cfg, pm, "tokenizer", "tokenizer")
    data = typed_section("data", cfg.get("data", {}), DataConfig)
    trainer = typed_section("trainer", cfg.get("trainer", {}), TrainerConfig)
    max_len = getattr(model_cfg, "max_seq_len", None)
    if max_len is not None and data.seq_len > max_len:
        raise ConfigError(f"data.seq_len={data.seq_len} is longer than the model's positions "
                          f"(model.max_seq_len={max_len}). Lower data.seq_len or raise model.max_seq_len.")

    if "hardware" in options:
        accelerator = find_accelerator(options["hardware"])
    else:
        import torch

        accelerator = detect_accelerator(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        if accelerator is None:
            raise ConfigError("estimate needs hardware=NAME (no known GPU here), e.g. hardware=h100; see "
                              "python -m lmkit estimate --help.")
    precision = options.get("precision", "bf16" if accelerator.bf16 else "fp16")
    if precision not in PRECISIONS:
        raise ConfigError(f"estimate: unknown precision '{precision}'.{did_you_mean(precision, PRECISIONS)} "
                          f"Choose one of {', '.join(PRECISIONS)}.")
    if accelerator.peak(precision) is None:
        supported = [p for p in PRECISIONS if accelerator.peak(p)]
        raise ConfigError(f"estimate: {accelerator.name} has no {precision} peak; use precision={supported[0]} "
                          f"({', '.join(supported)}).")
    if "mfu" in options and "hours" in options:
        raise ConfigError("estimate: give mfu (assumed utilisation) or hours (known duration), not both.")
    devices = _number("num_devices", options.get("num_devices", "1"), 1, integer=True, strict=False)
    mfu = _number("mfu", options.get("mfu", "0.4"), 0, maximum=1, hint=" (a fraction of the peak, e.g. 0.4)")
    hours = _number("hours", options["hours"], 0) if "hours" in options else None
    phases = None
    if "tokens" in options:
        tokens = _number("tokens", options["tokens"], 0)
    else:
        sequences_per_step = float(data.batch_size * data.grad_accum * devices)
        phases = _length_phases(data, trainer.max_steps, sequences_per_step)
        tokens = sum(t for t, _ in phases)
        phases = phases if len(phases) > 1 else None
    power = _number("power_w", options["power_w"], 0) if "power_w" in options else None
    pue = _number("pue", options.get("pue", str(DEFAULT_PUE)), 1, strict=False,
                  hint=" (facility / IT energy; 1.0 = no overhead)")
    explicit = _number("carbon_intensity", options["carbon_intensity"], 0, strict=False,
                       hint=" kg CO2e/kWh") if "carbon_intensity" in options else None
    intensity, source = carbon_intensity(explicit, check_country(options.get("country_iso_code")))
    decoder_len = (_number("decoder_len", options["decoder_len"], 1, integer=True, strict=False)
                   if "decoder_len" in options else None)
    flops = _model_flops(model_cfg, model_c, extensions.get("moe"), _vocab_size(model_cfg, tokenizer_cfg))
    plan = Plan(flops, data.seq_len, tokens, accelerator, precision, devices, pue, intensity,
                mfu=None if hours is not None else mfu, hours=hours, power_w=power, decoder_len=decoder_len,
                phases=phases)
    choice = args.group_choices.get("model", [None])[0] or "model"
    if any(o.lstrip("+").startswith("model.") for o in overrides):
        choice += " with model.* overrides"
    return plan, {"model": choice, "arch": model_cfg.name, "intensity_source": source,
                  "tokens_from": "given" if "tokens" in options else
                  "trainer.max_steps × data.batch_size × data.grad_accum × num_devices × data.seq_len"
                  + (" (each phase of data.seq_len_schedule at its length)" if phases else "")}


def _length_phases(data, max_steps: int, sequences_per_step: float) -> list[tuple[float, int]]:
    """``[(tokens, seq_len), ...]`` of ``max_steps`` steps under ``data.seq_len_schedule`` (one phase without it)."""
    phases, start = [], 0
    for phase in data.seq_len_schedule or []:
        end = min(int(phase["until_step"]), max_steps)
        if end > start:
            phases.append(((end - start) * sequences_per_step * int(phase["seq_len"]), int(phase["seq_len"])))
        start = max(start, end)
    if max_steps > start:
        phases.append(((max_steps - start) * sequences_per_step * data.seq_len, data.seq_len))
    return phases or [(0.0, data.seq_len)]


def format_estimate(plan, est, about: dict) -> str:
    """The printed table."""
    from lmkit.accounting.estimate import ENERGY_UNITS, MASS_UNITS, TIME_UNITS, scaled

    f = plan.flops
    six_n = 6.0 * f.params
    attention = f.per_token(plan.seq_len) - six_n
    acc = plan.accelerator
    time_label = "time (given)" if plan.hours is not None else f"time at MFU {100 * est.mfu:.1f}% (assumed)"
    rows = [
        ("parameters N (per token)", f"{f.total_params:.4g}" + (f" (encoder {f.params:.4g}, decoder {f.decoder_params:.4g})"
                                                                if f.decoder_layers else "")),
        ("FLOPs per token", f"{est.flops_per_token:.4g}" + ("" if f.decoder_layers else
                                                             f" = 6N {six_n:.4g} + attention {attention:.4g}")),
        ("tokens", f"{plan.tokens:.4g} ({about['tokens_from']})"),
        ("training FLOPs", f"{est.flops:.4g} (6ND alone: {est.six_nd:.4g})"),
        ("hardware", f"{plan.devices} × {acc.name}, {plan.precision} dense peak {est.peak / 1e12:,.4g} TFLOP/s each"),
        (time_label, f"{scaled(est.seconds, TIME_UNITS)} ({est.seconds / 3600:,.4g} h)"
         + (f", MFU {100 * est.mfu:.1f}%" if plan.hours is not None else "")),
        ("energy (accelerators)", f"{scaled(est.device_kwh, ENERGY_UNITS)} = {est.power_w:g} W × {plan.devices} × "
                                  f"{est.seconds / 3600:,.4g} h"),
        ("energy (facility)", f"{scaled(est.facility_kwh, ENERGY_UNITS)} with PUE {plan.pue:g}"),
        ("emissions", f"{scaled(est.co2e_kg, MASS_UNITS)} CO2e at {plan.intensity:.3g} kg CO2e/kWh "
                      f"({about['intensity_source']})"),
    ]
    width = max(len(k) for k, _ in rows)
    layers = f"{f.layers}+{f.decoder_layers}" if f.decoder_layers else f"{f.layers}"
    head = f"estimate: {about['model']} ({about['arch']}, {layers} layers × {f.width}), sequence {plan.seq_len}"
    return "\n".join([head] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    from lmkit.accounting.estimate import estimate

    options, overrides = parse(argv)
    plan, about = build_plan(options, overrides)
    print(format_estimate(plan, estimate(plan), about), flush=True)
    return 0
