"""The contract every lmkit architecture follows.

An architecture maps token ids (plus masks, segment ids and decoder inputs) to hidden
states. It knows nothing of losses or parallelism: objectives add heads and losses, and
strategy plugins parallelize it from outside through the attributes listed here.

Contract (plugin authors build against it):

* ``kind``: ``"decoder"``, ``"encoder"`` or ``"encoder_decoder"``.
* ``d_model``, ``vocab_size``, ``max_seq_len``: ints.
* ``forward(input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
  decoder_input_ids=None, decoder_padding_mask=None) -> Tensor[B, T, d_model]`` —
  the last hidden states (the decoder's, for encoder–decoders), final norm applied.
  ``padding_mask`` is bool [B, T], True for real tokens. ``attn_mask`` is an optional
  bool [B, T, T] (True = may attend) that replaces the architecture's default
  (causal for decoders, bidirectional for encoders); prefix LM and UniLM masks use it.
  Decoders and encoders may also accept ``document_ids`` (int [B, T], the number of the
  packed document each token belongs to): attention then stays inside each document and
  positions restart at each document's first token. Objectives pass it only when their
  ``document_mask`` option is on.
* ``output_embedding() -> Tensor[V, d_model]``: the weight that maps hidden states to
  vocabulary logits (tied to the input embedding where the architecture ties).
* ``logits(hidden) -> Tensor[..., V]``: the architecture's own LM head. An architecture
  whose head is exactly ``head_input(hidden) @ output_embedding().T`` (no bias; the
  optional ``head_input`` is a per-row map such as T5's rescaling, identity when absent)
  may set ``logits_are_linear = True``; objectives then may fuse the head with the loss.
* ``transformer_blocks() -> list[nn.Module]``: every block, in order (encoder first).
  Each block has ``.attn`` and ``.mlp`` sub-modules; ``.mlp`` maps [B, T, D] -> [B, T, D]
  and may be swapped for another module of that signature (the mixture-of-experts
  plugin does this).
* ``embedding_modules() -> list[nn.Module]``: input embeddings (for pipeline stage 0 and
  for excluding from weight decay).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

ARCHITECTURE_KINDS = ("decoder", "encoder", "encoder_decoder")


def collect_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum of the auxiliary losses that sub-modules expose via ``lmkit_aux_losses()``.

    A sub-module (e.g. a mixture-of-experts layer) that wants a term added to the training
    loss implements ``lmkit_aux_losses() -> dict[str, Tensor]`` returning the terms of its
    latest forward, already weighted. Terms with the same name are averaged over modules.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        fn = getattr(module, "lmkit_aux_losses", None)
        if fn is None:
            continue
        for name, value in fn().items():
            sums[name] = sums[name] + value if name in sums else value
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def collect_metrics(model: nn.Module) -> dict[str, float | torch.Tensor]:
    """Metrics that sub-modules expose via ``lmkit_metrics()``, keyed ``<module path>/<metric>``.

    Logged by the training loop every step (e.g. an MoE layer's expert load and dropped
    fraction). Values are floats or 0-dim tensors describing the latest forward.
    """
    metrics = {}
    for name, module in model.named_modules():
        fn = getattr(module, "lmkit_metrics", None)
        if fn is not None:
            for key, value in fn().items():
                metrics[f"{name or 'model'}/{key}"] = value
    return metrics


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of parameters that decoupled weight decay must skip: biases, norms, embeddings."""
    skip: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()
        is_embedding = isinstance(module, nn.Embedding)
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or is_embedding or param_name.endswith("bias") or param_name.endswith("relative_attention_bias"):
                skip.add(full)
    return skip


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
