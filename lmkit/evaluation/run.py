"""What ``python -m lmkit evaluate`` does, as functions: read the model, read the corpus, score, report.

:func:`evaluate` is the Python API::

    from lmkit.evaluation.run import EvalOptions, evaluate
    results = evaluate("outputs/run", EvalOptions(tasks=["shakespeare_next_line"], num_fewshot=3))
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmkit.errors import ConfigError

SPLITS = ("all", "train", "val")
#: the objective an encoder or encoder-decoder from a Hugging Face directory is scored with
DEFAULT_OBJECTIVES = {"bert": "mlm", "albert": "mlm", "t5": "span_corruption", "bart": "bart_denoising"}


@dataclass
class EvalOptions:
    """Options of ``evaluate`` (``eval.<name>=`` on the command line)."""

    seq_len: int | None = None  # window / block length (default: the run's data.seq_len, else the model's max)
    stride: int | None = None  # decoders: targets per window (default: seq_len // 2; seq_len = disjoint windows)
    batch_size: int = 8
    split: str | None = None  # all | train | val (default: val with the run's own data, else all)
    max_tokens: int | None = None  # score only the first N tokens of the corpus
    pseudo_perplexity: bool = False  # encoders: pseudo-perplexity instead of the objective's loss
    seed: int = 1234  # noise of objectives; few-shot example draws
    tasks: list = field(default_factory=list)
    num_fewshot: int = 0
    limit: int | None = None  # documents per task
    output: str | None = None  # JSON file (default: RUN_DIR/eval/evaluate-TIME.json, or ./eval/... for HF dirs)
    corpus: bool | None = None  # score a corpus (default: yes unless only tasks are asked for)
    device: str = "auto"

    def check(self) -> "EvalOptions":
        for name in ("batch_size", "seq_len", "stride", "max_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"eval.{name}={value!r}: give a whole number >= 1")
        if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ConfigError(f"eval.num_fewshot={self.num_fewshot!r}: give a whole number >= 0")
        if self.split is not None and self.split not in SPLITS:
            from lmkit.errors import did_you_mean

            raise ConfigError(f"eval.split={self.split}: give one of {', '.join(SPLITS)}.{did_you_mean(str(self.split), SPLITS)}")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        return self


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    architecture: str
    decoder_start_id: int | None
    run_dir: Path | None  # an lmkit run (None: a Hugging Face directory)
    run_config: dict  # the run's config.yaml (empty for HF directories)
    head_state: dict  # the checkpoint's objective tensors


def load_model(path, device: str = "cpu") -> LoadedModel:
    """A run directory, a checkpoint or a local HF directory, in eval mode on ``device`` (any kind of model)."""
    from lmkit.generation import read_model

    model, tokenizer, info, src = read_model(path)
    model.to(device).eval()
    if src is None:  # an HF directory
        return LoadedModel(model, tokenizer, info["architecture"], info["decoder_start_id"], None, {}, {})
    heads = {k[len("objective."):]: v for k, v in src.head_state.items()}  # an encoder is scored with its objective
    return LoadedModel(model, tokenizer, info["architecture"], info["decoder_start_id"], src.run_dir, src.run_config,
                       heads)


def corpus_tokens(loaded: LoadedModel, data_overrides: list[str], opts: EvalOptions):
    """(token stream, description) of the corpus to score: the data overrides composed as training composes
    them, or the run's own data when none are given; ``<eos>`` before each document."""
    from omegaconf import OmegaConf

    from lmkit.config.compose import compose_config
    from lmkit.config.schema import DataConfig
    from lmkit.config.validate import typed_section
    from lmkit.data.cache import default_cache_dir, load_tokens
    from lmkit.data.datamodule import split_tokens
    from lmkit.plugins import get_plugin_manager

    pm = get_plugin_manager()
    own = not data_overrides and bool(loaded.run_config.get("data"))
    if own:
        node = OmegaConf.create(loaded.run_config["data"])
    else:
        from lmkit.commands.train import prepare

        args = prepare(list(data_overrides), pm)
        node = compose_config(pm.config_dirs(), args.overrides).data
    data = typed_section("data", node, DataConfig)
    source = pm.get("dataset", data.source).factory(data)
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    split = opts.split or ("val" if own else "all")
    if getattr(data, "mixture", None) and split != "all":
        raise ConfigError(f"eval.split={split} of a data mixture: score one source at a time (data=text data.path=..."
                          f" or the source's own kind), or eval.split=all; the run logged val/<source>/loss for each")
    from lmkit.data.litdata_store import LitdataStore

    if isinstance(source, LitdataStore):  # data=litdata: the store's own splits, read by this run's tokenizer
        source.check_tokenizer(loaded.tokenizer)
        tokens = source.split_tokens(split)
        if opts.max_tokens:
            tokens = tokens[:opts.max_tokens]
        return tokens, {"source": data.source, "path": source.root, "split": split}
    tokens = load_tokens(source, loaded.tokenizer, cache_dir)
    if getattr(data, "val_path", None) and split != "all":  # a separate validation set: data.path is all training
        if split == "val":
            from lmkit.data.mixture import build_val_source

            tokens = load_tokens(build_val_source(data, pm.get("dataset", data.source)), loaded.tokenizer, cache_dir)
    elif split != "all":
        if data.val_fraction <= 0:
            raise ConfigError(f"eval.split={split} needs data.val_fraction > 0 (the corpus has no validation split)")
        parts = split_tokens(tokens, data.val_fraction)
        tokens = parts.val if split == "val" else parts.train
    if opts.max_tokens:
        tokens = tokens[:opts.max_tokens]
    where = data.path if data.path else data.source
    if getattr(data, "val_path", None) and split == "val":
        where = data.val_path
    return tokens, {"source": data.source, "path": str(where), "split": split}


