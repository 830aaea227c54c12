"""Tensor-parallel plans, one per architecture family, keyed on the structure of a block.

A plan knows how to split one kind of transformer block over a tensor-parallel mesh
(Megatron: column-parallel input projections, row-parallel output projections, so each
attention/MLP sub-layer costs one all-reduce in forward and one in backward). The model
code stays plain: the plan swaps or annotates sub-modules from outside, torchtitan-style.

Built in: :class:`SelfAttentionMLPPlan` for blocks whose ``.attn`` is lmkit's
:class:`~lmkit.models.layers.SelfAttention` (fused ``qkv``) and whose ``.mlp`` is
:class:`~lmkit.models.layers.MLP`, without cross-attention: the GPT decoder block (and
structurally identical pre/post-LN encoder blocks); :class:`LlamaPlan` for llama blocks
(grouped-query attention, gated MLP). Other families (T5's relative-bias
attention and gated MLP, encoder–decoder blocks with cross-attention) are added by
registering a plan with :func:`register_plan`; until then :func:`plan_for` raises a
:class:`~lmkit.errors.ConfigError` naming the architecture and the block it cannot split.

Checkpoints stay in the plain model's layout: a plan that changes parameter names (the
fused ``qkv`` becomes ``q``, ``k``, ``v``) returns :class:`~lmkit_fsdp.layout.Fusion`
records, and the strategy fuses them back whenever it writes a checkpoint.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.errors import ConfigError
from lmkit_fsdp.layout import Fusion


class TensorParallelPlan(Protocol):
    """What a per-family tensor-parallel plan provides."""

    name: str

    def matches(self, block: nn.Module) -> bool:
        """True when this plan can split ``block``."""

    def check(self, block: nn.Module, tp: int) -> list[str]:
        """Problems (empty = fine) with splitting ``block`` over ``tp`` ranks, e.g. heads not divisible."""

    def parallelize_block(self, block: nn.Module, tp_mesh) -> list[Fusion]:
        """Split ``block`` in place over ``tp_mesh``; return the renamed parameters (names relative to ``block``)."""


_PLANS: list[TensorParallelPlan] = []


def register_plan(plan: TensorParallelPlan, first: bool = False) -> None:
    """Make ``plan`` available to ``strategy=fsdp_tp`` (``first=True``: tried before the built-ins)."""
    if any(p.name == plan.name for p in _PLANS):
        return
    if first:
        _PLANS.insert(0, plan)
    else:
        _PLANS.append(plan)


def plans() -> list[TensorParallelPlan]:
    return list(_PLANS)


def describe_block(block: nn.Module) -> str:
    parts = [type(block).__name__]
    for name in ("attn", "cross_attn", "mlp"):
        sub = getattr(block, name, None)
        if sub is not None:
            parts.append(f"{name}={type(sub).__name__}")
    return "(" + ", ".join(parts) + ")"


def plan_for(model: nn.Module, tp: int, arch_name: str | None = None) -> TensorParallelPlan:
    """The plan that splits every block of ``model`` over ``tp`` ranks, or a ConfigError saying why none does."""
    arch = arch_name or type(model).__name__
    if not hasattr(model, "transformer_blocks"):
        raise ConfigError(f"tensor parallelism needs model.transformer_blocks(); architecture '{arch}' has none")
    blocks = model.transformer_blocks()
    if not blocks:
        raise ConfigError(f"architecture '{arch}' has no transformer blocks to split for tensor parallelism")
    seen: set[int] = set()
    for block in blocks:
        ids = {id(p) for p in block.parameters()}
        if ids & seen:
            raise ConfigError(
                f"strategy=fsdp_tp: architecture '{arch}' shares layers between its blocks (cross-layer parameter "
                f"sharing, as in ALBERT); tensor parallelism of shared layers is not supported. Use strategy=fsdp."
            )
        seen |= ids
    chosen = None
    for plan in _PLANS:
        if all(plan.matches(b) for b in blocks):
            chosen = plan
            break
    if chosen is None:
        odd = next(b for b in blocks if not any(p.matches(b) for p in _PLANS))
        known = "; ".join(f"{p.name}: {getattr(p, 'description', '')}" for p in _PLANS)
        raise ConfigError(
            f"strategy=fsdp_tp: tensor parallelism is not supported for architecture '{arch}': no plan splits its "
            f"block {describe_block(odd)}. Supported block structures: {known}. Use strategy=fsdp (no tensor "
            f"parallelism) for this architecture, or register a plan with lmkit_fsdp.families.register_plan()."
        )
    problems: list[str] = []
    for block in blocks:
        for p in chosen.check(block, tp):
            if p not in problems:
                problems.append(p)
    if problems:
        raise ConfigError(f"strategy.tensor_parallel_size={tp} does not fit architecture '{arch}': "
                          + "; ".join(problems) + ". Choose a tensor_parallel_size that divides them.")
    return chosen


# --- the GPT-style family -----------------------------------------------------------------


class TensorParallelSelfAttention(nn.Module):
    """Self-attention with separate ``q``, ``k``, ``v`` projections and this rank's heads only.

    Built from a fused :class:`~lmkit.models.layers.SelfAttention` (the weights are copied
    from the ``qkv`` rows). Under tensor parallelism ``q``/``k``/``v`` are column-parallel,
    so each rank computes ``n_head / tp`` whole heads, and ``proj`` is row-parallel (its
    all-reduce restores the full hidden state). The head count is read from the local
    projection width, so the same module also runs unsplit.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        fused: nn.Linear = attn.qkv
        D = fused.in_features
        bias = fused.bias is not None
        factory = {"device": fused.weight.device, "dtype": fused.weight.dtype}
        self.q = nn.Linear(D, D, bias=bias, **factory)
        self.k = nn.Linear(D, D, bias=bias, **factory)
        self.v = nn.Linear(D, D, bias=bias, **factory)
        if not fused.weight.is_meta:
            with torch.no_grad():
                for i, lin in enumerate((self.q, self.k, self.v)):
                    lin.weight.copy_(fused.weight[i * D:(i + 1) * D])
                    if bias:
                        lin.bias.copy_(fused.bias[i * D:(i + 1) * D])
        self.proj = attn.proj
        self.n_head = attn.n_head
        self.head_dim = D // attn.n_head
        self.dropout = attn.dropout

    def forward(self, x, mask=None, is_causal=False, position_bias=None):
        if position_bias is not None:
            raise NotImplementedError("TensorParallelSelfAttention does not take a position bias")
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SelfAttentionMLPPlan:
    """Blocks with lmkit's fused-qkv ``SelfAttention`` and ``MLP`` and no cross-attention (GPT).

    ``attn.qkv`` is split into ``attn.q``/``attn.k``/``attn.v`` (column-parallel: each rank
    gets whole heads of q, k and v, never a mix), ``attn.proj`` is row-parallel;
    ``mlp.fc`` column-parallel, ``mlp.proj`` row-parallel. Layer norms, embeddings and the
    LM head stay replicated over the tensor-parallel ranks (and sharded by FSDP).
    """

    name = "self_attention_mlp"
    description = "blocks with a fused-qkv SelfAttention as .attn and an MLP as .mlp, no cross-attention (GPT)"

    def matches(self, block: nn.Module) -> bool:
        from lmkit.models.layers import MLP, SelfAttention

        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        return (type(attn) in (SelfAttention, TensorParallelSelfAttention) and type(mlp) is MLP
                and getattr(block, "cross_attn", None) is None)

    def check(self, block: nn.Module, tp: int) -> list[str]:
        problems = []
        n_head = block.attn.n_head
        d_model = block.attn.proj.out_features
        d_ff = block.mlp.fc.out_features
        if n_head % tp:
            problems.append(f"n_head={n_head} is not divisible by {tp}")
        if d_model % tp:
            problems.append(f"d_model={d_model} is not divisible by {tp}")
        if d_ff % tp:
            problems.append(f"the MLP width d_ff={d_ff} is not divisible by {tp}")
        return problems

    def parallelize_block(self, block: nn.Module, tp_mesh) -> list[Fusion]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        fusions = []
        if type(block.attn) is not TensorParallelSelfAttention:
            bias = block.attn.qkv.bias is not None
            block.attn = TensorParallelSelfAttention(block.attn)
            fusions.append(Fusion("attn.qkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")))
            if bias:
                fusions.append(Fusion("attn.qkv.bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias")))
        parallelize_module(block, tp_mesh, {
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(),
        })
        return fusions


