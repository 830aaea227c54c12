"""The pipeline at run time: stages, schedule, gradient synchronisation, clipping, checkpoint state.

One :class:`PipelineRuntime` per process, built in ``LightningModule.configure_model`` (the
plan's ``parallelize``) once the process group exists. The process grid is ``pp × dp``
with the pipeline dimension outermost: global rank = ``pp_rank · dp + dp_rank``. The ranks
of one data-parallel replica (same ``dp_rank``) form a pipeline and read the same batches.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from lmkit.errors import CheckpointError, ConfigError
from lmkit.models.base import count_parameters
from lmkit.objectives.base import LossOutput
from lmkit_pipeline.config import SCHEDULES, PipelineConfig, check_run, stage_ranks
from lmkit_pipeline.split import balanced_split, block_costs, stage_block_ranges
from lmkit_pipeline.stage import (MB_INDEX, PACKED, AuxLosses, ModelSplitter, StageModule, probe_batch,
                                  probe_ownership, unpack)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class PipelineRuntime:
    """Everything one process needs to train and evaluate its pipeline stages."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.ready = False

    # -- topology ---------------------------------------------------------------------
    def topology(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank
        self.dp = self.cfg.resolved_dp(world_size)
        self.pp = self.cfg.pp_size
        self.pp_rank, self.dp_rank = divmod(rank, self.dp)

    def global_rank(self, pp_rank: int, dp_rank: int | None = None) -> int:
        return pp_rank * self.dp + (self.dp_rank if dp_rank is None else dp_rank)

    # -- building -----------------------------------------------------------------------
    def setup(self, lm_module, run) -> None:
        """Cut ``lm_module``'s model into stages, keep this rank's, build the schedule."""
        if self.ready:
            return
        cfg = self.cfg
        model, objective = lm_module.model, lm_module.objective
        blocks = list(model.transformer_blocks())
        check_run(cfg, kind=getattr(model, "kind", None), n_blocks=len(blocks),
                  rows_per_step=run.data.batch_size * run.data.grad_accum, batch_ramp_steps=run.data.batch_ramp_steps,
                  precision=run.trainer.precision, compile=bool(getattr(run.model, "compile", False)))
        world = dist.get_world_size() if _distributed() else 1
        rank = dist.get_rank() if _distributed() else 0
        self.topology(world, rank)
        if self.pp > 1 and not _distributed():
            raise ConfigError(f"strategy.pp_size={self.pp} needs {self.pp} processes: launch with torchrun or set "
                              f"trainer.devices")
        trainer = getattr(lm_module, "_trainer", None)
        self.device = trainer.strategy.root_device if trainer is not None else lm_module.device
        # new process groups get the run's collective timeout (trainer.dist_timeout_s), not torch's 30 minutes
        timeout = getattr(trainer.strategy, "_timeout", None) if trainer is not None else None
        lm_module.to(self.device)
        self.lm_module = lm_module

        # the optimizer's parameter groups of the whole model (the checkpoint's index order)
        self.name_of = {id(p): n for n, p in lm_module.named_parameters()}
        conf = lm_module.configure_optimizers()
        opt = conf["optimizer"] if isinstance(conf, dict) else conf
        self.full_groups = [[self.name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
        del conf, opt
        self.full_keys = list(lm_module.state_dict().keys())

        # cut the block stack
        if cfg.split is not None:
            sizes = list(cfg.split)
        else:
            first = count_parameters(p for m in model.embedding_modules() for p in m.parameters())
            last = model.output_embedding().numel()
            sizes = balanced_split(block_costs(blocks), cfg.n_stages, first_extra=first, last_extra=last)
        self.sizes = sizes
        ranges = stage_block_ranges(sizes)
        self.splitter = ModelSplitter(model, objective, ranges)
        self.stage_rank = stage_ranks(cfg.n_stages, self.pp, cfg.style)
        self.local_stages = [s for s in range(cfg.n_stages) if self.stage_rank[s] == self.pp_rank]

        # which stage computes which parameters (probe), and which rank keeps what
        seq_len = run.data.seq_len
        ownership = probe_ownership(self.splitter, probe_batch(objective, seq_len, objective.vocab_size, self.device))
        self.stage_params = ownership.stage_params
        self.log_names = ownership.log_names
        self.width = PACKED + len(self.log_names)
        all_params = OrderedDict((id(p), p) for _, p in lm_module.named_parameters())
        owners: dict[int, set[int]] = {pid: set() for pid in all_params}
        for s, params in enumerate(self.stage_params):
            for p in params:
                owners[id(p)].add(self.stage_rank[s])
        for pid, ranks in owners.items():
            if not ranks:  # never receives a gradient (e.g. an unused pooler): kept, untouched, by stage 0's rank
                ranks.add(self.stage_rank[0])
        self.owners = owners
        self.local_params = [p for pid, p in all_params.items() if self.pp_rank in owners[pid]]
        local_ids = {id(p) for p in self.local_params}
        self.norm_params = [p for p in self.local_params if min(owners[id(p)]) == self.pp_rank]

        # parameters of other ranks: frozen here; their storage released where nothing local reads them
        called = set().union(*(ownership.called[s] for s in self.local_stages))
        local_blocks = {i for s in self.local_stages for i in ranges[s]}
        keep_ids = {id(p) for i in local_blocks for p in blocks[i].parameters()}
        foreign_block_ids = {id(p) for i, b in enumerate(blocks) if i not in local_blocks for p in b.parameters()} - keep_ids
        embedding_ids = {id(p) for m in self.splitter.embeddings for p in m.parameters()}
        self.released: set[int] = set()
        for module in lm_module.modules():
            for p in module.parameters(recurse=False):
                if id(p) in local_ids or id(p) in self.released:
                    continue
                p.requires_grad_(False)
                if id(p) in foreign_block_ids or id(p) in embedding_ids or id(module) not in called:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                    self.released.add(id(p))
        self._setup_aux(model, lm_module.objective)
        self.key_keeper = self._key_keepers(lm_module, blocks, ranges)
        self.released_keys = {k for k, v in lm_module.state_dict(keep_vars=True).items() if id(v) in self.released}

        self._build_groups(timeout)
        self._build_schedule()
        self.ready = True

    def _setup_aux(self, model, objective) -> None:
        """Auxiliary-loss modules (e.g. MoE layers): their term names, counted after the probe's forward."""
        count: dict[str, int] = {}
        for m in model.modules():
            if hasattr(m, "lmkit_aux_losses"):
                for name in m.lmkit_aux_losses():
                    count[name] = count.get(name, 0) + 1
        self.aux_names = sorted(count)
        self._local_targets = torch.ones((), device=self.device)

        def scale(batch):
            return objective.count_targets(batch).float() / self._local_targets / self.dp

        self.aux = AuxLosses(count, scale) if count else None

    def _key_keepers(self, lm_module, blocks, ranges) -> dict[str, int]:
        """Pipeline rank whose copy of each state-dict entry is saved."""
        stage_of_block = {i: s for s, r in enumerate(ranges) for i in r}
        module_name = {id(m): n for n, m in lm_module.named_modules()}
        block_prefix = [(module_name[id(b)] + ".", self.stage_rank[stage_of_block[i]]) for i, b in enumerate(blocks)]
        keepers = {}
        for key, value in lm_module.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter) and id(value) in self.owners:
                keepers[key] = min(self.owners[id(value)])
                continue
            keepers[key] = next((r for prefix, r in block_prefix if key.startswith(prefix)), self.stage_rank[0])
        return keepers

    def _build_groups(self, timeout) -> None:
        """Process groups: one pipeline per replica, one data-parallel group per pipeline rank, and one per
        set of pipeline ranks sharing parameters. Every process creates every group, in the same order."""
        self.pp_group = self.dp_group = None
        self.shared: list[tuple[object, list[nn.Parameter]]] = []
        if not _distributed():
            return
        kw = {"timeout": timeout} if timeout is not None else {}
        if self.pp > 1:
            for d in range(self.dp):
                group = dist.new_group([self.global_rank(p, d) for p in range(self.pp)], **kw)
                if d == self.dp_rank:
                    self.pp_group = group
        if self.dp > 1:
            for p in range(self.pp):
                group = dist.new_group([self.global_rank(p, d) for d in range(self.dp)], **kw)
                if p == self.pp_rank:
                    self.dp_group = group
        # parameters held by several pipeline ranks (tied embeddings, shared blocks)
        rank_sets = sorted({tuple(sorted(r)) for r in self.owners.values() if len(r) > 1})
        for ranks in rank_sets:
            mine = None
            for d in range(self.dp):
                group = dist.new_group([self.global_rank(r, d) for r in ranks], **kw)
                if d == self.dp_rank and self.pp_rank in ranks:
                    mine = group
            if mine is not None:
                params = [p for p in self.local_params if tuple(sorted(self.owners[id(p)])) == ranks]
                self.shared.append((mine, params))

    def _build_schedule(self) -> None:
        from torch.distributed import pipelining

        cfg = self.cfg
        self.stage_modules = {s: StageModule(self.splitter, s, self.stage_params[s], self.aux, self.log_names)
                              for s in self.local_stages}
        self.last_module = self.stage_modules.get(cfg.n_stages - 1)
        self._norm = torch.ones((), device=self.device)
        if self.pp == 1:
            self.schedule = None
            return
        stages = [pipelining.PipelineStage(self.stage_modules[s], s, cfg.n_stages, self.device, group=self.pp_group)
                  for s in self.local_stages]
        cls = getattr(pipelining.schedules, SCHEDULES[cfg.schedule][0])
        arg = stages[0] if cfg.schedule in ("gpipe", "1f1b") else stages
        try:
            self.schedule = cls(arg, cfg.n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        except ValueError as e:
            raise ConfigError(f"strategy.schedule={cfg.schedule}: {e}") from None

    def _loss_fn(self, output, target):
        """Last stage: the micro-batch's summed loss over the targets of the whole step (as the core does)."""
        return output[0] / self._norm

    # -- training -------------------------------------------------------------------------
    def step_batch(self, micro_batches: list[dict]) -> dict:
        if len(micro_batches) == 1:
            return dict(micro_batches[0])
        return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}

    def forward_backward(self, lm_module, micro_batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's forward and backward through the pipeline schedule.

        Returns (Σ loss, Σ targets) of the whole step, summed over the data-parallel replicas
        and identical on every rank, so the logged loss is the full batch's loss.
        """
        batch = self.step_batch(micro_batches)
        rows = batch["input_ids"].shape[0]
        n_mb = self.cfg.n_microbatches
        if rows % n_mb:
            raise ConfigError(f"a step of {rows} rows cannot be cut into strategy.n_microbatches={n_mb} micro-batches")
        local_targets = lm_module.objective.count_targets(batch).float()
        total = local_targets.clone()
        if self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        self._norm = total.clamp(min=1)
        self._local_targets = local_targets.clamp(min=1)
        if self.last_module is not None:
            self.last_module.outputs.clear()
        if self.aux is not None:
            self.aux.logged.clear()
        if self.schedule is None:
            self._local_step(batch, n_mb)
        else:
            kwargs = dict(batch)
            kwargs[MB_INDEX] = torch.arange(n_mb, device=self.device)
            self.schedule.step(batch["input_ids"], target=torch.arange(n_mb, device=self.device),
                               return_outputs=False, **kwargs)
        self.sync_grads()
        packed = self._collect(n_mb)
        if self.dp > 1:
            dist.all_reduce(packed, group=self.dp_group)
        logs = unpack(packed, self.log_names, n_mb * self.dp).logs  # the objective's metrics, mean over the step
        if self.aux is not None:
            logs.update(self._aux_logs(n_mb))
        if logs and isinstance(getattr(lm_module, "_aux_logs", None), dict):
            lm_module._aux_logs.update(logs)
        return packed[0], packed[1]

    def _aux_logs(self, n_mb: int) -> dict[str, torch.Tensor]:
        """Each aux term, averaged over modules and micro-batches (as the core logs it), over all stages."""
        sums = torch.zeros(len(self.aux_names), device=self.device)
        for terms in self.aux.logged.values():
            for i, name in enumerate(self.aux_names):
                if name in terms:
                    sums[i] += terms[name].float()
        if self.pp > 1:
            dist.all_reduce(sums, group=self.pp_group)
        if self.dp > 1:
            dist.all_reduce(sums, group=self.dp_group)
            sums /= self.dp
        return {name: sums[i] / n_mb for i, name in enumerate(self.aux_names)}

    def _local_step(self, batch: dict, n_mb: int) -> None:
        """pp_size=1: the stages of this rank run one after another, micro-batch by micro-batch."""
        chunks = {k: torch.tensor_split(v, n_mb) for k, v in batch.items()}
        for i in range(n_mb):
            mb = {k: v[i] for k, v in chunks.items()}
            x = mb["input_ids"]
            for s in self.local_stages:
                x = self.stage_modules[s](x, **mb, **{MB_INDEX: torch.tensor([i], device=self.device)})
            self._loss_fn(x, None).backward()

    def _collect(self, n_mb: int) -> torch.Tensor:
        """Σ of the last stage's packed outputs, broadcast to every rank of the pipeline."""
        packed = torch.zeros(self.width, device=self.device)
        if self.last_module is not None:
            outs = self.last_module.outputs
            if sorted(outs) != list(range(n_mb)):
                raise RuntimeError(f"lmkit-pipeline: the last stage saw micro-batches {sorted(outs)}, expected {n_mb}")
            packed = torch.stack([outs[i] for i in range(n_mb)]).sum(0)
            packed[4] = outs[0][4]
        if self.pp > 1:
            dist.broadcast(packed, src=self.global_rank(self.stage_rank[-1]), group=self.pp_group)
        return packed

    def sync_grads(self) -> None:
        """Sum gradients of parameters held by several pipeline ranks, then across data-parallel replicas."""
        for group, params in self.shared:
            _all_reduce_grads(params, group)
        if self.dp > 1:
            _all_reduce_grads(self.local_params, self.dp_group)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global norm over all stages (a parameter held by several ranks counts once)."""
        grads = [p.grad for p in self.norm_params if p.grad is not None]
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        for g in grads:
            sq += g.detach().float().pow(2).sum()
        if self.pp > 1:
            dist.all_reduce(sq, group=self.pp_group)
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.local_params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    # -- validation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, lm_module, micro_batch: dict) -> LossOutput:
        """Forward only, stage after stage (point-to-point), the loss broadcast from the last stage."""
        n_mb = self.cfg.eval_microbatches or 1
        rows = micro_batch["input_ids"].shape[0]
        n_mb = math.gcd(n_mb, rows)
        total = torch.zeros(self.width, device=self.device)
        for chunk in range(n_mb):
            mb = {k: torch.tensor_split(v, n_mb)[chunk] for k, v in micro_batch.items()}
            total += self._eval_chunk(mb)
        if self.pp > 1:
            dist.broadcast(total, src=self.global_rank(self.stage_rank[-1]), group=self.pp_group)
        total[4] = (total[4] > 0).float()
        return unpack(total, self.log_names, n_mb)

    def _eval_chunk(self, mb: dict) -> torch.Tensor:
        x = mb["input_ids"]
        result = torch.zeros(self.width, device=self.device)
        for s in range(self.cfg.n_stages):
            here = self.stage_rank[s]
            prev = self.stage_rank[s - 1] if s else here
            if here != self.pp_rank:
                if prev == self.pp_rank and s:  # this rank ran stage s-1: send its output on
                    _send_tensor(x, self.global_rank(here), self.pp_group)
                continue
            if s and prev != self.pp_rank:
                x = _recv_tensor(self.global_rank(prev), self.pp_group, self.device)
            out = self.stage_modules[s](x, **mb)
            if s == self.cfg.n_stages - 1:
                result = out.detach().float()
            x = out
        return result

    # -- checkpoint state ---------------------------------------------------------------
    def _gather_to_first(self, obj):
        """Objects of every pipeline rank of this replica, on pipeline rank 0 (None elsewhere)."""
        if self.pp == 1 or self.pp_group is None:
            return [obj]
        out = [None] * self.pp if self.pp_rank == 0 else None
        dist.gather_object(obj, out, dst=self.global_rank(0), group=self.pp_group)
        return out

    def full_state_dict(self, local: dict) -> dict:
        """The whole model's state dict (on global rank 0), assembled from the pipeline ranks' parts."""
        if self.dp_rank != 0:
            return local  # replicas hold copies; only global rank 0 writes the file
        mine = {k: v.detach().cpu() for k, v in local.items() if self.key_keeper.get(k, 0) == self.pp_rank}
        parts = self._gather_to_first(mine)
        if parts is None:
            return local
        merged: dict = {}
        for part in parts:
            merged.update(part)
        missing = [k for k in self.full_keys if k not in merged]
        if missing:
            raise RuntimeError(f"lmkit-pipeline: checkpoint assembly lacks {missing[:5]}")
        return OrderedDict((k, merged[k]) for k in self.full_keys)

    def load_state_dict(self, lm_module, state: dict, strict: bool = True) -> None:
        """Load a whole-model state dict (pipeline or not); this rank takes what it holds."""
        if strict:
            unexpected = [k for k in state if k not in self.key_keeper]
            missing = [k for k in self.full_keys if k not in state]
            if unexpected or missing:
                raise CheckpointError(f"the checkpoint does not fit this model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
        wanted = {k: v for k, v in state.items() if k not in self.released_keys}
        lm_module.load_state_dict(wanted, strict=False)

    def _local_index(self, optimizer) -> list[str]:
        return [self.name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def full_optimizer_state(self, optimizer) -> dict:
        """The optimizer state of the whole model in the single-process index order (on global rank 0)."""
        local = optimizer.state_dict()
        if self.dp_rank != 0:
            return local
        names = self._local_index(optimizer)
        mine = {
            "state": {names[i]: _to_cpu(v) for i, v in local["state"].items()
                      if min(self.owners[id(self._param(names[i]))]) == self.pp_rank},
            "groups": [({k: v for k, v in g.items() if k != "params"}, [names[i] for i in g["params"]])
                       for g in local["param_groups"]],
        }
        parts = self._gather_to_first(mine)
        if parts is None:
            return local
        state: dict = {}
        for part in parts:
            state.update(part["state"])
        hyper_of: dict[str, dict] = {}
        for part in parts:
            for hyper, members in part["groups"]:
                for n in members:
                    hyper_of.setdefault(n, hyper)
        out_state, groups, index = {}, [], 0
        for group_names in self.full_groups:
            ids = []
            for n in group_names:
                if n in state:
                    out_state[index] = state[n]
                ids.append(index)
                index += 1
            hyper = next((hyper_of[n] for n in group_names if n in hyper_of), {})
            groups.append({**hyper, "params": ids})
        return {"state": out_state, "param_groups": groups, "lmkit_param_names": [list(g) for g in self.full_groups]}

    def _param(self, name: str) -> nn.Parameter:
        if not hasattr(self, "_by_name"):
            self._by_name = dict(self.lm_module.named_parameters())
        return self._by_name[name]

    def load_optimizer_state(self, optimizer, full: dict) -> None:
        """Take this rank's part of a whole-model optimizer state (pipeline or single-process checkpoint)."""
        groups_names = full.get("lmkit_param_names") or self.full_groups
        saved_sizes = [len(g["params"]) for g in full["param_groups"]]
        if saved_sizes != [len(g) for g in groups_names]:
            raise CheckpointError(f"the checkpoint's optimizer has parameter groups of sizes {saved_sizes}, this run "
                                  f"{[len(g) for g in groups_names]}: it was written for another model or optimizer")
        name_of_index, hyper_of = {}, {}
        for g, names in zip(full["param_groups"], groups_names):
            hyper = {k: v for k, v in g.items() if k != "params"}
            for i, n in zip(g["params"], names):
                name_of_index[i] = n
                hyper_of[n] = hyper
        named = {name_of_index[i]: v for i, v in full["state"].items()}
        local = {"state": {}, "param_groups": []}
        index = 0
        for g in optimizer.param_groups:
            ids = []
            for p in g["params"]:
                n = self.name_of[id(p)]
                if n in named:
                    local["state"][index] = named[n]
                ids.append(index)
                index += 1
            first = self.name_of[id(g["params"][0])] if g["params"] else None
            hyper = hyper_of.get(first, {k: v for k, v in g.items() if k != "params"})
            local["param_groups"].append({**hyper, "params": ids})
        optimizer.load_state_dict(local)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _all_reduce_grads(params: list[nn.Parameter], group) -> None:
    """Σ of the gradients over ``group``; a gradient missing on every member stays None."""
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, group=group)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    if not live:
        return
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send_tensor(x: torch.Tensor, dst: int, group) -> None:
    header = torch.tensor([_DTYPES.index(x.dtype), x.dim(), *x.shape], dtype=torch.int64, device=x.device)
    head = torch.zeros(8, dtype=torch.int64, device=x.device)
    head[: header.numel()] = header
    dist.send(head, dst=dst, group=group)
    dist.send(x.contiguous(), dst=dst, group=group)


def _recv_tensor(src: int, group, device) -> torch.Tensor:
    head = torch.zeros(8, dtype=torch.int64, device=device)
    dist.recv(head, src=src, group=group)
    dtype, ndim = _DTYPES[int(head[0])], int(head[1])
    x = torch.empty(*[int(s) for s in head[2:2 + ndim]], dtype=dtype, device=device)
    dist.recv(x, src=src, group=group)
    return x

