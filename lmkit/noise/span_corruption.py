"""T5 span corruption, vectorized over the batch.

Reference: google-research/text-to-text-transfer-transformer ``t5/data/preprocessors.py``
(``random_spans_helper``, ``random_spans_noise_mask``, ``noise_span_to_unique_sentinel``,
``nonnoise_span_to_unique_sentinel``; EOS appended to inputs and targets afterwards).

For a row of ``n`` real tokens: ``n_noise = round(density · n)`` clamped to [1, n−1],
``n_spans = max(1, round(n_noise / mean_span))``; the noise and the non-noise tokens are
each cut into ``n_spans`` positive parts uniformly at random (every composition equally
likely), and the parts interleave starting with non-noise, so the row ends with noise.
Inputs: every noise span becomes one sentinel (``V−1``, ``V−2``, ... in order), then EOS.
Targets: every non-noise span becomes one sentinel, then EOS — i.e. each noise span preceded
by its sentinel. Tokens are dropped by position, never by value, so a real id 0 survives
(HF #12755); sentinels count down from the top of the vocabulary (not HF #14282's bug).

Rounding uses float64 and ties-to-even, as Python's ``round`` in ``random_spans_helper`` does,
so the output lengths are exactly what the helper predicts (T5's mask function rounds in
float32, which differs from the helper on rare exact halves such as 0.15 · 570).
"""
from __future__ import annotations

import torch

from lmkit.noise._common import (
    IGNORE_INDEX, check_gen, check_open_unit, check_tokens, exclusive_cumsum, random_subset, real_lengths,
    round_half_even,
)
from lmkit.noise.vocab import NoiseVocab


