"""ELMo (Peters et al. 2018): a bidirectional LSTM language model whose mixed layers are the representation.

* Token representation ``x_k`` (width ``d_model``): a plain embedding (default), or with
  ``char_cnn=true`` ELMo's character encoder: the token's bytes, framed by begin/end-of-word
  marks, through char embeddings, convolutions of several widths (max over positions, ReLU),
  ``n_highway`` highway layers and a projection to ``d_model``.
* A forward and a backward stack of ``n_layer`` LSTMs with ``d_hidden`` cells whose outputs are
  projected to ``d_model`` (LSTMP: ``nn.LSTM(proj_size=d_model)``), a residual connection
  around every layer but the first (as AllenNLP's ``ElmoLstm``), dropout between layers.
  The forward stack reads each row left to right, the backward stack right to left, both over
  the real tokens only (``padding_mask``): the backward direction starts at each row's last
  real token wherever the padding is.
* Layer outputs ``h_0 = [x; x]`` and ``h_j = [fwd_j; bwd_j]`` (j = 1..n_layer), width ``2·d_model``.
* One softmax shared by both directions: ``logits(h) = h @ output_embedding().T`` (no bias), the
  output embedding tied to the input embedding by default (``tie_embeddings``; a character
  CNN has no table to tie to, so ``char_cnn=true`` needs ``tie_embeddings=false``).

What the objectives read:

* ``bilm_states(input_ids, padding_mask)`` -> (top forward states, top backward states), each
  [B, T, d_model] (after dropout): the ``bilm`` objective predicts token t+1 from the forward
  state at t and token t-1 from the backward state at t.
* ``forward(...)`` -> the task representation, [B, T, d_model]: ELMo's scalar mix
  ``γ · Σ_j softmax(s)_j · h_j`` (:meth:`ELMo.scalar_mix`, width 2·d_model) mapped to d_model by
  a learned linear layer ``mix_proj`` (the contract's width; a head on top of it is a linear map
  of the mix, as ELMo's task models read it). ``s``, ``γ`` and ``mix_proj`` are the task's: the
  ``bilm`` objective never reads them (and freezes them).
* ``pooled(hidden)``: the representation at the first position ([CLS] in classification): its
  backward half has read the whole sequence, its forward half only the first token.

The contract's ``token_type_ids`` are taken and ignored (no segment embeddings);
``transformer_blocks()`` is empty (no attention blocks to swap or count).

The character table: ``char_cnn`` reads each token's bytes from a persistent buffer
``token_chars`` [V, max_chars] (saved with the weights). The architecture is built from its
config alone, without the tokenizer, so the table starts as the byte tokenizer's layout (ids
0-255 are bytes, then lmkit's special tokens and the sentinels, each spelled by its name after
a special-token mark); :meth:`ELMo.set_token_chars` replaces it with another tokenizer's tokens
(the ``bilm`` objective does so in ``attach``, and the table then travels with the checkpoint).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.models.base import ArchitectureConfig
from lmkit.models.layers import require_vocab_size

# character ids of the char-CNN input: padding, begin/end of word, the special-token mark, then bytes
CHAR_PAD, CHAR_BOW, CHAR_EOW, CHAR_SPECIAL = 0, 1, 2, 3
CHAR_BYTE0 = 4  # byte b -> CHAR_BYTE0 + b
CHAR_VOCAB = CHAR_BYTE0 + 256

# PyTorch's CPU note that its oneDNN kernel lacks LSTM projections and its own kernel runs instead: the
# result is the same, and the note would otherwise greet every run of this architecture
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

#: ELMo's character filters (width, count): 2048 in all
ELMO_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]


@dataclass
class ELMoConfig(ArchitectureConfig):
    """Sizes and options of :class:`ELMo`. ``vocab_size`` None = taken from the tokenizer.

    The paper's model: 2 layers, 4096 cells, 512-d projections, character CNN with 2048
    filters and 2 highway layers (``model=elmo_base``).
    """

    name: str = "elmo"
    n_layer: int = 2
    d_model: int = 64  # token representation, LSTM projection, softmax input and forward() output
    d_hidden: int = 256  # LSTM cells per direction and layer
    max_seq_len: int = 4096  # no position table: only bounds data.seq_len
    vocab_size: int | None = None
    dropout: float = 0.0
    residual: bool = True  # residual connection around every LSTM layer but the first
    tie_embeddings: bool = True  # softmax weights = input embedding (needs char_cnn=false)
    char_cnn: bool = False  # token representation from the token's bytes (ELMo) instead of an embedding
    char_dim: int = 16
    char_filters: list[list[int]] = field(default_factory=lambda: [list(f) for f in ELMO_FILTERS])
    n_highway: int = 2
    max_chars: int = 50  # characters per token, begin/end-of-word marks included (longer tokens are cut)
    init_std: float = 0.02  # N(0, init_std) for the embeddings; LSTMs and convolutions keep PyTorch's init
    compile: bool = False

    def __post_init__(self):
        from lmkit.config.checks import check_int, check_positive, check_probability
        from lmkit.models.checks import post_init_base
        from lmkit.tokenizers.base import MAX_VOCAB_SIZE

        post_init_base(self, ELMoConfig)
        check_int("model.vocab_size", self.vocab_size, minimum=1, maximum=MAX_VOCAB_SIZE, optional=True,
                  hint=" (null = the tokenizer's vocabulary)")
        check_int("model.max_seq_len", self.max_seq_len, minimum=1, hint=" (the longest sequence the model takes)")
        for key in ("n_layer", "d_model", "d_hidden", "char_dim", "max_chars"):
            check_int(f"model.{key}", getattr(self, key), minimum=1)
        check_int("model.n_highway", self.n_highway, minimum=0)
        check_probability("model.dropout", self.dropout)
        check_positive("model.init_std", self.init_std, " (the standard deviation of the initial embeddings)")
        if self.d_model >= self.d_hidden:
            raise ConfigError(f"model.d_model={self.d_model} must be smaller than model.d_hidden={self.d_hidden}: "
                              f"the LSTM projects its {self.d_hidden} cells down to d_model (LSTMP)")
        if not self.char_cnn:
            return
        if self.tie_embeddings:
            raise ConfigError("model.char_cnn=true builds token representations from characters, so there is no input "
                              "embedding to tie the softmax to: set model.tie_embeddings=false")
        filters = self.char_filters
        if not filters or any(not isinstance(f, (list, tuple)) or len(f) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in f) for f in filters):
            raise ConfigError(f"model.char_filters must list [width, count] pairs of positive integers "
                              f"(ELMo: {ELMO_FILTERS}), got {filters!r}")
        widest = max(w for w, _ in filters)
        if self.max_chars < max(widest, 3):
            raise ConfigError(f"model.max_chars={self.max_chars} is shorter than the widest filter ({widest}) or than "
                              f"one byte between the word marks (3): raise model.max_chars (ELMo: 50)")


# -- the character table ------------------------------------------------------------------------
def _token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token of ``tokenizer`` stands for; None for special tokens and sentinels."""
    from lmkit.tokenizers.byte import ByteTokenizer

    special = tokenizer.special_table()
    V = tokenizer.vocab_size
    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) if i < 256 else None for i in range(V)]
    hf, kind = getattr(tokenizer, "hf", None), getattr(tokenizer, "kind", None)
    byte_of = {}
    if kind == "bpe":
        from lmkit.interop.tokenizer import _bytes_to_unicode

        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for i in range(V):
        if special[i]:
            out.append(None)
            continue
        token = hf.id_to_token(i) if hf is not None else None
        if token is None:  # a tokenizer lmkit does not know: its decoded text
            out.append(tokenizer.decode([i]).encode())
        elif kind == "bpe":  # byte-level: one printable character per byte
            out.append(bytes(byte_of[c] if c in byte_of else ord(c) % 256 for c in token))
        elif kind == "wordpiece":
            out.append(token.removeprefix("##").encode())
        else:  # unigram: ▁ marks a space
            out.append(token.replace("▁", " ").encode())
    return out


