"""ELMo (lmkit/models/elmo.py) against by-hand references: which inputs each direction reads (with
padding anywhere), the LSTMP stacks against a per-step loop, the scalar mix against its formula,
the character table and CNN, and the config checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.models.elmo import CHAR_BOW, CHAR_BYTE0, CHAR_EOW, CHAR_PAD, CHAR_SPECIAL, ELMo, ELMoConfig, token_char_table
from lmkit.tokenizers.byte import ByteTokenizer

V = 266 + 4  # the byte tokenizer with 4 sentinels


def tiny(**kw) -> ELMo:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, n_layer=2, d_model=8, d_hidden=16)
    return ELMo(ELMoConfig(**{**cfg, **kw})).eval()


def ids_and_mask():
    """Row 0: 6 real tokens; row 1: right-padded (4 real); row 2: left-padded (2 pads, 4 real)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    return ids, mask


# -- by-hand references ---------------------------------------------------------------------------
def lstmp_by_hand(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """One LSTM layer with projection, step by step on one row x [T, D_in] -> [T, proj]."""
    W_ih, W_hh, W_hr = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.weight_hr_l0
    b = lstm.bias_ih_l0 + lstm.bias_hh_l0
    h, c, out = torch.zeros(W_hr.shape[0]), torch.zeros(W_hr.shape[1]), []
    for t in range(x.shape[0]):
        i, f, g, o = (W_ih @ x[t] + W_hh @ h + b).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = W_hr @ (torch.sigmoid(o) * torch.tanh(c))
        out.append(h)
    return torch.stack(out)


def stack_by_hand(lstms, x: torch.Tensor) -> list[torch.Tensor]:
    """Layer outputs of one direction, residual around every layer but the first (ELMo)."""
    outs, h = [], x
    for i, lstm in enumerate(lstms):
        y = lstmp_by_hand(lstm, h)
        if i > 0:
            y = y + h
        outs.append(y)
        h = y
    return outs


def layers_by_hand(model: ELMo, row_ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0 .. h_L of one unpadded row: [x; x], then [forward_j ; backward_j] (backward run on the reversed row)."""
    x = model.embed(row_ids[None])[0]
    fwd = stack_by_hand(model.fwd_lstms, x)
    bwd = [y.flip(0) for y in stack_by_hand(model.bwd_lstms, x.flip(0))]
    return [torch.cat([x, x], -1)] + [torch.cat([f, b], -1) for f, b in zip(fwd, bwd)]


# -- directions -----------------------------------------------------------------------------------
def test_forward_never_reads_the_future_and_backward_never_the_past_with_padding(monkeypatch):
    """d state[b, t] / d x[b', j] is non-zero exactly for the same row's real tokens j <= t (forward) and
    j >= t (backward), whether the padding is on the right or on the left, and never across rows."""
    model = tiny()
    ids, mask = ids_and_mask()
    x0 = model.embed(ids).detach()

    def tops(x):
        monkeypatch.setattr(model, "embed", lambda _ids: x)
        _, fwd, bwd = model.directions(ids, mask)
        return torch.stack([fwd[-1], bwd[-1]])

    jac = torch.autograd.functional.jacobian(tops, x0)  # [2, B, T, D, B, T, D]
    reads = jac.abs().sum(dim=(3, 6)) > 0  # [2, B, T, B, T]
    B, T = ids.shape
    j = torch.arange(T)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            same_row = torch.zeros(B, T, dtype=torch.bool)
            same_row[b] = mask[b] & (j <= t)
            assert torch.equal(reads[0, b, t], same_row), ("forward", b, t)
            same_row[b] = mask[b] & (j >= t)
            assert torch.equal(reads[1, b, t], same_row), ("backward", b, t)


def test_padded_rows_equal_the_rows_alone():
    """The backward direction starts at each row's last real token: a padded row's real positions
    equal the same tokens run alone without padding, for every layer (right and left padding)."""
    model = tiny()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        layers = model.layer_outputs(ids, mask)
        for b in range(3):
            alone = model.layer_outputs(ids[b:b + 1, mask[b]])
            for together, single in zip(layers, alone):
                torch.testing.assert_close(together[b, mask[b]], single[0], atol=1e-6, rtol=1e-5)


def test_lstm_stacks_equal_a_step_by_step_lstmp_with_residuals():
    model = tiny(n_layer=3)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        got = model.layer_outputs(ids)
        for b in range(ids.shape[0]):
            for j, want in enumerate(layers_by_hand(model, ids[b])):
                torch.testing.assert_close(got[j][b], want, atol=1e-5, rtol=1e-4)


def test_bilm_states_are_the_top_layers_of_each_direction():
    model = tiny()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        fwd, bwd = model.bilm_states(ids, mask)
        top = model.layer_outputs(ids, mask)[-1]
    assert torch.equal(torch.cat([fwd, bwd], -1), top)


# -- the representation ------------------------------------------------------------------------------
def test_forward_is_the_scalar_mix_of_the_layers_by_hand():
    """forward = mix_proj(γ · Σ_j softmax(s)_j · h_j), with h_j from the step-by-step reference."""
    model = tiny()
    with torch.no_grad():
        model.mix_weights.copy_(torch.tensor([0.3, -1.2, 0.8]))
        model.mix_gamma.fill_(1.7)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        hidden = model(ids)
        w = torch.exp(model.mix_weights) / torch.exp(model.mix_weights).sum()
        for b in range(ids.shape[0]):
            mix = 1.7 * sum(w[j] * h for j, h in enumerate(layers_by_hand(model, ids[b])))
            torch.testing.assert_close(model.scalar_mix(model.layer_outputs(ids[b:b + 1]))[0], mix, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(hidden[b], mix @ model.mix_proj.weight.T + model.mix_proj.bias, atol=1e-5, rtol=1e-4)
    assert hidden.shape == (*ids.shape, model.d_model)


def test_pooled_first_token_ignores_the_padding():
    """pooled() reads position 0; a right-padded row pools to what the row alone pools to."""
    model = tiny()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        pooled = model.pooled(model(ids, padding_mask=mask))
        alone = model.pooled(model(ids[1:2, :4]))
    torch.testing.assert_close(pooled[1], alone[0], atol=1e-6, rtol=1e-5)
    assert pooled.shape == (3, model.d_model)


def test_logits_use_the_shared_tied_softmax():
    model = tiny()
    assert model.output_embedding() is model.wte.weight
    h = torch.randn(2, 3, model.d_model)
    torch.testing.assert_close(model.logits(h), h @ model.wte.weight.T)
    untied = tiny(tie_embeddings=False)
    assert untied.output_embedding() is untied.lm_head.weight


# -- characters ------------------------------------------------------------------------------------
def test_byte_tokenizer_char_table():
    """Byte b -> [BOW, b, EOW]; specials and sentinels -> [BOW, SPECIAL, their name, EOW]; ids past the
    tokenizer -> [BOW, SPECIAL, EOW]. The factory's default equals the table of the byte tokenizer."""
    tok = ByteTokenizer(num_sentinels=4)
    table = token_char_table(tok, V + 2, 16)

    def row(*chars):
        return torch.tensor(list(chars) + [CHAR_PAD] * (16 - len(chars)))

    assert torch.equal(table[65], row(CHAR_BOW, CHAR_BYTE0 + 65, CHAR_EOW))
    assert torch.equal(table[0], row(CHAR_BOW, CHAR_BYTE0, CHAR_EOW))
    assert torch.equal(table[tok.eos_id], row(CHAR_BOW, CHAR_SPECIAL, *(CHAR_BYTE0 + b for b in b"<eos>"), CHAR_EOW))
    assert torch.equal(table[tok.sentinel_id(2)],
                       row(CHAR_BOW, CHAR_SPECIAL, *(CHAR_BYTE0 + b for b in b"<extra_id_2>"), CHAR_EOW))
    assert torch.equal(table[V + 1], row(CHAR_BOW, CHAR_SPECIAL, CHAR_EOW))
    assert len({tuple(r.tolist()) for r in table[:V]}) == V  # every token reads differently
    assert torch.equal(token_char_table(None, V, 16), table[:V])
    assert torch.equal(tiny(char_cnn=True, tie_embeddings=False, max_chars=16).token_chars, table[:V])


def _bytes_of(row: torch.Tensor) -> bytes:
    return bytes(int(c) - CHAR_BYTE0 for c in row if c >= CHAR_BYTE0)


def test_trained_bpe_char_table_spells_each_token():
    """With a byte-level BPE vocabulary, the bytes of the tokens of a text (table rows) are the text's bytes."""
    from lmkit.tokenizers.trained import TrainedTokenizer, train_hf_tokenizer

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind — café " * 20
    tok = TrainedTokenizer(train_hf_tokenizer("bpe", [text], 300, min_frequency=1), "bpe")
    table = token_char_table(tok, tok.vocab_size, 50)
    ids = tok.encode(text[:200])
    assert max(len(_bytes_of(table[i])) for i in ids) > 1  # merged tokens, not single bytes
    assert b"".join(_bytes_of(table[i]) for i in ids) == text[:200].encode()
    model = tiny(char_cnn=True, tie_embeddings=False, max_chars=50, vocab_size=tok.vocab_size)
    model.set_token_chars(tok)
    assert torch.equal(model.state_dict()["token_chars"], table)  # saved with the weights


def test_char_cnn_equals_convolutions_highway_and_projection_by_hand():
    model = tiny(char_cnn=True, tie_embeddings=False, char_filters=[[1, 3], [3, 5]], n_highway=2, max_chars=8)
    cnn = model.char_cnn
    with torch.no_grad():
        for hw in cnn.highways:  # away from the carry-only start, so that both branches count
            hw.layer.bias.normal_()
        ids = torch.tensor([[65, 10, 257, 65]])
        got = model.embed(ids)[0]
        for k, i in enumerate(ids[0].tolist()):
            e = cnn.embed.weight[model.token_chars[i]]  # [max_chars, char_dim]
            pooled = []
            for conv in cnn.convs:
                w = conv.weight.shape[-1]
                windows = torch.stack([e[p:p + w] for p in range(e.shape[0] - w + 1)])  # [P, w, char_dim]
                scores = torch.einsum("pwc,fcw->pf", windows, conv.weight) + conv.bias
                pooled.append(torch.relu(scores.max(0).values))
            h = torch.cat(pooled)
            for hw in cnn.highways:
                a = hw.layer.weight @ h + hw.layer.bias
                g = torch.sigmoid(a[h.shape[0]:])
                h = g * h + (1 - g) * torch.relu(a[:h.shape[0]])
            torch.testing.assert_close(got[k], cnn.proj.weight @ h + cnn.proj.bias, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], got[3])  # the same token, the same representation


def test_char_cnn_model_trains_its_character_encoder():
    model = tiny(char_cnn=True, tie_embeddings=False, char_filters=[[1, 4], [2, 4]], max_chars=8).train()
    ids, mask = ids_and_mask()
    fwd, bwd = model.bilm_states(ids, mask)
    (model.logits(fwd).logsumexp(-1).sum() + model.logits(bwd).logsumexp(-1).sum()).backward()
    for p in (model.char_cnn.embed.weight, model.char_cnn.convs[1].weight, model.char_cnn.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# -- config checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, expected", [
    (dict(char_cnn=True), "model.tie_embeddings=false"),
    (dict(char_cnn=True, tie_embeddings=False, char_filters=[[3]]), "model.char_filters"),
    (dict(char_cnn=True, tie_embeddings=False, max_chars=5), "model.max_chars=5"),
    (dict(d_model=32, d_hidden=32), "model.d_hidden=32"),
    (dict(dropout=1.0), "model.dropout"),
])
def test_bad_elmo_configs_name_the_key(kw, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        ELMoConfig(**kw)