def random_spans_helper(
    inputs_length: int,
    noise_density: float,
    mean_noise_span_length: float,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
    """Raw chunk length and targets length that give exactly ``inputs_length`` inputs.

    Same arithmetic as T5's ``random_spans_helper`` (EOS counted in both lengths, and the
    "targets = inputs" adjustment at density 0.5): 512 → (568, 114); 128 → (141, 29).

    Returns:
        ``(tokens_length, targets_length)``: cut raw chunks of ``tokens_length`` tokens; the
        encoded targets are ``targets_length`` long.
    """
    if not isinstance(inputs_length, int) or inputs_length < 2:
        raise ValueError(f"inputs_length must be an int >= 2 (room for one token and EOS), got {inputs_length!r}")
    _check_noise(noise_density, mean_noise_span_length)

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def noise_counts(lengths: torch.Tensor, noise_density: float, mean_noise_span_length: float):
    """``(n_noise, n_spans)`` per row for rows of ``lengths`` tokens (T5's formulas)."""
    n_noise = round_half_even(lengths.double() * noise_density)
    n_noise = torch.minimum(n_noise.clamp(min=1), lengths - 1)
    n_spans = round_half_even(n_noise.double() / mean_noise_span_length).clamp(min=1)
    return n_noise, n_spans


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    gen: torch.Generator,
    batch: int = 1,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """T5's random-spans noise mask for ``batch`` rows at once: bool [batch, length].

    ``lengths`` (int64 [batch], optional) gives each row's real length (the rest is False);
    by default every row is ``length`` long. See the module docstring for the distribution.
    """
    check_gen(gen)
    _check_noise(noise_density, mean_noise_span_length)
    if lengths is None:
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2 (one noise and one non-noise token), got {length!r}")
        lengths = torch.full((batch,), length, dtype=torch.long)
    else:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if lengths.ndim != 1 or int(lengths.min()) < 2 or int(lengths.max()) > length:
            raise ValueError(f"lengths must be a 1-D tensor of ints in [2, {length}], got {lengths.tolist()}")
    n_noise, n_spans = noise_counts(lengths, noise_density, mean_noise_span_length)
    check_spans_fit(lengths, n_noise, n_spans, noise_density, mean_noise_span_length)
    return _noise_mask(lengths, n_noise, n_spans, length, gen)


def span_corruption(
    tokens: torch.Tensor,
    gen: torch.Generator,
    vocab: NoiseVocab,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> dict[str, torch.Tensor]:
    """T5 span corruption of a batch of raw chunks.

    Args:
        tokens: int64 [B, L] raw chunks, right-padded with ``vocab.pad_id`` if rows are
            shorter (cut chunks of ``random_spans_helper(...)[0]`` tokens to get fixed
            lengths without padding). Must not contain sentinel ids.

    Returns:
        ``input_ids`` int64 [B, I]: non-noise tokens, one sentinel per noise span, EOS, then
        ``pad_id``; ``padding_mask`` bool [B, I] (True = real); ``labels`` int64 [B, T]:
        sentinel, noise span, sentinel, noise span, ..., EOS, then -100. With unpadded rows
        of L tokens, ``I = L − n_noise + n_spans + 1`` and ``T = n_noise + n_spans + 1``
        (L = 568 → I = 512, T = 114); otherwise I and T are the longest row's.
    """
    id_range = check_tokens(tokens, vocab)
    check_gen(gen)
    _check_noise(noise_density, mean_noise_span_length)
    lengths = real_lengths(tokens, vocab.pad_id, id_range=id_range)
    if int(lengths.min()) < 2:
        raise ValueError(
            f"a row has {int(lengths.min())} real token(s); span corruption needs at least 2 per row "
            "(one noise, one kept): drop or merge such short rows"
        )
    n_noise, n_spans = noise_counts(lengths, noise_density, mean_noise_span_length)
    check_spans_fit(lengths, n_noise, n_spans, noise_density, mean_noise_span_length)
    check_sentinels(tokens, lengths, n_spans, vocab, noise_density, mean_noise_span_length, id_range[1])

    clean_lens, noise_lens = span_lengths(lengths, n_noise, n_spans, gen)
    inputs, in_len = assemble_spans(tokens, clean_lens, noise_lens, vocab, sentinel_first=False)
    labels, _ = assemble_spans(tokens, clean_lens, noise_lens, vocab, sentinel_first=True, fill=IGNORE_INDEX)
    return {"input_ids": inputs, "padding_mask": below(in_len, inputs.shape[1]), "labels": labels}


def below(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [B, width]: True at positions < lengths[b]."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def pad_after_(values: torch.Tensor, lengths: torch.Tensor, fill: int) -> torch.Tensor:
    """Set the positions at or past ``lengths[b]`` of ``values`` to ``fill``, in place."""
    if int(lengths.min()) == values.shape[1]:
        return values
    return values.masked_fill_(~below(lengths, values.shape[1]), fill)


def assemble_spans(tokens, clean_lens, noise_lens, vocab: NoiseVocab, sentinel_first: bool,
                   sentinels: torch.Tensor | None = None, lead: torch.Tensor | None = None, fill: int | None = None):
    """Build T5's inputs (``sentinel_first=False``) or targets (``True``) from the span plan.

    Row ``b`` alternates clean span 0, noise span 0, clean span 1, ... (lengths
    ``clean_lens`` / ``noise_lens`` [B, S], zero past the row's spans). Inputs are each clean
    span followed by sentinel ``j`` (in place of noise span ``j``); targets are sentinel ``j``
    followed by noise span ``j``; both end with EOS and are right-padded with ``fill``
    (default ``pad_id``).
    Rows where ``sentinels`` (bool [B]) is False get no sentinels (a prefix-LM split is the
    plan ``[prefix], [rest]``); ``lead`` (int64 [B]) puts one token first (UL2's mode token).
    Each output position is read from ``tokens`` by a gather, so no per-token scatter is needed.

    Returns ``(ids [B, W], lengths [B])``; ``W`` is the longest result (EOS included).
    """
    device = tokens.device
    B, S = clean_lens.shape
    L = tokens.shape[1]
    sent = torch.ones((B, 1), dtype=torch.long, device=device) if sentinels is None else sentinels.long()[:, None]
    off = 0 if lead is None else 1
    both = torch.stack([clean_lens, noise_lens], 2).view(B, 2 * S)
    span_start = exclusive_cumsum(both)
    kept = noise_lens if sentinel_first else clean_lens
    src_start = span_start[:, 1::2] if sentinel_first else span_start[:, 0::2]
    has_unit = noise_lens > 0  # one unit (kept span + sentinel) per noise span
    unit = (kept + sent) * has_unit
    out_start = exclusive_cumsum(unit) + off
    count = out_start[:, -1] + unit[:, -1]
    W = int(count.max()) + 1

    # source index of every output position: +1 per position, plus a jump at each unit start
    shift = src_start - out_start - (sent if sentinel_first else 0)  # source = position + shift
    jumps = torch.ones((B, W), dtype=torch.long, device=device)
    jumps[:, 0] = 0
    jumps.scatter_add_(1, out_start, torch.diff(shift, dim=1, prepend=torch.zeros_like(shift[:, :1])) * has_unit)
    src = jumps.cumsum(1)
    if int(count.min()) < W - 1:  # shorter rows read past their end
        src = src.clamp_(0, L - 1)
    else:  # only the EOS column can
        src[:, -1].clamp_(0, L - 1)
    out = tokens.gather(1, src)
    if lead is not None:
        out[:, 0] = lead
    sentinel_pos = out_start + (0 if sentinel_first else kept)
    sentinel_ids = vocab.vocab_size - 1 - torch.arange(S, device=device).expand(B, S)
    out.scatter_(1, torch.where(has_unit & (sent > 0), sentinel_pos, count[:, None]), sentinel_ids)
    out.scatter_(1, count[:, None], torch.full_like(count[:, None], vocab.eos_id))
    return pad_after_(out, count + 1, vocab.pad_id if fill is None else fill), count + 1


def reconstruct(input_ids: torch.Tensor, labels: torch.Tensor, vocab: NoiseVocab) -> list[list[int]]:
    """Undo :func:`span_corruption`: the original real tokens of each row, from inputs + targets."""
    first_sentinel = vocab.first_sentinel_id
    rows = []
    for inp, tgt in zip(input_ids.tolist(), labels.tolist()):
        while inp and inp[-1] == vocab.pad_id:
            inp.pop()
        tgt = [t for t in tgt if t != IGNORE_INDEX]
        if not inp or inp[-1] != vocab.eos_id or not tgt or tgt[-1] != vocab.eos_id:
            raise ValueError("inputs and targets must each end with EOS (before padding)")
        inp, tgt = inp[:-1], tgt[:-1]
        spans: dict[int, list[int]] = {}
        current = None
        for t in tgt:
            if t >= first_sentinel:
                current = spans.setdefault(t, [])
            elif current is None:
                raise ValueError("targets must start with a sentinel")
            else:
                current.append(t)
        out: list[int] = []
        for t in inp:
            out.extend(spans.get(t, [])) if t >= first_sentinel else out.append(t)
        rows.append(out)
    return rows


# -- internals ---------------------------------------------------------------------------------
def _check_noise(noise_density: float, mean_noise_span_length: float) -> None:
    check_open_unit("noise_density", noise_density, " (the share of tokens to corrupt, e.g. 0.15)")
    if not isinstance(mean_noise_span_length, (int, float)) or not 1 <= mean_noise_span_length < float("inf"):
        raise ValueError(
            f"mean_noise_span_length must be a number >= 1 (tokens per noise span, e.g. 3.0), "
            f"got {mean_noise_span_length!r}"
        )


def check_spans_fit(lengths, n_noise, n_spans, noise_density, mean) -> None:
    bad = n_spans > lengths - n_noise
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"noise_density={noise_density} with mean_noise_span_length={mean} asks for {int(n_spans[i])} noise "
            f"spans but a row of {int(lengths[i])} tokens has only {int(lengths[i] - n_noise[i])} non-noise tokens "
            "to separate them; lower noise_density or raise mean_noise_span_length"
        )


def check_sentinels(tokens, lengths, n_spans, vocab: NoiseVocab, noise_density, mean, max_id) -> None:
    need = int(n_spans.max())
    if need > vocab.num_sentinels:
        raise ValueError(
            f"span corruption needs {need} sentinel ids for a row of {int(lengths.max())} tokens at "
            f"noise_density={noise_density}, mean_noise_span_length={mean}, but the vocabulary has "
            f"{vocab.num_sentinels}; build the tokenizer with more sentinels, use shorter rows, or raise "
            "mean_noise_span_length"
        )
    if max_id < vocab.first_sentinel_id:
        return
    sentinel = tokens >= vocab.first_sentinel_id
    if int(lengths.min()) < tokens.shape[1]:
        sentinel &= below(lengths, tokens.shape[1])
    if bool(sentinel.any()):
        raise ValueError(
            f"tokens contain sentinel ids (>= {vocab.first_sentinel_id}); sentinels are reserved for the noise, "
            "so the raw text must not hold them"
        )


def _segment_lengths(num_items: torch.Tensor, num_segments: torch.Tensor, gen) -> torch.Tensor:
    """Cut ``num_items[b]`` items into ``num_segments[b]`` positive parts, every composition
    equally likely (T5's ``_random_segmentation``): the parts end after ``num_segments − 1``
    distinct gaps chosen uniformly. Returns int64 [B, max(num_segments)], zero past each
    row's segment count."""
    last = (num_items - 1)[:, None]
    cuts = random_subset(num_items - 1, num_segments - 1, gen)
    return torch.cat([torch.full_like(last, -1), cuts, last], dim=1).diff(dim=1)


def span_lengths(lengths, n_noise, n_spans, gen):
    """Random span plan: ``(clean_lens, noise_lens)`` int64 [B, S], zero past a row's spans."""
    noise_lens = _segment_lengths(n_noise, n_spans, gen)
    clean_lens = _segment_lengths(lengths - n_noise, n_spans, gen)
    return clean_lens, noise_lens


def _noise_mask(lengths, n_noise, n_spans, width: int, gen) -> torch.Tensor:
    device = lengths.device
    B = lengths.shape[0]
    clean_lens, noise_lens = span_lengths(lengths, n_noise, n_spans, gen)
    interleaved = torch.stack([clean_lens, noise_lens], dim=2).reshape(B, -1)
    span_starts = interleaved.cumsum(1).clamp(max=width)
    indicator = torch.zeros((B, width + 1), dtype=torch.int32, device=device)
    indicator.scatter_add_(1, span_starts, torch.ones_like(span_starts, dtype=torch.int32))
    span_num = indicator[:, :width].cumsum(1, dtype=torch.int32)
    return (span_num & 1).bool() & below(lengths, width)
