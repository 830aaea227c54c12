"""ELECTRA (replaced token detection) against its definition in google-research/electra:
labels = (sampled != original), no gradient from the discriminator into the generator except
through the shared embeddings, loss = generator MLM + λ · BCE over non-pad tokens, 15% of the
positions selected (85% [MASK], 15% kept), the generator sized as a fraction of the discriminator."""
from __future__ import annotations

import csv

import pytest
import torch
from objective_helpers import RUN, byte_tokenizer, gen, text_blocks, tiny_model

from lmkit.api import load_run_config, run
from lmkit.errors import ConfigError
from lmkit.objectives.base import IGNORE_INDEX
from lmkit.objectives.electra import ELECTRA, ELECTRAConfig, generator_sizes, gumbel_sample


def setup(arch: str = "bert", **cfg):
    tok = byte_tokenizer()
    extra = {"embedding_size": 16} if arch == "albert" else {}
    model = tiny_model(arch, tok.vocab_size, d_model=64, n_head=2, **extra)
    objective = ELECTRA(ELECTRAConfig(**cfg), tok)
    objective.attach(model)
    batch = objective.make_collator()(text_blocks(8, 40), gen(1))
    return tok, model, objective, batch


def bce_by_hand(logits, labels, keep):
    p = torch.sigmoid(logits.double())
    per_token = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p))
    return per_token[keep].mean()


def test_sampled_token_equal_to_the_original_is_labelled_original():
    _, model, objective, batch = setup()
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    original = labels[selected]
    # the generator's distribution puts all its mass on the original token at even-numbered selected
    # positions and on another token at odd ones
    other = torch.where(original == ord("e"), ord("a"), ord("e"))
    forced = torch.where(torch.arange(original.numel()) % 2 == 0, original, other)
    logits = torch.full((original.numel(), objective.vocab_size), -1e4)
    logits[torch.arange(original.numel()), forced] = 1e4
    disc_ids, orig_ids, replaced = objective.corrupt(batch, logits)
    assert torch.equal(disc_ids[selected], forced)
    assert torch.equal(disc_ids[~selected], orig_ids[~selected])
    assert torch.equal(orig_ids[selected], original)
    assert torch.equal(replaced[selected], (forced != original).float())
    assert replaced[selected][0::2].sum() == 0 and replaced[selected][1::2].all()
    assert replaced[~selected].sum() == 0  # an unselected token is never "replaced"


def test_generator_biased_to_one_token_labels_its_occurrences_original():
    """End to end through the generator: a huge output bias on 'e' makes every sample 'e'."""
    _, model, objective, batch = setup()
    with torch.no_grad():
        objective.generator.lm_bias[ord("e")] = 1e4
        disc = objective.discriminator_loss(model, batch, objective.generator_logits(model, batch))
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    assert bool((labels[selected] == ord("e")).any()) and bool((labels[selected] != ord("e")).any())
    assert torch.equal(disc["replaced"][selected], (labels[selected] != ord("e")).float())


def test_gumbel_sampling_follows_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = gumbel_sample(probs.log().expand(40_000, 4), gen(0))
    freq = torch.bincount(draws, minlength=4) / 40_000.0
    assert torch.allclose(freq, probs, atol=4 * (0.25 / 40_000) ** 0.5)


def _grads(module):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def test_discriminator_loss_sends_no_gradient_to_the_generator_except_through_shared_embeddings():
    _, model, objective, batch = setup()
    gen_logits = objective.generator_logits(model, batch)
    assert gen_logits.requires_grad
    disc = objective.discriminator_loss(model, batch, gen_logits)
    (objective.cfg.disc_weight * disc["loss"]).backward()
    for name, g in _grads(objective.generator).items():
        assert g is None or not g.any(), f"generator.{name} got a gradient from the discriminator loss"
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0  # shared embeddings
    assert model.wpe.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.disc_head.parameters())


