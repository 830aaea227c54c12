"""An lm-evaluation-harness model backend for lmkit models: ``--model lmkit --model_args run=PATH``.

``run`` (or ``pretrained``) is any model argument lmkit takes: a run directory, a checkpoint,
or a local Hugging Face directory. Other ``model_args``: ``batch_size`` (default 8),
``device`` (auto), ``max_length`` (default: the model's ``max_seq_len``).

All three request types go through :class:`lmkit.evaluation.scorer.Scorer`, the code
``lmkit evaluate`` scores tasks with, so both give the same log-likelihoods for the same
requests: the pairs are split as lm-eval's ``TemplateLM`` splits them, and a decoder's
context starts with ``<eos>`` (lmkit's document separator, the token every training
document follows), which is also lm-eval's ``prefix_token_id`` for an empty context.

Registration: the ``lm_eval.models`` entry point (lm-eval releases with plugin discovery,
EleutherAI/lm-evaluation-harness#4013) and ``@register_model`` when this module is imported.
lm-eval 0.4.x discovers no plugins, so there ``lmkit-lm-eval`` (or ``python -m
lmkit.evaluation.lm_eval``) runs lm-eval's own command line with this backend registered;
from Python, import this module and call ``lm_eval.simple_evaluate(model="lmkit", ...)``.
"""
from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

try:  # lm-eval's own backends (hf, ...) register when lm_eval.models is imported; keep them beside ours
    import lm_eval.models  # noqa: F401
except ImportError:  # the hf backend needs accelerate; lmkit's backend does not
    pass


@register_model("lmkit")
class LmkitLM(TemplateLM):
    """lm-eval's view of an lmkit model (see the module docstring)."""

    def __init__(self, run: str | None = None, pretrained: str | None = None, batch_size=8, device: str = "auto",
                 max_length: int | None = None, **kwargs):
        super().__init__()
        from lmkit.commands.generate import _device
        from lmkit.evaluation.run import load_model
        from lmkit.evaluation.scorer import Scorer
        from lmkit.errors import ConfigError

        path = run or pretrained
        if not path:
            raise ConfigError("lm-eval --model lmkit needs --model_args run=RUN_DIR (or a checkpoint, or a local "
                              "Hugging Face directory)")
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda:0 unless told otherwise
        loaded = load_model(path, _device(device))
        self.scorer = Scorer(loaded.model, loaded.tokenizer, loaded.architecture, loaded.decoder_start_id,
                             batch_size=int(batch_size) if str(batch_size).isdigit() else 8,
                             max_length=int(max_length) if max_length else None)
        self.backend = "causal" if loaded.model.kind == "decoder" else "seq2seq"
        self.path = str(path)

    # --- what TemplateLM asks of a backend -----------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.scorer.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"lmkit:{self.scorer.tokenizer.fingerprint()}"

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.scorer.encode(string)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.scorer.encode_pair(context, continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        encoded = []
        for _, context_enc, continuation_enc in requests:
            if self.backend == "seq2seq" and context_enc == [self.prefix_token_id]:
                context_enc = self.scorer.encode_pair("", "")[0]  # an empty prompt, framed as in training
            encoded.append((list(context_enc), list(continuation_enc)))
        results = self.scorer.loglikelihood_tokens(encoded)
        for (cache_key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        results = self.scorer.loglikelihood_rolling(texts)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.scorer.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            text = self.scorer.generate_until([(context, until, max_new)])[0]
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out
