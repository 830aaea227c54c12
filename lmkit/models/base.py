"""The contract every lmkit architecture follows.

An architecture maps token ids (plus masks, segment ids and decoder inputs) to hidden
states. It knows nothing of losses or parallelism: objectives add heads and losses, and
strategy plugins parallelize it from outside through the attributes listed here.

Contract (plugin authors build against it):

* ``kind``: ``"decoder"``, ``"encoder"`` or ``"encoder_decoder"``.
* ``d_model``, ``vocab_size``, ``max_seq_len``: ints.
* ``forward(input_ids, *, padding_mask=None, **optional) -> Tensor[B, T, d_model]`` —
  the last hidden states (the decoder's, for encoder–decoders), final norm applied.
  ``padding_mask`` is bool [B, T], True for real tokens; every architecture takes it. The
  optional keyword inputs are those of the capabilities in ``accepts`` (below), and an
  objective passes only the ones it needs: ``attn_mask``, an optional bool [B, T, T]
  (True = may attend) that replaces the architecture's default (causal for decoders,
  bidirectional for encoders; the encoder's for encoder–decoders), used by prefix LM and
  UniLM masks; ``token_type_ids``, int [B, T] segment ids (an architecture without segment
  embeddings may take and ignore them); ``document_ids``, int [B, T], the number of the
  packed document each token belongs to: attention then stays inside each document and
  positions restart at each document's first token (objectives pass it only when their
  ``document_mask`` option is on); ``decoder_input_ids`` with ``decoder_padding_mask``,
  the decoder's inputs of an encoder–decoder. The built-ins take all of these keywords.
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
* ``accepts``: the optional inputs (:data:`CAPABILITIES`) the architecture honours, e.g.
  ``frozenset({"attn_mask", "document_ids"})``. Registration copies it into
  ``Component.meta["accepts"]``; the config check refuses an objective that needs an input
  the architecture does not honour (see :func:`architecture_accepts` for what an
  architecture that declares nothing is taken to accept).
* ``stream_memory`` (optional, :class:`lmkit.models.memory.StreamMemory`): segment-level
  recurrence (Transformer-XL, XLNet). The model reads and writes it in ``forward`` only while its
  ``mode`` is set: the training loop sets ``"train"`` during training steps and ``"val"`` during
  validation (emptied at the start of each validation epoch), and None otherwise, so evaluation,
  generation and scoring see a stateless model. Such a model sets ``stream_order = True``: the data
  module then serves batches in stream order (row r of each micro-batch continues row r of the
  previous one, :class:`lmkit.data.sampler.StreamStepBatchSampler`), and it saves the training
  memory in checkpoints through ``get_extra_state``/``set_extra_state`` (exact resume).

Config contract (the dataclass registered as the architecture's ``config_cls``; subclass
:class:`ArchitectureConfig`): the core reads ``vocab_size`` (None = the tokenizer's; the core
fills it in with ``dataclasses.replace`` before calling the factory, so the config must be a
dataclass), ``max_seq_len`` (``data.seq_len`` may not exceed it; read with ``getattr``, so an
architecture without a position limit may leave it out) and ``compile`` (True = the core
compiles the built model in place with ``trainer.compile_backend``/``compile_mode``). ``name``
is the registered architecture name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

ARCHITECTURE_KINDS = ("decoder", "encoder", "encoder_decoder")

#: Optional architecture inputs, beyond ``input_ids`` and ``padding_mask`` (which every
#: architecture takes). An architecture declares the ones it honours in ``accepts``; an
#: objective declares the ones it needs (:meth:`lmkit.objectives.base.Objective.needs_for`).
CAPABILITIES: dict[str, str] = {
    "attn_mask": "a [B, T, T] attention mask that replaces the default causal/bidirectional one",
    "token_type_ids": "segment ids [B, T], added as segment embeddings where the architecture has them",
    "document_ids": "per-token document ids [B, T] that keep attention inside each packed document",
    "decoder_input_ids": "the decoder inputs (and decoder_padding_mask) of an encoder-decoder",
    "pooled": "a pooled() sentence representation for sentence-level heads",
    "bilm_states": "separate forward and backward LM states from bilm_states(input_ids, padding_mask), as ELMo's",
    "two_stream": "XLNet's two-stream attention, two_stream(input_ids, perm_ranks, target_mask) (permutation LM)",
    "neighbours": "retrieved neighbour tokens [B, chunks, k, r] (and neighbour_mask) for chunked cross-attention (RETRO)",
}

#: Forward keyword arguments that stand for a capability (``pooled`` is a method instead).
_KWARG_CAPABILITIES = ("attn_mask", "token_type_ids", "document_ids", "decoder_input_ids")


@dataclass
class ArchitectureConfig:
    """Base of architecture config dataclasses: the fields the core reads (see the module doc).

    Subclass it and add the architecture's own sizes and options::

        @dataclass
        class MyConfig(ArchitectureConfig):
            name: str = "mine"
            n_layer: int = 4
            d_model: int = 128

    ``vocab_size=None`` means "the tokenizer's vocabulary" (filled in by the core);
    ``max_seq_len`` bounds ``data.seq_len``; ``compile=True`` makes the core ``torch.compile`` the model.
    """

    name: str = ""
    vocab_size: int | None = None
    max_seq_len: int = 512
    compile: bool = False


def architecture_accepts(component) -> frozenset[str] | None:
    """The capabilities a registered architecture honours, or None when they cannot be known.

    In order: ``component.meta["accepts"]``; the ``accepts`` attribute of the factory when the
    factory is a class; for a factory class that declares nothing, the capabilities named by
    its ``forward``'s keyword parameters (all of them when ``forward`` takes ``**kwargs``) plus
    ``pooled`` when it has a ``pooled`` method. A plain-function factory that declares nothing
    gives None: such an architecture is not checked (every objective of a fitting kind is
    accepted, as before capabilities existed).
    """
    declared = component.meta.get("accepts")
    if declared is not None:
        return frozenset(declared)
    factory = component.factory
    if not inspect.isclass(factory):
        return None
    if getattr(factory, "accepts", None) is not None:
        return frozenset(factory.accepts)
    forward = getattr(factory, "forward", None)
    if forward is None:
        return None
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        found = set(_KWARG_CAPABILITIES)
    else:
        found = {p.name for p in params if p.name in _KWARG_CAPABILITIES}
    if callable(getattr(factory, "pooled", None)):
        found.add("pooled")
    return frozenset(found)


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
