"""Lightweight adaptation as model extensions: LoRA (``model.lora.*``) and prompt tuning (``model.prompt_tuning.*``).

Both act in ``lmkit_configure_model`` on the freshly built architecture (before ``init_from``
loads weights, before compilation and sharding): they add their parameters, keep every
existing parameter name, and freeze the rest of the model.
"""
from __future__ import annotations

from lmkit.adapters.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from lmkit.adapters.prompt_tuning import PromptTuningConfig, PromptedEmbedding, apply_prompt_tuning
from lmkit.errors import ConfigError


def configure(model, run) -> None:
    """Apply the run's ``model.lora`` / ``model.prompt_tuning`` to ``model`` (the ``lmkit_configure_model`` hook)."""
    ext = getattr(run, "model_extensions", {}) or {}
    lora, prompt = ext.get("lora"), ext.get("prompt_tuning")
    lora_on, prompt_on = lora is not None and lora.enabled, prompt is not None and prompt.length > 0
    if lora_on and prompt_on:
        raise ConfigError("model.lora and model.prompt_tuning are both set: choose one (each freezes the model "
                          "for its own parameters)")
    if not (lora_on or prompt_on):
        return
    tp = getattr(getattr(run, "strategy", None), "tensor_parallel", 1) or 1
    if tp > 1:
        raise ConfigError(f"model.{'lora' if lora_on else 'prompt_tuning'} does not work with tensor parallelism "
                          f"(strategy.tensor_parallel={tp}): use strategy=fsdp without it")
    if lora_on:
        apply_lora(model, lora, verbose=True)
        return
    seq_len = getattr(getattr(run, "data", None), "seq_len", 0) or 0
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and seq_len + prompt.length > max_len:
        raise ConfigError(f"model.prompt_tuning.length={prompt.length} + data.seq_len={seq_len} exceeds the model's "
                          f"max_seq_len={max_len}: the soft prompt takes positions too; shorten one of them")
    if getattr(getattr(run, "objective", None), "document_mask", False):
        raise ConfigError("model.prompt_tuning does not work with packed-document masks: set "
                          "objective.document_mask=false")
    apply_prompt_tuning(model, prompt, verbose=True)


def merged_model_state(node: dict, model_cls, config, state: dict, refuse_prompt: bool = True) -> dict:
    """The model tensors of a saved run with its adapters merged: the base architecture's names and shapes.

    ``node`` is the run's ``model`` section (``lora`` / ``prompt_tuning`` blocks as saved in
    config.yaml), ``state`` its checkpoint's model tensors. A LoRA run is rebuilt (the base
    model, its adapters), loaded and merged (``W + (alpha/r)·B·A``); a prompt-tuning run is
    refused (its soft prompt has no place in the base architecture) unless ``refuse_prompt`` is
    False (``init_from``: the base tensors are used, the prompt is not); any other run is returned as is.
    """
    prompt = node.get("prompt_tuning")
    if refuse_prompt and isinstance(prompt, dict) and (prompt.get("length") or 0) > 0:
        raise ConfigError(f"this {node.get('name')} run is prompt-tuned (model.prompt_tuning.length="
                          f"{prompt['length']}): its soft prompt has no place in the base architecture, so it cannot "
                          f"be exported, generated from or evaluated outside lmkit training")
    lora = node.get("lora")
    if not (isinstance(lora, dict) and lora.get("r") is not None):
        return state
    model = model_cls(config)
    apply_lora(model, LoRAConfig(**lora))
    model.load_state_dict(state)
    return {k: v.detach() for k, v in merge_lora(model).state_dict().items()}


__all__ = ["LoRAConfig", "LoRALinear", "PromptTuningConfig", "PromptedEmbedding", "apply_lora", "apply_prompt_tuning",
           "configure", "merge_lora", "merged_model_state"]
