"""lmkit's built-in components, registered through the same hooks as any plugin."""
from __future__ import annotations

from pathlib import Path

from lmkit.plugins import hookimpl
from lmkit.registry import Component


def _conf_dir() -> str:
    from lmkit.conf_path import core_conf_dir

    return str(core_conf_dir())


@hookimpl
def lmkit_config_dirs():
    return [_conf_dir()]


@hookimpl
def lmkit_register_objectives():
    from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig

    return [
        Component("causal_lm", CausalLM, CausalLMConfig, "next-token prediction (GPT)",
                  meta={"kinds": CausalLM.kinds, "default_model": "gpt_tiny"}),
    ]


@hookimpl
def lmkit_register_architectures():
    from lmkit.models.albert import ALBERT, ALBERTConfig
    from lmkit.models.bart import BART, BARTConfig
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.models.t5 import T5, T5Config

    return [
        Component("gpt", GPT, GPTConfig, "GPT-2 decoder: learned positions, pre-LN, tied embeddings", meta={"kind": GPT.kind}),
        Component("bert", BERT, BERTConfig, "BERT encoder: segment embeddings, post-LN, [CLS] pooler", meta={"kind": BERT.kind}),
        Component("albert", ALBERT, ALBERTConfig, "ALBERT encoder: factorized embeddings, cross-layer sharing", meta={"kind": ALBERT.kind}),
        Component("t5", T5, T5Config, "T5 encoder-decoder: RMSNorm, relative position buckets", meta={"kind": T5.kind}),
        Component("bart", BART, BARTConfig, "BART encoder-decoder: learned positions, post-LN", meta={"kind": BART.kind}),
    ]


@hookimpl
def lmkit_register_optimizers():
    from lmkit.optim import optimizers as o

    return [
        Component("sgd", o.build_sgd, o.OptimizerConfig, "SGD with momentum"),
        Component("adam", o.build_adam, o.OptimizerConfig, "Adam (L2 weight decay)"),
        Component("adamw", o.build_adamw, o.OptimizerConfig, "AdamW (decoupled weight decay)"),
        Component("adafactor", o.build_adafactor, o.OptimizerConfig, "Adafactor (factored second moments)"),
    ]


@hookimpl
def lmkit_register_schedulers():
    from lmkit.optim import schedulers as s

    return [
        Component("cosine", s.build_cosine, s.SchedulerConfig, "linear warmup, cosine decay to a floor"),
        Component("linear", s.build_linear, s.SchedulerConfig, "linear warmup, linear decay to a floor"),
        Component("constant", s.build_constant, s.SchedulerConfig, "linear warmup, then constant"),
    ]


@hookimpl
def lmkit_register_strategies():
    from lmkit import strategies as st
    from lmkit.config.schema import StrategyConfig

    return [
        Component("auto", st.build_auto, StrategyConfig, "Lightning's automatic choice (single device)"),
        Component("ddp", st.build_ddp, StrategyConfig, "distributed data parallel"),
    ]


@hookimpl
def lmkit_register_tokenizers():
    from lmkit.config.schema import TokenizerConfig
    from lmkit.tokenizers import factory as f

    return [
        Component("byte", f.build_byte, TokenizerConfig, "UTF-8 bytes, no training"),
        Component("bpe", f.build_bpe, TokenizerConfig, "byte-level BPE trained on the corpus (HF tokenizers)"),
        Component("wordpiece", f.build_wordpiece, TokenizerConfig, "WordPiece trained on the corpus (HF tokenizers)"),
        Component("unigram", f.build_unigram, TokenizerConfig, "Unigram trained on the corpus (HF tokenizers)"),
    ]


@hookimpl
def lmkit_register_datasets():
    from lmkit.data import sources as s

    return [
        Component("tinyshakespeare", lambda cfg: s.BuiltinSource("tinyshakespeare", cfg.doc_separator),
                  description="built-in corpus (public domain), shipped in the package"),
        Component("text", lambda cfg: s.TextSource(cfg.path, cfg.doc_separator), description="plain text files or directories"),
        Component("jsonl", lambda cfg: s.JsonlSource(cfg.path, cfg.text_field), description="JSON lines with a text field"),
        Component("hf", lambda cfg: s.HFDatasetSource(cfg.path, cfg.hf_builder or "json", cfg.text_field),
                  description="local files through HF datasets (json/csv/parquet/text builders)"),
    ]


@hookimpl
def lmkit_register_callbacks():
    from lmkit import callbacks as c

    return [
        Component("token_throughput", c.build_token_throughput, description="logs train/tokens_per_s"),
        Component("lr_monitor", c.build_lr_monitor, description="Lightning's LearningRateMonitor"),
    ]
