"""Throughput of lmkit's vectorized noise functions against per-example numpy references.

For each noise function this times, on the same inputs in one run, (a) the vectorized
``lmkit.noise`` version on the whole batch and (b) a straightforward per-example numpy /
Python port of the reference algorithm (written below, close to the original code: BERT's
``create_masked_lm_predictions``, T5's ``random_spans_noise_mask`` + sentinel filters,
SpanBERT's ``PairWithSpanMaskingScheme.mask``, fairseq's ``DenoisingDataset``, T5's
prefix split with a dense per-example mask, UL2's per-example denoiser choice, XLNet's
``_sample_mask`` + ``_local_perm``), and prints
sequences per second. The reference ports are also used by the tests to compare
distributions.

    python tools/bench_noise.py [--batch 256] [--length 512] [--threads 1] [--out bench_noise.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmkit.noise import (  # noqa: E402
    UL2_DENOISERS, NoiseVocab, bart_noise, mlm_mask, prefix_lm, random_spans_helper, span_corruption,
    spanbert_mask, ul2_denoise,
)
from lmkit.noise.plm import plm_noise, two_stream_masks  # noqa: E402
from lmkit.noise.spanbert import span_length_pmf  # noqa: E402


# ============================== per-example references ======================================
def ref_mlm(row: np.ndarray, rng: np.random.Generator, vocab: NoiseVocab, mask_prob=0.15, max_predictions=None):
    """BERT ``create_masked_lm_predictions`` (token level), on one row."""
    special = vocab.special_table.numpy()
    regular = vocab.regular_ids.numpy()
    cand = [i for i, t in enumerate(row) if not special[t]]
    rng.shuffle(cand)
    n = len(cand)
    k = max(1, int(round(n * mask_prob))) if n else 0
    if max_predictions is not None:
        k = min(k, max_predictions)
    out = row.copy()
    labels = np.full_like(row, -100)
    for i in cand[:k]:
        labels[i] = row[i]
        r = rng.random()
        if r < 0.8:
            out[i] = vocab.mask_id
        elif r < 0.9:
            out[i] = regular[rng.integers(len(regular))]
    return {"input_ids": out, "labels": labels}


def _t5_noise_mask(length, noise_density, mean_span, rng):
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_nonnoise = length - num_noise

    def segmentation(num_items, num_segments):
        marks = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(marks)
        first = np.pad(marks, [[1, 0]])
        seg = np.cumsum(first)
        _, counts = np.unique(seg, return_counts=True)
        return counts

    noise_l = segmentation(num_noise, num_spans)
    nonnoise_l = segmentation(num_nonnoise, num_spans)
    inter = np.reshape(np.stack([nonnoise_l, noise_l], axis=1), [num_spans * 2])
    starts = np.cumsum(inter)[:-1]
    ind = np.zeros((length,), dtype=np.int8)
    ind[starts] = True
    return np.cumsum(ind) % 2 == 1


def _t5_to_sentinels(row, noise, vocab_size, eos):
    prev = np.pad(noise[:-1], [[1, 0]])
    first = noise & ~prev
    sentinel = vocab_size - np.cumsum(first)
    vals = np.where(first, sentinel, row)
    return np.concatenate([vals[~(noise & prev)], [eos]])


def ref_span_corruption(row, rng, vocab: NoiseVocab, noise_density=0.15, mean_span=3.0):
    """T5 ``random_spans_noise_mask`` + ``noise_span_to_unique_sentinel`` (+ EOS), one row."""
    noise = _t5_noise_mask(len(row), noise_density, mean_span, rng)
    return {"input_ids": _t5_to_sentinels(row, noise, vocab.vocab_size, vocab.eos_id),
            "labels": _t5_to_sentinels(row, ~noise, vocab.vocab_size, vocab.eos_id)}


def ref_spanbert(row, ws, rng, vocab: NoiseVocab, mask_ratio=0.15, p=0.2, max_len=10):
    """SpanBERT ``PairWithSpanMaskingScheme.mask`` + ``span_masking(replacement='span')``.

    ``row`` excludes the [CLS]/[SEP] around it (as SpanBERT's sentence does)."""
    lens = list(range(1, max_len + 1))
    distrib = span_length_pmf(p, max_len).numpy()
    regular = vocab.regular_ids.numpy()
    n = len(row)
    mask_num = math.ceil(n * mask_ratio)
    mask: set[int] = set()
    spans = []

    def word_start(i):
        while i > 0 and not ws[i]:
            i -= 1
        return i

    def word_end(i):  # one past the end of the word holding i
        i += 1
        while i < n and not ws[i]:
            i += 1
        return i

    while len(mask) < mask_num:
        span_len = rng.choice(lens, p=distrib)
        anchor = int(rng.integers(n))
        if anchor in mask:
            continue
        left1, right1 = word_start(anchor), word_end(anchor)
        spans.append([left1, left1])
        for i in range(left1, right1):
            if len(mask) >= mask_num:
                break
            mask.add(i)
            spans[-1][-1] = i
        num_words, right2 = 1, right1
        while num_words < span_len and right2 < n and len(mask) < mask_num:
            left2, right2 = right2, word_end(right2)
            num_words += 1
            for i in range(left2, right2):
                if len(mask) >= mask_num:
                    break
                mask.add(i)
                spans[-1][-1] = i
    spans.sort()
    merged = []
    for s, e in spans:
        if merged and s <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out = row.copy()
    target = np.full_like(row, -100)
    pair_targets = []
    for s, e in merged:
        if s > 0 and e < n - 1:
            pair_targets.append([s - 1, e + 1])
        r = rng.random()
        for i in range(s, e + 1):
            target[i] = row[i]
            if r < 0.8:
                out[i] = vocab.mask_id
            elif r < 0.9:
                out[i] = regular[rng.integers(len(regular))]
    return {"input_ids": out, "labels": target, "pair_targets": pair_targets}


def ref_bart(row, ws, rng, vocab: NoiseVocab, mask_ratio=0.3, lam=3.0, random_ratio=0.1,
             permute_sentence_ratio=0.0, sentence_ends=None):
    """fairseq ``DenoisingDataset``: ``permute_sentences`` then ``add_whole_word_mask`` with
    Poisson spans and ``replace_length=1``, then ``add_insertion_noise``; one row that starts
    with BOS and ends with EOS. ``ws`` marks word starts (BOS/EOS are ignored).

    Returns the noised row, ``num_words`` and ``masked_words`` (distinct words covered by spans)."""
    regular = vocab.regular_ids.numpy()
    src = row.copy()
    is_ws = ws.copy()
    is_ws[0] = is_ws[-1] = False
    if permute_sentence_ratio > 0:
        ends = [i + 1 for i in range(1, len(src) - 1) if sentence_ends[i]]
        if not ends or ends[-1] != len(src) - 1:
            ends.append(len(src) - 1)
        starts = [1] + ends[:-1]
        k = len(ends)
        num = math.ceil(k * permute_sentence_ratio)
        subst = rng.permutation(k)[:num]
        ordering = np.arange(k)
        ordering[subst] = subst[rng.permutation(num)]
        res_t, res_w, idx = src.copy(), is_ws.copy(), 1
        for i in ordering:
            seg = slice(starts[i], ends[i])
            m = ends[i] - starts[i]
            res_t[idx: idx + m] = src[seg]
            res_w[idx: idx + m] = is_ws[seg]
            idx += m
        src, is_ws = res_t, res_w
    if len(src) > 2:
        is_ws[1] = True  # the first content token starts a word (lmkit's rule, for like-for-like)
    num_words = int(is_ws.sum())
    num_to_mask = int(math.ceil(num_words * mask_ratio))
    masked_words = 0
    if num_to_mask == 0:
        return {"input_ids": src, "masked_words": 0, "num_words": num_words}
    lengths = rng.poisson(lam, size=num_to_mask)
    cum = np.cumsum(lengths)
    while cum[-1] < num_to_mask:
        lengths = np.concatenate([lengths, rng.poisson(lam, size=num_to_mask)])
        cum = np.cumsum(lengths)
    i = int(np.searchsorted(cum, num_to_mask, side="left"))
    lengths[i] = num_to_mask - (0 if i == 0 else cum[i - 1])
    num_to_mask = i + 1
    lengths = lengths[:num_to_mask]
    lengths = lengths[lengths > 0]
    num_inserts = num_to_mask - lengths.shape[0]
    num_to_mask -= num_inserts
    to_keep = np.ones(len(src), dtype=bool)
    if num_to_mask > 0:
        word_starts = np.flatnonzero(is_ws)
        indices = word_starts[rng.permutation(len(word_starts))[:num_to_mask]]
        mask_random = rng.random(num_to_mask) < random_ratio
        start_flag = np.zeros(len(src), dtype=bool)
        start_flag[indices] = True
        ext = is_ws.astype(np.int64)
        ext[-1] = 255
        src[indices] = vocab.mask_id
        src[indices[mask_random]] = regular[rng.integers(len(regular), size=int(mask_random.sum()))]
        lengths = lengths - 1
        while indices.shape[0] > 0:
            lengths = lengths - ext[indices + 1]
            unc = lengths >= 0
            indices = indices[unc] + 1
            lengths = lengths[unc]
            to_keep[indices] = False
        masked_words = int((is_ws & (~to_keep | start_flag)).sum())
        src = src[to_keep]
    if num_inserts > 0:
        n_tok = len(src)
        n = num_inserts
        noise_idx = rng.permutation(n_tok + n - 2)[:n] + 1
        noise = np.zeros(n_tok + n, dtype=bool)
        noise[noise_idx] = True
        res = np.full(n_tok + n, -1, dtype=src.dtype)
        num_random = int(math.ceil(n * random_ratio))
        res[noise_idx[num_random:]] = vocab.mask_id
        res[noise_idx[:num_random]] = regular[rng.integers(len(regular), size=num_random)]
        res[~noise] = src
        src = res
    return {"input_ids": src, "masked_words": masked_words, "num_words": num_words}


def ref_prefix_lm(row, rng):
    """T5 prefix split in [1, n−1] and a dense prefix-LM mask, one row of n tokens (L = n − 1 inputs)."""
    n = len(row)
    s = int(rng.integers(1, n))
    L = n - 1
    mask = np.tril(np.ones((L, L), dtype=bool))
    mask[:, :s] = True
    labels = row[1:].copy()
    labels[: max(s - 1, 0)] = -100
    return {"input_ids": row[:-1], "labels": labels, "attn_mask": mask}


def ref_ul2(row, rng, vocab: NoiseVocab, denoisers=UL2_DENOISERS):
    d = denoisers[int(rng.integers(len(denoisers)))]
    if d.kind == "S":
        s = int(rng.integers(1, len(row)))
        return {"input_ids": np.concatenate([[vocab.s2s_id], row[:s], [vocab.eos_id]]),
                "labels": np.concatenate([row[s:], [vocab.eos_id]])}
    out = ref_span_corruption(row, rng, vocab, d.density, d.mean_span)
    mode = vocab.nlu_id if d.kind == "R" else vocab.nlg_id
    return {"input_ids": np.concatenate([[mode], out["input_ids"]]), "labels": out["labels"]}


def ref_plm(row, rng, vocab: NoiseVocab, k=6.0, max_gram=5, alpha=6):
    """XLNet ``_sample_mask`` (every token a word start) + ``_local_perm`` (perm_size = L), one row.

    Returns the targets, the query-stream mask ``perm_mask`` [L, L] (True = may NOT attend, as
    the reference) and the labels."""
    special = vocab.special_table.numpy()
    seg_len = len(row)
    goal = max(1, int(round(seg_len / k)))
    mask = np.zeros(seg_len, dtype=bool)
    ngrams = np.arange(1, max_gram + 1)
    pvals = 1.0 / ngrams
    pvals /= pvals.sum()
    num_predict, cur_len = 0, 0
    while cur_len < seg_len and num_predict < goal:
        n = min(int(rng.choice(ngrams, p=pvals)), goal - num_predict)
        ctx_size = n * alpha
        l_ctx = int(rng.integers(ctx_size)) if ctx_size else 0
        beg = cur_len + l_ctx
        end = beg + n
        if end >= seg_len:
            break
        mask[beg:end] = True
        num_predict += end - beg
        cur_len = end + ctx_size - l_ctx
    mask &= ~special[row]
    while mask.sum() < min(goal, int((~special[row]).sum())):
        i = int(rng.integers(seg_len))
        if not special[row[i]]:
            mask[i] = True
    index = rng.permutation(seg_len)
    rev_index = np.where(mask, index, -1)
    self_rev_index = np.where(mask, rev_index, rev_index + 1)
    perm_mask = (self_rev_index[:, None] <= rev_index[None, :]) & mask[None, :]
    return {"target_mask": mask, "perm_mask": perm_mask, "labels": np.where(mask, row, -100)}


# ============================== benchmark ===================================================
def make_inputs(batch: int, length: int, vocab: NoiseVocab, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    regular = vocab.regular_ids
    tokens = regular[torch.randint(regular.numel(), (batch, length), generator=g)]
    ws = torch.rand(batch, length, generator=g) < 0.7
    sentence_ends = torch.rand(batch, length, generator=g) < 0.05
    return tokens, ws, sentence_ends


def _time(fns, min_time: float) -> list[float]:
    """Best seconds per call of each function; calls alternate between the functions, so a
    load spike on a shared machine hits them alike. Runs until each has had ``min_time``."""
    best = [float("inf")] * len(fns)
    spent = [0.0] * len(fns)
    calls = 0
    while min(spent) < min_time or calls < 3:
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[i], spent[i] = min(best[i], dt), spent[i] + dt
        calls += 1
    return best


def run(batch: int, length: int, min_time: float) -> list[dict]:
    vocab = NoiseVocab.synthetic(32_100, num_sentinels=100)
    raw_len, _ = random_spans_helper(length, 0.15, 3.0)
    tokens, ws, send = make_inputs(batch, length, vocab)
    t5_tokens, _, _ = make_inputs(batch, raw_len, vocab, seed=1)
    bert = tokens.clone()
    bert[:, 0], bert[:, -1] = vocab.cls_id, vocab.sep_id
    bart = tokens.clone()
    bart[:, 0], bart[:, -1] = vocab.bos_id, vocab.eos_id
    ws_np, send_np = ws.numpy(), send.numpy()
    bert_np, bart_np, t5_np, tok_np = bert.numpy(), bart.numpy(), t5_tokens.numpy(), tokens.numpy()
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    cases = {
        "mlm (exact, 80/10/10)": (
            lambda: mlm_mask(bert, gen, vocab),
            lambda: [ref_mlm(bert_np[i], rng, vocab) for i in range(batch)]),
        "mlm (whole word)": (
            lambda: mlm_mask(bert, gen, vocab, whole_word=True, word_starts=ws),
            None),
        f"span_corruption (L={raw_len})": (
            lambda: span_corruption(t5_tokens, gen, vocab),
            lambda: [ref_span_corruption(t5_np[i], rng, vocab) for i in range(batch)]),
        "spanbert": (
            lambda: spanbert_mask(bert, gen, vocab, ws),
            lambda: [ref_spanbert(bert_np[i, 1:-1], ws_np[i, 1:-1], rng, vocab) for i in range(batch)]),
        "bart (infill + permute)": (
            lambda: bart_noise(bart, gen, vocab, ws, permute_sentence_ratio=1.0, sentence_ends=send),
            lambda: [ref_bart(bart_np[i], ws_np[i], rng, vocab, permute_sentence_ratio=1.0, sentence_ends=send_np[i])
                     for i in range(batch)]),
        "prefix_lm (+[L,L] mask)": (
            lambda: prefix_lm(tokens, gen, vocab),
            lambda: [ref_prefix_lm(tok_np[i], rng) for i in range(batch)]),
        "prefix_lm (collator: prefix_len, mask built on device)": (
            lambda: prefix_lm(tokens, gen, vocab, dense_mask=False),
            None),
        "plm (n-gram targets + order + [L,L] two-stream masks)": (
            lambda: two_stream_masks(plm_noise(tokens, gen, vocab)["perm_ranks"]),
            lambda: [ref_plm(tok_np[i], rng, vocab) for i in range(batch)]),
        "plm (collator: targets + order, masks built on device)": (
            lambda: plm_noise(tokens, gen, vocab),
            None),
        f"ul2 (7 denoisers, L={raw_len})": (
            lambda: ul2_denoise(t5_tokens, gen, vocab),
            lambda: [ref_ul2(t5_np[i], rng, vocab) for i in range(batch)]),
    }
    rows = []
    for name, (vec, ref) in cases.items():
        if ref is None:
            (t_vec,), t_ref = _time([vec], min_time), None
        else:
            t_vec, t_ref = _time([vec, ref], min_time)
        rows.append({
            "function": name,
            "vectorized_seq_per_s": batch / t_vec,
            "reference_seq_per_s": None if t_ref is None else batch / t_ref,
            "speedup": None if t_ref is None else t_ref / t_vec,
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="sequences per call (default 256)")
    ap.add_argument("--length", type=int, default=512, help="sequence length (T5/UL2 use the raw length for this input length)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: same as the single-threaded references)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of repeated calls per measurement")
    ap.add_argument("--out", default="bench_noise.json", help="where to write the JSON results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.batch, args.length, args.min_time)
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"batch={args.batch} length={args.length} torch_threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()} torch {torch.__version__}")
    print(f"{'function':56s} {'vectorized seq/s':>17s} {'per-example seq/s':>18s} {'speedup':>8s}")
    for r in rows:
        ref = "-" if r["reference_seq_per_s"] is None else f"{r['reference_seq_per_s']:.0f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        print(f"{r['function']:56s} {r['vectorized_seq_per_s']:17.0f} {ref:>18s} {sp:>8s}")
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s")
    Path(args.out).write_text(json.dumps({"batch": args.batch, "length": args.length, "machine": machine,
                                          "results": rows, "seconds": total}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
