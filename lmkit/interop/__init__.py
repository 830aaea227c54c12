"""Models that leave lmkit and come in: Hugging Face export and import.

Export (``python -m lmkit export RUN_DIR|CHECKPOINT OUT_DIR``, or :func:`export` /
:func:`export_model` from Python) writes a directory that offline transformers loads::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("OUT_DIR")    # GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained("OUT_DIR")              # lmkit's ids on any text

======== ============================================ ============================================
lmkit    transformers class                           notes
======== ============================================ ============================================
gpt      GPT2LMHeadModel                              Conv1D weights transposed; bias=false as zero
                                                      biases; tied or untied head
bert     BertForMaskedLM / BertForPreTraining (NSP)   qkv split; post-LN only (pre_ln refused), MLM
                                                      transform required; the untrained pooler of
                                                      an MLM-only run is left out (and listed)
albert   AlbertForMaskedLM / AlbertForPreTraining     share=all (1 group) or none (a group per
         (SOP)                                        layer); attention/ffn sharing refused
t5       T5ForConditionalGeneration                   tied head (d_model**-0.5 scaling) or untied;
                                                      relu or gated-gelu FFN
bart     BartForConditionalGeneration                 positions offset by 2 rows; zero
                                                      final_logits_bias; layer_norm_eps 1e-5 only
llama    LlamaForCausalLM                             q/k/v/o and gate/up/down as they are (HF's
                                                      half-split RoPE: no permute); GQA; tied or
                                                      untied head; rope_scaling refused on import
======== ============================================ ============================================

A model with mixture-of-experts layers (lmkit-moe) is refused: these classes hold one dense
MLP per layer. Sharded (fsdp) checkpoints are read through ``lmkit_fsdp.consolidate``;
pipeline checkpoints are whole-model files already.

Each family is one module here (``gpt.py`` ...) holding ONE table of tensor rules (HF name
<-> lmkit name, with a ``{i}`` layer slot and a paired transform: transpose, qkv split/concat,
position rows, zeros, tied repeats; see :mod:`lmkit.interop.table`) and ONE config map
(lmkit config field <-> config.json key). Export reads them lmkit -> HF, import HF -> lmkit,
so the two cannot disagree. Both directions are strict: every tensor is used exactly once,
else one error names the leftovers and the missing ones. ``config.json`` also records the
lmkit config (key ``lmkit``), so an exported model imports back bit for bit, options HF has
no name for (init, bias=false, type_vocab_size=0) included.

Import (:func:`load_hf`) reads a local HF directory of these families (config.json decides
the family and sizes; ``model.safetensors`` preferred, ``pytorch_model.bin`` only with
``weights_only=True``; never the hub) into an lmkit model and tokenizer: lmkit's own exports
come back bit for bit; a directory transformers wrote (bert-base, gpt2, t5) keeps its own
tokenizer, whose special tokens stand in for lmkit's (``[SEP]`` as ``<eos>``, GPT-2's
``<|endoftext|>`` as eos, bos and pad; :class:`lmkit.interop.tokenizer.HFDirTokenizer`).
``init_from=PATH`` starts a training run from such a directory or from an lmkit run
(:mod:`lmkit.interop.init`). transformers is not needed for any of this.

The tokenizer files: trained bpe/wordpiece/unigram tokenizers are exported as they are
(their tokenizer.json is already an HF ``tokenizers`` file); the byte tokenizer as an
equivalent byte-level BPE without merges. ``tok(text, add_special_tokens=False)`` equals
lmkit's ``encode(text)``; ``add_special_tokens=True`` frames BERT/ALBERT inputs as
``[CLS] ... [SEP]`` and BART's as ``<bos> ... <eos>``, as lmkit's objectives do.
"""
from __future__ import annotations


def export(source, out_dir, force: bool = False) -> dict:
    """Export an lmkit run directory or checkpoint as a Hugging Face model directory (see module doc)."""
    from lmkit.interop.exporter import export as _export

    return _export(source, out_dir, force=force)


def export_model(model, tokenizer, out_dir, head_state=None, objective=None, force: bool = False) -> dict:
    """Export an in-memory lmkit model and tokenizer as a Hugging Face model directory."""
    from lmkit.interop.exporter import export_model as _export_model

    return _export_model(model, tokenizer, out_dir, head_state=head_state, objective=objective, force=force)


def load_hf(path, **kwargs):
    """An lmkit model and tokenizer from a local Hugging Face directory (:func:`lmkit.interop.load.load_hf`)."""
    from lmkit.interop.load import load_hf as _load_hf

    return _load_hf(path, **kwargs)


__all__ = ["export", "export_model", "load_hf"]
