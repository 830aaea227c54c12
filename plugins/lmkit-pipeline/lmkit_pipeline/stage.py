"""Pipeline stages cut from a built architecture from outside, through the architecture contract.

A stage runs the architecture's *own* ``forward`` (and the objective's own ``loss``) with the
blocks of other stages swapped out of the model's block container for the duration of the
call (see :class:`ModelSplitter`):

* blocks before the stage are skipped; the stage's first block reads the activations
  received from the previous stage instead of its input;
* on a stage that is not the first, the input embeddings (``embedding_modules()``) return
  zeros instead of looking tokens up, so the stage needs no embedding table;
* after the stage's last block a non-last stage stops the forward (an exception carries
  the hidden states out); the last stage runs on through the final norm and the
  objective's head and loss.

So the embedding composition, the attention-mask construction and the final norm stay the
architecture's code, and any objective works that calls the architecture once per loss.
Model and objective code are untouched. Parameters outside the blocks (embeddings, final
norm, heads, tied output embeddings) are attributed to stages by a probe (one tiny forward
and backward per stage, :func:`probe_ownership`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkit.objectives.base import LossOutput

#: keyword argument carrying each micro-batch's index through the pipeline schedule
MB_INDEX = "_lmkit_pp_microbatch"
#: packed last-stage output: [loss_sum, n_targets, nll_sum, n_bytes, has_nll, *objective logs]
PACKED = 5


class _StageExit(Exception):
    """Raised after the last block of a non-last stage, carrying its output out of ``forward``."""

    def __init__(self, hidden):
        super().__init__("pipeline stage exit")
        self.hidden = hidden


class _Slot(nn.Module):
    """Stands in for one block in the architecture's block container while a stage runs."""

    def __init__(self, block: nn.Module | None, enter: bool, exit: bool, splitter: "ModelSplitter"):
        super().__init__()
        # plain attributes: the slot must not register the block (or the splitter) as sub-modules
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_splitter", splitter)
        self.enter, self.exit = enter, exit

    def forward(self, x, *args, **kwargs):
        if self.enter:
            x = self._splitter.received
        if self._block is not None:
            x = self._block(x, *args, **kwargs)
        if self.exit:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"lmkit-pipeline: a transformer block returned {type(x).__name__}; stages can only "
                                f"pass a single hidden-state tensor between them")
            raise _StageExit(x)
        return x


def _zeros_embedding(module: nn.Embedding):
    def forward(ids, *args, **kwargs):
        return torch.zeros(*ids.shape, module.embedding_dim, dtype=module.weight.dtype, device=ids.device)

    return forward


def _block_locations(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[nn.Module, str]]:
    """(parent module, key) under which each block sits in the model tree."""
    wanted: dict[int, list[int]] = {}
    for i, b in enumerate(blocks):
        wanted.setdefault(id(b), []).append(i)
    found: list[tuple[nn.Module, str] | None] = [None] * len(blocks)
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is not None and id(child) in wanted and wanted[id(child)]:
                found[wanted[id(child)].pop(0)] = (parent, key)
    missing = [i for i, loc in enumerate(found) if loc is None]
    if missing:
        raise ValueError(f"lmkit-pipeline: transformer_blocks() {missing} are not sub-modules of the model; "
                         f"cannot cut it into stages")
    return found  # type: ignore[return-value]