def token_char_table(tokenizer, vocab_size: int, max_chars: int) -> torch.Tensor:
    """Char-CNN input of every token id: [vocab_size, max_chars] int64.

    A regular token: begin-of-word, its bytes (cut to fit), end-of-word, padding. A special token
    or sentinel: begin-of-word, the special mark, its name's bytes (``<eos>``, ``<extra_id_3>``),
    end-of-word; the mark keeps it apart from the same text as ordinary bytes. Ids beyond the
    tokenizer's vocabulary (``model.vocab_size`` larger) get the special mark alone.
    ``tokenizer`` None: the byte tokenizer with as many sentinels as fill ``vocab_size``.
    """
    from lmkit.tokenizers.base import SPECIAL_TOKENS
    from lmkit.tokenizers.byte import ByteTokenizer

    if tokenizer is None:
        tokenizer = ByteTokenizer(num_sentinels=max(vocab_size - 256 - len(SPECIAL_TOKENS), 0))
    table = torch.full((vocab_size, max_chars), CHAR_PAD, dtype=torch.long)
    room = max_chars - 2
    for i, raw in enumerate(_token_bytes(tokenizer)[:vocab_size]):
        if raw is None:
            chars = [CHAR_SPECIAL] + [CHAR_BYTE0 + b for b in tokenizer.decode([i]).encode()]
        else:
            chars = [CHAR_BYTE0 + b for b in raw]
        chars = [CHAR_BOW, *chars[:room], CHAR_EOW]
        table[i, :len(chars)] = torch.tensor(chars)
    table[tokenizer.vocab_size:, :3] = torch.tensor([CHAR_BOW, CHAR_SPECIAL, CHAR_EOW])
    return table


