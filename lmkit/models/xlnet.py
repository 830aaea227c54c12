"""XLNet (Yang et al. 2019): a Transformer-XL backbone with two-stream attention for permutation LM.

Every layer runs one relative-position attention (:class:`~lmkit.models.relative_attention.RelativeAttention`,
with XLNet's relative segment encodings) for two streams with the same weights:

* the **content stream** ``h`` (starts at the token embeddings) is an ordinary bidirectional
  encoder when no permutation is given: ``forward`` returns it, for fine-tuning and for any
  encoder objective;
* the **query stream** ``g`` (starts at a learned ``mask_emb`` at the targets) attends to the
  content of the positions before it in the factorization order, never to its own token
  (:meth:`XLNet.two_stream`, used by the ``plm`` objective; masks from :func:`lmkit.noise.plm.two_stream_masks`).

With ``memory_len > 0`` each layer also attends, from both streams, to the cached content states
of the previous segment (stop-gradient), and the data are served in stream order
(:class:`~lmkit.models.memory.StreamMemory`). Post-LN blocks with a GELU FFN and a tied output
embedding with a bias, as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.layers import MLP
from lmkit.models.relative_attention import RelativeAttention, relative_layout, sinusoid_embedding


@dataclass
class XLNetConfig(ArchitectureConfig):
    """Sizes and options of :class:`XLNet`. ``vocab_size`` None = taken from the tokenizer.

    ``memory_len``: content states of the previous segment every layer attends to (0 = none);
    ``max_seq_len`` only bounds ``data.seq_len`` (positions are relative).
    """

    name: str = "xlnet"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    memory_len: int = 0
    max_seq_len: int = 512
    vocab_size: int | None = None
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    activation: str = "gelu_exact"
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False

    def __post_init__(self):
        from lmkit.config.checks import check_int
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, XLNetConfig)
        check_architecture(self)
        check_int("model.memory_len", self.memory_len, minimum=0,
                  hint=" (the cached states of the previous segment each layer attends to; 0 = no memory)")


class XLNetBlock(nn.Module):
    """Relative attention + FFN, post-LN; the same weights serve the content and the query stream."""

    def __init__(self, cfg: XLNetConfig):
        super().__init__()
        self.attn = RelativeAttention(cfg.d_model, cfg.n_head, dropout=cfg.dropout, segments=True)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, cfg.activation, cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def _post(self, x, attended):
        x = self.ln_1(x + self.drop(attended))
        return self.ln_2(x + self.mlp(x))

    def forward(self, h, memory, r, index, content_mask, segment_differs, g=None, query_mask=None):
        context = h if memory is None else torch.cat([memory.to(h), h], dim=1)
        k, v = self.attn.keys_values(context)
        h_out = self._post(h, self.attn.attend(h, k, v, r, index, content_mask, segment_differs))
        if g is None:
            return h_out, None
        return h_out, self._post(g, self.attn.attend(g, k, v, r, index, query_mask, segment_differs))


class XLNet(nn.Module):
    """XLNet encoder: relative positions and segments, optional segment memory, two-stream attention."""

    kind = "encoder"
    accepts = frozenset({"token_type_ids", "pooled", "two_stream"})
    logits_are_linear = False  # the LM head has a bias

    def __init__(self, cfg: XLNetConfig):
        super().__init__()
        from lmkit.models.init import initialize

        self.cfg = cfg
        self.d_model, self.vocab_size, self.max_seq_len = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(XLNetBlock(cfg) for _ in range(cfg.n_layer))
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer, residual_names=())
        with torch.no_grad():
            for block in self.blocks:
                for p in (block.attn.u, block.attn.v, block.attn.s, block.attn.seg_embed):
                    p.normal_(0.0, cfg.init_std)
            self.mask_emb.normal_(0.0, cfg.init_std)
        self.stream_order = cfg.memory_len > 0
        if self.stream_order:
            from lmkit.models.memory import StreamMemory

            self.stream_memory = StreamMemory(cfg.memory_len)

    # -- training memory in checkpoints (exact resume) ------------------------------------
    def get_extra_state(self):
        return self.stream_memory.state_dict() if self.stream_order else {}

    def set_extra_state(self, state):
        if self.stream_order and state:
            self.stream_memory.load_state_dict(state)

    def forward(self, input_ids, *, padding_mask=None, token_type_ids=None, **_unused):
        """Content stream of a bidirectional pass: [B, T, d_model]."""
        h, _ = self._run(input_ids, padding_mask, token_type_ids)
        return h

    def two_stream(self, input_ids, perm_ranks, target_mask, *, padding_mask=None, token_type_ids=None):
        """Query-stream outputs [B, T, d_model] under the factorization order ``perm_ranks`` [B, T]
        (−1 = not a target, first in the order; see :func:`lmkit.noise.plm.factorization_ranks`).
        Only the rows at ``target_mask`` are meaningful."""
        from lmkit.noise.plm import two_stream_masks

        content, query = two_stream_masks(perm_ranks)
        _, g = self._run(input_ids, padding_mask, token_type_ids, (content, query), target_mask)
        return g

    def _run(self, input_ids, padding_mask, token_type_ids, perm_masks=None, target_mask=None):
        B, T = input_ids.shape
        device = input_ids.device
        memories = self.stream_memory.read(B) if self.stream_order else None
        M = 0 if memories is None else memories[0].shape[1]
        h = self.drop(self.wte(input_ids))
        g = None
        if perm_masks is not None:
            g = self.drop(torch.where(target_mask[..., None], self.mask_emb.to(h.dtype), h))
        q_pos = torch.arange(M, M + T, device=device)
        distances, index = relative_layout(q_pos, torch.arange(M + T, device=device))
        pos_emb = self.drop(sinusoid_embedding(distances, self.d_model).to(h.dtype))
        key_ok = torch.ones(B, M + T, dtype=torch.bool, device=device)
        if padding_mask is not None:
            key_ok[:, M:] = padding_mask.bool()
        if perm_masks is None:
            content = key_ok[:, None, None, :].expand(B, 1, T, M + T)
            query = None
        else:
            memory_cols = torch.ones(B, T, M, dtype=torch.bool, device=device)
            content, query = (torch.cat([memory_cols, m], dim=2)[:, None] & key_ok[:, None, None, :]
                              for m in perm_masks)
        segments = torch.zeros(B, T, dtype=torch.long, device=device) if token_type_ids is None else token_type_ids
        key_segments = torch.cat([torch.zeros(B, M, dtype=segments.dtype, device=device), segments], dim=1)
        segment_differs = segments[:, :, None] != key_segments[:, None, :]  # memory counts as segment 0 (XLNet)
        new_memory = []
        for i, block in enumerate(self.blocks):
            new_memory.append(h)
            r = block.attn.position_keys(pos_emb)
            h, g = block(h, None if memories is None else memories[i], r, index, content, segment_differs,
                         g, query)
        if self.stream_order:
            self.stream_memory.write(new_memory)
        return h, g

    def pooled(self, hidden):
        """The first position's content state [B, D]: the ``[CLS]`` lmkit puts first in encoder inputs
        (XLNet's own summary reads its ``<cls>`` at the end, which right padding would move)."""
        return hidden[:, 0]

    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight

    def logits(self, hidden):
        return hidden @ self.wte.weight.t() + self.lm_bias

    def transformer_blocks(self):
        return list(self.blocks)

    def embedding_modules(self):
        return [self.wte]