class ModelSplitter:
    """Runs one stage of ``model`` (under ``objective``) at a time; see the module docstring."""

    def __init__(self, model: nn.Module, objective: nn.Module, ranges: list[range]):
        self.model, self.objective, self.ranges = model, objective, ranges
        self.blocks = list(model.transformer_blocks())
        self.locations = _block_locations(model, self.blocks)
        self.embeddings = [m for m in model.embedding_modules() if isinstance(m, nn.Embedding)]
        self.received: torch.Tensor | None = None
        self._active = False

    @property
    def n_stages(self) -> int:
        return len(self.ranges)

    @contextlib.contextmanager
    def running(self, stage: int, received: torch.Tensor | None):
        if self._active:
            raise RuntimeError("lmkit-pipeline: stages of one model cannot run nested")
        r = self.ranges[stage]
        first, last = stage == 0, stage == self.n_stages - 1
        saved = [parent._modules[key] for parent, key in self.locations]
        try:
            self._active = True
            self.received = received
            for i, (parent, key) in enumerate(self.locations):
                inside = r.start <= i < r.stop
                parent._modules[key] = _Slot(self.blocks[i] if inside else None,
                                             enter=inside and i == r.start and not first,
                                             exit=inside and i == r.stop - 1 and not last, splitter=self)
            if not first:
                for emb in self.embeddings:
                    emb.forward = _zeros_embedding(emb)
            yield
        finally:
            for (parent, key), module in zip(self.locations, saved):
                parent._modules[key] = module
            for emb in self.embeddings:
                emb.__dict__.pop("forward", None)
            self.received = None
            self._active = False

    def run(self, stage: int, received: torch.Tensor | None, batch: dict) -> torch.Tensor | LossOutput:
        """Hidden states after ``stage`` (non-last stages) or the objective's LossOutput (last stage)."""
        with self.running(stage, received):
            try:
                out = self.objective.loss(self.model, batch)
            except _StageExit as e:
                return e.hidden
        if stage != self.n_stages - 1:
            raise RuntimeError(f"lmkit-pipeline: stage {stage} did not reach the end of its blocks; does the objective "
                               f"call the architecture's forward?")
        return out


def pack(out: LossOutput, log_names: list[str] = ()) -> torch.Tensor:
    """LossOutput -> [loss_sum, n_targets, nll_sum, n_bytes, has_nll, *logs] (float32; loss_sum keeps its graph)."""
    loss = out.loss_sum.float().reshape(())
    zero = torch.zeros((), device=loss.device)

    def scalar(t):
        return zero if t is None else torch.as_tensor(t, device=loss.device).detach().float().reshape(())

    has = torch.ones((), device=loss.device) if out.nll_sum is not None else zero
    logs = [scalar(out.logs.get(name)) for name in log_names]
    return torch.stack([loss, scalar(out.n_targets), scalar(out.nll_sum), scalar(out.n_bytes), has, *logs])


def unpack(packed: torch.Tensor, log_names: list[str] = (), n_chunks: int = 1) -> LossOutput:
    """Packed sums over ``n_chunks`` micro-batches -> LossOutput (logs averaged over the chunks)."""
    has_nll = bool(packed[4] > 0)
    logs = {name: packed[PACKED + i] / n_chunks for i, name in enumerate(log_names)}
    return LossOutput(loss_sum=packed[0], n_targets=packed[1], nll_sum=packed[2] if has_nll else None,
                      n_bytes=packed[3] if has_nll else None, logs=logs)