# -- modules -------------------------------------------------------------------------------------
class Highway(nn.Module):
    """``g·x + (1−g)·relu(W x + b)`` with ``g = σ(W_g x + b_g)``; the gate's bias starts at 1 (carry x), as AllenNLP's."""

    def __init__(self, d: int):
        super().__init__()
        self.layer = nn.Linear(d, 2 * d)
        with torch.no_grad():
            self.layer.bias[d:].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nonlinear, gate = self.layer(x).chunk(2, dim=-1)
        g = torch.sigmoid(gate)
        return g * x + (1 - g) * torch.relu(nonlinear)


class CharCNN(nn.Module):
    """ELMo's token encoder: char embeddings -> convolutions (max over positions, ReLU) -> highways -> projection."""

    def __init__(self, char_dim: int, filters, n_highway: int, d_out: int):
        super().__init__()
        self.embed = nn.Embedding(CHAR_VOCAB, char_dim, padding_idx=CHAR_PAD)
        self.convs = nn.ModuleList(nn.Conv1d(char_dim, count, width) for width, count in filters)
        n_filters = sum(count for _, count in filters)
        self.highways = nn.ModuleList(Highway(n_filters) for _ in range(n_highway))
        self.proj = nn.Linear(n_filters, d_out)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """[N, max_chars] character ids -> [N, d_out]."""
        x = self.embed(chars).transpose(1, 2)  # [N, char_dim, max_chars]
        h = torch.cat([torch.relu(conv(x).amax(dim=-1)) for conv in self.convs], dim=-1)
        for highway in self.highways:
            h = highway(h)
        return self.proj(h)


