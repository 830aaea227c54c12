"""``python -m lmkit generate MODEL prompt="..." [OPTION=VALUE ...]``: text from a trained model, streamed.

MODEL is an lmkit run directory (its newest checkpoint), a checkpoint inside one, or a local
Hugging Face model directory (gpt2, llama, t5, bart; e.g. one written by ``lmkit export``).
Decoders (gpt, llama) continue the prompt; encoder-decoders (t5, bart) encode it and decode from
the start token the model was trained with (T5 span infilling: put ``<extra_id_0>``... in
the prompt; the fill of each sentinel is listed after the text). The text is printed as it is
produced. Encoders (bert, albert) fill masks: each ``[MASK]`` of the prompt gets its top_k
tokens with their probabilities (options: prompt, prompts_file, top_k, device).

Options (OPTION=VALUE):
  prompt=TEXT             the prompt (or prompts_file=PATH: one prompt per line)
  max_new_tokens=64       tokens to generate at most
  temperature=0.8         0 = greedy
  top_k=K                 sample among the K most likely tokens (default: all)
  top_p=1.0               nucleus sampling: the most likely tokens up to this mass, in (0, 1]
  repetition_penalty=1.0  > 1 discourages tokens already in the context
  num_samples=1           samples per prompt (decoded together as one batch)
  seed=N                  makes sampling reproducible
  stop=[S1,S2]            stop strings: the text ends before the first one
  device=auto             cpu, cuda, cuda:1 ... (auto: cuda when available)
  use_cache=true          false: rerun the whole context every step (slow; for checks)
  cache=dynamic           static: a fixed-shape cache (multiples of 256 positions; gpt, llama), same output
  compile=false           true: torch.compile the decode step over a static cache (CUDA graphs on a GPU);
                          compiles once per model and batch size (seconds), then every step reuses it
  template=TEXT           SFT prompt template ({prompt} = the prompt); default: the run's objective.template
  raw=false               true: a run trained with objective sft gets the prompt as plain text (no template)

A run trained with ``+objective=sft`` answers prompts: the prompt is written in the run's
template between the markers it was trained with (``[NLU] template(prompt) [S2S]``) and the
response ends at the ``<eos>`` it learned.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lmkit.errors import ConfigError, did_you_mean

USAGE = "usage: python -m lmkit generate RUN_DIR|CHECKPOINT|HF_DIR prompt=\"...\" [OPTION=VALUE ...]"
OPTIONS = ("prompt", "prompts_file", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
           "num_samples", "seed", "stop", "device", "use_cache", "cache", "compile", "template", "raw")
_TEXT = ("prompt", "prompts_file", "device", "template", "cache")


def _value(key: str, raw: str):
    if key in _TEXT:
        return raw
    import yaml

    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if key == "stop":
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, list) else [raw]
    if key == "top_k" and value in (None, "null", "none", "None"):
        return None
    if key in ("use_cache", "raw", "compile"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={raw}: give true or false")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={raw}: give a number")


def parse(argv: list[str]) -> tuple[str, dict]:
    model, options = None, {}
    for arg in argv:
        if "=" not in arg:
            if arg.startswith("-"):
                raise ConfigError(f"generate: unknown option {arg}; options are written key=value. {USAGE}")
            if model is not None:
                raise ConfigError(f"generate takes one model (got '{model}' and '{arg}'); give the prompt as "
                                  f"prompt=\"...\". {USAGE}")
            model = arg
            continue
        key, raw = arg.split("=", 1)
        key = key.lstrip("+")
        if key not in OPTIONS:
            raise ConfigError(f"generate: unknown option '{key}'.{did_you_mean(key, OPTIONS)} Options: "
                              f"{', '.join(OPTIONS)}")
        options[key] = _value(key, raw)
    if model is None:
        raise ConfigError(f"generate needs a model: a run directory, a checkpoint or a Hugging Face directory. {USAGE}")
    return model, options


def _prompts(options: dict) -> list[str]:
    if "prompt" in options and "prompts_file" in options:
        raise ConfigError("give prompt=... or prompts_file=..., not both")
    if "prompts_file" in options:
        path = Path(options.pop("prompts_file"))
        if not path.is_file():
            raise ConfigError(f"prompts_file={path} does not exist (one prompt per line)")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompts_file={path} holds no prompt (one prompt per line)")
        return prompts
    if "prompt" not in options:
        raise ConfigError(f"generate needs a prompt: prompt=\"...\" (or prompts_file=PATH). {USAGE}")
    return [options.pop("prompt")]


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}: not a device (cpu, cuda, cuda:0 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is available")
    return name


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    from lmkit.generation import GenerationOptions, generate, load_for_generation

    model_path, options = parse(argv)
    prompts = _prompts(options)
    device = _device(options.pop("device", None))
    template, raw = options.pop("template", None), options.pop("raw", False)
    GenerationOptions(**options).check()  # bad values fail before the model is read
    from lmkit.objectives.sft import run_format

    sft = None if raw else run_format(model_path, template)
    model, tokenizer, info = load_for_generation(model_path, device=device, allow_encoders=True)
    out = sys.stdout
    if model.kind == "encoder":
        return _fill_masks(model, tokenizer, prompts, options, out)
    if sft is not None:
        return _respond(model, tokenizer, sft, prompts, info, options, out)
    samples = options.get("num_samples", 1)

    def stream(prompt_index: int, sample_index: int, text: str) -> None:
        out.write(text)
        out.flush()

    for n, prompt in enumerate(prompts):
        if len(prompts) > 1:
            out.write(f"{'' if n == 0 else chr(10)}=== prompt {n + 1} ===\n")
        if samples == 1:
            if model.kind == "decoder":
                out.write(prompt)
            texts = generate(model, tokenizer, prompt, stream=stream, **info, **options)
            out.write("\n")
            _write_fills(model, tokenizer, info, prompt, texts[0], out)
        else:
            texts = generate(model, tokenizer, prompt, **info, **options)
            for i, text in enumerate(texts):
                out.write(f"--- sample {i + 1} ---\n{prompt if model.kind == 'decoder' else ''}{text}\n")
                _write_fills(model, tokenizer, info, prompt, text, out)
        out.flush()
    return 0


def _respond(model, tokenizer, fmt, prompts: list[str], info: dict, options: dict, out) -> int:
    """An SFT run's responses: the prompt in its template, then the response (streamed when one sample)."""
    from lmkit.objectives.sft import respond

    for n, prompt in enumerate(prompts):
        if len(prompts) > 1:
            out.write(f"{'' if n == 0 else chr(10)}=== prompt {n + 1} ===\n")
        if options.get("num_samples", 1) == 1:
            out.write(fmt.render(prompt))
            respond(model, tokenizer, fmt, prompt, decoder_start_id=info.get("decoder_start_id"),
                    stream=lambda i, text: (out.write(text), out.flush()), **options)
            out.write("\n")
        else:
            for i, text in enumerate(respond(model, tokenizer, fmt, prompt, decoder_start_id=info.get("decoder_start_id"),
                                             **options)):
                out.write(f"--- sample {i + 1} ---\n{fmt.render(prompt)}{text}\n")
        out.flush()
    return 0