register_plan(SelfAttentionMLPPlan())


# --- the Llama family ---------------------------------------------------------------------


class LlamaPlan:
    """Blocks with lmkit's llama attention (separate ``q``/``k``/``v``, grouped-query) and gated MLP.

    ``attn.q``/``attn.k``/``attn.v`` column-parallel (each rank gets ``n_head / tp`` query heads
    and the ``n_kv_head / tp`` key/value heads they read: query head ``h`` uses kv head
    ``h // (n_head / n_kv_head)``, so contiguous slices of both stay together), ``attn.proj``
    row-parallel; ``mlp.gate``/``mlp.fc`` column-parallel, ``mlp.proj`` row-parallel. Rotary
    positions and RMSNorms act per head / on the replicated hidden state. No parameter is
    renamed, so checkpoints need no fusion.
    """

    name = "llama"
    description = ("blocks with a grouped-query attention (q, k, v, proj) as .attn and a gated MLP "
                   "(gate, fc, proj) as .mlp (llama)")

    def matches(self, block: nn.Module) -> bool:
        from lmkit.models.layers import GatedMLP
        from lmkit.models.llama import GroupedQueryAttention

        return (type(getattr(block, "attn", None)) is GroupedQueryAttention
                and type(getattr(block, "mlp", None)) is GatedMLP and getattr(block, "cross_attn", None) is None)

    def check(self, block: nn.Module, tp: int) -> list[str]:
        problems = []
        attn = block.attn
        for what, n in (("n_head", attn.n_head), ("n_kv_head", attn.n_kv_head),
                        ("the MLP width d_ff", block.mlp.fc.out_features)):
            if n % tp:
                problems.append(f"{what}={n} is not divisible by {tp}")
        return problems

    def parallelize_block(self, block: nn.Module, tp_mesh) -> list[Fusion]:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(block, tp_mesh, {
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.gate": ColwiseParallel(), "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
        })
        return []


register_plan(LlamaPlan())
