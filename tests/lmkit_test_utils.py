"""Constants and helpers shared by the core tests."""
from __future__ import annotations

import csv
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A 1-layer GPT on 32-token windows: a few steps take well under a second.
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.max_seq_len=64",
    "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "trainer.val_batches=2", "trainer.checkpoint_every_n_steps=2", "trainer.progress_bar=false",
    "logger=none", "scheduler.warmup_steps=1", "callbacks=[]",
]


def write_fake_plugin(root: Path, dist: str, module: str, source: str, version: str = "0.1.0") -> Path:
    """Make ``root`` look like site-packages holding distribution ``dist`` with an ``lmkit`` entry point."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[lmkit]\n{module} = {module}\n")
    return root




#: a plugin that registers a second optimizer named ``adamw`` (a name conflict with lmkit's)
DUP_PLUGIN_SOURCE = """
import lmkit
from lmkit.optim.optimizers import build_sgd, OptimizerConfig

def other_factory(groups, cfg):
    return build_sgd(groups, cfg)

@lmkit.hookimpl
def lmkit_register_optimizers():
    return [lmkit.Component("adamw", other_factory, OptimizerConfig)]
"""
#: a plugin whose import fails
BROKEN_PLUGIN_SOURCE = "import lmkit_this_module_does_not_exist\n"


def one_error_line(capsys, argv, expected) -> None:
    """``lmkit.cli.main(argv)`` exits 2 with exactly one ``lmkit: error:`` line, which contains ``expected``."""
    import lmkit.cli

    capsys.readouterr()
    assert lmkit.cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmkit: error:")]
    assert len(lines) == 1 and expected in lines[0], err


def assert_compiled_matches_eager(built) -> None:
    """One micro-batch through ``built`` (``lmkit.api.build`` of a run with ``model.compile=true``): the compiled
    model makes one graph without breaks, and its loss and gradients equal the eager model's."""
    import torch

    module, dm = built.module, built.datamodule
    assert module.model._compiled_call_impl is not None
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["micro_batches"][0]

    def loss_and_grads():
        module.zero_grad(set_to_none=True)
        out = module.objective.loss(module.model, batch)
        (out.loss_sum / out.n_targets).backward()
        return out.loss_sum.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_loss, compiled_grads = loss_and_grads()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled_impl, module.model._compiled_call_impl = module.model._compiled_call_impl, None
    eager_loss, eager_grads = loss_and_grads()
    module.model._compiled_call_impl = compiled_impl
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the run's CSV log ({} while the file is missing or being rewritten)."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    try:
        with open(path) as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
