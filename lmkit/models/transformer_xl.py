"""Transformer-XL decoder (Dai et al. 2019): segment-level recurrence and relative positions.

Layer n of segment τ+1 attends over [SG(m^{n−1}_τ) ∘ h^{n−1}_{τ+1}]: the inputs of that layer
for the last ``memory_len`` positions before the segment (kept with stop-gradient in a
:class:`~lmkit.models.memory.StreamMemory`) followed by the segment's own, causally. Positions
enter only through :class:`~lmkit.models.relative_attention.RelativeAttention` (sinusoidal
distance embeddings with learned biases u, v); there are no absolute positions. Post-LN blocks
with a ReLU feed-forward, as the paper (``pre_lnorm``: pre-LN blocks, the reference code's option,
with no final norm as there); the output embedding is the input embedding (tied), and there is no
adaptive softmax or adaptive input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.layers import MLP
from lmkit.models.memory import StreamMemory
from lmkit.models.relative_attention import RelativeAttention, relative_layout, sinusoid_embedding


@dataclass
class TransformerXLConfig(ArchitectureConfig):
    """Sizes and options of :class:`TransformerXL`.

    ``memory_len``: hidden states of earlier segments each layer attends over (0 = no
    recurrence: every segment alone). ``max_seq_len`` bounds ``data.seq_len`` (the segment)
    and generation's context; there are no position embeddings. ``d_head`` None =
    ``d_model // n_head``; ``d_ff`` None = ``4 * d_model``. ``attn_dropout``: on attention
    probabilities (the paper's "dropatt"). ``pre_lnorm``: pre-LN blocks, the reference code's
    ``pre_lnorm`` option (default False = post-LN, as the paper). Post-LN needs a long warmup at
    lmkit's learning rates: with a short one the states collapse to one input-independent vector
    and the loss stays at the unigram level for hundreds of steps.
    """

    name: str = "transformer_xl"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_head: int | None = None
    d_ff: int | None = None
    memory_len: int = 128
    max_seq_len: int = 512
    vocab_size: int | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    pre_lnorm: bool = False
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False

    def __post_init__(self):
        from lmkit.config.checks import check_int, check_probability
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, TransformerXLConfig)
        check_architecture(self)
        check_int("model.memory_len", self.memory_len, minimum=0,
                  hint=" (the number of earlier positions each layer attends over; 0 = no recurrence)")
        check_int("model.d_head", self.d_head, minimum=1, optional=True, hint=" (null = d_model / n_head)")
        check_probability("model.attn_dropout", self.attn_dropout)


class Block(nn.Module):
    """Post-LN block: h = LN(h + attn([memory ∘ h])), then LN(h + mlp(h)).

    With ``pre_lnorm`` (the reference's ``pre_lnorm``): h = h + attn(LN([memory ∘ h])), then
    h + mlp(LN(h)); the memory holds the un-normalized layer inputs either way.
    """

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.attn = RelativeAttention(cfg.d_model, cfg.n_head, cfg.d_head, cfg.attn_dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, "relu", cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.pre_lnorm = cfg.pre_lnorm

    def forward(self, x, context, pos_emb, index, mask):
        """``x`` [B, T, D] the segment, ``context`` [B, K, D] its keys (memory ∘ segment); ``pos_emb``
        [R, D] and ``index`` [T, K] from :func:`relative_layout`; ``mask`` bool, True = may attend."""
        if self.pre_lnorm:
            normed = self.ln_1(context)  # queries are the segment's last T rows of the normalized context
            k, v = self.attn.keys_values(normed)
            out = self.attn.attend(normed[:, -x.shape[1]:], k, v, self.attn.position_keys(pos_emb), index, mask)
            x = x + self.drop(out)
            return x + self.mlp(self.ln_2(x))
        k, v = self.attn.keys_values(context)
        out = self.attn.attend(x, k, v, self.attn.position_keys(pos_emb), index, mask)
        x = self.ln_1(x + self.drop(out))
        return self.ln_2(x + self.mlp(x))


class TransformerXL(nn.Module):
    """Decoder with segment-level recurrence over a :class:`StreamMemory` (when ``memory_len`` > 0).

    The memory is read and written only while its ``mode`` is set (the training loop does so for
    training and validation, whose batches then come in stream order: ``stream_order``); with
    mode None every call is a plain causal decoder over its own tokens. ``padding_mask`` hides
    padded keys of the current segment (the memory holds states of earlier segments as they were).
    """

    kind = "decoder"
    accepts = frozenset({"token_type_ids"})  # token_type_ids: taken, ignored; no attn_mask / document_ids
    logits_are_linear = True  # logits(h) == h @ output_embedding().T

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.vocab_size, self.max_seq_len = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
        self.memory_len = cfg.memory_len
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        #: the data module serves batches in stream order (row r continues row r) for this model
        self.stream_order = cfg.memory_len > 0
        if cfg.memory_len > 0:
            self.stream_memory = StreamMemory(cfg.memory_len)
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer, residual_names=())
        with torch.no_grad():
            for block in self.blocks:
                block.attn.u.normal_(0.0, cfg.init_std)
                block.attn.v.normal_(0.0, cfg.init_std)

    def forward(self, input_ids, *, padding_mask=None, token_type_ids=None, attn_mask=None, document_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None):
        if attn_mask is not None or document_ids is not None:
            raise ValueError("transformer_xl takes neither attn_mask nor document_ids (it attends causally "
                             "over its memory and segment)")
        B, T = input_ids.shape
        memory = self.stream_memory.read(B) if self.memory_len > 0 else None
        M = memory[0].shape[1] if memory is not None else 0
        device = input_ids.device
        q_pos = torch.arange(M, M + T, device=device)
        k_pos = torch.arange(M + T, device=device)
        distances, index = relative_layout(q_pos, k_pos)
        x = self.drop(self.wte(input_ids) * math.sqrt(self.d_model))
        pos_emb = self.drop(sinusoid_embedding(distances, self.d_model).to(x.dtype))
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, M + T]: all memory, the segment causally
        if padding_mask is not None:
            keys = torch.cat([padding_mask.new_ones(B, M), padding_mask.bool()], dim=1)
            mask = mask & keys[:, None, None, :]
        inputs = []
        for i, block in enumerate(self.blocks):
            inputs.append(x)
            context = x if memory is None else torch.cat([memory[i].to(x), x], dim=1)
            x = block(x, context, pos_emb, index, mask)
        if self.memory_len > 0:
            self.stream_memory.write(inputs)
        return self.drop(x)

    # -- memory in checkpoints (exact resume) --------------------------------------------------
    def get_extra_state(self):
        return self.stream_memory.state_dict() if self.memory_len > 0 else {}

    def set_extra_state(self, state):
        if self.memory_len > 0 and state:
            self.stream_memory.load_state_dict(state)

    # -- the architecture contract -------------------------------------------------------------
    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight

    def logits(self, hidden):
        return hidden @ self.wte.weight.t()

    def transformer_blocks(self):
        return list(self.blocks)

    def embedding_modules(self):
        return [self.wte]