def _progress(total: int, label: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
               disable=None)
    return bar


def score_corpus(loaded: LoadedModel, tokens, info: dict, opts: EvalOptions) -> dict:
    """Loss, perplexity (and bits/byte for decoders) of ``tokens`` under the model."""
    import numpy as np

    model, tok = loaded.model, loaded.tokenizer
    byte_lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    max_len = getattr(model, "max_seq_len", None) or 512
    trained = (loaded.run_config.get("data") or {}).get("seq_len")  # the context the run was trained with
    seq_len = opts.seq_len or min(trained or max_len, max_len, 1024)
    if model.kind == "decoder":
        from lmkit.evaluation.corpus import score_decoder
        from lmkit.evaluation.scorer import Scorer

        if seq_len > max_len:
            raise ConfigError(f"eval.seq_len={seq_len} is longer than the model's max_seq_len={max_len}")
        stride = opts.stride or max(1, seq_len // 2)
        if stride > seq_len:
            raise ConfigError(f"eval.stride={stride} is longer than the window eval.seq_len={seq_len}")
        scorer = Scorer(model, tok, loaded.architecture, batch_size=opts.batch_size, max_length=seq_len)
        stream = np.concatenate([np.array([tok.eos_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])
        with _progress(len(stream) - 1, "evaluate") as bar:
            score = score_decoder(scorer, stream, byte_lengths, stride, progress=bar.update)
        result = {"method": "sliding window", "seq_len": seq_len, "stride": stride, **score.metrics()}
    elif opts.pseudo_perplexity:
        if model.kind != "encoder":
            raise ConfigError("eval.pseudo_perplexity=true scores encoders (bert, albert); this model is an "
                              f"{model.kind.replace('_', '-')}")
        from lmkit.evaluation.corpus import score_pseudo_perplexity

        with _progress(len(tokens), "evaluate") as bar:
            score = score_pseudo_perplexity(model, tok, tokens, seq_len, opts.batch_size, byte_lengths, bar.update)
        result = {"method": "pseudo-perplexity", "seq_len": seq_len, **score.metrics(with_bpb=False)}
    else:
        from lmkit.evaluation.corpus import score_objective

        objective, name = build_objective(loaded)
        with _progress(len(tokens), "evaluate") as bar:
            score = score_objective(model, objective, np.asarray(tokens), seq_len, opts.batch_size, opts.seed,
                                    bar.update)
        result = {"method": f"objective {name} (noise seed {opts.seed})", "seq_len": seq_len,
                  **score.metrics(with_bpb=False)}
    return result


def build_objective(loaded: LoadedModel):
    """The run's objective (its heads loaded), or the family's pretraining objective for an HF directory."""
    from omegaconf import OmegaConf

    from lmkit.config.validate import _component_section
    from lmkit.plugins import get_plugin_manager

    pm = get_plugin_manager()
    node = loaded.run_config.get("objective") if loaded.run_dir is not None else None
    if node and node.get("name") == "distillation":  # a student is scored by its own LM loss, without its teacher
        node = None
    if not node:
        node = {"name": DEFAULT_OBJECTIVES.get(loaded.architecture, "causal_lm")}
    cfg, component = _component_section(OmegaConf.create({}), pm, "objective", "objective",
                                        node=OmegaConf.create(node))
    objective = component.factory(cfg, loaded.tokenizer)
    objective.attach(loaded.model)
    if loaded.head_state:
        objective.load_state_dict(loaded.head_state, strict=False)
    objective.to(next(loaded.model.parameters()).device).eval()
    return objective, component.name


def run_tasks(loaded: LoadedModel, tasks: list, opts: EvalOptions) -> dict:
    """Each of ``tasks`` (loaded :class:`lmkit.evaluation.tasks.Task`) scored under the model."""
    from lmkit.evaluation.scorer import Scorer
    from lmkit.evaluation.tasks import check_task_fits, evaluate_task

    for task in tasks:
        check_task_fits(task, loaded.model.kind)
    scorer = Scorer(loaded.model, loaded.tokenizer, loaded.architecture, loaded.decoder_start_id,
                    batch_size=opts.batch_size)
    out = {}
    for task in tasks:
        t0 = time.perf_counter()
        result = evaluate_task(scorer, task, opts.num_fewshot, opts.seed, opts.limit)
        result["seconds"] = time.perf_counter() - t0
        out[task.name] = result
    return out


def evaluate(model_path, opts: EvalOptions | None = None, data_overrides: list[str] | None = None) -> dict:
    """Score the model at ``model_path`` on a corpus and/or tasks; returns the results (see ``format_results``)."""
    opts = (opts or EvalOptions()).check()
    from lmkit.commands.generate import _device

    from lmkit.evaluation.tasks import load_task

    tasks = [load_task(t) for t in opts.tasks]  # a misspelled or malformed task fails before the model is read
    loaded = load_model(model_path, _device(opts.device))
    results = {"model": str(model_path), "architecture": loaded.architecture, "kind": loaded.model.kind,
               "run_dir": None if loaded.run_dir is None else str(loaded.run_dir)}
    do_corpus = opts.corpus if opts.corpus is not None else (not opts.tasks or bool(data_overrides))
    if do_corpus:
        tokens, info = corpus_tokens(loaded, data_overrides or [], opts)
        results["corpus"] = {**info, **score_corpus(loaded, tokens, info, opts)}
        if "neighbours" in getattr(loaded.model, "accepts", ()):  # RETRO: this verb gives it no neighbours
            results["corpus"]["note"] = ("scored without retrieved neighbours (as its plain decoder); with them: "
                                         "python -m lmkit retrieval evaluate MODEL store=STORE_DIR")
    if opts.tasks:
        results["tasks"] = run_tasks(loaded, tasks, opts)
        results["num_fewshot"] = opts.num_fewshot
    return results


def format_results(results: dict) -> str:
    lines = [f"model: {results['model']} ({results['architecture']})"]
    corpus = results.get("corpus")
    if corpus:
        lines.append(f"corpus: {corpus['path']} (split {corpus['split']}), {corpus['method']}, window "
                     f"{corpus['seq_len']}" + (f", stride {corpus['stride']}" if "stride" in corpus else ""))
        lines.append(f"  {'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
        bpb = f"{corpus['bits_per_byte']:.4f}" if "bits_per_byte" in corpus else "-"
        lines.append(f"  {corpus['tokens']:>10} {corpus['loss']:>8.4f} {corpus['perplexity']:>11.3f} {bpb:>10}")
        if corpus.get("note"):
            lines.append(f"  note: {corpus['note']}")
    tasks = results.get("tasks")
    if tasks:
        lines.append(f"tasks ({results.get('num_fewshot', 0)}-shot):")
        lines.append(f"  {'task':<26} {'n':>5} {'metric':<12} {'value':>7}  {'chance':>6}")
        for name, r in tasks.items():
            for metric in ("acc", "acc_norm", "exact_match", "perplexity"):
                if metric in r:
                    chance = f"{r['chance']:.3f}" if "chance" in r and metric.startswith("acc") else ""
                    lines.append(f"  {name:<26} {r['n']:>5} {metric:<12} {r[metric]:>7.4f}  {chance:>6}")
    return "\n".join(lines)


def default_output(results: dict) -> Path:
    """``RUN_DIR/eval/evaluate-TIME.json`` for a run, ``outputs/eval/evaluate-TIME.json`` for an HF directory."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(results["run_dir"]) if results.get("run_dir") else Path("outputs")
    return base / "eval" / f"evaluate-{stamp}.json"


def write_json(path: Path, results: dict) -> None:
    """``results`` as JSON at ``path``, written to a temporary name and renamed (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_jsonable(results), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    return value
