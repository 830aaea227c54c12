"""Prompt tuning (``model.prompt_tuning.*``): a soft prompt whose rows are real token embeddings gives the
base model's outputs on those tokens followed by the input (GPT and Llama, with padding and prefix masks);
only the prompt gets gradients; the loss covers the input's tokens only; length 0 is the base model; bad
settings are one-line errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmkit.adapters.prompt_tuning import PromptedEmbedding, PromptTuningConfig, apply_prompt_tuning
from lmkit.api import build, run
from lmkit.checkpoint import load_checkpoint_file
from lmkit.errors import ConfigError
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.llama import Llama, LlamaConfig

K = 5


def base_model(arch: str):
    torch.manual_seed(0)
    if arch == "gpt":
        return GPT(GPTConfig(name="gpt", vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=32)).eval()
    return Llama(LlamaConfig(name="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                             max_seq_len=32)).eval()


def prompted_with_tokens(base, prompt_ids: torch.Tensor):
    """``base`` with a soft prompt set to the embeddings of ``prompt_ids``: it must act as if they were typed."""
    model = apply_prompt_tuning(copy.deepcopy(base), PromptTuningConfig(length=len(prompt_ids)))
    with torch.no_grad():
        model.wte.prompt.copy_(base.wte.weight[prompt_ids])
    return model


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_soft_prompt_of_token_embeddings_equals_the_base_model_on_those_tokens(arch):
    base = base_model(arch)
    p = torch.randint(0, 64, (K,), generator=torch.Generator().manual_seed(1))
    model = prompted_with_tokens(base, p)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = base(torch.cat([p.expand(2, K), ids], dim=1))[:, K:]
        torch.testing.assert_close(model(ids), reference, rtol=0, atol=1e-5)
        # right padding: the prompt counts as real tokens, the padded keys stay hidden
        pad = torch.ones(2, 12, dtype=torch.bool)
        pad[1, 8:] = False
        ref_pad = base(torch.cat([p.expand(2, K), ids], dim=1), padding_mask=torch.cat([torch.ones(2, K, dtype=torch.bool), pad], 1))
        torch.testing.assert_close(model(ids, padding_mask=pad)[pad], ref_pad[:, K:][pad], rtol=0, atol=1e-5)
        # an explicit attention mask (here: causal) gets the prompt in front, visible to every token
        causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 12, 12)
        torch.testing.assert_close(model(ids, attn_mask=causal), reference, rtol=0, atol=1e-5)


def test_prefix_lm_mask_sees_the_prompt_and_keeps_its_prefix_bidirectional():
    base = base_model("gpt")
    p = torch.arange(K)
    model = prompted_with_tokens(base, p)
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    prefix = torch.ones(10, 10, dtype=torch.bool).tril()
    prefix[:4, :4] = True  # the first 4 tokens see each other
    full = torch.ones(K + 10, K + 10, dtype=torch.bool).tril()
    full[K:K + 4, K:K + 4] = True
    with torch.no_grad():
        reference = base(torch.cat([p[None], ids], 1), attn_mask=full[None])[:, K:]
        torch.testing.assert_close(model(ids, attn_mask=prefix[None]), reference, rtol=0, atol=1e-5)


def test_only_the_prompt_gets_gradients_and_the_loss_covers_only_the_input(tiny, tmp_path):
    built = build(tiny + ["model.prompt_tuning.length=4"], tmp_path)
    model, objective = built.module.model, built.module.objective
    assert isinstance(model.wte, PromptedEmbedding)
    assert [n for n, p in built.module.named_parameters() if p.requires_grad] == ["model.wte.prompt"]
    batch = next(iter(built.datamodule.train_dataloader()))["micro_batches"][0]
    out = objective.loss(model, batch)
    (out.loss_sum / out.n_targets).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == ["wte.prompt"] and grads["wte.prompt"].abs().sum() > 0
    # the loss: next-token cross-entropy over the input's own labels, from the outputs after the prompt
    with torch.no_grad():
        base = copy.deepcopy(model)
        base._forward_pre_hooks.clear()
        base._forward_hooks.clear()
        ids = batch["input_ids"]
        prompt_ids = -torch.arange(1, 5).expand(ids.shape[0], 4)
        logits = base.logits(base(torch.cat([prompt_ids, ids], 1)))[:, 4:]
        labels = batch["labels"]
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")
    assert int(out.n_targets) == int((labels != -100).sum())
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-5, atol=1e-4)


def test_training_changes_only_the_prompt(tiny, tmp_path):
    from lmkit_test_utils import TINY

    run(TINY + ["trainer.max_steps=1"], tmp_path / "pre")
    run(tiny + ["model.prompt_tuning.length=4", "optimizer.lr=0.05", f"init_from={tmp_path / 'pre'}"], tmp_path / "pt")
    source = load_checkpoint_file(tmp_path / "pre" / "checkpoints" / "last.ckpt")["state_dict"]
    ckpt = load_checkpoint_file(tmp_path / "pt" / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    assert set(state) - set(source) == {"model.wte.prompt"}
    for name, value in source.items():
        assert torch.equal(state[name], value), name
    assert len(ckpt["optimizer_states"][0]["state"]) == 1  # Adam moments of the prompt only


def test_zero_length_is_the_base_model(tiny, tmp_path):
    base = base_model("gpt")
    model = apply_prompt_tuning(copy.deepcopy(base), PromptTuningConfig(length=0))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    assert set(model.state_dict()) == set(base.state_dict()) and all(p.requires_grad for p in model.parameters())
    a = build(tiny + ["model.prompt_tuning.length=0"], tmp_path / "a").module.model
    b = build(tiny, tmp_path / "b").module.model
    assert type(a.wte) is type(b.wte) is torch.nn.Embedding
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("overrides, said", [
    (["model.prompt_tuning.length=-1"], "model.prompt_tuning.length must be a whole number >= 0 (0 = off), got -1"),
    (["model.prompt_tuning.length=4", "model.prompt_tuning.init=zeros"], "model.prompt_tuning.init must be one of"),
    (["model.prompt_tuning.length=40"], "model.prompt_tuning.length=40 + data.seq_len=32 exceeds the model's "
                                        "max_seq_len=64"),
    (["model.prompt_tuning.length=4", "model.lora.r=4"], "model.lora and model.prompt_tuning are both set"),
    (["+objective=mlm", "model=bert_tiny", "model.prompt_tuning.length=4"], "model.prompt_tuning works on decoders"),
    (["+objective=causal_lm", "model.prompt_tuning.length=4", "objective.document_mask=true"], "does not work with packed-document masks"),
])
def test_bad_settings_are_one_line_errors(overrides, said, tiny, tmp_path):
    with pytest.raises(ConfigError) as e:
        build(tiny + overrides, tmp_path)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_export_of_a_prompt_tuned_run_is_refused_in_one_line(tiny, tmp_path, capsys):
    import lmkit.cli

    run(tiny + ["model.prompt_tuning.length=2", "trainer.max_steps=1"], tmp_path / "run")
    assert lmkit.cli.main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is prompt-tuned (model.prompt_tuning.length=2): its soft prompt has no place" in err
