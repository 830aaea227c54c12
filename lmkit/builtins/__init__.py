"""lmkit's built-in components, registered through the same hooks as any plugin."""
from __future__ import annotations

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
    from lmkit.objectives.bart import BARTDenoising, BARTDenoisingConfig
    from lmkit.objectives.bilm import BiLM, BiLMConfig
    from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig
    from lmkit.objectives.classification import Classification, ClassificationConfig
    from lmkit.objectives.distillation import Distillation, DistillationConfig
    from lmkit.objectives.electra import ELECTRA, ELECTRAConfig
    from lmkit.objectives.mlm import MLM, MLMConfig
    from lmkit.objectives.plm import PLM, PLMConfig
    from lmkit.objectives.prefix_lm import PrefixLM, PrefixLMConfig, PrefixLMSeq2SeqConfig
    from lmkit.objectives.sentence_pair import NSPConfig, SentencePair, SOPConfig
    from lmkit.objectives.sft import SFT, SFTConfig
    from lmkit.objectives.span_bert import SpanBERT, SpanBERTConfig
    from lmkit.objectives.span_corruption import SpanCorruption, SpanCorruptionConfig
    from lmkit.objectives.ul2 import UL2, UL2Config

    def objective(name, factory, config_cls, description, default_model, kinds=None):
        # needs: (validated cfg, architecture kind) -> the capabilities the architecture must have
        return Component(name, factory, config_cls, description,
                         meta={"kinds": tuple(kinds or factory.kinds), "default_model": default_model,
                               "needs": factory.needs_for})

    return [
        objective("causal_lm", CausalLM, CausalLMConfig, "next-token prediction (GPT)", "gpt_tiny"),
        objective("bilm", BiLM, BiLMConfig, "forward + backward LM with a shared softmax (ELMo)", "elmo_tiny"),
        objective("mlm", MLM, MLMConfig, "masked LM (BERT; RoBERTa / Bernoulli modes, whole-word option)", "bert_tiny"),
        objective("nsp", SentencePair, NSPConfig, "masked LM + next-sentence prediction (BERT)", "bert_tiny"),
        objective("sop", SentencePair, SOPConfig, "masked LM + sentence-order prediction (ALBERT)", "albert_tiny"),
        objective("span_bert", SpanBERT, SpanBERTConfig, "span masking + span boundary objective (SpanBERT)", "bert_tiny"),
        objective("electra", ELECTRA, ELECTRAConfig, "replaced token detection with a small MLM generator (ELECTRA)",
                  "bert_tiny"),
        objective("plm", PLM, PLMConfig, "permutation LM with two-stream attention, n-gram targets (XLNet)",
                  "xlnet_tiny"),
        objective("span_corruption", SpanCorruption, SpanCorruptionConfig, "span corruption with sentinels (T5)",
                  "t5_tiny"),
        objective("bart_denoising", BARTDenoising, BARTDenoisingConfig,
                  "text infilling + sentence permutation denoising (BART)", "bart_tiny"),
        objective("prefix_lm", PrefixLM, PrefixLMConfig, "prefix LM, decoder-only or encoder-decoder (T5, UniLM)",
                  "gpt_tiny"),
        objective("prefix_lm_seq2seq", PrefixLM, PrefixLMSeq2SeqConfig, "prefix LM, encoder-decoder form (T5)",
                  "t5_tiny", kinds=("encoder_decoder",)),
        objective("ul2", UL2, UL2Config, "mixture of denoisers R/X/S with mode tokens (UL2)", "t5_tiny"),
        objective("classification", Classification, ClassificationConfig,
                  "sentence (pair) classification or regression: [CLS] / last-token head, label text (T5)", "bert_tiny"),
        objective("sft", SFT, SFTConfig, "supervised fine-tuning, loss on responses (decoders, enc-dec, UniLM encoders)",
                  "gpt_tiny"),
        objective("distillation", Distillation, DistillationConfig,
                  "student trained against a frozen teacher: T^2 KL + LM + cosine (DistilBERT)", "bert_tiny"),
    ]