def test_generator_gradient_of_the_total_loss_is_that_of_its_mlm_loss():
    _, model, objective, batch = setup()
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    out = objective.loss(model, batch)
    (out.loss_sum / out.n_targets).backward()
    total = _grads(objective.generator)
    objective.zero_grad(set_to_none=True)
    mlm = torch.nn.functional.cross_entropy(objective.generator_logits(model, batch), labels[selected])
    mlm.backward()
    alone = _grads(objective.generator)
    assert any(g is not None and g.abs().sum() > 0 for g in alone.values())
    for name in alone:
        assert torch.allclose(total[name], alone[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("weight", [50.0, 3.0, 0.0])
def test_loss_is_generator_mlm_plus_lambda_times_discriminator_bce(weight):
    _, model, objective, batch = setup(disc_weight=weight)
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    with torch.no_grad():
        out = objective.loss(model, batch)
        gen_logits = objective.generator_logits(model, batch)
        gen_loss = torch.nn.functional.cross_entropy(gen_logits.double(), labels[selected])
        disc_ids, _, replaced = objective.corrupt(batch, gen_logits)  # the same samples: seeded by the batch
        disc_loss = bce_by_hand(objective.disc_logits(model, batch, disc_ids), replaced, batch["padding_mask"])
    total = out.loss_sum / out.n_targets
    assert float(total) == pytest.approx(float(gen_loss + weight * disc_loss), rel=1e-5)
    assert float(out.logs["gen_loss"]) == pytest.approx(float(gen_loss), rel=1e-5)
    assert float(out.logs["disc_loss"]) == pytest.approx(float(disc_loss), rel=1e-5)
    assert float(out.logs["replaced_frac"]) == pytest.approx(float(replaced[selected].mean()))


def test_bce_covers_every_non_pad_token_and_no_pad():
    tok, model, objective, batch = setup()
    pad = torch.zeros_like(batch["padding_mask"])
    pad[:, -9:] = True  # the last 9 positions of every row are padding
    batch["input_ids"] = batch["input_ids"].masked_fill(pad, tok.pad_id)
    batch["labels"] = batch["labels"].masked_fill(pad, IGNORE_INDEX)
    batch["padding_mask"] = ~pad
    with torch.no_grad():
        disc = objective.discriminator_loss(model, batch, objective.generator_logits(model, batch))
    real = ~pad
    expected = bce_by_hand(disc["logits"], disc["replaced"], real)
    assert float(disc["loss"]) == pytest.approx(float(expected), rel=1e-5)
    everything = bce_by_hand(disc["logits"], disc["replaced"], torch.ones_like(real))
    assert abs(float(everything) - float(expected)) > 1e-4  # the pad positions would change it
    assert real[:, 0].all() and (batch["input_ids"][:, 0] == tok.cls_id).all()  # [CLS] counts


def test_fifteen_percent_selected_85_masked_15_kept_none_random():
    tok, _, objective, _ = setup()
    collate = objective.make_collator()
    blocks = text_blocks(2000, 62, seed=3)
    batch = collate(blocks, gen(7))
    labels, ids = batch["labels"], batch["input_ids"]
    selected = labels != IGNORE_INDEX
    assert (selected.sum(1) == round(0.15 * 62)).all()  # exact: round(0.15 · n) of the n candidates
    assert not selected[:, 0].any() and not selected[:, -1].any()  # never [CLS] / [SEP]
    masked = (ids[selected] == tok.special_id("[MASK]")).double().mean()
    n = int(selected.sum())
    assert abs(float(masked) - 0.85) < 4 * (0.85 * 0.15 / n) ** 0.5
    kept = ids[selected] != tok.special_id("[MASK]")
    assert torch.equal(ids[selected][kept], labels[selected][kept])  # no random replacements
    bern = ELECTRA(ELECTRAConfig(mode="bernoulli"), tok).make_collator()(blocks, gen(7))["labels"] != IGNORE_INDEX
    rate = bern[:, 1:-1].double().mean()
    assert abs(float(rate) - 0.15) < 4 * (0.15 * 0.85 / bern[:, 1:-1].numel()) ** 0.5
    again = collate(blocks, gen(7))
    assert torch.equal(again["sample_seed"], batch["sample_seed"])  # sampling is seeded by stream position


def test_generator_is_sized_like_electra_and_shares_the_embedding_layer():
    model = tiny_model("bert", 300, d_model=768, n_head=12, n_layer=2, max_seq_len=8)
    # ELECTRA-Base's generator: hidden 256 (1/3), 4 heads of 64, ffn 1024
    sizes = generator_sizes(model, ELECTRAConfig(generator_size=1 / 3))
    assert sizes == {"d_model": 256, "n_layer": 2, "n_head": 4, "d_ff": 1024}
    assert generator_sizes(model, ELECTRAConfig())["d_model"] == 192
    _, model, objective, batch = setup("albert")  # E = 16, hidden 64 -> generator 16 wide, no projection
    assert objective.generator.project is None
    _, model, objective, batch = setup()
    assert objective.generator.project is not None  # BERT: E = 64 -> generator hidden 16
    objective_params = {id(p) for p in objective.parameters()}
    assert not objective_params & {id(p) for p in model.parameters()}  # nothing copied or registered twice
    assert not any(isinstance(m, torch.nn.Embedding) for m in objective.modules())
    with torch.no_grad():
        before = objective.generator_logits(model, batch)
        model.wte.weight[ord("e")] += 1.0  # the generator reads the discriminator's embeddings
        assert not torch.allclose(objective.generator_logits(model, batch), before)
    assert not model.lm_bias.requires_grad and not model.pooler.dense.weight.requires_grad


def test_albert_discriminator_trains_one_step():
    _, model, objective, batch = setup("albert")
    out = objective.loss(model, batch)
    (out.loss_sum / out.n_targets).backward()
    assert model.embedding_hidden_mapping_in.weight.grad.abs().sum() > 0
    assert objective.generator.head.dense.weight.grad.abs().sum() > 0


def test_discriminator_learns_to_find_an_untrained_generators_replacements():
    """Against a frozen, untrained generator (near-uniform samples) the discriminator must beat the
    base rate of its labels by far: its input really holds the samples, and its labels line up."""
    _, model, objective, _ = setup()
    objective.generator.requires_grad_(False)
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    collate = objective.make_collator()
    for step in range(40):
        batch = collate(text_blocks(16, 62, seed=step), gen(step))
        with torch.no_grad():
            gen_logits = objective.generator_logits(model, batch)
        disc = objective.discriminator_loss(model, batch, gen_logits)
        opt.zero_grad()
        disc["loss"].backward()
        opt.step()
    real, replaced = disc["real"], disc["replaced"]
    acc = float((((disc["logits"] > 0).float() == replaced) & real).sum() / real.sum())
    base = 1 - float(replaced[real].mean())  # always answering "original"
    assert acc > base + 0.05, (acc, base)


@pytest.mark.parametrize("overrides, expected", [
    (["objective.generator_size=1.5"], "a generator larger than the discriminator"),
    (["objective.generator_layers=2"], "a generator larger than the discriminator"),
    (["objective.generator_size=0"], "objective.generator_size must be a fraction"),
    (["objective.disc_weight=-1"], "objective.disc_weight must be a finite number >= 0"),
    (["objective.temperature=0"], "objective.temperature must be a finite number > 0"),
])
def test_bad_values_are_refused_before_training(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=electra", *overrides])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_electra_is_encoder_only():
    with pytest.raises(ConfigError, match="encoder"):
        load_run_config(["+objective=electra", "model=gpt_tiny"])


def _metric(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


def test_cli_run_lowers_the_discriminator_loss_and_exports_the_discriminator(tmp_path):
    from safetensors.torch import load_file

    from lmkit.checkpoint import load_checkpoint_file
    from lmkit.cli import main

    summary = run(["+objective=electra", *RUN, "logger=csv", "trainer.val_check_interval=12"], tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    disc = _metric(rows, "val/disc_loss")
    assert len(disc) >= 2 and disc[-1] < disc[0] - 0.1, disc
    assert summary["end"]["val/loss"] < summary["start"]["val/loss"]
    for key in ("gen_loss", "disc_loss", "disc_acc", "replaced_frac"):
        assert _metric(rows, f"train/{key}") and _metric(rows, f"val/{key}"), key
    assert 0.5 < _metric(rows, "val/replaced_frac")[-1] <= 1.0

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.equal(tensors["bert.embeddings.word_embeddings.weight"], state["model.wte.weight"])
    assert not any("generator" in k or "disc_head" in k for k in tensors)


def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny):
    def step_losses(d):
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(open(d / "logs" / "metrics.csv"))
                if r.get("train/loss")}

    common = ["+objective=electra", *tiny, "logger=csv", "trainer.log_every_n_steps=1",
              "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=2", "scheduler.decay_steps=5"]
    run(common + ["trainer.max_steps=5"], tmp_path / "full")
    run(common + ["trainer.max_steps=2"], tmp_path / "part")
    run(common + ["trainer.max_steps=5", f"resume={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
        tmp_path / "resumed")
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(b) == [2, 3, 4]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"

