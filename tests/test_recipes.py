"""Paper recipes as experiment presets (RoBERTa, BERT, T5), T5's inverse square root schedule, and
BERT's sequence-length schedule (``data.seq_len_schedule``): lengths per step, exact resume across the
switch, token counts, and bad input."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmkit.api import build, load_run_config, run
from lmkit.data.sampler import StepBatchSampler
from lmkit.data.seq_len_schedule import PhasedStepBatchSampler
from lmkit.errors import ConfigError
from lmkit.optim.schedulers import InverseSqrtConfig, WarmupDecay, build_inverse_sqrt
from lmkit_test_utils import TINY, one_error_line


# -- the presets against the papers' numbers -----------------------------------------------------------
def test_roberta_recipe_is_the_papers():
    r = load_run_config(["experiment=roberta_recipe"])
    assert r.objective_component.name == "mlm" and r.objective.mode == "roberta" and r.objective.mask_prob == 0.15
    assert r.model_component.name == "bert" and r.data.seq_len_schedule is None
    assert r.optimizer_component.name == "adamw"
    assert list(r.optimizer.betas) == [0.9, 0.98] and r.optimizer.eps == 1e-6 and r.optimizer.weight_decay == 0.01
    assert r.optimizer.lr == 6e-4
    assert r.scheduler_component.name == "linear" and r.scheduler.min_lr_ratio == 0.0
    assert r.scheduler.decay_steps is None  # decays to 0 at the run's last step
    assert r.scheduler.warmup_steps / r.trainer.max_steps == pytest.approx(24_000 / 500_000)
    assert r.trainer.gradient_clip == 0.0


def test_bert_recipe_is_the_papers():
    r = load_run_config(["experiment=bert_recipe"])
    assert r.objective_component.name == "nsp" and r.objective.task == "nsp" and r.objective.mask_prob == 0.15
    assert r.model_component.name == "bert"
    assert r.optimizer_component.name == "adamw"  # AdamWeightDecayOptimizer: decoupled decay
    assert r.optimizer.lr == 1e-4 and list(r.optimizer.betas) == [0.9, 0.999] and r.optimizer.weight_decay == 0.01
    assert r.optimizer.eps == 1e-6 and r.trainer.gradient_clip == 1.0  # BERT's code
    assert r.scheduler_component.name == "linear" and r.scheduler.min_lr_ratio == 0.0
    assert r.scheduler.warmup_steps / r.trainer.max_steps == pytest.approx(10_000 / 1_000_000)
    [phase] = r.data.seq_len_schedule  # 90% of the steps at a quarter of the final length (128 of 512)
    assert phase["until_step"] / r.trainer.max_steps == pytest.approx(0.9)
    assert phase["seq_len"] / r.data.seq_len == pytest.approx(128 / 512)
    assert r.data.seq_len <= r.model.max_seq_len


def test_t5_recipe_is_the_papers():
    r = load_run_config(["experiment=t5_recipe"])
    assert r.objective_component.name == "span_corruption"
    assert (r.objective.noise_density, r.objective.mean_noise_span_length) == (0.15, 3.0)
    assert r.model_component.name == "t5" and r.optimizer_component.name == "adafactor"
    assert r.scheduler_component.name == "inverse_sqrt"
    assert r.optimizer.lr == pytest.approx(1 / math.sqrt(10_000))  # T5's lr before step 10^4
    assert r.scheduler.warmup_steps == round(r.trainer.max_steps * 10_000 / 2 ** 19)
    assert r.optimizer.weight_decay == 0.0 and r.trainer.gradient_clip == 0.0


def test_recipes_keep_command_line_choices():
    r = load_run_config(["experiment=roberta_recipe", "model=bert_base", "objective.mask_prob=0.2",
                         "scheduler.warmup_steps=7"])
    assert r.model.d_model == 768 and r.objective.mask_prob == 0.2 and r.scheduler.warmup_steps == 7
    assert r.objective.mode == "roberta"


@pytest.mark.parametrize("recipe, extra", [
    ("roberta_recipe", []),
    ("bert_recipe", ["data.seq_len_schedule=[{until_step:2,seq_len:16}]"]),
    ("t5_recipe", []),
])
def test_recipe_trains(tmp_path, recipe, extra):
    small = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "data.seq_len=32", "data.batch_size=4",
             "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.val_batches=1", "logger=none",
             "trainer.progress_bar=false", "callbacks=[]", "trainer.checkpoint_every_n_steps=3",
             "scheduler.warmup_steps=1"]
    summary = run([f"experiment={recipe}", *small, *extra], tmp_path)
    assert summary["steps"] == 3 and math.isfinite(summary["end"]["val/loss"])


# -- inverse square root ----------------------------------------------------------------------------
def _lrs(lr: float, warmup: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_inverse_sqrt(opt, InverseSqrtConfig(warmup_steps=warmup), total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])  # the lr of this update
        opt.step()
        sched.step()
    return out


def test_inverse_sqrt_is_t5s_formula():
    k = 100
    lrs = _lrs(1 / math.sqrt(k), k, 1000)
    for n, lr in enumerate(lrs):
        assert lr == pytest.approx(1 / math.sqrt(max(n, k)), rel=1e-12), n
    assert lrs[:k + 1] == [pytest.approx(0.1, rel=1e-12)] * (k + 1)  # the constant phase, up to n = k
    assert lrs[400] == pytest.approx(0.05, rel=1e-12)  # 1/sqrt(400)


def test_inverse_sqrt_scales_with_optimizer_lr():
    k, peak = 10, 3e-3
    for n, lr in enumerate(_lrs(peak, k, 200)):
        assert lr == pytest.approx(peak * math.sqrt(k) / math.sqrt(max(n, k)), rel=1e-12), n


def test_inverse_sqrt_refuses_no_warmup():
    with pytest.raises(ConfigError, match=r"scheduler.warmup_steps must be >= 1, got 0"):
        load_run_config(["scheduler=inverse_sqrt", "scheduler.warmup_steps=0"])


# -- the sequence-length schedule: sampler ---------------------------------------------------------
def _indices(sampler, steps):
    return [[k[0] for k in sampler.keys_for_step(s)] for s in steps]


def test_phase_zero_is_an_unscheduled_run_and_later_phases_permute_their_blocks():
    plain = StepBatchSampler(40, 4, 1, seed=7)
    phased = PhasedStepBatchSampler([0, 3], [40, 20], 4, 1, seed=7)
    assert _indices(phased, range(3)) == _indices(plain, range(3))
    keys = [k for s in range(3, 13) for k in phased.keys_for_step(s)]
    assert [pos for _, pos, _ in keys] == list(range(12, 52))  # positions go on across the switch
    assert {phase for _, _, phase in keys} == {1}
    first, second = [i for i, _, _ in keys[:20]], [i for i, _, _ in keys[20:]]
    assert sorted(first) == sorted(second) == list(range(20))  # each pass takes every block of the phase once
    assert first != second


@pytest.mark.parametrize("at", [2, 3, 5])
def test_sampler_resumed_with_another_layout_goes_on_with_the_phase(at):
    """Resumed at step ``at`` (before, at, after the switch at step 3) with micro-batches of 2 instead of 4:
    the switch stays at step 3, and each phase goes on with the examples the uninterrupted run takes next."""
    full = PhasedStepBatchSampler([0, 3], [40, 20], 4, 1, seed=1, start_step=lambda: at)
    resumed = PhasedStepBatchSampler([0, 3], [40, 20], 2, 1, seed=1, start_step=lambda: at)
    resumed.load_state_dict(full.state_dict())
    full_keys = [k for s in range(at, at + 12) for k in full.keys_for_step(s)]
    keys = [k for s in range(at, at + 12) for k in resumed.keys_for_step(s)]
    assert [k[2] for k in keys] == [0 if s < 3 else 1 for s in range(at, at + 12) for _ in range(2)]
    f0, r0 = [k for k in full_keys if k[2] == 0], [k for k in keys if k[2] == 0]
    assert r0 == f0[:len(r0)]
    f1, r1 = [k for k in full_keys if k[2] == 1], [k for k in keys if k[2] == 1]
    assert [k[0] for k in r1] == [k[0] for k in f1][:len(r1)]  # phase 1's blocks in the same order
    if at >= 3:  # resumed in phase 1: the same stream positions too (they seed the objective's noise)
        assert r1 == f1[:len(r1)]


# -- the sequence-length schedule: end to end ------------------------------------------------------
SCHEDULED = TINY + ["++data.seq_len_schedule=[{until_step:4,seq_len:16}]", "data.grad_accum=2", "logger=csv",
                    "trainer.log_every_n_steps=1", "trainer.val_check_interval=3", "scheduler.decay_steps=8",
                    "callbacks=[compute_accounting]", "+callback_options.compute_accounting.energy=none"]


def _metrics(run_dir: Path, key: str) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq-len-schedule")
    summary = run(SCHEDULED + ["trainer.max_steps=8"], root / "full")
    return root / "full", summary


def test_batches_have_each_steps_length_and_validation_the_final(tmp_path):
    built = build(SCHEDULED + ["trainer.max_steps=8"], tmp_path)
    dm = built.datamodule
    sampler = dm.train_sampler()
    tokens = np.asarray(dm.splits.train)
    for step in range(8):
        keys = sampler.keys_for_step(step)
        seq_len = 16 if step < 4 else 32
        assert len(keys) == 4 * 2  # batch size in sequences, in both phases
        for index, pos, phase in keys:  # causal LM: windows of seq_len + 1 tokens every seq_len tokens
            block, _ = dm.train_set[(index, pos, phase)]
            assert block.tolist() == tokens[index * seq_len:index * seq_len + seq_len + 1].tolist()
        batch = dm.collate([dm.train_set[k] for k in keys])
        assert [tuple(mb["input_ids"].shape) for mb in batch["micro_batches"]] == [(4, seq_len)] * 2
    val = next(iter(dm.val_dataloader()))
    assert val["micro_batches"][0]["input_ids"].shape[1] == 32  # data.seq_len, the final length
    built.trainer.fit(built.module, datamodule=dm)
    assert built.module.data_steps == 8 and built.module.last_step_tokens == 2 * 4 * 32  # what token_throughput reads


def test_tokens_and_lr_follow_the_schedule(full_run):
    run_dir, summary = full_run
    seen = _metrics(run_dir, "train/tokens_seen")
    per_step = {s: seen[s] - seen.get(s - 1, 0.0) for s in seen}
    assert per_step == {s: 4 * 2 * (16 if s < 4 else 32) for s in range(8)}
    assert summary["compute"]["tokens"] == 4 * 8 * 16 + 4 * 8 * 32  # 8 sequences per step, in both phases
    lrs = _metrics(run_dir, "train/lr")
    schedule = WarmupDecay("cosine", 1, 8, 0.1)  # TINY: cosine, warmup 1; decay_steps 8
    assert sorted(lrs) == list(range(8))
    for step, lr in lrs.items():  # logged after the scheduler stepped: the lr of the next update
        assert lr == pytest.approx(3e-3 * schedule(step + 1), rel=1e-5), step


@pytest.mark.parametrize("stop", [3, 4, 6])  # before, at and after the switch to 32 tokens at step 4
def test_resume_across_the_switch_is_exact(tmp_path, full_run, stop):
    full_dir, _ = full_run
    run(SCHEDULED + [f"trainer.max_steps={stop}", f"trainer.checkpoint_every_n_steps={stop}"], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = run(SCHEDULED + ["trainer.max_steps=8", f"resume={ckpt}"], tmp_path / "resumed")
    assert resumed["steps"] == 8
    a, b = _metrics(full_dir, "train/loss"), _metrics(tmp_path / "resumed", "train/loss")
    assert sorted(b) == list(range(stop, 8))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"
    seen_a, seen_b = _metrics(full_dir, "train/tokens_seen"), _metrics(tmp_path / "resumed", "train/tokens_seen")
    assert seen_b[7] == seen_a[7]  # the resumed run goes on counting from the checkpoint's tokens


# -- the sequence-length schedule: bad input --------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("[]", "data.seq_len_schedule is empty"),
    ("[{until_step:5,seq_len:16},{until_step:5,seq_len:24}]",
     "data.seq_len_schedule[1].until_step=5 is not after the previous phase's end (step 5)"),
    ("[{until_step:5,seq_len:128}]", "data.seq_len_schedule[0].seq_len=128 is longer than the model's positions "
                                     "(model.max_seq_len=64)"),
    ("[{until_step:abc,seq_len:16}]", "data.seq_len_schedule[0].until_step must be an integer, got 'abc'"),
])
def test_bad_schedules_are_one_line(capsys, value, expected):
    one_error_line(capsys, [*TINY, f"++data.seq_len_schedule={value}"], expected)


@pytest.mark.parametrize("value, expected", [  # as Hydra parses the command line's values
    ([{"until_step": 9, "seq_len": 16}, {"until_step": 5, "seq_len": 24}], "until_step must increase"),
    ([{"until_step": 5, "seq_len": 1.5}], "data.seq_len_schedule[0].seq_len must be an integer, got 1.5"),
    ([{"until_step": True, "seq_len": 16}], "data.seq_len_schedule[0].until_step must be an integer, got True"),
    ([{"until_step": 0, "seq_len": 16}], "data.seq_len_schedule[0].until_step must be >= 1, got 0"),
    ([{"until_step": 5, "seq_len": 1}], "data.seq_len_schedule[0].seq_len must be >= 2, got 1"),
    ([16, 32], "data.seq_len_schedule[0] must be {until_step: N, seq_len: S}, got 16"),
    ({"until_step": 5, "seq_len": 16}, "data.seq_len_schedule must be a list of phases"),
    ("32", "data.seq_len_schedule must be a list of phases"),
    ([{"until": 5, "seq_len": 16}], "unknown key 'until'. Did you mean 'until_step'?"),
    ([{"until_step": 5}], "data.seq_len_schedule[0] has no seq_len"),
])
def test_bad_schedule_values_name_the_entry(value, expected):
    from lmkit.config.schema import DataConfig

    with pytest.raises(ConfigError) as e:
        DataConfig(seq_len_schedule=value)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_schedule_too_short_for_the_objective_names_the_entry(tmp_path, capsys):
    one_error_line(capsys, [*TINY, "+objective=nsp", "model.max_seq_len=64", "++data.seq_len_schedule=[{until_step:2,seq_len:4}]",
                            f"hydra.run.dir={tmp_path}"],
                   "data.seq_len_schedule[0].seq_len=4 is too short for objective 'nsp': it needs at least 5")


def test_schedule_refused_for_objectives_without_packed_text(capsys):
    one_error_line(capsys, ["+objective=classification", "++data.seq_len_schedule=[{until_step:2,seq_len:16}]"],
                   "data.seq_len_schedule needs an objective that cuts blocks from packed text")


# -- warnings: a recipe shortened below its phases ---------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["scheduler=inverse_sqrt", "scheduler.warmup_steps=10"],
     "scheduler.warmup_steps=10 is not shorter than the run (trainer.max_steps=4): the inverse square root schedule "
     "keeps optimizer.lr throughout and never decays. Lower scheduler.warmup_steps if that is not what you want."),
    (["++data.seq_len_schedule=[{until_step:4,seq_len:16}]"],
     "data.seq_len_schedule's last phase ends at step 4, not before the end of the run (trainer.max_steps=4): no step "
     "trains at data.seq_len=32. Lower its until_step if that is not what you want."),
])
def test_phases_past_the_end_of_the_run_warn_once(capsys, monkeypatch, args, expected):
    from hydra.core.hydra_config import HydraConfig

    # an in-process CLI run earlier in the session leaves Hydra's config set, which means "inside a run: the
    # pre-flight check already warned"; this test is the pre-flight check
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    capsys.readouterr()
    load_run_config([*TINY, *args])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmkit: warning:")]
    assert warnings == [f"lmkit: warning: {expected}"]


@pytest.mark.parametrize("saved", [
    StepBatchSampler(40, 8, 1, seed=1, start_step=lambda: 5),  # a checkpoint without a schedule
    PhasedStepBatchSampler([0, 2], [40, 20], 8, 1, seed=1, start_step=lambda: 5),  # one with another switch
])
def test_resume_with_other_phases_begins_the_current_phase_at_the_resume(saved):
    """resume_allow_data_change: the phase under way starts its order at the resumed stream position."""
    resumed = PhasedStepBatchSampler([0, 3], [40, 20], 2, 1, seed=1, start_step=lambda: 5)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.phase_begin(1) == 40  # 5 steps of 8
    keys = [k for s in range(5, 15) for k in resumed.keys_for_step(s)]
    assert [pos for _, pos, _ in keys] == list(range(40, 60)) and {p for _, _, p in keys} == {1}
    assert sorted(i for i, _, _ in keys) == list(range(20))  # phase 1's first pass, from its beginning