@hookimpl
def lmkit_register_architectures():
    from lmkit.models.albert import ALBERT, ALBERTConfig
    from lmkit.models.bart import BART, BARTConfig
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.models.elmo import ELMo, ELMoConfig
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.models.llama import Llama, LlamaConfig
    from lmkit.models.t5 import T5, T5Config
    from lmkit.models.transformer_xl import TransformerXL, TransformerXLConfig
    from lmkit.models.xlnet import XLNet, XLNetConfig

    def arch(cls):  # kind and capabilities (lmkit.models.base.CAPABILITIES) come from the class
        return {"kind": cls.kind, "accepts": cls.accepts}

    return [
        Component("gpt", GPT, GPTConfig, "GPT-2 decoder: learned positions, pre-LN, tied embeddings", meta=arch(GPT)),
        Component("bert", BERT, BERTConfig, "BERT encoder: segment embeddings, post-LN, [CLS] pooler", meta=arch(BERT)),
        Component("albert", ALBERT, ALBERTConfig, "ALBERT encoder: factorized embeddings, cross-layer sharing",
                  meta=arch(ALBERT)),
        Component("elmo", ELMo, ELMoConfig, "ELMo biLM: forward and backward LSTMs, scalar mix of the layers",
                  meta=arch(ELMo)),
        Component("t5", T5, T5Config, "T5 encoder-decoder: RMSNorm, relative position buckets", meta=arch(T5)),
        Component("bart", BART, BARTConfig, "BART encoder-decoder: learned positions, post-LN", meta=arch(BART)),
        Component("xlnet", XLNet, XLNetConfig, "XLNet: Transformer-XL backbone, relative segments, two-stream attention",
                  meta=arch(XLNet)),
        Component("transformer_xl", TransformerXL, TransformerXLConfig,
                  "Transformer-XL decoder: segment recurrence memory, relative positions, post-LN",
                  meta=arch(TransformerXL)),
        Component("llama", Llama, LlamaConfig, "Llama decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention",
                  meta=arch(Llama)),
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
        Component("inverse_sqrt", s.build_inverse_sqrt, s.InverseSqrtConfig,
                  "T5's inverse square root: optimizer.lr for warmup_steps, then 1/sqrt(step) decay"),
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
        Component("mixture", _build_mixture, description="weighted mixture of sources (data.mixture), The Pile style"),
        Component("litdata", _open_litdata_store,
                  description="token shards written by python -m lmkit optimize, streamed by litdata (local or s3://)"),
    ]


def _open_litdata_store(cfg):
    from lmkit.data.litdata_store import LitdataStore

    return LitdataStore(cfg.path, cfg.cache_dir)


def _build_mixture(cfg):
    from lmkit.data.mixture import MixtureSource

    return MixtureSource(cfg)


@hookimpl
def lmkit_register_callbacks():
    from lmkit import callbacks as c
    from lmkit.accounting.callback import ComputeAccountingConfig

    return [
        Component("token_throughput", c.build_token_throughput, c.TokenThroughputConfig, "logs train/tokens_per_s"),
        Component("compute_accounting", c.build_compute_accounting, ComputeAccountingConfig,
                  "logs model FLOPs, tokens seen, MFU, energy and CO2e; the summary's compute line"),
        Component("lr_monitor", c.build_lr_monitor, c.LRMonitorConfig, "Lightning's LearningRateMonitor"),
        Component("task_eval", _build_task_eval, _task_eval_config(),
                  "scores few-shot tasks every N steps and logs tasks/<task>/<metric>"),
    ]


def _build_task_eval(cfg):
    from lmkit.evaluation.callback import build_task_eval

    return build_task_eval(cfg)


def _task_eval_config():
    from lmkit.evaluation.callback import TaskEvalConfig

    return TaskEvalConfig


@hookimpl
def lmkit_register_model_extensions():
    from lmkit.adapters import LoRAConfig, PromptTuningConfig

    return [
        Component("lora", None, LoRAConfig, "low-rank adapters on chosen Linear layers, the model frozen "
                  "(model.lora.r=8)"),
        Component("prompt_tuning", None, PromptTuningConfig, "trainable soft-prompt embeddings before the input, "
                  "the model frozen (model.prompt_tuning.length=20)"),
    ]


@hookimpl
def lmkit_configure_model(model, run):
    from lmkit.adapters import configure

    configure(model, run)