def _write_fills(model, tokenizer, info: dict, prompt: str, text: str, out) -> None:
    """T5 span infilling: one line per sentinel of the prompt with the text the model put there."""
    if info.get("architecture") != "t5" or "<extra_id_" not in prompt:
        return
    from lmkit.generation import encode_text, span_fills

    for mark, fill in span_fills(tokenizer, encode_text(tokenizer, text)).items():
        if mark in prompt:
            out.write(f"{mark}: {fill}\n")


def _fill_masks(model, tokenizer, prompts: list[str], options: dict, out) -> int:
    from lmkit.generation import fill_mask

    extra = sorted(set(options) - {"top_k"})
    if extra:
        raise ConfigError(f"an encoder fills masks: {', '.join(extra)} do not apply (options: prompt, prompts_file, "
                          f"top_k, device)")
    for n, prompt in enumerate(prompts):
        if len(prompts) > 1:
            out.write(f"{'' if n == 0 else chr(10)}=== prompt {n + 1} ===\n")
        for i, candidates in enumerate(fill_mask(model, tokenizer, prompt, options.get("top_k") or 5)):
            shown = ", ".join(f"{text!r} {p:.3f}" for text, p in candidates)
            out.write(f"[MASK] {i + 1}: {shown}\n")
        out.flush()
    return 0