def reading_orders(padding_mask: torch.Tensor | None, T: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gather indices [B, T] (or [T]) that put each row in the reading order of each direction.

    Forward: the real tokens in order, then the padding. Backward: the real tokens last to
    first, then the padding. A causal LSTM run over the reordered row never reads padding
    before a real token. Without a mask, forward is the identity (None) and backward a flip.
    """
    t = torch.arange(T, device=device)
    if padding_mask is None:
        return None, t.flip(0)
    pad_after = T + t  # padding sorts after every real token, in order
    fwd = torch.argsort(torch.where(padding_mask, t, pad_after), dim=1)
    bwd = torch.argsort(torch.where(padding_mask, -t, pad_after), dim=1)
    return fwd, bwd


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t]]`` for [B, T, D] ``x`` and an index of [B, T] or [T]."""
    if index.dim() == 1:
        return x[:, index]
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class ELMo(nn.Module):
    """Bidirectional LSTM language model with ELMo's scalar mix as its representation (see the module doc)."""

    kind = "encoder"
    accepts = frozenset({"token_type_ids", "pooled", "bilm_states"})  # token_type_ids: taken, ignored
    logits_are_linear = True  # logits(h) == h @ output_embedding().T: objectives may fuse head and loss

    def __init__(self, cfg: ELMoConfig):
        super().__init__()
        self.cfg = cfg
        V, D, L = require_vocab_size(cfg), cfg.d_model, cfg.n_layer
        self.d_model, self.vocab_size, self.max_seq_len = D, V, cfg.max_seq_len
        if cfg.char_cnn:
            self.wte = None
            self.char_cnn = CharCNN(cfg.char_dim, cfg.char_filters, cfg.n_highway, D)
            self.register_buffer("token_chars", token_char_table(None, V, cfg.max_chars))
        else:
            self.wte = nn.Embedding(V, D)
            self.char_cnn = None
        self.drop = nn.Dropout(cfg.dropout)
        self.fwd_lstms = nn.ModuleList(nn.LSTM(D, cfg.d_hidden, proj_size=D, batch_first=True) for _ in range(L))
        self.bwd_lstms = nn.ModuleList(nn.LSTM(D, cfg.d_hidden, proj_size=D, batch_first=True) for _ in range(L))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, V, bias=False)
        # ELMo's task-specific mix: softmax(s) over the n_layer + 1 layers, scale γ; then 2·D -> D
        self.mix_weights = nn.Parameter(torch.zeros(L + 1))
        self.mix_gamma = nn.Parameter(torch.ones(()))
        self.mix_proj = nn.Linear(2 * D, D)
        for table in (self.wte, self.lm_head):
            if table is not None:
                nn.init.normal_(table.weight, mean=0.0, std=cfg.init_std)

    # -- token representation and the two directions ---------------------------------------------
    def set_token_chars(self, tokenizer) -> None:
        """Read the char-CNN input of every token from ``tokenizer`` (no-op without ``char_cnn``)."""
        if self.char_cnn is not None:
            table = token_char_table(tokenizer, self.vocab_size, self.cfg.max_chars)
            self.token_chars.copy_(table.to(self.token_chars.device))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token representations x_k: [B, T, d_model] (the char CNN runs once per distinct token of the batch)."""
        if self.char_cnn is None:
            return self.wte(input_ids)
        distinct, where = torch.unique(input_ids, return_inverse=True)
        return self.char_cnn(self.token_chars[distinct])[where]

    def _direction(self, lstms: nn.ModuleList, x: torch.Tensor, order: torch.Tensor | None) -> list[torch.Tensor]:
        """Outputs of each layer of one direction, in the original positions; ``order`` = its reading order."""
        h = x if order is None else _gather(x, order)
        back = None if order is None else torch.argsort(order, dim=-1)  # the inverse permutation
        outputs = []
        for i, lstm in enumerate(lstms):
            y, _ = lstm(h)
            if self.cfg.residual and i > 0:
                y = y + h
            outputs.append(y if back is None else _gather(y, back))
            h = self.drop(y)
        return outputs

    def directions(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``(x, fwd, bwd)``: token representations [B, T, D] and each direction's layer outputs (lists of
        n_layer [B, T, D], before dropout). Positions of padding hold values no real position depends on."""
        x = self.embed(input_ids)
        fwd_order, bwd_order = reading_orders(padding_mask, input_ids.shape[1], input_ids.device)
        h = self.drop(x)
        return x, self._direction(self.fwd_lstms, h, fwd_order), self._direction(self.bwd_lstms, h, bwd_order)

    def bilm_states(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """(forward top states, backward top states), each [B, T, d_model] after dropout: what the softmax reads."""
        _, fwd, bwd = self.directions(input_ids, padding_mask)
        return self.drop(fwd[-1]), self.drop(bwd[-1])

    # -- the representation ------------------------------------------------------------------------
    def layer_outputs(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """ELMo's h_0 .. h_L, each [B, T, 2·d_model]: h_0 = [x; x], h_j = [fwd_j; bwd_j]."""
        x, fwd, bwd = self.directions(input_ids, padding_mask)
        return [torch.cat([x, x], dim=-1)] + [torch.cat(pair, dim=-1) for pair in zip(fwd, bwd)]

    def scalar_mix(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """γ · Σ_j softmax(s)_j · h_j over the ``layers`` of :meth:`layer_outputs`: [B, T, 2·d_model]."""
        weights = torch.softmax(self.mix_weights, dim=0)
        return self.mix_gamma * torch.einsum("l,lbtd->btd", weights.to(layers[0].dtype), torch.stack(layers))

    def mix_parameters(self) -> list[nn.Parameter]:
        """The task-specific parameters forward() adds to the biLM: s, γ and the projection."""
        return [self.mix_weights, self.mix_gamma, *self.mix_proj.parameters()]

    def forward(self, input_ids, *, padding_mask=None, token_type_ids=None):
        """The task representation: ``mix_proj(scalar_mix(h_0..h_L))``, [B, T, d_model]."""
        return self.mix_proj(self.scalar_mix(self.layer_outputs(input_ids, padding_mask)))

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The representation of the first token, [B, d_model]: its backward half has read the whole row."""
        return hidden[:, 0]

    # -- the contract's heads and module lists ----------------------------------------------------------
    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.output_embedding().t()

    def transformer_blocks(self) -> list[nn.Module]:
        return []

    def embedding_modules(self) -> list[nn.Module]:
        return [self.wte if self.char_cnn is None else self.char_cnn.embed]
