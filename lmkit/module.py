"""LMModule: the LightningModule that joins an architecture, an objective and an optimizer.

Optimization is manual so that one training step holds all its micro-batches: the loss
of each micro-batch is divided by the predicted tokens of the whole step (summed over
ranks), which makes gradient accumulation exactly equal to one large batch.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torchmetrics import SumMetric

from lmkit.models.base import collect_aux_losses, collect_metrics, no_weight_decay
from lmkit.objectives.base import LossOutput


class LMModule(L.LightningModule):
    """Training and validation of ``model`` under ``objective``.

    ``optimizer_factory(param_groups)`` and ``scheduler_factory(optimizer, total_steps)``
    come from the registries; ``parallelize(model)`` (optional) is applied in
    :meth:`configure_model`, where strategies expect sharding to happen.

    For callbacks: :attr:`last_step_tokens` is the input token count of this rank's latest
    training step (public, documented; ``_last_step_tokens`` is its old private name).
    """

    def __init__(self, model, objective, optimizer_factory, scheduler_factory, weight_decay: float,
                 gradient_clip: float = 1.0, max_nonfinite_steps: int = 10, parallelize=None,
                 plan_forward_backward=None, plan_evaluate=None):
        super().__init__()
        self.model, self.objective = model, objective
        self.optimizer_factory, self.scheduler_factory = optimizer_factory, scheduler_factory
        self.weight_decay, self.gradient_clip = weight_decay, gradient_clip
        self.max_nonfinite_steps = max_nonfinite_steps
        self.parallelize = parallelize
        self.plan_forward_backward, self.plan_evaluate = plan_forward_backward, plan_evaluate
        self.automatic_optimization = False
        self.data_steps = 0  # optimizer steps' worth of data consumed (drives the sampler)
        self.nonfinite_steps = 0
        self.val_nll, self.val_targets, self.val_bytes, self.val_loss = (SumMetric() for _ in range(4))
        self.history: list[dict] = []  # per-validation summaries, for the CLI report
        self.val_by_source = None  # data.mixture: per-source sums (lmkit.data.mixture.SourceMetrics, set by train)
        self.val_by_length = None  # data.val_seq_lens: per-length sums (a SourceMetrics too, set by train)
        #: Input tokens of this rank's latest training step: ``input_ids`` elements (padding
        #: included) summed over the step's micro-batches; 0 before the first step. Public, for
        #: callbacks (``train/tokens_per_s``): multiply by the data-parallel replicas for the
        #: global count (:func:`lmkit.strategies.data_parallel_world`). Set in ``training_step``
        #: right after forward/backward, so a step whose optimizer update was skipped for a
        #: non-finite loss still counts the tokens it processed.
        self.last_step_tokens: int = 0

    # -- setup --------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.parallelize is not None and not getattr(self, "_parallelized", False):
            self.parallelize(self)
            self._parallelized = True

    def configure_optimizers(self):
        skip = {f"model.{n}" for n in no_weight_decay(self.model)} | {f"objective.{n}" for n in no_weight_decay(self.objective)}
        decay, no_decay, seen = [], [], set()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if name in skip or p.dim() < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory([g for g in groups if g["params"]])
        total = self._trainer.max_steps if self._trainer is not None and self._trainer.max_steps > 0 else 1
        scheduler = self.scheduler_factory(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training -----------------------------------------------------------------
    def _step_targets(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets on this rank, mean targets per rank) for the whole step."""
        local = torch.stack([self.objective.count_targets(mb) for mb in micro_batches]).sum().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = local.clone()
            dist.all_reduce(total)
            return local, total / dist.get_world_size()
        return local, local

    def forward_backward(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over one step's micro-batches; returns (Σ loss, targets on this rank).

        Each micro-batch's loss is divided by the mean targets per rank of the whole step,
        so the accumulated gradient equals that of one large batch. A strategy may replace
        this (``StrategyPlan.forward_backward``), e.g. with a pipeline schedule.
        """
        if self.plan_forward_backward is not None:
            return self.plan_forward_backward(self, micro_batches)
        local_targets, norm = self._step_targets(micro_batches)
        norm = norm.clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            out: LossOutput = self.objective.loss(self.model, mb)
            loss = out.loss_sum / norm
            if out.logs and hasattr(self, "_aux_logs"):  # the objective's own metrics (e.g. NSP accuracy)
                for name, value in out.logs.items():
                    self._aux_logs[name] = self._aux_logs.get(name, 0) + value.detach() / len(micro_batches)
            for name, value in collect_aux_losses(self.model).items():
                loss = loss + value * (out.n_targets / local_targets.clamp(min=1))
                self._aux_logs[name] = self._aux_logs.get(name, 0) + value.detach() / len(micro_batches)
            with self._maybe_no_sync(i == len(micro_batches) - 1):
                self.manual_backward(loss)
            loss_sum = loss_sum + out.loss_sum.detach()
        return loss_sum, local_targets

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        micro_batches = batch["micro_batches"]
        self.data_steps += 1
        self._aux_logs: dict[str, torch.Tensor] = {}
        self._set_memory_mode("train")  # recurrence memories continue the training stream during the step only
        try:
            loss_sum, local_targets = self.forward_backward(micro_batches)
        finally:
            self._set_memory_mode(None)
        self.last_step_tokens = sum(mb["input_ids"].numel() for mb in micro_batches)
        step_loss = loss_sum / local_targets.clamp(min=1)
        if self._nonfinite_on_any_rank(step_loss):
            return self._skip_nonfinite(opt, step_loss)
        if self.gradient_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self.log("global_step", float(self.global_step))  # lets ModelCheckpoint keep the last k
        self.log("train/loss", step_loss, prog_bar=True)
        self.log("train/ppl", torch.exp(step_loss.clamp(max=30)))
        self.log("train/lr", sched.get_last_lr()[0], prog_bar=True)
        for name, value in self._aux_logs.items():
            self.log(f"train/{name}", value)
        for name, value in collect_metrics(self.model).items():
            self.log(f"train/{name}", value)
        return step_loss

    @property
    def _last_step_tokens(self) -> int:
        """Deprecated private name of :attr:`last_step_tokens`, kept for callbacks written against it."""
        return self.last_step_tokens

    def _maybe_no_sync(self, sync: bool):
        wrapped = self.trainer.model if self._trainer is not None else None
        if not sync and wrapped is not None and hasattr(wrapped, "no_sync"):
            return wrapped.no_sync()
        return contextlib.nullcontext()

    @staticmethod
    def _nonfinite_on_any_rank(step_loss: torch.Tensor) -> bool:
        """One decision for all ranks: their gradients were averaged, so a NaN on one rank is a NaN on all."""
        bad = (~torch.isfinite(step_loss.detach())).float().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def _skip_nonfinite(self, opt, step_loss):
        """Skip the optimizer step of a NaN/inf loss (the batch is consumed: ``data_steps`` moved on)."""
        opt.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        self.log("train/loss", step_loss, prog_bar=True)  # its own (non-finite) loss, not the last step's
        within_budget = self.nonfinite_steps <= self.max_nonfinite_steps
        if within_budget and self._trainer is not None and self.trainer.is_global_zero:
            value = float(step_loss) if not torch.isfinite(step_loss) else "on another rank"
            print(f"lmkit: warning: non-finite loss ({value}) at step {self.global_step} (batch "
                  f"{self.data_steps - 1}); optimizer step skipped ({self.nonfinite_steps} of "
                  f"trainer.max_nonfinite_steps={self.max_nonfinite_steps})", file=sys.stderr, flush=True)
        if self.nonfinite_steps > self.max_nonfinite_steps:
            from lmkit.errors import LmkitError

            raise LmkitError(
                f"the loss was not finite ({float(step_loss)}) in {self.nonfinite_steps} steps, more than "
                f"trainer.max_nonfinite_steps={self.max_nonfinite_steps}. Training stopped; the last good checkpoint "
                f"is kept. Lower optimizer.lr, enable trainer.gradient_clip, or use precision=bf16-mixed."
            )
        return None

    # -- recurrence memory --------------------------------------------------------
    def _set_memory_mode(self, mode: str | None, reset: bool = False) -> None:
        """Set the mode of every sub-module's ``stream_memory`` (lmkit.models.memory); reset: empty it first.

        "train" during training steps, "val" during validation (fresh at each validation epoch), None
        otherwise: evaluation, generation, scoring and callbacks between steps see a stateless model.
        """
        for module in self.model.modules():
            memory = getattr(module, "stream_memory", None)
            if memory is not None:
                if reset and mode is not None:
                    memory.reset(mode)
                memory.mode = mode

    def on_validation_epoch_start(self):
        self._set_memory_mode("val", reset=True)

    # -- validation ---------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        length = batch.get("val_len", 0)  # data.val_seq_lens: set k > 0 is the k-th extra length
        for mb in batch["micro_batches"]:
            out = self.plan_evaluate(self, mb) if self.plan_evaluate else self.objective.loss(self.model, mb)
            if length:  # counted in val/len<L>/* only: val/loss stays the loss at data.seq_len
                self.val_by_length.update(length - 1, out)
                continue
            self.val_loss.update(out.loss_sum.float())
            self.val_targets.update(out.n_targets.float())
            for name, value in out.logs.items():  # the objective's own metrics, averaged over batches
                self.log(f"val/{name}", value.float(), on_step=False, on_epoch=True,
                         batch_size=int(mb["input_ids"].shape[0]), sync_dist=True)
            if out.nll_sum is not None:
                self.val_nll.update(out.nll_sum.float())
                self.val_bytes.update(out.n_bytes.float())
            if self.val_by_source is not None and "source" in batch:  # a mixture's batch: all of one source
                self.val_by_source.update(batch["source"], out)

    def on_validation_epoch_end(self):
        self._set_memory_mode(None)
        targets = self.val_targets.compute()
        loss = self.val_loss.compute() / targets.clamp(min=1)
        summary = {"step": self.global_step, "val/loss": float(loss)}
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        # an objective without an LM likelihood (nll_sum None: distillation of an encoder) never updates these
        has_nll = self.val_nll.update_called
        nll = self.val_nll.compute() if has_nll else None
        if has_nll and float(targets) > 0 and float(self.val_bytes.compute()) > 0:
            mean_nll = nll / targets
            ppl = torch.exp(mean_nll.clamp(max=30))
            self.log("val/ppl", ppl)
            summary["val/ppl"] = float(ppl)
            if getattr(self.objective, "scores_every_byte", False):
                bpb = nll / (self.val_bytes.compute() * math.log(2))
                self.log("val/bpb", bpb)
                summary["val/bpb"] = float(bpb)
        for m in (self.val_nll, self.val_targets, self.val_bytes, self.val_loss):
            m.reset()
        if self.val_by_source is not None:
            summary.update(self.val_by_source.log(self))
        if self.val_by_length is not None:
            summary.update(self.val_by_length.log(self))
        self.history.append(summary)

    # -- checkpoint state ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        np_state = np.random.get_state()
        checkpoint["lmkit"] = {
            "data_steps": self.data_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            },
        }
        # what the data order depends on (LMDataModule.fingerprint, set by lmkit.train): compared on resume
        if getattr(self, "data_fingerprint", None) is not None:
            checkpoint["lmkit"]["data"] = dict(self.data_fingerprint)

    def on_load_checkpoint(self, checkpoint):
        from lmkit.checkpoint import check_lmkit_state

        check_lmkit_state(checkpoint, None)  # never restart the data at batch 0 silently
        state = checkpoint["lmkit"]
        self.data_steps = int(state.get("data_steps", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            n = rng["numpy"]
            np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
            p = rng["python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