class _AttachAux(torch.autograd.Function):
    """Identity on ``x`` whose backward also feeds gradient 1 into ``aux``: adds ``aux`` to the loss
    wherever the stage sits in the pipeline (Megatron's MoE aux-loss trick)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.clone()  # a new tensor: zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class AuxLosses:
    """Auxiliary losses (``lmkit_aux_losses()``, e.g. mixture-of-experts balance terms) under pipelining.

    The core adds, per micro-batch, each term averaged over the modules exposing it, times
    (micro-batch targets / step targets). Each stage adds the share of its own modules;
    ``count[name]`` is how many modules of the whole model expose ``name``.
    """

    def __init__(self, count: dict[str, int], scale):
        self.count = count
        self.scale = scale  # (micro-batch) -> weight of this micro-batch's terms
        self.logged: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def total(self, modules, stage: int, mb_index: int | None, batch: dict):
        terms: dict[str, torch.Tensor] = {}
        for m in modules:
            for name, value in m.lmkit_aux_losses().items():
                v = value / self.count.get(name, 1)
                terms[name] = terms[name] + v if name in terms else v
        if not terms:
            return None
        if mb_index is not None:
            self.logged[(stage, mb_index)] = {k: v.detach() for k, v in terms.items()}
        return sum(terms.values()) * self.scale(batch)


class StageModule(nn.Module):
    """The ``submodule`` given to ``torch.distributed.pipelining.PipelineStage`` for one stage.

    ``forward(x, **micro_batch)``: ``x`` is the token ids on the first stage (ignored: the
    micro-batch carries them) and the previous stage's hidden states elsewhere. Non-last
    stages return hidden states; the last stage returns the packed loss (see :func:`pack`)
    and records it in ``outputs[micro-batch index]``. ``parameters()`` are exactly the
    parameters this stage computes gradients for (zero-bubble schedules differentiate them).
    """

    def __init__(self, splitter: ModelSplitter, index: int, params: list[nn.Parameter], aux: AuxLosses | None = None,
                 log_names: list[str] = ()):
        super().__init__()
        object.__setattr__(self, "splitter", splitter)
        object.__setattr__(self, "_params", list(params))
        object.__setattr__(self, "_aux", aux)
        self.log_names = list(log_names)
        self.index = index
        self.is_last = index == splitter.n_stages - 1
        self.outputs: dict[int, torch.Tensor] = {}
        blocks = [splitter.blocks[i] for i in splitter.ranges[index]]
        seen: set[int] = set()
        self._aux_modules = []
        for b in blocks:
            for m in b.modules():
                if hasattr(m, "lmkit_aux_losses") and id(m) not in seen:
                    seen.add(id(m))
                    self._aux_modules.append(m)

    def parameters(self, recurse: bool = True):
        return iter(self._params)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return ((f"{prefix}{i}", p) for i, p in enumerate(self._params))

    def forward(self, x, **batch):
        index = batch.pop(MB_INDEX, None)
        mb_index = int(index.reshape(-1)[0]) if index is not None else None
        received = None if self.index == 0 else x
        out = self.splitter.run(self.index, received, batch)
        if self.is_last:
            out = pack(out, self.log_names)
            if mb_index is not None:
                self.outputs[mb_index] = out.detach()
        if self._aux is not None and self._aux_modules and torch.is_grad_enabled():
            aux = self._aux.total(self._aux_modules, self.index, mb_index, batch)
            if aux is not None:
                out = _AttachAux.apply(out, aux)
        return out


@dataclass
class Ownership:
    """Which stages compute gradients for which parameters, and which modules each stage calls."""

    stage_params: list[list[nn.Parameter]]  # per stage, in model order
    called: list[set[int]] = field(default_factory=list)  # per stage: ids of modules whose forward ran
    log_names: list[str] = field(default_factory=list)  # the objective's LossOutput.logs keys


def probe_ownership(splitter: ModelSplitter, batch: dict) -> Ownership:
    """Run every stage once on ``batch`` (forward + backward) and record its parameters.

    Block parameters belong to the stages holding the block (whether the probe touched them
    or not: a mixture-of-experts expert may receive no token); any other parameter belongs to
    the stages in which it received a gradient (embeddings on the first, final norm and heads
    on the last, a tied output embedding on both). RNG state and gradients are restored.
    """
    model, objective = splitter.model, splitter.objective
    params = []
    seen: set[int] = set()
    for p in list(model.parameters()) + list(objective.parameters()):
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    saved_grads = {id(p): p.grad for p in params}
    block_params = [{id(p) for p in splitter.blocks[i].parameters()} for i in range(len(splitter.blocks))]
    stage_params: list[list[nn.Parameter]] = []
    called: list[set[int]] = []
    log_names: list[str] = []
    x = None
    try:
        device = next((p.device for p in params), torch.device("cpu"))
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            for stage, r in enumerate(splitter.ranges):
                for p in params:
                    p.grad = None
                ran: set[int] = set()
                handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: ran.add(id(m)))
                try:
                    received = None if x is None else x.detach().requires_grad_(True)
                    out = splitter.run(stage, received, batch)
                finally:
                    handle.remove()
                if isinstance(out, LossOutput):
                    log_names = sorted(out.logs)
                loss = out.loss_sum if isinstance(out, LossOutput) else out.float().sum()
                if loss.requires_grad:
                    loss.backward()
                mine = set().union(*(block_params[i] for i in r))
                stage_params.append([p for p in params if id(p) in mine or p.grad is not None])
                called.append(ran)
                x = out.detach() if not isinstance(out, LossOutput) else None
    finally:
        for p in params:
            p.grad = saved_grads[id(p)]
    return Ownership(stage_params, called, log_names)


def probe_batch(objective, seq_len: int, vocab_size: int, device) -> dict:
    """One example built by the objective's own collator from random tokens."""
    block_len, _ = objective.block_layout(seq_len)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, max(vocab_size, 2), (1, block_len), generator=gen)
    batch = objective.make_collator()(tokens, torch.Generator().manual_seed(0))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
