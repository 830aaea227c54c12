"""Text generation from an lmkit model: a KV cache, sampling, stop strings, streaming.

Decoders (gpt; llama through its ``forward_cached``) prefill the prompt into a per-layer KV
cache, then feed one token at a time; encoder–decoders (t5, bart) run the encoder once, cache
the cross-attention keys/values of its output once, and decode with a self-attention KV cache
from the decoder start token (the one the model was trained with). Architectures with neither
``forward(..., input_pos=)`` nor ``forward_cached`` are decoded without a cache (the whole
context rerun each step).

``cache=static`` (gpt, llama): the caches hold a multiple of 256 positions (at most ``max_seq_len``),
positions go in as a tensor, and every step attends over the whole cache with the unwritten positions
masked, so every decode step has the same shapes; the caches are kept per model and batch size between
calls. ``compile=true`` compiles that decode step with ``torch.compile`` (``mode="reduce-overhead"``, i.e.
CUDA graphs, on a GPU; the caches' addresses are marked static) once, and reuses it for every later call of
that shape.

Each step: repetition penalty (over the context, as transformers does), then greedy
(``temperature=0``) or temperature -> top-k -> top-p -> a sample drawn with a
``torch.Generator`` seeded by ``seed``. Generation ends at ``<eos>``, at a stop string (cut
before it; text that might start a stop string is held back until resolved, so streamed text
never shows part of one) or after ``max_new_tokens``.

Python API::

    from lmkit.generation import generate, load_for_generation
    model, tokenizer, info = load_for_generation("outputs/run")      # run dir, checkpoint or HF dir
    texts = generate(model, tokenizer, "ROMEO:", max_new_tokens=50, seed=1, **info)
"""
from __future__ import annotations

import inspect
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmkit.errors import ConfigError


@dataclass
class GenerationOptions:
    """What :func:`generate` takes (checked by :meth:`check`)."""

    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_samples: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    use_cache: bool = True
    cache: str = "dynamic"  # dynamic | static (fixed shapes: 256·n positions, masked; gpt, llama)
    compile: bool = False  # torch.compile the decode step (implies cache=static; CUDA: CUDA graphs)

    def check(self) -> "GenerationOptions":
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [str(s) for s in (self.stop or [])]
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")
        for name in ("max_new_tokens", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: give a whole number >= 1")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k={self.top_k!r}: give a whole number >= 1 (or leave it out: no top-k)")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature!r}: give a number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r}: give a number in (0, 1] (1 = no nucleus filtering)")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty!r}: give a number > 0 (1 = none)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed={self.seed!r}: give a whole number")
        from lmkit.config.checks import check_choice

        check_choice("cache", self.cache, CACHE_KINDS)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile={self.compile!r}: give true or false")
        if self.compile:
            self.cache = "static"
        if self.cache == "static" and not self.use_cache:
            raise ConfigError("cache=static (or compile=true) needs use_cache=true")
        return self


OPTION_NAMES = tuple(GenerationOptions.__dataclass_fields__)
CACHE_KINDS = ("dynamic", "static")


# --- logits processing --------------------------------------------------------------------------


def filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """``logits`` [..., V] with every token outside the ``k`` largest set to -inf (ties at the k-th value kept)."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens, in order, until their probability reaches ``p``.

    A token is kept when the probability of the tokens more likely than it is still below ``p``
    (so the most likely token is always kept); the others become -inf.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    remove_sorted = before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: a token seen in ``context`` [B, T] has its logit divided
    by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, -1, context)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, context, seen)


def next_tokens(logits: torch.Tensor, context: torch.Tensor, opts: GenerationOptions,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token [B] of each row from its last logits [B, V]."""
    logits = apply_repetition_penalty(logits.float(), context, opts.repetition_penalty)
    if opts.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k(logits / opts.temperature, opts.top_k)
    logits = filter_top_p(logits, opts.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# --- KV caches ----------------------------------------------------------------------------------


def supports_cache(model) -> bool:
    if callable(getattr(model, "forward_cached", None)):  # llama
        return True
    if model.kind == "encoder_decoder":
        fn = getattr(model, "decode", None)
    else:
        fn = model.forward
    try:
        return fn is not None and "input_pos" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def supports_static_cache(model) -> bool:
    """Decoders whose cached forward takes tensor positions (gpt, llama), without banded (local) layers."""
    if not getattr(model, "static_kv_cache", False):
        return False
    return all(getattr(getattr(block, "attn", None), "window", None) is None for block in model.transformer_blocks())


_STATIC = weakref.WeakKeyDictionary()  # model -> {(batch, length, device, dtype): {caches, compiled step}}
STATIC_BUCKET = 256  # static caches hold a multiple of this many positions (at most max_seq_len)
_STATIC_KEPT = 2  # shapes kept per model (their caches hold batch × layers × length keys and values)


def static_length(needed: int, max_seq_len: int) -> int:
    """Positions of a static cache for ``needed`` positions: rounded up to ``STATIC_BUCKET``, so that prompts and
    lengths of a similar size share one compiled step, and at most ``max_seq_len``."""
    return min(max_seq_len, -(-needed // STATIC_BUCKET) * STATIC_BUCKET)


def _static_state(model, batch_size: int, length: int, compiled: bool) -> dict:
    """The model's static caches for this shape (reused across calls, so that a compiled step compiles once)."""
    param = next(model.parameters())
    key = (batch_size, length, str(param.device), param.dtype)
    per_model = _STATIC.setdefault(model, {})
    if key not in per_model:
        while len(per_model) >= _STATIC_KEPT:
            per_model.pop(next(iter(per_model)))  # the oldest shape
        per_model[key] = {"caches": None, "step": None}
    state = per_model.pop(key)
    per_model[key] = state  # the newest
    if compiled and state["step"] is None:
        mode = "reduce-overhead" if param.device.type == "cuda" else None  # CUDA graphs on GPUs
        # the model is an argument, not captured: the compiled function must not keep the model alive
        state["step"] = torch.compile(_cached_logits, mode=mode, dynamic=False)
    return state


def _cached_logits(model, ids: torch.Tensor, pos) -> torch.Tensor:
    """Logits [B, V] of the last of ``ids`` [B, T], the tokens at positions ``pos..`` (a decoder, caches attached;
    ``pos`` an int, or a tensor of T positions for a static cache)."""
    hidden = model.forward_cached(ids, pos) if callable(getattr(model, "forward_cached", None)) else model(
        ids, input_pos=pos)
    return model.logits(hidden[:, -1])


@contextmanager
def kv_cache(model, batch_size: int, max_len: int, static: dict | None = None):
    """Attach a KV cache to every self-attention layer of ``model``'s decoder (and an encoder-memory cache to
    every cross-attention layer) for the duration of the block; removed afterwards. ``static``: a
    :func:`_static_state`, whose caches are created once and attached again on later calls."""
    from lmkit.models.layers import CrossAttention, KVCache, MemoryKV, SelfAttention

    root = model.decoder if model.kind == "encoder_decoder" else model
    param = next(model.parameters())
    attached = []
    kept = None if static is None else static["caches"]
    try:
        if kept is not None:
            for module, cache in kept:
                module.kv_cache = cache
                attached.append(module)
            yield
            return
        for module in root.modules():
            if isinstance(module, SelfAttention):
                hd = module.qkv.out_features // 3 // module.n_head
                module.kv_cache = KVCache(batch_size, module.n_head, max_len, hd, param.device, param.dtype)
                attached.append(module)
            elif isinstance(module, CrossAttention):
                module.kv_cache = MemoryKV()
                attached.append(module)
            elif hasattr(module, "kv_cache") and hasattr(module, "head_dim") and hasattr(module, "k"):
                # grouped-query attention (llama): the cache holds the n_kv_head heads, before their repeat
                hd = module.head_dim
                module.kv_cache = KVCache(batch_size, module.k.out_features // hd, max_len, hd, param.device,
                                          param.dtype)
                attached.append(module)
        if static is not None:
            static["caches"] = [(module, module.kv_cache) for module in attached]
            for _, cache in static["caches"]:  # written in place every step: fixed addresses let CUDA graphs keep them
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        yield
    finally:
        for module in attached:
            module.kv_cache = None


# --- the decoding loop --------------------------------------------------------------------------


class _Stream:
    """The text of one sample as it grows: what may be shown now, held back while a stop string may begin."""

    def __init__(self, tokenizer, stop: list[str], emit: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.ids: list[int] = []
        self.shown = 0
        self.text = ""
        self.done = False

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that may still become a stop string or a multi-byte character."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        tail = len(text) - len(text.rstrip("\ufffd"))
        return max(held, tail)

    def _show(self, upto: int) -> None:
        if upto > self.shown:
            if self.emit is not None:
                self.emit(self.text[self.shown:upto])
            self.shown = upto

    def add(self, token: int) -> None:
        self.ids.append(token)
        if not self.stop and self.emit is None:
            return
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self._show(len(self.text))
            self.done = True
            return
        self._show(len(self.text) - self._held(self.text))

    def finish(self) -> str:
        if not self.done:  # no stop string cut it: all of it, held-back characters included
            self.text = self.tokenizer.decode(self.ids)
        self._show(len(self.text))
        self.done = True
        return self.text


def generate_ids(model, input_ids: list[int], opts: GenerationOptions, *, tokenizer=None,
                 eos_id: int | None = None, decoder_start_id: int | None = None,
                 stream: Callable[[int, str], None] | None = None, logits_out: list | None = None):
    """Generate ``opts.num_samples`` continuations of one prompt (token ids).

    Decoders continue ``input_ids``; encoder–decoders encode them and decode from
    ``decoder_start_id``. Returns ``(ids, texts)``: the new token ids of each sample (the eos that
    ended one not included) and their texts (stop strings applied; None without a tokenizer).
    ``stream(sample, text)`` receives each sample's text as it is resolved. ``logits_out``, when
    given, collects the [B, V] logits of every step (tests).
    """
    opts.check()
    device = next(model.parameters()).device
    B = opts.num_samples
    gen = None
    if opts.temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    seq2seq = model.kind == "encoder_decoder"
    if model.kind not in ("decoder", "encoder_decoder"):
        raise ConfigError(f"generation needs a decoder or an encoder-decoder; this {getattr(model.cfg, 'name', '')} "
                          f"model is an {model.kind} (encoders fill masks: lmkit.generation.fill_mask)")
    if not input_ids and not seq2seq:
        raise ConfigError("the prompt is empty (no tokens): give some text")
    src = torch.tensor([input_ids] * B, dtype=torch.long, device=device)
    if seq2seq:
        if decoder_start_id is None:
            raise ConfigError("an encoder-decoder needs its decoder start token (decoder_start_id)")
        context = torch.full((B, 1), decoder_start_id, dtype=torch.long, device=device)
    else:
        context = src
    limit = getattr(model, "max_seq_len", None)
    needed = context.shape[1] + opts.max_new_tokens - 1  # the last token is never fed back
    positional = not seq2seq or getattr(model.cfg, "name", "") != "t5"
    if limit is not None and positional and needed > limit:
        raise ConfigError(f"the prompt ({context.shape[1]} tokens) and max_new_tokens={opts.max_new_tokens} need "
                          f"{needed} positions; the model has max_seq_len={limit}: lower max_new_tokens or shorten "
                          f"the prompt")
    streams = [_Stream(tokenizer, opts.stop, None if stream is None else (lambda t, i=i: stream(i, t)))
               for i in range(B)] if tokenizer is not None else None
    use_cache = opts.use_cache and supports_cache(model)
    static, cache_len = None, needed + 1
    if opts.cache == "static":
        if not supports_static_cache(model):
            name = getattr(model.cfg, "name", model.kind)
            raise ConfigError(f"cache=static / compile=true: this {name} model has no "
                              f"static-cache decoding (gpt and llama without local attention layers do); use the "
                              f"default cache=dynamic")
        cache_len = static_length(needed + 1, limit)
        static = _static_state(model, B, cache_len, opts.compile)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new: list[list[int]] = [[] for _ in range(B)]

    with torch.no_grad(), (kv_cache(model, B, cache_len, static) if use_cache else _nothing()):
        memory = model.encode(src) if seq2seq else None
        pos = 0
        feed = context
        for _ in range(opts.max_new_tokens):
            if use_cache:
                if seq2seq:
                    logits = model.logits(model.decode(feed, memory, input_pos=pos)[:, -1])
                elif static is None:
                    logits = _cached_logits(model, feed, pos)
                else:  # positions as a tensor: every decode step has the same shapes; one-token steps compiled
                    step = static["step"] if static["step"] is not None and feed.shape[1] == 1 else _cached_logits
                    # .clone(): a CUDA-graph step's output is overwritten by its next replay
                    logits = step(model, feed, torch.arange(pos, pos + feed.shape[1], device=device)).clone()
                pos += feed.shape[1]
            else:
                hidden = model(src, decoder_input_ids=context) if seq2seq else model(context)
                logits = model.logits(hidden[:, -1])
            if logits_out is not None:
                logits_out.append(logits.float().cpu())
            tok = next_tokens(logits, context, opts, gen)
            for i in range(B):
                if finished[i]:
                    continue
                t = int(tok[i])
                if eos_id is not None and t == eos_id:
                    finished[i] = True
                    continue
                new[i].append(t)
                if streams is not None:
                    streams[i].add(t)
                    if streams[i].done:
                        finished[i] = True
            if bool(finished.all()):
                break
            if eos_id is not None:
                tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
            context = torch.cat([context, tok[:, None]], dim=1)
            feed = tok[:, None]
    texts = [s.finish() for s in streams] if streams is not None else None
    return new, texts


@contextmanager
def _nothing():
    yield


# --- text in, text out --------------------------------------------------------------------------


_MARKS = re.compile(r"(<extra_id_\d+>|\[MASK\]|<mask>)")


def encode_text(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode`` with span marks written in the text turned into their ids: ``<extra_id_N>`` (T5
    sentinels, where the tokenizer has them) and ``[MASK]`` / ``<mask>`` (BART's mask)."""
    ids: list[int] = []
    for part in _MARKS.split(text):
        if not part:
            continue
        if part in ("[MASK]", "<mask>"):
            ids.append(tokenizer.mask_id)
        elif part.startswith("<extra_id_") and int(part[10:-1]) < tokenizer.num_sentinels:
            ids.append(tokenizer.sentinel_id(int(part[10:-1])))
        else:
            ids.extend(tokenizer.encode(part))
    return ids


def span_fills(tokenizer, ids) -> dict[str, str]:
    """T5 span infilling: the text the output ``ids`` give each sentinel, ``{"<extra_id_0>": "...", ...}``."""
    sentinels = {tokenizer.sentinel_id(i): f"<extra_id_{i}>" for i in range(tokenizer.num_sentinels)}
    fills: dict[str, list[int]] = {}
    current = None
    for t in (int(x) for x in ids):
        if t in sentinels:
            current = sentinels[t]
            fills[current] = []
        elif current is not None:
            fills[current].append(t)
    return {k: tokenizer.decode(v) for k, v in fills.items()}


def encode_prompt(tokenizer, kind: str, architecture: str, prompt: str) -> list[int]:
    """Token ids of a prompt, framed as the model saw text in training (span marks: :func:`encode_text`).

    Decoders: ``<eos>`` (lmkit's document separator: what precedes every packed document) then the
    prompt; T5: the prompt then ``<eos>``; BART: ``<bos>`` prompt ``<eos>``.
    """
    ids = encode_text(tokenizer, prompt)
    if kind == "decoder":
        return [tokenizer.eos_id] + ids
    if architecture == "bart":
        return [tokenizer.bos_id] + ids + [tokenizer.eos_id]
    return ids + [tokenizer.eos_id]


def generate(model, tokenizer, prompts, *, decoder_start_id: int | None = None, architecture: str | None = None,
             stream: Callable[[int, int, str], None] | None = None, **options):
    """Continue each prompt; returns a list (one per prompt) of ``num_samples`` texts, or that list alone
    when ``prompts`` is one string.

    ``options``: see :class:`GenerationOptions`. ``stream(prompt_index, sample_index, text)`` receives
    the text as it is produced. Encoder–decoders need ``decoder_start_id`` (given by
    :func:`load_for_generation`; by default the id of ``<pad>`` for t5, ``<eos>`` for bart).
    """
    unknown = [k for k in options if k not in OPTION_NAMES]
    if unknown:
        from lmkit.errors import did_you_mean

        raise ConfigError(f"unknown generation option '{unknown[0]}'.{did_you_mean(unknown[0], OPTION_NAMES)} "
                          f"Options: {', '.join(OPTION_NAMES)}")
    opts = GenerationOptions(**options).check()
    single = isinstance(prompts, str)
    architecture = architecture or getattr(getattr(model, "cfg", None), "name", "")
    if model.kind == "encoder_decoder" and decoder_start_id is None:
        from lmkit.interop.exporter import DEFAULT_DECODER_START

        decoder_start_id = tokenizer.special_id(DEFAULT_DECODER_START.get(architecture, "<pad>"))
    was_training = model.training
    model.eval()
    try:
        results = []
        for n, prompt in enumerate([prompts] if single else list(prompts)):
            ids = encode_prompt(tokenizer, model.kind, architecture, prompt)
            _, texts = generate_ids(model, ids, opts, tokenizer=tokenizer, eos_id=tokenizer.eos_id,
                                    decoder_start_id=decoder_start_id,
                                    stream=None if stream is None else (lambda i, t, n=n: stream(n, i, t)))
            results.append(texts)
    finally:
        model.train(was_training)
    return results[0] if single else results


def fill_mask(model, tokenizer, prompt: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Encoders (bert, albert): the ``top_k`` most likely tokens, as ``(text, probability)``, at each
    ``[MASK]`` of ``prompt``, left to right. The prompt is framed as in MLM training: ``[CLS] prompt [SEP]``.
    A two-stream model (XLNet) predicts each ``[MASK]`` as a PLM target that sees the prompt's other tokens
    (not the other ``[MASK]``s), unframed as in PLM training.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r}: fill-mask needs a whole number >= 1")
    two_stream = callable(getattr(model, "two_stream", None))  # XLNet: no framing, [MASK]s are PLM targets
    ids = encode_text(tokenizer, prompt)
    if not two_stream:
        ids = [tokenizer.special_id("[CLS]")] + ids + [tokenizer.special_id("[SEP]")]
    where = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not where:
        raise ConfigError("fill-mask needs [MASK] in the prompt (e.g. prompt=\"To be or [MASK] to be\")")
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and len(ids) > max_len:
        raise ConfigError(f"the prompt is {len(ids)} tokens with [CLS] and [SEP]; the model takes at most {max_len}")
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if two_stream:  # every [MASK] predicted from its query stream over the unmasked tokens only
                targets = x == tokenizer.mask_id
                hidden = model.two_stream(x, torch.where(targets, 0, -1), targets)
            else:
                hidden = model(x, token_type_ids=torch.zeros_like(x))
            probs = model.logits(hidden[0, where]).float().softmax(-1)
    finally:
        model.train(was_training)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[(tokenizer.decode([int(t)]), float(p)) for p, t in zip(ps, ts)] for ps, ts in zip(top.values, top.indices)]


def read_model(path):
    """``(model, tokenizer, info, source)`` from an lmkit run directory or checkpoint, or a local HF directory, on the
    CPU, any kind of model. ``source``: the run's :class:`lmkit.interop.source.Source` (its objective heads, its
    checkpoint), None for an HF directory. See :func:`load_for_generation`."""
    from pathlib import Path

    from lmkit.errors import CheckpointError

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"'{path}' does not exist: give a run directory, a checkpoint or a Hugging Face "
                              f"model directory")
    src = None
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from lmkit.interop import load_hf

        loaded = load_hf(p)
        model, tokenizer, arch = loaded.model, loaded.tokenizer, loaded.architecture
        start = loaded.hf_config.get("decoder_start_token_id")
    else:
        from lmkit.interop.exporter import DEFAULT_DECODER_START
        from lmkit.interop.families import family_of
        from lmkit.interop.source import read_source

        registered = _registered_run(p)  # an architecture without a Hugging Face family (transformer_xl)
        src, model_cls = registered if registered is not None else (read_source(p), None)
        model = (model_cls or family_of(src.architecture).model_cls)(src.config)
        model.load_state_dict(src.model_state)
        tokenizer, arch = src.tokenizer, src.architecture
        start = None
        if arch in DEFAULT_DECODER_START:
            start = tokenizer.special_id(src.objective.get("decoder_start_token") or DEFAULT_DECODER_START[arch])
    if tokenizer is None:
        raise ConfigError(f"'{path}' has no tokenizer lmkit can read")
    return model, tokenizer, {"architecture": arch, "decoder_start_id": start}, src


def _registered_run(path):
    """``(Source, model class)`` of an lmkit run whose architecture has no Hugging Face family (it cannot be
    exported, e.g. transformer_xl), read through the architecture registry as :func:`read_source` reads the
    others; None for an exportable or unknown architecture (:func:`read_source` then reads or refuses it)."""
    from omegaconf import OmegaConf

    from lmkit.adapters import merged_model_state
    from lmkit.interop.families import MODULES
    from lmkit.interop.source import Source, load_weights, locate, model_config
    from lmkit.plugins import get_plugin_manager
    from lmkit.tokenizers.trained import load_tokenizer_file

    run_dir, ckpt = locate(path)
    raw = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    node = raw.get("model") or {}
    name = str(node.get("name"))
    registry = get_plugin_manager().registries["architecture"]
    if name in MODULES or name not in registry.names():
        return None
    component = registry.get(name)
    state = load_weights(ckpt)
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    cfg = model_config(node, model_state, component.config_cls)
    model_state = merged_model_state(node, component.factory, cfg, model_state)
    tok_path = run_dir / "tokenizer.json"
    tokenizer = load_tokenizer_file(tok_path) if tok_path.is_file() else None
    head_state = {k: v for k, v in state.items() if k.startswith("objective.")}
    return Source(name, cfg, model_state, head_state, tokenizer, raw.get("objective") or {}, ckpt, run_dir,
                  raw), component.factory


def load_for_generation(path, device=None, dtype=None, allow_encoders: bool = False):
    """``(model, tokenizer, info)`` from an lmkit run directory or checkpoint, or a local HF directory.

    ``info`` holds ``architecture`` and ``decoder_start_id`` (encoder–decoders), to pass on to
    :func:`generate`. Encoders are refused unless ``allow_encoders`` (for :func:`fill_mask`). The run is read as export reads it (:func:`lmkit.interop.source.read_source`),
    the HF directory by :func:`lmkit.interop.load_hf`.
    """
    model, tokenizer, info, _ = read_model(path)
    if model.kind not in ("decoder", "encoder_decoder") and not (allow_encoders and model.kind == "encoder"):
        raise ConfigError(f"'{path}' holds a {info['architecture']} model, an encoder: it cannot generate text; "
                          f"generate needs a decoder (gpt, llama) or an encoder-decoder (t5, bart), or fill_mask for "
                          f"an encoder")
    model.to(device=device or "cpu", dtype=dtype).eval()
    return model, tokenizer, info
