"""Document-boundary attention masking: a packed document behaves as if it were alone."""
from __future__ import annotations

import pytest
import torch

from lmkit.models.layers import document_attention_mask, document_ids_from_separators, document_positions
from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig
from lmkit.objectives.mlm import MLM, MLMConfig
from lmkit.tokenizers.byte import ByteTokenizer
from tests.objectives.objective_helpers import tiny_model

TOK = ByteTokenizer()
EOS = TOK.eos_id


def _docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in (5, 9, 4)]


def _packed(docs):
    """doc0 EOS doc1 EOS doc2 (the last document is cut off by the window: no EOS)."""
    eos = torch.tensor([EOS])
    return torch.cat([docs[0], eos, docs[1], eos, docs[2]])[None]


def test_document_ids_and_positions():
    row = torch.tensor([[7, EOS, 8, 9, EOS, 10, EOS]])
    ids = document_ids_from_separators(row, EOS)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    # a row starting with a separator, and a batch of rows with different layouts
    rows = torch.tensor([[EOS, 5, 6, EOS], [5, 6, 7, 8]])
    ids = document_ids_from_separators(rows, EOS)
    assert ids.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    assert document_positions(ids).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]


def test_document_mask_is_block_diagonal_and_causal():
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    causal = document_attention_mask(ids, True)[0].int()
    assert causal.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    full = document_attention_mask(ids, False)[0].int()
    assert full.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    prefix = torch.ones(1, 5, 5, dtype=torch.bool).tril()
    prefix[:, :, :1] = True  # another mask given: combined with, not replaced by, the document mask
    assert document_attention_mask(ids, True, prefix)[0].int().tolist() == causal.tolist()


@pytest.mark.parametrize("arch", ["gpt", "bert", "albert"])
def test_packed_document_equals_document_alone(arch):
    model = tiny_model(arch, TOK.vocab_size).eval()
    docs = _docs()
    packed = _packed(docs)
    doc_ids = document_ids_from_separators(packed, EOS)
    with torch.no_grad():
        masked = model(packed, document_ids=doc_ids)
        unmasked = model(packed)
        for i, doc in enumerate(docs):
            alone_tokens = doc if i == len(docs) - 1 else torch.cat([doc, torch.tensor([EOS])])
            alone = model(alone_tokens[None])
            span = doc_ids[0] == i
            torch.testing.assert_close(masked[0, span], alone[0], atol=1e-5, rtol=1e-5)
            if i > 0:  # without the mask later documents see earlier ones and sit at other positions
                assert (unmasked[0, span] - alone[0]).abs().max() > 1e-3


def test_causal_lm_collator_and_loss_use_document_ids():
    blocks = torch.cat([_packed(_docs(1)), torch.tensor([[65]])], dim=1).repeat(2, 1)
    on = CausalLM(CausalLMConfig(document_mask=True), TOK)
    off = CausalLM(CausalLMConfig(), TOK)
    batch_on = on.make_collator()(blocks, torch.Generator())
    batch_off = off.make_collator()(blocks, torch.Generator())
    assert "document_ids" not in batch_off
    assert batch_on["document_ids"].tolist()[0] == document_ids_from_separators(blocks[:, :-1], EOS).tolist()[0]
    model = tiny_model("gpt", TOK.vocab_size).eval()
    with torch.no_grad():
        loss_on = on.loss(model, batch_on).loss_sum
        loss_off = off.loss(model, batch_off).loss_sum
        # the masked loss is the loss of each document scored on its own
        hidden = model(batch_on["input_ids"], document_ids=batch_on["document_ids"])
        expected = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), batch_on["labels"].flatten(),
                                                     reduction="sum")
    torch.testing.assert_close(loss_on, expected)
    assert abs(loss_on.item() - loss_off.item()) > 1e-3


def test_mlm_collator_frames_document_ids():
    blocks = _packed(_docs(2)).repeat(3, 1)
    mlm = MLM(MLMConfig(document_mask=True), TOK)
    batch = mlm.make_collator()(blocks, torch.Generator().manual_seed(0))
    ids = batch["document_ids"]
    assert ids.shape == batch["input_ids"].shape
    inner = document_ids_from_separators(blocks, EOS)
    assert torch.equal(ids[:, 1:-1], inner)
    assert (ids[:, 0] == 0).all() and torch.equal(ids[:, -1], inner[:, -1])  # [CLS] -> first doc, [SEP] -> last
    model = tiny_model("bert", TOK.vocab_size).eval()
    with torch.no_grad():
        on = mlm.loss(model, batch).loss_sum
        off = mlm.loss(model, {k: v for k, v in batch.items() if k != "document_ids"}).loss_sum
    assert abs(on.item() - off.item()) > 1e-4
