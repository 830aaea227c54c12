"""XLNet's permutation LM: a target never sees its own content, the order is respected, the CLI trains it."""
from __future__ import annotations

import pytest
import torch
from objective_helpers import RUN, byte_tokenizer, gen, text_blocks

from lmkit.api import load_run_config, run
from lmkit.errors import ConfigError
from lmkit.models.xlnet import XLNet, XLNetConfig
from lmkit.objectives.plm import PLM, PLMConfig


def _xlnet(vocab_size, **kw):
    torch.manual_seed(0)
    return XLNet(XLNetConfig(n_layer=2, n_head=2, d_model=32, vocab_size=vocab_size, **kw))


def _batch(n_rows=4, length=24, seed=0, k=4.0):
    tok = byte_tokenizer()
    objective = PLM(PLMConfig(k=k), tok)
    return tok, objective, objective.make_collator()(text_blocks(n_rows, length, seed), gen(seed))


def _embedding_grads(model, batch, b, i):
    """d g[b, i] / d (token embeddings) [T, D] of row b, through the whole two-stream model."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["emb"] = output

    handle = model.wte.register_forward_hook(keep)
    g = model.two_stream(batch["input_ids"], batch["perm_ranks"], batch["target_mask"])
    handle.remove()
    g[b, i].pow(2).sum().backward()
    return captured["emb"].grad[b].abs().sum(-1)


def test_a_target_never_sees_its_own_content_through_any_path():
    tok, _, batch = _batch()
    model = _xlnet(tok.vocab_size)
    ranks = batch["perm_ranks"]
    checked = 0
    for b in range(2):
        for i in torch.nonzero(batch["target_mask"][b]).flatten().tolist():
            model.zero_grad()
            grads = _embedding_grads(model, batch, b, i)
            later = (ranks[b] >= ranks[b, i])  # itself and every target after it in the order
            assert grads[later].max() == 0, (b, i)
            earlier_or_context = ~later
            assert (grads[earlier_or_context] > 0).all(), (b, i)
            checked += 1
    assert checked >= 10


def test_the_prediction_at_a_target_is_unchanged_by_its_own_token_and_later_ones():
    tok, _, batch = _batch(seed=1)
    model = _xlnet(tok.vocab_size).eval()
    g = model.two_stream(batch["input_ids"], batch["perm_ranks"], batch["target_mask"])
    b = 0
    last = int(batch["perm_ranks"][b].argmax())  # the last target of the order
    first = int(torch.nonzero(batch["perm_ranks"][b] == 0))
    changed = batch["input_ids"].clone()
    changed[b, first] = (changed[b, first] + 7) % 256
    g2 = model.two_stream(changed, batch["perm_ranks"], batch["target_mask"])
    torch.testing.assert_close(g2[b, first], g[b, first])  # its own token: no effect
    assert not torch.allclose(g2[b, last], g[b, last])  # a later target reads it


def test_the_content_stream_is_a_bidirectional_encoder():
    tok, _, batch = _batch()
    model = _xlnet(tok.vocab_size).eval()
    h = model(batch["input_ids"])
    changed = batch["input_ids"].clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    assert not torch.allclose(model(changed)[:, 0], h[:, 0])  # the first position reads the last
    padded = model(batch["input_ids"], padding_mask=torch.arange(24).expand(4, 24) < 20)
    changed[:, 20:] = 0
    torch.testing.assert_close(model(changed, padding_mask=torch.arange(24).expand(4, 24) < 20)[:, :20],
                               padded[:, :20])  # padding is never read


def test_loss_is_cross_entropy_of_the_query_stream_at_the_targets_only():
    tok, objective, batch = _batch(k=6.0)
    model = _xlnet(tok.vocab_size)
    out = objective.loss(model, batch)
    g = model.two_stream(batch["input_ids"], batch["perm_ranks"], batch["target_mask"])
    sel = batch["target_mask"]
    want = torch.nn.functional.cross_entropy(model.logits(g)[sel], batch["input_ids"][sel], reduction="sum")
    torch.testing.assert_close(out.loss_sum, want)
    assert int(out.n_targets) == 4 * 4  # round(24 / 6) per row
    assert abs(int(out.n_targets) / batch["input_ids"].numel() - 1 / 6) < 0.01


@pytest.mark.parametrize("overrides,expected", [
    (["model=bert_tiny"], "two_stream"),
    (["objective.k=1"], "objective.k must be > 1"),
    (["model.memory_len=-1"], "model.memory_len must be >= 0"),
    (["objective.max_gram=0"], "objective.max_gram must be >= 1"),
])
def test_bad_values_are_refused_before_training(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=plm", *overrides])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_plm_on_another_architecture_names_the_xlnet_presets(capsys):
    from lmkit_test_utils import one_error_line

    one_error_line(capsys, ["+objective=plm", "model=gpt_tiny"], "xlnet_tiny")


def test_cli_run_lowers_the_loss(tmp_path):
    summary = run(["+objective=plm", *RUN], tmp_path / "run")
    assert summary["end"]["val/loss"] < summary["start"]["val/loss"] - 0.5


def test_with_memory_both_streams_read_the_previous_segment_which_gets_no_gradient():
    tok, _, first = _batch(seed=2)
    _, _, second = _batch(seed=3)
    model = _xlnet(tok.vocab_size, memory_len=16)
    assert model.stream_order
    stateless = model.two_stream(second["input_ids"], second["perm_ranks"], second["target_mask"])
    model.stream_memory.mode = "train"
    model.two_stream(first["input_ids"], first["perm_ranks"], first["target_mask"])
    memory = model.stream_memory.read(4)
    assert len(memory) == 2 and memory[0].shape == (4, 16, 32) and not memory[0].requires_grad
    b, i = 0, int(torch.nonzero(second["perm_ranks"][0] == 0))  # the first target of the order
    grads = _embedding_grads(model, second, b, i)
    assert grads[second["perm_ranks"][b] >= 0].max() == 0  # it sees context tokens and the memory only
    g = model.two_stream(second["input_ids"], second["perm_ranks"], second["target_mask"])
    assert not torch.allclose(g, stateless)  # the memory is read
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.stream_memory.mode = None
    torch.testing.assert_close(model.two_stream(second["input_ids"], second["perm_ranks"], second["target_mask"]),
                               stateless)  # mode None: stateless again


def test_fill_mask_predicts_each_mask_as_a_plm_target_of_the_unmasked_tokens():
    from lmkit.generation import encode_text, fill_mask
    from lmkit.tokenizers.byte import ByteTokenizer

    tok = ByteTokenizer()
    model = _xlnet(tok.vocab_size).eval()
    got = fill_mask(model, tok, "To be [MASK]r not [MASK]o be", top_k=3)
    ids = torch.tensor([encode_text(tok, "To be [MASK]r not [MASK]o be")])
    targets = ids == tok.mask_id
    assert int(targets.sum()) == 2 and ids.shape[1] == 18  # unframed: no [CLS]/[SEP]
    with torch.no_grad():
        g = model.two_stream(ids, torch.where(targets, 0, -1), targets)
        probs = model.logits(g[targets]).softmax(-1)
    for row, p in zip(got, probs):
        top = p.topk(3)
        assert [t for t, _ in row] == [tok.decode([int(i)]) for i in top.indices]
        assert [round(q, 5) for _, q in row] == [round(float(q), 5) for q in top.values]
