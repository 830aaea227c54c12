"""Noise functions of the pretraining objectives: pure, seeded and vectorized over the batch.

Every function takes int64 token blocks [B, L], a ``torch.Generator`` and a
:class:`NoiseVocab`, and returns a dict of tensors ready for a model (-100 = ignored label,
``padding_mask`` True = real token, padding with ``vocab.pad_id``). They run in DataLoader
workers; the same generator state gives the same output.
"""
from lmkit.noise.bart import bart_noise
from lmkit.noise.mlm import mlm_mask
from lmkit.noise.prefix_lm import prefix_lm, prefix_lm_attention_mask, prefix_lm_seq2seq, unilm_mask
from lmkit.noise.span_corruption import (
    random_spans_helper, random_spans_noise_mask, reconstruct, span_corruption,
)
from lmkit.noise.spanbert import expected_span_words, span_length_pmf, spanbert_mask
from lmkit.noise.ul2 import UL2_DENOISERS, Denoiser, ul2_denoise
from lmkit.noise.vocab import NoiseVocab

__all__ = [
    "NoiseVocab", "mlm_mask", "span_corruption", "random_spans_helper", "random_spans_noise_mask",
    "reconstruct", "spanbert_mask", "span_length_pmf", "expected_span_words", "bart_noise",
    "prefix_lm", "prefix_lm_attention_mask", "prefix_lm_seq2seq", "unilm_mask", "ul2_denoise", "Denoiser", "UL2_DENOISERS",
]
