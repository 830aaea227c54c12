"""Log-likelihoods and greedy continuations of text under an lmkit model, batched.

:class:`Scorer` answers the three questions every evaluation asks of a language model (the
same three lm-evaluation-harness asks its backends): how likely is this continuation of this
context (and is it the greedy one), how likely is this whole text, and what does the model
write after this context until a stop string.

Text is framed as the model saw it in training: a decoder's context starts with ``<eos>``,
lmkit's document separator, so the first word of a text is scored given a document start
(as lm-eval prefixes its end-of-text token); an encoder–decoder encodes the context framed as
in :func:`lmkit.generation.encode_prompt` and decodes the continuation from its start token.
Context/continuation pairs are split as lm-eval splits them (trailing spaces of the context
move to the continuation; a decoder encodes context + continuation whole and cuts at the
context's length), so both give the same numbers for the same requests.

Requests are sorted longest first and run in batches of ``batch_size`` rows, right-padded
(causal attention never lets a real token see the padding after it); only the positions
that are scored go through the output projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError


@dataclass
class Scorer:
    """An lmkit model and its tokenizer, ready to score text (see the module docstring).

    ``max_length``: the longest input the model is given (default: its ``max_seq_len``);
    longer requests keep their last ``max_length`` tokens, as lm-eval truncates.
    ``share_prefixes``: requests with the same context (a multiple-choice question's choices)
    run the context once; the numbers are those of running each request alone.
    """

    model: torch.nn.Module
    tokenizer: object
    architecture: str
    decoder_start_id: int | None = None
    batch_size: int = 16
    max_length: int | None = None
    share_prefixes: bool = True  # run a context shared by several continuations once (see _run_shared_contexts)

    def __post_init__(self):
        if self.model.kind not in ("decoder", "encoder_decoder"):
            raise ConfigError(f"this {self.architecture} model is an encoder: it cannot score or write continuations "
                              f"(tasks need a decoder or an encoder-decoder); evaluate an encoder on a corpus with "
                              f"its objective's loss or eval.pseudo_perplexity=true")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size}: give a whole number >= 1")
        if self.max_length is None:
            self.max_length = int(getattr(self.model, "max_seq_len", 0) or 1024)
        if self.model.kind == "encoder_decoder" and self.decoder_start_id is None:
            from lmkit.interop.exporter import DEFAULT_DECODER_START

            self.decoder_start_id = self.tokenizer.special_id(DEFAULT_DECODER_START.get(self.architecture, "<pad>"))

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- text -> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special token added."""
        return self.tokenizer.encode(text) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's ``TemplateLM`` splits a pair, with lmkit's framing.

        A decoder's context ids start with ``<eos>``; an encoder–decoder's are the encoder input
        (framed as in training) and the continuation is encoded on its own.
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if self.kind == "encoder_decoder":
            from lmkit.generation import encode_prompt

            return encode_prompt(self.tokenizer, self.kind, self.architecture, context), self.encode(continuation)
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return [self.tokenizer.eos_id] + context_ids, whole[len(context_ids):]

    # --- log-likelihoods -----------------------------------------------------------------------

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each ``(context, continuation)``: the summed log-probability (nats) of the continuation's
        tokens and whether each of them is the model's greedy choice."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    @torch.no_grad()
    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` of requests already encoded (context ids framed, continuation ids)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        empty = [i for i, (_, cont) in enumerate(requests) if not cont]
        for i in empty:  # nothing to score: probability 1
            results[i] = (0.0, True)
        todo = [i for i in range(len(requests)) if results[i] is None]
        if self.share_prefixes:
            todo = self._run_shared_contexts(requests, todo, results)
        if self.kind == "decoder":
            todo.sort(key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        else:
            todo.sort(key=lambda i: -(len(requests[i][0]) + 4 * len(requests[i][1])))
        run = self._decoder_batch if self.kind == "decoder" else self._seq2seq_batch
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            for i, result in zip(chunk, run([requests[i] for i in chunk])):
                results[i] = result
        return results

    # --- requests that share a context (the choices of a multiple-choice question) -------------

    def _run_shared_contexts(self, requests, todo: list[int], results: list) -> list[int]:
        """Score every group of requests with one context once: the context runs a single time (decoders: into
        a KV cache then copied to one row per continuation; encoder-decoders: the encoder), then all its
        continuations in one batch. Returns the requests left for the plain batched path."""
        from lmkit.generation import supports_cache

        groups: dict[tuple, list[int]] = {}
        for i in todo:
            groups.setdefault(tuple(requests[i][0]), []).append(i)
        rest = []
        for context, members in groups.items():
            longest = max(len(requests[i][1]) for i in members)
            if len(members) < 2 or (self.kind == "decoder" and (len(context) + longest - 1 > self.max_length
                                                                 or not supports_cache(self.model))):
                rest.extend(members)
                continue
            conts = [requests[i][1] for i in members]
            run = self._decoder_group if self.kind == "decoder" else self._seq2seq_group
            for i, result in zip(members, run(list(context), conts)):
                results[i] = result
        return rest

    def _decoder_group(self, context: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        from lmkit.generation import kv_cache

        n, width = len(conts), max(len(c) for c in conts)
        with kv_cache(self.model, 1, len(context) + width):
            last = self._cached_forward(torch.tensor([context], device=self.device), 0)[:, -1:]  # [1, 1, D]
            if width == 1:
                hidden = last.expand(n, 1, -1)
            else:
                _expand_caches(self.model, n)
                feed = self._pad([c[:-1] or [self.tokenizer.eos_id] for c in conts], self.tokenizer.eos_id)
                hidden = torch.cat([last.expand(n, 1, -1), self._cached_forward(feed, len(context))], dim=1)
        return self._score(hidden, [(0, c) for c in conts])

    def _cached_forward(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if callable(getattr(self.model, "forward_cached", None)):
            return self.model.forward_cached(ids, pos)
        return self.model(ids, input_pos=pos)

    def _seq2seq_group(self, context: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        targets = [c[:self.max_length] for c in conts]
        src = torch.tensor([context[-self.max_length:]], device=self.device)
        memory = self.model.encode(src).expand(len(targets), -1, -1)
        dec_rows = [[self.decoder_start_id] + t[:-1] for t in targets]
        dec = self._pad(dec_rows, self.tokenizer.pad_id)
        hidden = self.model.decode(dec, memory, decoder_padding_mask=self._mask(dec_rows))
        return self._score(hidden, [(0, t) for t in targets])

    def _decoder_batch(self, requests) -> list[tuple[float, bool]]:
        rows, spans = [], []
        for context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            n = min(len(continuation), len(whole) - 1)
            if n < len(continuation):
                raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                  f"{self.max_length} positions")
            inputs = whole[:-1]
            rows.append(inputs)
            spans.append((len(inputs) - n, whole[-n:]))
        ids = self._pad(rows, self.tokenizer.eos_id)
        hidden = self.model(ids)
        return self._score(hidden, spans)

    def _seq2seq_batch(self, requests) -> list[tuple[float, bool]]:
        sources = [context[-self.max_length:] for context, _ in requests]
        targets = [continuation[:self.max_length] for _, continuation in requests]
        src = self._pad(sources, self.tokenizer.pad_id)
        src_mask = self._mask(sources)
        dec_rows = [[self.decoder_start_id] + t[:-1] for t in targets]
        dec = self._pad(dec_rows, self.tokenizer.pad_id)
        memory = self.model.encode(src, padding_mask=src_mask)
        hidden = self.model.decode(dec, memory, encoder_padding_mask=src_mask, decoder_padding_mask=self._mask(dec_rows))
        return self._score(hidden, [(0, t) for t in targets])

    def _score(self, hidden: torch.Tensor, spans) -> list[tuple[float, bool]]:
        """Log-probabilities of the target tokens at ``spans`` [(first position, target ids)] of ``hidden``."""
        rows = torch.cat([hidden[b, first:first + len(t)] for b, (first, t) in enumerate(spans)])
        targets = torch.tensor([tok for _, t in spans for tok in t], device=hidden.device)
        logprobs = F.log_softmax(self.model.logits(rows).float(), dim=-1)
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        greedy = logprobs.argmax(-1) == targets
        out, at = [], 0
        for _, t in spans:
            out.append((float(picked[at:at + len(t)].sum()), bool(greedy[at:at + len(t)].all())))
            at += len(t)
        return out

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.device)

    def _mask(self, rows: list[list[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(r) for r in rows])
        return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).to(self.device)

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Summed log-probability of each whole text (decoders), scored in windows of ``max_length``
        tokens with no overlap, the first token given ``<eos>`` (lm-eval's rolling windows)."""
        if self.kind != "decoder":
            raise ConfigError(f"rolling log-likelihoods need a decoder; this {self.architecture} model is an "
                              f"encoder-decoder")
        requests, owner = [], []
        for n, text in enumerate(texts):
            ids = self.encode(text)
            framed = [self.tokenizer.eos_id] + ids
            for start in range(0, len(ids), self.max_length):  # each window: one token of context before it
                requests.append((framed[start:start + 1], ids[start:start + self.max_length]))
                owner.append(n)
        totals = [0.0] * len(texts)
        for n, (ll, _) in zip(owner, self.loglikelihood_tokens(requests)):
            totals[n] += ll
        return totals

    # --- generation ----------------------------------------------------------------------------

    def generate_until(self, requests: list[tuple[str, list[str], int]]) -> list[str]:
        """Greedy continuation of each ``(context, stop strings, max new tokens)``, cut before the first stop."""
        from lmkit.generation import GenerationOptions, encode_prompt, generate_ids

        out = []
        for context, until, max_new in requests:
            ids = encode_prompt(self.tokenizer, self.kind, self.architecture, context)
            room = self.max_length - (1 if self.kind == "encoder_decoder" else max_new)
            if self.kind == "decoder" and len(ids) > room:
                ids = ids[-room:]
            opts = GenerationOptions(max_new_tokens=max_new, temperature=0.0, stop=list(until or []))
            _, texts = generate_ids(self.model, ids, opts, tokenizer=self.tokenizer, eos_id=self.tokenizer.eos_id,
                                    decoder_start_id=self.decoder_start_id)
            out.append(texts[0])
        return out


def _expand_caches(model, n: int) -> None:
    """Every attached KV cache, filled for one row, copied to ``n`` rows."""
    from lmkit.models.layers import KVCache

    for module in model.modules():
        cache = getattr(module, "kv_cache", None)
        if isinstance(cache, KVCache):
            cache.k = cache.k.expand(n, -1, -1, -1).contiguous()
            cache.v = cache.v.expand(n, -1, -1, -1).contiguous()
