"""LoRA (``model.lora.*``): the layer against PEFT's, frozen base, fresh adapters = base model, only
trainable parameters in the optimizer, merged export = unmerged logits (and transformers loads it),
exact resume, compile, and one-line refusals of bad settings."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lmkit.adapters.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from lmkit.api import build, run
from lmkit.checkpoint import load_checkpoint_file
from lmkit.errors import ConfigError
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.llama import Llama, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import step_losses  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA = ["model.lora.r=4", "model.lora.alpha=8", "optimizer.lr=0.01"]


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(name="gpt", vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=32, **kw)).eval()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every lora_B (zero at init) random values, so that an adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# -- the layer -----------------------------------------------------------------------------------


def test_layer_forward_and_merge_equal_peft():
    """Same W, b, A, B: the output equals PEFT's LoraLayer, and the merged weight PEFT's merge_and_unload."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    holder = nn.Sequential(copy.deepcopy(base))
    peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0), holder)
    ours = LoRALinear(copy.deepcopy(base), r=3, alpha=6)
    with torch.no_grad():
        ours.lora_A.copy_(torch.randn(3, 12))
        ours.lora_B.copy_(torch.randn(20, 3))
        holder[0].lora_A["default"].weight.copy_(ours.lora_A)
        holder[0].lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 7, 12)
    torch.testing.assert_close(ours(x), holder(x), rtol=0, atol=1e-6)
    holder[0].merge()
    torch.testing.assert_close(ours.merged().weight, holder[0].base_layer.weight, rtol=0, atol=1e-6)
    # the paper's formula, by hand
    torch.testing.assert_close(ours.merged().weight, base.weight + 2.0 * ours.lora_B @ ours.lora_A)


def test_fresh_adapters_leave_the_model_equal_to_the_base_bit_for_bit():
    base = tiny_gpt()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(r=4, targets=["all-linear"]))
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(model.logits(model(ids)), base.logits(base(ids)))
    assert all(torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in model.modules() if isinstance(m, LoRALinear))


def test_names_are_kept_base_frozen_and_merge_gives_the_unmerged_logits():
    model = tiny_gpt()
    before = set(model.state_dict())
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["qkv", "mlp.fc"], train=["ln_f.weight"]))
    after = set(model.state_dict())
    assert before <= after  # the base's names are unchanged (init_from, export tables, fsdp plans)
    assert after - before == {f"blocks.{i}.{m}.{p}" for i in range(2) for m in ("attn.qkv", "mlp.fc")
                              for p in ("lora_A", "lora_B")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == (after - before) | {"ln_f.weight"}
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        unmerged = model.logits(model(ids))
        merged = merge_lora(copy.deepcopy(model))
        assert set(merged.state_dict()) == before
        torch.testing.assert_close(merged.logits(merged(ids)), unmerged, rtol=0, atol=1e-5)


def test_attention_keyword_on_llama_adapts_q_k_v():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(name="llama", vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                              max_seq_len=32))
    assert apply_lora(model, LoRAConfig(r=2)) == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"]


