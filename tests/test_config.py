"""Composition and validation: defaults, groups, presets, and every kind of bad config."""
from __future__ import annotations

import pytest

from lmkit.api import load_run_config
from lmkit.errors import ConfigError


def test_defaults_compose_to_causal_lm_on_gpt():
    run = load_run_config([])
    assert run.objective_component.name == "causal_lm"
    assert run.model_component.name == "gpt" and run.model.n_layer == 4
    assert run.optimizer_component.name == "adamw" and run.scheduler_component.name == "cosine"
    assert run.tokenizer_component.name == "byte" and run.data.source == "tinyshakespeare"


def test_group_choice_and_dotted_override():
    run = load_run_config(["optimizer=adafactor", "scheduler=linear", "optimizer.lr=0.02", "trainer.max_steps=7"])
    assert run.optimizer_component.name == "adafactor" and run.optimizer.lr == 0.02
    assert run.scheduler_component.name == "linear" and run.trainer.max_steps == 7


def test_plus_objective_is_the_form_that_works():
    run = load_run_config(["+objective=causal_lm"])
    assert run.objective_component.name == "causal_lm"


def test_objective_without_plus_says_to_add_it():
    with pytest.raises(ConfigError, match=r"write '\+objective=causal_lm'"):
        load_run_config(["objective=causal_lm"])


def test_unknown_objective_suggests():
    with pytest.raises(ConfigError, match=r"unknown objective 'causal_ml'\. Did you mean 'causal_lm'\?"):
        load_run_config(["+objective=causal_ml"])


@pytest.mark.parametrize("override, expected", [
    ("optimizer=adamww", "unknown optimizer 'adamww'. Did you mean 'adamw'?"),
    ("model=gpt_tinyy", "unknown model 'gpt_tinyy'. Did you mean 'gpt_tiny'?"),
    ("scheduler=cosin", "Did you mean 'cosine'?"),
])
def test_misspelled_group_option(override, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config([override])
    assert expected in str(e.value)


def test_misspelled_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_run_config(["trainer.max_stepz=5"])
    assert "trainer.max_stepz" in str(e.value) and "Did you mean 'trainer.max_steps'?" in str(e.value)


def test_added_unknown_key_is_still_refused():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'. Did you mean 'optimizer.lr'\?"):
        load_run_config(["+optimizer.lrr=0.1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as e:
        load_run_config(["trainer.max_steps=abc"])
    assert "trainer.max_steps" in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lr=-0.1", "optimizer.lr must be positive"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("trainer.precision=fp8", "trainer.precision must be one of"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1)"),
    ("data.seq_len=1000", "longer than the model's positions"),
])
def test_invalid_values(override, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config([override])
    assert expected in str(e.value)


def test_incompatible_objective_and_architecture_names_both_and_fixes():
    with pytest.raises(ConfigError) as e:
        load_run_config(["model=bert_tiny"])
    msg = str(e.value)
    assert "objective 'causal_lm' needs a decoder" in msg and "bert_tiny" in msg and "encoder" in msg
    assert "gpt" in msg  # the architectures that would work


def test_gpt3_recipe_preset():
    run = load_run_config(["experiment=gpt3_recipe"])
    assert run.optimizer_component.name == "adamw"
    assert list(run.optimizer.betas) == [0.9, 0.95] and run.optimizer.eps == 1e-8
    assert run.optimizer.weight_decay == 0.1 and run.trainer.gradient_clip == 1.0
    assert run.scheduler_component.name == "cosine" and run.scheduler.min_lr_ratio == 0.1
    assert run.data.batch_ramp_steps > 0 and run.data.batch_ramp_start < run.data.grad_accum


def test_plugin_configs_are_found_by_the_same_syntax(example_plugin):
    from lmkit.plugins import get_plugin_manager

    get_plugin_manager.cache_clear()
    try:
        run = load_run_config(["+objective=reverse_lm", "optimizer=signsgd"])
        assert run.objective_component.provider == "lmkit-example"
        assert run.optimizer_component.name == "signsgd" and run.model_component.name == "gpt"
    finally:
        get_plugin_manager.cache_clear()


def test_incompatible_pair_suggests_model_presets_not_family_names():
    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=mlm", "model=t5_tiny"])
    msg = str(e.value)
    assert ("choose a model= preset that fits: albert_base, albert_tiny, bert_base, bert_large, bert_tiny, "
            "elmo_base, elmo_small, elmo_tiny, xlnet_base, xlnet_tiny (architectures: albert, bert, elmo, xlnet)") in msg
    assert "Drop model= to get its default (model=bert_tiny)" in msg


def test_callback_options_are_validated_per_callback():
    run = load_run_config(["+callback_options.token_throughput.window=8"])
    assert run.callback_configs["token_throughput"].window == 8
    with pytest.raises(ConfigError) as e:
        load_run_config(["+callback_options.token_throughput.windw=8"])
    assert "Did you mean 'callback_options.token_throughput.window'?" in str(e.value)
    with pytest.raises(ConfigError, match="callback_options.token_throughput.window"):
        load_run_config(["+callback_options.token_throughput.window=many"])


@pytest.mark.parametrize("preset, objective", [("gpt_tiny", "causal_lm"), ("bert_tiny", "mlm"), ("albert_tiny", "sop"),
                                               ("t5_tiny", "span_corruption"), ("bart_tiny", "bart_denoising"),
                                               ("llama_tiny", "causal_lm")])
def test_memory_check_counts_a_lower_bound_of_the_parameters(preset, objective):
    """The check that refuses models too large for the machine must never overcount (it would refuse a model
    that fits)."""
    import dataclasses

    from lmkit.config.validate import _min_parameters

    run = load_run_config([f"+objective={objective}", f"model={preset}"])
    cfg = dataclasses.replace(run.model, vocab_size=300)
    actual = sum(p.numel() for p in run.model_component.factory(cfg).parameters())
    assert 0 < _min_parameters(cfg) <= actual
