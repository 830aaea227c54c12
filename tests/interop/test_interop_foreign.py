"""Directories transformers wrote itself (a BERT with its own WordPiece tokenizer, a GPT-2 with a byte-level
BPE whose only special token is <|endoftext|>): imported, and a run started from them (init_from)."""
from __future__ import annotations

import pytest
import torch
from interop_helpers import TOL, batch, max_logit_diff, transformers
from lmkit_test_utils import TINY

import lmkit.api
from lmkit.interop.load import load_hf
from lmkit.interop.tokenizer import HFDirTokenizer
from lmkit.tokenizers.trained import load_tokenizer_file

BASE = [a for a in TINY if not a.startswith("model.")]
WORDS = ("the of and to a in is that it was he for on with as his be at by i this had not are but from or have an "
         "they which one you were her all she there would their we him been has when who will more no if out so "
         "said what up its about into than them can only other new some time could these two may then do first "
         "any my now such like our over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people mr how too little state good very "
         "make world still own see men work long get here between both life being under never day same another "
         "know while last might us great old year off come since against go came right used take three").split()
TEXTS = ["The cat sat on the mat, and the dog did not.", "Ünïcode àccents, 日本語 and [MASK] in text", "  spaces\tand\nlines "]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"-()"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *(f"##{c}" for c in chars)]
    tokens = list(dict.fromkeys(tokens))
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(tokens))
    try:  # transformers 5 takes the vocabulary itself, 4.x a vocab.txt
        tok = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    except TypeError:
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    assert len(tok) == len(tokens)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    model.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root / "bert"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("foreign")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                               bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root / "gpt2"


def test_foreign_bert_imports_with_its_tokenizer(bert_dir, tmp_path):
    loaded = load_hf(bert_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(bert_dir)).eval()
    ids, pad = batch(loaded.config.vocab_size, T=20, pad_from=14)
    assert max_logit_diff(loaded.model, hf, ids, pad) < TOL
    tok, hf_tok = loaded.tokenizer, transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    assert isinstance(tok, HFDirTokenizer)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    assert (tok.pad_id, tok.unk_id if hasattr(tok, "unk_id") else tok.special_id("<unk>"), tok.cls_id, tok.sep_id,
            tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.eos_id == tok.sep_id and tok.bos_id == tok.cls_id  # BERT: [SEP] ends, [CLS] starts
    assert tok.special_table()[:5].all() and not tok.special_table()[5:].any()
    tok.save(tmp_path / "tokenizer.json")  # a run directory's tokenizer.json reads back the same
    back = load_tokenizer_file(tmp_path / "tokenizer.json")
    assert back.fingerprint() == tok.fingerprint() and back.mask_id == tok.mask_id
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS)


def test_continue_bert_pretraining_from_a_foreign_directory(bert_dir, tmp_path, capsys):
    """python -m lmkit +objective=mlm init_from=BERT_DIR: the first validation loss is the HF model's."""
    built = lmkit.api.build(["+objective=mlm", *BASE, "data.seq_len=24", f"init_from={bert_dir}"], tmp_path / "run")
    said = capsys.readouterr().out
    assert "model.d_model=32 (was 128)" in said and "loaded" in said
    dm, module = built.datamodule, built.module
    dm.setup("fit")
    mb = next(iter(dm.val_dataloader()))["micro_batches"][0]
    module.eval()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(bert_dir)).eval()
    with torch.no_grad():
        out = module.objective.loss(module.model, mb)
        pad = mb.get("padding_mask")
        logits = hf(input_ids=mb["input_ids"], token_type_ids=mb["token_type_ids"],
                    attention_mask=None if pad is None else pad.long()).logits
        hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100)
    assert abs(out.loss_sum / out.n_targets - hf_loss).item() < 1e-5


def test_foreign_gpt2_with_one_special_token(gpt2_dir, tmp_path):
    loaded = load_hf(gpt2_dir)
    tok = loaded.tokenizer
    end = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir)).eos_token_id
    assert tok.eos_id == tok.pad_id == tok.bos_id == end
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gpt2_dir)).eval()
    ids, pad = batch(loaded.config.vocab_size, T=16)
    assert max_logit_diff(loaded.model, hf, ids, pad) < TOL
    built = lmkit.api.build([*TINY, f"init_from={gpt2_dir}"], tmp_path / "run")
    assert built.tokenizer.eos_id == end


def _foreign_models():
    t = transformers
    small = dict(vocab_size=100)
    return {
        "t5_v1_1": lambda: t.T5ForConditionalGeneration(t.T5Config(**small, d_model=32, d_kv=16, num_heads=2, num_layers=2,
                                                                   d_ff=48, feed_forward_proj="gated-gelu",
                                                                   tie_word_embeddings=False)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(**small, d_model=32, d_kv=16, num_heads=2, num_layers=2,
                                                              num_decoder_layers=1, d_ff=48)),
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(
            **small, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40)),
        "albert": lambda: t.AlbertForMaskedLM(t.AlbertConfig(**small, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=2, intermediate_size=48,
                                                             max_position_embeddings=40)),
        "bert_pretraining": lambda: t.BertForPreTraining(t.BertConfig(**small, hidden_size=32, num_hidden_layers=2,
                                                                      num_attention_heads=2, intermediate_size=48,
                                                                      max_position_embeddings=40)),
    }


@pytest.mark.parametrize("name", list(_foreign_models()))
def test_models_transformers_saved_import_with_equal_logits(name, tmp_path):
    torch.manual_seed(0)
    model = _foreign_models()[name]().eval()
    with torch.no_grad():  # norms and biases away from 1 and 0
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf", tokenizer=False)
    ids, pad = batch(100, T=30, pad_from=20)
    if loaded.model.kind == "encoder_decoder":
        dec, dec_pad = batch(100, T=9, seed=1)
        diff = max_logit_diff(loaded.model, model, ids, pad, dec=dec, dec_pad=dec_pad)
    else:
        diff = max_logit_diff(loaded.model, model, ids, pad)
    assert diff < TOL
    if name == "bert_pretraining":
        assert sorted(loaded.heads) == ["objective.pair_head.bias", "objective.pair_head.weight"]