# -- bad settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("targets, said", [
    (["qvk"], "model.lora.targets: 'qvk' matches no Linear layer of this GPT. Did you mean 'qkv'? Its Linear "
              "layers: attn.qkv, attn.proj, mlp.fc, mlp.proj"),
    (["qkv", "nothing_here"], "'nothing_here' matches no Linear layer"),
    (["attn"], "'attn' selects blocks.0.attn (SelfAttention), not a Linear layer"),
    (["lm_head"], "'lm_head' matches no Linear layer"),  # the output head is read by the loss directly
])
def test_targets_that_select_nothing_are_one_line_errors(targets, said):
    model = tiny_gpt(tie_embeddings=False)
    with pytest.raises(ConfigError) as e:
        apply_lora(model, LoRAConfig(r=4, targets=targets))
    assert said in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, said", [
    ("model.lora.r=0", "model.lora.r must be a whole number >= 1 (the adapters' rank), got 0"),
    ("model.lora.r=-2", "model.lora.r must be a whole number >= 1"),
    ("model.lora.alpha=0", "model.lora.alpha must be > 0"),
    ("model.lora.dropout=1.0", "model.lora.dropout must be in [0, 1)"),
    ("model.lora.rank=4", "unknown config key 'model.lora.rank'"),
    ("model.lora.targets=[qvk]", "'qvk' matches no Linear layer of this GPT. Did you mean 'qkv'?"),
    ("model.lora.train=[nope]", "model.lora.train: 'nope' matches no parameter"),
])
def test_bad_settings_are_refused_in_one_line_before_training(override, said, tiny, tmp_path):
    extra = [] if override.startswith("model.lora.r=") else ["model.lora.r=4"]
    with pytest.raises(ConfigError) as e:
        build(tiny + extra + [override], tmp_path)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_the_target_error_in_one_line(tiny, tmp_path, capsys):
    import lmkit.cli

    assert lmkit.cli.main([*tiny, "model.lora.r=4", "model.lora.targets=[qvk]", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmkit: error: model.lora.targets: 'qvk' matches no Linear layer")


# -- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from lmkit_test_utils import TINY

    run_dir = tmp_path_factory.mktemp("pre") / "run"
    run(TINY + ["trainer.max_steps=2"], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, pretrained):
    from lmkit_test_utils import TINY

    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run(TINY + LORA + ["model.lora.targets=[all-linear]", f"init_from={pretrained}"], run_dir)
    return run_dir


def test_only_adapters_train_and_the_optimizer_holds_only_them(lora_run, pretrained):
    source = load_checkpoint_file(pretrained / "checkpoints" / "last.ckpt")["state_dict"]
    ckpt = load_checkpoint_file(lora_run / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    adapters = sorted(k for k in state if k.endswith(("lora_A", "lora_B")))
    assert len(adapters) == 8  # 1 layer x 4 Linear layers x (A, B)
    for name, value in source.items():  # the base: exactly the init_from weights after 4 steps
        assert torch.equal(state[name], value), name
    assert all(state[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # B moved away from 0
    opt_state = ckpt["optimizer_states"][0]
    n_opt = sum(len(g["params"]) for g in opt_state["param_groups"])
    assert n_opt == len(adapters) == len(opt_state["state"])
    shapes = sorted(tuple(s["exp_avg"].shape) for s in opt_state["state"].values())
    assert shapes == sorted(tuple(state[k].shape) for k in adapters)


def test_export_merges_and_transformers_gives_the_unmerged_logits(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import lmkit.cli

    out = tmp_path / "hf"
    assert lmkit.cli.main(["export", str(lora_run), str(out)]) == 0
    built = build_from_run(lora_run)  # the unmerged LoRA model as trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = built.logits(built(ids))
        theirs = hf(input_ids=ids).logits
    assert not any(k.endswith(("lora_A", "lora_B")) for k in hf.state_dict())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # generate/evaluate read the run the same way (merged, base names)
    from lmkit.generation import load_for_generation

    model, _, _ = load_for_generation(lora_run)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), ours, rtol=0, atol=1e-5)


def build_from_run(run_dir: Path) -> nn.Module:
    """The run's own LoRA model (base + adapters, unmerged), loaded from its last checkpoint."""
    import yaml

    node = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    state = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    from lmkit.interop.source import model_config

    model = GPT(model_config(node, model_state, GPTConfig))
    apply_lora(model, LoRAConfig(**node["lora"]))
    model.load_state_dict(model_state)
    return model.eval()


def test_init_from_a_lora_run_takes_the_merged_weights(lora_run, tiny, tmp_path):
    from lmkit.adapters import merged_model_state

    built = build(tiny + [f"init_from={lora_run}"], tmp_path)
    merged = build_from_run(lora_run)
    expected = merge_lora(merged).state_dict()
    got = built.module.model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    assert merged_model_state({"name": "gpt"}, GPT, None, {"a": 1}) == {"a": 1}  # no adapters: as is


def test_resumed_lora_run_matches_the_uninterrupted_one(tmp_path, tiny):
    common = tiny + LORA + ["model.lora.dropout=0.1", "logger=csv", "trainer.log_every_n_steps=1",
                            "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=2",
                            "scheduler.decay_steps=4"]
    run(common + ["trainer.max_steps=4"], tmp_path / "full")
    run(common + ["trainer.max_steps=2"], tmp_path / "part")
    run(common + ["trainer.max_steps=4", f"resume={tmp_path / 'part'}"], tmp_path / "resumed")
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(b) == [2, 3]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"
    full = load_checkpoint_file(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7)


def test_compiled_lora_model_gives_the_eager_loss_and_gradients(tmp_path, tiny):
    pytest.importorskip("torch._dynamo")
    eager = build(tiny + LORA + ["model.compile=false"], tmp_path / "e")
    compiled = build(tiny + LORA + ["model.compile=true", "trainer.compile_backend=aot_eager"], tmp_path / "c")
    compiled.module.model.load_state_dict(eager.module.model.state_dict())
    randomize_adapters(eager.module.model)
    randomize_adapters(compiled.module.model)
    batch = next(iter(eager.datamodule.train_dataloader()))["micro_batches"][0]
    grads = []
    for b in (eager, compiled):
        out = b.module.objective.loss(b.module.model, batch)
        (out.loss_sum / out.n_targets).backward()
        grads.append({n: p.grad for n, p in b.module.model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and all(n.endswith(("lora_A", "lora_B")) for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_the_lora_preset_composes_and_trains(tiny, tmp_path):
    summary = run(tiny + ["experiment=lora", "trainer.max_steps=2", "scheduler.warmup_steps=1"], tmp_path)
    assert summary["steps"] == 2
    state = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert sorted(k for k in state if "lora" in k) == ["model.blocks.0.attn.qkv.lora_A", "model.blocks.0.attn.qkv.lora_B"]


@pytest.mark.slow
def test_lora_under_fsdp_on_two_ranks_matches_one_process(tmp_path):
    """FSDP2 over 2 CPU/gloo ranks (batch 4 each) = one process (batch 8): losses and parameters to 1e-5;
    the frozen base is unchanged; the sharded checkpoint exports merged."""
    pytest.importorskip("lmkit_fsdp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "lmkit-fsdp" / "tests"))
    from fsdp_helpers import Launcher

    launcher = Launcher(tmp_path, tmp_path / "cache")
    common = ["model.lora.r=4", "model.lora.targets=[all-linear]", "trainer.max_steps=3"]
    ref = launcher.run("reference", common + ["data.batch_size=8", "trainer.devices=1"])
    two = launcher.run("fsdp2", common + ["strategy=fsdp", "data.batch_size=4", "trainer.devices=2"], nproc=2)
    assert two["world"] == 2 and two["steps"] == 3
    assert max(abs(a - b) for a, b in zip(two["losses"], ref["losses"])) < 1e-5
    assert set(two["state"]) == set(ref["state"])
    for k in ref["state"]:
        torch.testing.assert_close(two["state"][k], ref["state"][k], rtol=0, atol=1e-5)
    from fsdp_helpers import TINY as FSDP_TINY

    fresh = build(FSDP_TINY + common + ["data.batch_size=8"], tmp_path / "fresh").module.state_dict()
    for k, v in two["state"].items():  # the base as initialised; the adapters B moved away from 0
        if k.endswith("lora_B"):
            assert v.abs().sum() > 0, k
        elif not k.endswith("lora_A"):
            assert torch.equal(v, fresh[k].float()), k
    import lmkit.cli

    assert (two["run_dir"] / "checkpoints" / "last.ckpt").is_dir()  # sharded
    assert lmkit.cli.main(["export", str(two["run_dir"]), str(tmp_path / "hf")]) == 0


@pytest.mark.parametrize("preset, objective", [
    ("gpt_tiny", "causal_lm"), ("llama_tiny", "causal_lm"), ("bert_tiny", "mlm"), ("albert_tiny", "sop"),
    ("t5_tiny", "span_corruption"), ("bart_tiny", "bart_denoising"),
])
def test_every_architecture_adapts_and_merges_to_the_same_outputs(preset, objective):
    import dataclasses

    from lmkit.api import load_run_config

    cfg = load_run_config([f"model={preset}", f"+objective={objective}", "model.dropout=0.0"])
    torch.manual_seed(0)
    base = cfg.model_component.factory(dataclasses.replace(cfg.model, vocab_size=300)).eval().double()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(r=2, targets=["all-linear"]))  # fp64: the merge, not rounding, is tested
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"decoder_input_ids": ids[:, :7]} if base.kind == "encoder_decoder" else {}
    with torch.no_grad():
        assert torch.equal(model(ids, **kwargs), base(ids, **kwargs))  # B = 0: the base model, bit for bit
        randomize_adapters(model)
        unmerged = model(ids, **kwargs)
        assert not torch.allclose(unmerged, base(ids, **kwargs))
        merged = merge_lora(copy.deepcopy(model))
        assert set(merged.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(merged(ids, **kwargs), unmerged, rtol=0, atol=1e-10)
