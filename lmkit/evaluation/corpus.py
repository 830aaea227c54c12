"""Scoring every token of a corpus once: loss, perplexity and bits per byte.

Decoders are scored with a sliding window (HF's "perplexity of fixed-length models" guide):
the token stream (documents joined by ``<eos>``, and an ``<eos>`` before the first, as in
training) is cut into chunks of ``stride`` targets; each chunk is predicted from a window of
up to ``max_length`` tokens that ends just before its last target, so every token is scored
exactly once and, with ``stride < max_length``, each sees at least ``max_length - stride``
tokens of context. ``stride == max_length`` gives disjoint windows, the blocks training
validates on.

Encoders and encoder–decoders are scored with their objective's loss over disjoint blocks,
its noise drawn from a fixed seed (the same numbers on every call); encoders can instead be
scored by pseudo-perplexity (Salazar et al., 2020: each token masked in turn and predicted
from all the others).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from lmkit.errors import ConfigError


@dataclass
class CorpusScore:
    """Summed negative log-likelihood (nats) over ``tokens`` scored targets standing for ``bytes`` UTF-8 bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    def metrics(self, with_bpb: bool = True) -> dict:
        out = {"loss": self.loss, "perplexity": math.exp(min(self.loss, 700.0)), "tokens": self.tokens}
        if with_bpb and self.bytes:
            out["bits_per_byte"] = self.nll / (self.bytes * math.log(2))
            out["bytes"] = self.bytes
        out.update(self.extra)
        return out


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(start, first_target, end)`` of each window over a stream of ``n_tokens`` (its first token is context only).

    The window's inputs are ``stream[start:end-1]`` (at most ``max_length``), its scored targets
    ``stream[first_target:end]``; the targets of successive windows tile ``[1, n_tokens)``.
    """
    if not 1 <= stride <= max_length:
        raise ConfigError(f"eval.stride={stride}: give a whole number between 1 and the window ({max_length})")
    first = 1
    while first < n_tokens:
        end = min(first + stride, n_tokens)
        yield max(0, end - 1 - max_length), first, end
        first = end


def score_decoder(scorer, stream: np.ndarray, byte_lengths: np.ndarray, stride: int,
                  progress=None) -> CorpusScore:
    """Sliding-window score of ``stream`` (token ids, ``<eos>`` first) under the decoder of ``scorer``."""
    windows = list(sliding_windows(len(stream), scorer.max_length, stride))
    result = CorpusScore()
    step = scorer.batch_size
    for at in range(0, len(windows), step):
        batch = windows[at:at + step]
        requests = [(stream[s:f].tolist(), stream[f:e].tolist()) for s, f, e in batch]
        for ll, _ in scorer.loglikelihood_tokens(requests):
            result.nll -= ll
        for _, f, e in batch:
            result.tokens += e - f
        if progress is not None:
            progress(sum(e - f for _, f, e in batch))
    result.bytes = int(byte_lengths[np.asarray(stream[1:], dtype=np.int64)].sum())
    return result


@torch.no_grad()
def score_objective(model, objective, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                    progress=None) -> CorpusScore:
    """The objective's loss over disjoint blocks of ``tokens``, noise seeded by ``seed``.

    ``nll``/``tokens`` are the objective's language-model part where it has one (the masked or
    corrupted tokens); its full loss per target is in ``extra["objective_loss"]``.
    """
    from lmkit.data.datamodule import BlockDataset

    block_len, _ = objective.block_layout(seq_len)
    blocks = BlockDataset(tokens, block_len, block_len)
    if len(blocks) == 0:
        raise ConfigError(f"the corpus has {len(tokens)} tokens, fewer than one block of {block_len}: use more text "
                          f"or a shorter eval.seq_len")
    collate = objective.make_collator()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    result, loss_sum, targets = CorpusScore(), 0.0, 0
    for at in range(0, len(blocks), batch_size):
        rows = torch.stack([blocks[(i, i)][0] for i in range(at, min(at + batch_size, len(blocks)))])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows, gen).items()}
        out = objective.loss(model, batch)
        loss_sum += float(out.loss_sum)
        targets += int(out.n_targets)
        if out.nll_sum is not None:
            result.nll += float(out.nll_sum)
            result.tokens += int(out.n_targets)
            result.bytes += int(out.n_bytes) if out.n_bytes is not None else 0
        if progress is not None:
            progress(rows.numel())
    if result.tokens == 0:  # an objective without an LM part: its loss stands in
        result.nll, result.tokens = loss_sum, targets
    result.extra["objective_loss"] = loss_sum / max(targets, 1)
    return result


@torch.no_grad()
def score_pseudo_perplexity(model, tokenizer, tokens: np.ndarray, seq_len: int, batch_size: int,
                            byte_lengths: np.ndarray, progress=None) -> CorpusScore:
    """Pseudo-log-likelihood of an encoder (bert, albert): disjoint blocks framed ``[CLS] ... [SEP]``, each token
    replaced by ``[MASK]`` in its own copy of the block and predicted from all the others."""
    inner = seq_len - 2
    if inner < 1:
        raise ConfigError(f"eval.seq_len={seq_len} leaves no room between [CLS] and [SEP]")
    device = next(model.parameters()).device
    result = CorpusScore()
    n_blocks = max(1, math.ceil(len(tokens) / inner))
    for b in range(n_blocks):
        part = torch.as_tensor(np.asarray(tokens[b * inner:(b + 1) * inner], dtype=np.int64))
        if part.numel() == 0:
            break
        row = torch.cat([torch.tensor([tokenizer.cls_id]), part, torch.tensor([tokenizer.sep_id])])
        positions = torch.arange(1, row.numel() - 1)
        for at in range(0, positions.numel(), batch_size):
            pos = positions[at:at + batch_size]
            copies = row.repeat(pos.numel(), 1)
            copies[torch.arange(pos.numel()), pos] = tokenizer.mask_id
            hidden = model(copies.to(device))
            picked = hidden[torch.arange(pos.numel()), pos.to(device)]
            logprobs = torch.log_softmax(model.logits(picked).float(), dim=-1)
            result.nll -= float(logprobs.gather(-1, row[pos].to(device)[:, None]).sum())
        result.tokens += part.numel()
        result.bytes += int(byte_lengths[part.numpy()].sum())
        if progress is not None:
            progress(part.numel())
    return result
