"""Transformer-XL: recurrence against one forward over the concatenated segments, stop-gradient memory,
stream-ordered data, exact resume with the memory, and its refusals."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmkit.data.datamodule import BlockDataset
from lmkit.data.sampler import (SequentialBatchSampler, StepBatchSampler, StreamSequentialBatchSampler,
                                StreamStepBatchSampler)
from lmkit.models.memory import StreamMemory
from lmkit.models.relative_attention import relative_layout, sinusoid_embedding
from lmkit.models.transformer_xl import TransformerXL, TransformerXLConfig
from lmkit_test_utils import TINY, one_error_line

XL = TINY + ["model=transformer_xl_tiny"]  # memory_len = data.seq_len (32)


def _model(memory_len: int, seed: int = 0, pre_lnorm: bool = False) -> TransformerXL:
    torch.manual_seed(seed)
    return TransformerXL(TransformerXLConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, memory_len=memory_len,
                                             max_seq_len=64, pre_lnorm=pre_lnorm)).eval()


@pytest.mark.parametrize("M, pre_lnorm", [(8, False), (4, False), (12, False), (4, True)])  # L = 8
def test_recurrence_equals_one_forward_over_the_concatenation_with_a_block_mask(M, pre_lnorm):
    """3 segments with memory M = a forward over the 3L tokens where a query of segment τ sees its own segment
    causally and the M positions before it (the paper's attention span), positions given explicitly."""
    L, B, D = 8, 2, 32
    model = _model(M, pre_lnorm=pre_lnorm)
    ids = torch.randint(0, 50, (B, 3 * L), generator=torch.Generator().manual_seed(1))
    model.stream_memory.mode = "val"
    with torch.no_grad():
        got = torch.cat([model(ids[:, t * L:(t + 1) * L]) for t in range(3)], dim=1)
        pos = torch.arange(3 * L)
        q, k = pos[:, None], pos[None, :]
        mask = (k <= q) & (k >= (q // L) * L - M)
        distances, index = relative_layout(pos, pos)
        pos_emb = sinusoid_embedding(distances, D)
        x = model.wte(ids) * math.sqrt(D)
        for block in model.blocks:
            x = block(x, x, pos_emb, index, mask[None, None])
    torch.testing.assert_close(got, x, atol=1e-5, rtol=0)
    assert [m.shape for m in model.stream_memory.read(B)] == [(B, M, D)] * 2


def test_pre_lnorm_block_is_the_reference_pre_ln_composition():
    """pre_lnorm (the reference's RelPartialLearnableDecoderLayer with pre_lnorm=True): the attention reads
    LN([memory ∘ h]) and adds to h unnormalized, the feed-forward reads LN of that; post-LN normalizes the sums."""
    T, M = 6, 5
    model = _model(M, pre_lnorm=True)
    block = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():  # LN weights away from 1/0, so that a missing or extra LN shows
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        memory, x = 2.0 * torch.randn(2, M, 32, generator=g), 2.0 * torch.randn(2, T, 32, generator=g)
        context = torch.cat([memory, x], 1)
        distances, index = relative_layout(torch.arange(M, M + T), torch.arange(M + T))
        pos_emb = sinusoid_embedding(distances, 32)
        mask = (torch.arange(M + T)[None, :] <= torch.arange(M, M + T)[:, None])[None, None]
        attn = block.attn
        normed = torch.nn.functional.layer_norm(context, (32,), block.ln_1.weight, block.ln_1.bias)
        k, v = attn.keys_values(normed)
        h = x + attn.attend(normed[:, M:], k, v, attn.position_keys(pos_emb), index, mask)
        want = h + block.mlp(torch.nn.functional.layer_norm(h, (32,), block.ln_2.weight, block.ln_2.bias))
        torch.testing.assert_close(block(x, context, pos_emb, index, mask), want, atol=1e-5, rtol=0)
        block.pre_lnorm = False
        k, v = attn.keys_values(context)
        h = block.ln_1(x + attn.attend(x, k, v, attn.position_keys(pos_emb), index, mask))
        torch.testing.assert_close(block(x, context, pos_emb, index, mask), block.ln_2(h + block.mlp(h)), atol=1e-5,
                                   rtol=0)


def test_the_memory_receives_no_gradient():
    model = _model(8)
    model.stream_memory.mode = "train"
    embedded = []
    hook = model.wte.register_forward_hook(lambda module, inputs, out: embedded.append(out))
    seg1, seg2 = torch.randint(0, 50, (2, 2, 8), generator=torch.Generator().manual_seed(2))
    model(seg1)
    out2 = model(seg2)
    hook.remove()
    g1, g2 = torch.autograd.grad(out2.pow(2).sum(), embedded, allow_unused=True)
    assert g1 is None or g1.abs().max() == 0
    assert g2.abs().max() > 0
    model.stream_memory.mode = None
    assert (out2 - model(seg2)).abs().max() > 1e-3  # the memory did change segment 2's states


def test_mode_none_is_stateless_and_modes_are_separate():
    model = _model(8)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(x)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert model.stream_memory.read(2) is None and not model.stream_memory.state_dict()["train"]
        model.stream_memory.mode = "train"
        first, second = model(x), model(x)
        torch.testing.assert_close(first, a, atol=0, rtol=0)  # nothing stored yet: as stateless
        assert (second - first).abs().max() > 1e-3
        model.stream_memory.mode = "val"  # another split's memory: empty
        torch.testing.assert_close(model(x), a, atol=0, rtol=0)
        assert model.stream_memory.read(3) is None  # another batch size: no memory


def test_stream_memory_keeps_the_last_length_states_detached_and_saves_the_train_memory():
    mem = StreamMemory(5)
    mem.mode = "train"
    h = torch.arange(2 * 3 * 1, dtype=torch.float).view(2, 3, 1).requires_grad_()
    mem.write([h])
    mem.write([h + 100])
    [got] = mem.read(2)
    assert not got.requires_grad
    torch.testing.assert_close(got, torch.cat([h, h + 100], 1)[:, -5:].detach())
    other = StreamMemory(4)
    other.load_state_dict(mem.state_dict())
    other.mode = "train"
    torch.testing.assert_close(other.read(2)[0], got[:, -4:])
    mem.reset("train")
    assert mem.read(2) is None


# -- data order --------------------------------------------------------------------------------


def _rows(dataset, keys, mbs):
    """input_ids (the block without its last token, as causal LM) of each micro-batch's rows."""
    return [[dataset[k][0][:-1] for k in keys[m:m + mbs]] for m in range(0, len(keys), mbs)]


def test_training_batches_in_stream_order_across_micro_batches_steps_and_ranks():
    L, mbs, accum, world = 16, 3, 2, 2
    dataset = BlockDataset(np.arange(40 * L * mbs * world + 1), L + 1, L)  # token t at position t
    lanes = mbs * world
    seen = set()
    for rank in range(world):
        sampler = StreamStepBatchSampler(len(dataset), mbs, accum, seed=0, rank=rank, world_size=world)
        micro = [rows for step in range(5) for rows in _rows(dataset, sampler.keys_for_step(step), mbs)]
        assert len(micro) == 5 * accum
        for a, b in zip(micro, micro[1:]):
            for row in range(mbs):  # row r continues row r: the next L tokens of the stream
                assert torch.equal(b[row], a[row] + L)
        seen |= {int(r[0]) for r in micro[0]}
    assert len(seen) == lanes  # every lane starts elsewhere
    # a pure function of the stream position: a fresh sampler resumed at step 3 serves the same keys
    done = StreamStepBatchSampler(len(dataset), mbs, accum, seed=0, start_step=lambda: 3)
    resumed = StreamStepBatchSampler(len(dataset), mbs, accum, seed=0, start_step=lambda: 3)
    resumed.load_state_dict(done.state_dict())
    assert next(iter(resumed)) == done.keys_for_step(3)
    # at the end of its part a lane starts over at its first block
    lane_len = len(dataset) // (mbs * 1)
    one = StreamStepBatchSampler(len(dataset), mbs, 1, seed=0)
    assert one.keys_for_step(lane_len)[1][0] == one.keys_for_step(0)[1][0] == lane_len


def test_validation_batches_in_stream_order():
    L, bs, world = 8, 3, 2
    dataset = BlockDataset(np.arange(50 * L + 1), L + 1, L)
    for rank in range(world):
        batches = list(StreamSequentialBatchSampler(len(dataset), bs, None, rank, world))
        assert len(batches) == len(dataset) // (bs * world)
        rows = [[dataset[k][0] for k in b] for b in batches]
        for a, b in zip(rows, rows[1:]):
            for row in range(bs):
                assert torch.equal(b[row], a[row] + L)
    # bounded by max_batches (one rank): the blocks the plain sampler validates on, in another order
    plain = {k for b in SequentialBatchSampler(len(dataset), bs, 4) for k in b}
    stream = {k for b in StreamSequentialBatchSampler(len(dataset), bs, 4) for k in b}
    assert plain == stream and len(stream) == 12


def test_the_data_module_serves_stream_order_for_a_model_with_memory(tmp_path):
    from lmkit.api import build

    built = build(XL, tmp_path / "xl")
    assert built.module.model.stream_order
    assert isinstance(built.datamodule.train_sampler(), StreamStepBatchSampler)
    built.datamodule.trainer = built.trainer
    assert isinstance(built.datamodule.val_dataloader().batch_sampler, StreamSequentialBatchSampler)
    # consecutive validation segments of a lane are contiguous text: the next block starts where this one's
    # inputs end (its last token is this block's last label), with no gap for the memory to skip
    built.datamodule.setup("validate")
    val = built.datamodule.val_set
    first, second = val[(0, 0)][0], val[(1, 1)][0]
    assert torch.equal(first[-1:], second[:1]) and len(val) == (len(built.datamodule.splits.val) - 1) // (len(first) - 1)
    plain = build(XL + ["model.memory_len=0"], tmp_path / "plain")
    assert not plain.module.model.stream_order
    assert type(plain.datamodule.train_sampler()) is StepBatchSampler


# -- training, resume, CLI ---------------------------------------------------------------------


def _losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_resume_with_memory_is_exact(tmp_path):
    from lmkit.api import run
    from lmkit.checkpoint import load_checkpoint_file

    common = XL + ["data.grad_accum=2", "logger=csv", "trainer.log_every_n_steps=1",
                   "trainer.checkpoint_every_n_steps=3", "trainer.val_check_interval=3", "scheduler.decay_steps=6"]
    run(common + ["trainer.max_steps=6"], tmp_path / "full")
    run(common + ["trainer.max_steps=3"], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    memory = load_checkpoint_file(ckpt)["state_dict"]["model._extra_state"]["train"]
    assert [tuple(m.shape) for m in memory] == [(4, 32, 32)]  # 1 layer: [batch, memory_len, d_model]
    run(common + ["trainer.max_steps=6", f"resume={ckpt}"], tmp_path / "resumed")
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4, 5]
    for step in b:  # step 3 attends over the memory of step 2: equal only if the checkpoint restored it
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"
    full = load_checkpoint_file(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    for name, value in full.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory):
    import contextlib
    import io

    import lmkit.cli

    run_dir = tmp_path_factory.mktemp("xl") / "run"
    argv = [*XL, "+objective=causal_lm", "trainer.max_steps=30", "trainer.val_check_interval=30",
            "optimizer.lr=3e-3", f"hydra.run.dir={run_dir}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert lmkit.cli.main(argv) == 0
    (run_dir / "stdout.txt").write_text(out.getvalue())
    return run_dir


def test_cli_run_trains_and_lowers_the_loss(xl_run):
    import re

    assert (xl_run / "checkpoints" / "last.ckpt").is_file()
    metrics = [line for line in (xl_run / "config.yaml").read_text().splitlines() if "memory_len" in line]
    assert metrics == ["  memory_len: 32"]
    out = (xl_run / "stdout.txt").read_text()
    start, end = (float(v) for v in re.findall(r"validation at (?:start|end):\s+loss ([0-9.]+)", out))
    assert end < start - 0.3, out


def test_generate_decodes_a_trained_run_statelessly(xl_run, capsys):
    """Greedy generation from the run equals argmax over one stateless forward of the growing context."""
    import lmkit.cli
    from lmkit.generation import encode_prompt, generate, load_for_generation

    model, tokenizer, info = load_for_generation(xl_run)
    assert info["architecture"] == "transformer_xl" and model.stream_memory.mode is None
    [text] = generate(model, tokenizer, "ROMEO:", max_new_tokens=6, temperature=0, **info)
    ids = encode_prompt(tokenizer, "decoder", "transformer_xl", "ROMEO:")
    new = []
    with torch.no_grad():
        for _ in range(6):
            new.append(int(model.logits(model(torch.tensor([ids + new]))[0, -1]).argmax()))
            if new[-1] == tokenizer.eos_id:
                new.pop()
                break
    assert text == tokenizer.decode(new)
    capsys.readouterr()
    assert lmkit.cli.main(["generate", str(xl_run), "prompt=ROMEO:", "max_new_tokens=6", "temperature=0"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + text + "\n"


def test_export_refuses_transformer_xl_in_one_line(xl_run, capsys, tmp_path):
    one_error_line(capsys, ["export", str(xl_run), str(tmp_path / "hf")],
                   "lmkit has no Hugging Face export for architecture 'transformer_xl'")


@pytest.mark.parametrize("extra, expected", [
    (["model.memory_len=-1"], "model.memory_len must be >= 0"),
    (["+objective=prefix_lm"], "architecture 'transformer_xl'"),
    (["+objective=causal_lm", "objective.document_mask=true"], "architecture 'transformer_xl'"),
    (["+objective=causal_lm", "+data.seq_len_schedule=[{until_step: 2, seq_len: 16}]"], "data.seq_len_schedule"),
    (["+objective=classification"], "the recurrence memory needs the packed text stream"),
])
def test_bad_input_is_refused_in_one_line_before_training(capsys, tmp_path, extra, expected):
    one_error_line(capsys, [*XL, *extra, f"hydra.run.dir={tmp_path / 'run'}"], expected)
    assert not (tmp_path / "run" / "checkpoints").exists()
