"""Switch-routing mixture-of-experts feed-forward layer (Switch Transformer / ST-MoE).

The layer maps ``[..., D] -> [..., D]`` like the dense MLP it replaces. One forward:

1. **Route** (:class:`Router`): logits in float32 even under autocast ("selective
   precision"), multiplicative jitter on the router input in training only, softmax,
   top-k (k=1: the switch gate is the chosen expert's probability; k>1: the k gates are
   renormalized to sum to 1).
2. **Capacity**: ``ceil(k · tokens / experts · capacity_factor)`` per expert, ``tokens``
   being the batch's non-padding tokens. Assignments are ranked slot-major (every token's
   first choice before any second choice), then in token order; overflow is dropped, so
   the layer outputs zero for a dropped token and the block's residual carries it.
   ``dropless=True`` keeps every assignment.
3. **Dispatch**: a stable sort groups the kept assignments per expert; the experts run as
   two grouped GEMMs over the sorted rows (``torch._grouped_mm`` where it is present,
   passes a correctness probe on the device/dtype and is the faster choice, i.e. CUDA;
   else a padded batched ``bmm``). No Python loop over tokens or experts. With expert
   parallelism the sorted rows go through ``all_to_all_single`` (see :mod:`lmkit_moe.parallel`).
4. **Combine**: each kept row is scaled by its gate and written back to its token
   (deterministic: no atomic adds).

Auxiliary losses (over non-padding tokens only), from :func:`load_balancing_loss` and
:func:`router_z_loss`, weighted, are exposed by ``lmkit_aux_losses()`` for
``lmkit.models.base.collect_aux_losses``; ``lmkit_metrics()`` gives expert load, dropped
fraction and the two losses of the latest forward.
"""
from __future__ import annotations

import copy
import functools
import math
import torch
import torch.nn.functional as F
from torch import nn

from lmkit.errors import ConfigError

DISPATCH_MODES = ("auto", "grouped_mm", "bmm")


class MoEConfigError(ConfigError, ValueError):
    """An invalid mixture-of-experts setting (a ``ValueError`` and an lmkit ``ConfigError``)."""


def validate_moe_args(
    num_experts: int,
    top_k: int = 1,
    capacity_factor: float = 1.25,
    eval_capacity_factor: float = 2.0,
    jitter: float = 0.0,
    dispatch: str = "auto",
    every: int = 1,
) -> None:
    """Raise :class:`MoEConfigError` (a ValueError) for settings that cannot work."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise MoEConfigError(f"moe.num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise MoEConfigError(f"moe.top_k must be a positive int, got {top_k!r}")
    if top_k > num_experts:
        raise MoEConfigError(
            f"moe.top_k={top_k} is larger than moe.num_experts={num_experts}; "
            "a token cannot be routed to more experts than exist")
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
            raise MoEConfigError(
                f"moe.{name} must be a finite number > 0, got {value!r} "
                "(use moe.dropless=true to never drop tokens)")
    if not 0.0 <= jitter < 1.0:
        raise MoEConfigError(f"moe.jitter must be in [0, 1), got {jitter!r}")
    if dispatch not in DISPATCH_MODES:
        raise MoEConfigError(f"moe.dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
    if not isinstance(every, int) or every < 1:
        raise MoEConfigError(f"moe.every must be a positive int, got {every!r}")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, top_k: int = 1) -> int:
    """``ceil(top_k · num_tokens / num_experts · capacity_factor)``, at least 1 when there are tokens."""
    if num_tokens <= 0:
        return 0
    # Subtract a hair so that exact products (8 / 4 · 2.0) do not round up through float error.
    return max(1, math.ceil(top_k * num_tokens * capacity_factor / num_experts - 1e-9))


# --------------------------------------------------------------------------- losses

def load_balancing_loss(
    probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss ``N · Σᵢ fᵢ · Pᵢ`` (unweighted: multiply by α).

    ``probs`` [T, N] router probabilities; ``expert_index`` [T, k] chosen experts;
    ``valid`` optional bool [T], False for padding tokens, which are left out of both
    ``fᵢ`` (fraction of the k·T assignments sent to expert i) and ``Pᵢ`` (mean probability).
    Uniform routing gives 1; every token on one expert with probability 1 gives N.
    """
    probs = probs.float()
    k = expert_index.shape[-1]
    if valid is None:
        n = probs.shape[0]
        p_mean = probs.sum(0)
        counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)
    else:
        valid = valid.reshape(-1).bool()
        n = valid.sum()
        p_mean = (probs * valid[:, None]).sum(0)
        idx = expert_index.masked_fill(~valid[:, None], num_experts)
        counts = torch.bincount(idx.reshape(-1), minlength=num_experts + 1)[:num_experts]
    denom = torch.as_tensor(n, device=probs.device).clamp(min=1).float()
    f = counts.float() / (denom * k)
    return num_experts * (f * (p_mean / denom)).sum()


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (non-padding) tokens of ``logsumexp(logits)²`` (unweighted)."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    if valid is None:
        return z.mean()
    valid = valid.reshape(-1).bool()
    return (z * valid).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- grouped GEMM

def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch._grouped_mm(a, b, offs=offs)
    if out.requires_grad:
        # The CPU backward rejects non-contiguous (e.g. expanded) incoming gradients.
        out.register_hook(lambda g: g.contiguous())
    return out


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` exists and gives correct values and gradients here.

    Probed once per (device, dtype) on a small problem with an empty group and the
    transposed weight layout the layer uses, against a per-group matmul reference.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(48, 32, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(3, 16, 32, generator=gen).to(device, dtype).requires_grad_()  # [E, out, in]
        g = torch.randn(48, 16, generator=gen).to(device, dtype)
        counts = [16, 0, 32]
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        y = _grouped_mm(x, w.transpose(-2, -1), offs)
        (gx, gw) = torch.autograd.grad(y, (x, w), g)
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        parts, start = [], 0
        for e, c in enumerate(counts):
            parts.append(xr[start:start + c] @ wr[e].t())
            start += c
        yr = torch.cat(parts)
        (gxr, gwr) = torch.autograd.grad(yr, (xr, wr), g.float())
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        return all(
            torch.allclose(a.float(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
            for a, b in ((y, yr), (gx, gxr), (gw, gwr))
        )
    except Exception:  # noqa: BLE001 - any failure means "use the fallback"
        return False


class GroupedExperts(nn.Module):
    """``num_experts`` two-layer FFNs stored as stacked weights, run on expert-sorted rows.

    Parameters follow ``nn.Linear`` layout: ``fc_weight`` [E, d_ff, d_model],
    ``proj_weight`` [E, d_model, d_ff] (+ ``fc_bias``/``proj_bias``). ``gated=True`` adds
    ``gate_weight`` [E, d_ff, d_model] (+ ``gate_bias``) and computes
    ``proj(act(gate(x)) * fc(x))``, the GLU form of :class:`~lmkit.models.layers.GatedMLP`
    (Llama's SwiGLU). Under expert parallelism a rank holds only its slice of experts
    (``first_expert`` onwards).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: nn.Module | None = None,
                 bias: bool = True, dispatch: str = "auto", gated: bool = False):
        super().__init__()
        self.num_experts = num_experts  # experts held by this module (local ones under EP)
        self.total_experts = num_experts
        self.first_expert = 0
        self.d_model, self.d_ff = d_model, d_ff
        self.dispatch = dispatch
        self.grad_scale = 1.0
        self.act = activation if activation is not None else nn.GELU(approximate="tanh")
        self.fc_weight = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.proj_weight = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.fc_bias = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.proj_bias = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.gated = gated
        self.gate_weight = nn.Parameter(torch.empty(num_experts, d_ff, d_model)) if gated else None
        self.gate_bias = nn.Parameter(torch.zeros(num_experts, d_ff)) if gated and bias else None
        self.reset_parameters()

    def reset_parameters(self, fc_std: float = 0.02, proj_std: float = 0.02) -> None:
        nn.init.normal_(self.fc_weight, std=fc_std)
        nn.init.normal_(self.proj_weight, std=proj_std)
        if self.gate_weight is not None:
            nn.init.normal_(self.gate_weight, std=fc_std)
        for b in (self.fc_bias, self.proj_bias, self.gate_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}/{self.total_experts} (first={self.first_expert}), "
                f"d_model={self.d_model}, d_ff={self.d_ff}, dispatch={self.dispatch}" + (", gated" if self.gated else ""))

    def use_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        """``dispatch="auto"``: grouped GEMM on CUDA where the probe passes and rows are
        16-byte aligned. Not on CPU: there (torch 2.13) ``_grouped_mm`` is correct but
        measured 2-4x slower than the padded ``bmm`` (tools/bench_moe.py)."""
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        if device.type != "cuda":
            return False
        if self.d_model * dtype.itemsize % 16 or self.d_ff * dtype.itemsize % 16:
            return False  # CUDA kernels need 16-byte aligned rows
        return grouped_mm_supported(device.type, device.index, dtype)

    def _params(self, dtype: torch.dtype):
        params = [self.fc_weight, self.fc_bias, self.proj_weight, self.proj_bias, self.gate_weight, self.gate_bias]
        out = []
        for p in params:
            if p is None:
                out.append(None)
                continue
            if self.grad_scale != 1.0:
                p = _ScaleGrad.apply(p, self.grad_scale)
            out.append(p.to(dtype))
        return out

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` [M, D] rows grouped by expert (expert 0's rows first); ``counts`` [E] rows per expert."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        w1, b1, w2, b2, wg, bg = self._params(dtype)
        m = x.shape[0]
        counts = counts.to(device=x.device, dtype=torch.long)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x.device), counts, output_size=m)
        if self.use_grouped_mm(x.device, dtype):
            offs = counts.cumsum(0).to(torch.int32)
            h = _grouped_mm(x, w1.transpose(-2, -1), offs)
            if b1 is not None:
                h = h + b1[expert_of_row]
            if wg is None:
                h = self.act(h)
            else:
                g = _grouped_mm(x, wg.transpose(-2, -1), offs)
                h = self.act(g if bg is None else g + bg[expert_of_row]) * h
            y = _grouped_mm(h, w2.transpose(-2, -1), offs)
            if b2 is not None:
                y = y + b2[expert_of_row]
            return y
        # Fallback: scatter rows into a padded [E, C, D] buffer and use batched matmuls.
        cap = int(counts.max()) if m else 0
        starts = counts.cumsum(0) - counts
        dest = expert_of_row * cap + torch.arange(m, device=x.device) - starts[expert_of_row]
        buf = x.new_zeros(self.num_experts * cap, self.d_model).index_copy(0, dest, x)
        buf = buf.view(self.num_experts, cap, self.d_model)
        h = torch.bmm(buf, w1.transpose(1, 2))
        if b1 is not None:
            h = h + b1[:, None, :]
        if wg is None:
            h = self.act(h)
        else:
            g = torch.bmm(buf, wg.transpose(1, 2))
            h = self.act(g if bg is None else g + bg[:, None, :]) * h
        y = torch.bmm(h, w2.transpose(1, 2))
        if b2 is not None:
            y = y + b2[:, None, :]
        return y.reshape(self.num_experts * cap, self.d_model)[dest]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``scale`` (expert grads under expert parallelism)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


# --------------------------------------------------------------------------- router

class Router(nn.Module):
    """Linear router without bias; returns float32 logits whatever the autocast state."""

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.weight.float())


# --------------------------------------------------------------------------- layer

class MaskSource:
    """Holds the padding masks of the current model call (filled by ``apply_moe``'s hook)."""

    def __init__(self):
        self.masks: dict[str, torch.Tensor | None] = {}


class MoELayer(nn.Module):
    """Mixture-of-experts FFN, a drop-in for a block's ``.mlp`` ([..., D] -> [..., D])."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        top_k: int = 1,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        dropless: bool = False,
        jitter: float = 0.01,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 1e-3,
        activation: nn.Module | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        dispatch: str = "auto",
        router_init_std: float = 0.02,
        gated: bool = False,
    ):
        super().__init__()
        validate_moe_args(num_experts, top_k, capacity_factor, eval_capacity_factor, jitter, dispatch)
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = float(capacity_factor), float(eval_capacity_factor)
        self.dropless = dropless
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = Router(d_model, num_experts, jitter, router_init_std)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation, bias, dispatch, gated)
        self.drop = nn.Dropout(dropout)
        # Expert parallelism (set by lmkit_moe.parallel.apply_expert_parallel).
        self.ep_group = None
        self.ep_size = 1
        # Padding: an explicit ``padding_mask`` argument wins; else ``mask_source.masks[mask_key]``.
        self.mask_source: MaskSource | None = None
        self.mask_key = "padding_mask"
        self._last: dict | None = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, **kwargs) -> "MoELayer":
        """Size an MoE layer from a dense MLP with ``fc``/``proj`` Linears (lmkit's ``MLP``).

        Takes d_model, d_ff, bias, activation and dropout from ``mlp``; experts are drawn
        with the standard deviations of the dense weights, so the architecture's init
        scheme (e.g. GPT-2's scaled residual projection) carries over. A gated MLP (a ``gate``
        Linear besides ``fc``: :class:`~lmkit.models.layers.GatedMLP`, Llama's SwiGLU) gives
        gated experts.
        """
        fc, proj = getattr(mlp, "fc", None), getattr(mlp, "proj", None)
        if not isinstance(fc, nn.Linear):
            raise MoEConfigError(
                f"cannot size an MoE layer from {type(mlp).__name__}: it has no `fc` nn.Linear "
                "(already an MoE layer, or an MLP this plugin does not know)")
        act = getattr(mlp, "act", None)
        kwargs.setdefault("activation", copy.deepcopy(act) if isinstance(act, nn.Module) else None)
        kwargs.setdefault("bias", fc.bias is not None)
        kwargs.setdefault("gated", isinstance(getattr(mlp, "gate", None), nn.Linear))
        drop = getattr(mlp, "drop", None)
        kwargs.setdefault("dropout", drop.p if isinstance(drop, nn.Dropout) else 0.0)
        layer = cls(fc.in_features, fc.out_features, num_experts, **kwargs)
        with torch.no_grad():
            fc_std = fc.weight.float().std().item()
            proj_std = proj.weight.float().std().item() if isinstance(proj, nn.Linear) else fc_std
            layer.experts.reset_parameters(fc_std or 0.02, proj_std or 0.02)
        return layer.to(device=fc.weight.device, dtype=fc.weight.dtype)

    def extra_repr(self) -> str:
        cap = "dropless" if self.dropless else f"capacity_factor={self.capacity_factor}/{self.eval_capacity_factor}"
        return f"top_k={self.top_k}, {cap}, ep_size={self.ep_size}"

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for ``num_tokens`` (non-padding) tokens; None when dropless."""
        if self.dropless:
            return None
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, cf, self.top_k)

    def _resolve_mask(self, padding_mask, lead_shape) -> torch.Tensor | None:
        if padding_mask is None and self.mask_source is not None:
            padding_mask = self.mask_source.masks.get(self.mask_key)
        if padding_mask is None:
            return None
        if tuple(padding_mask.shape) != tuple(lead_shape):
            raise ValueError(
                f"MoE layer got a {self.mask_key} of shape {tuple(padding_mask.shape)} for hidden states "
                f"of leading shape {tuple(lead_shape)}; the mask must be bool [B, T], True for real tokens")
        return padding_mask.bool()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        mask = self._resolve_mask(padding_mask, shape[:-1])
        xf = x.reshape(-1, shape[-1])
        n, k, E = xf.shape[0], self.top_k, self.num_experts

        logits = self.router(xf)                      # [N, E] float32
        probs = logits.softmax(dim=-1)
        top_p, top_e = probs.topk(k, dim=-1)          # [N, k]
        gates = top_p if k == 1 else top_p / top_p.sum(-1, keepdim=True)
        valid = mask.reshape(-1) if mask is not None else None
        n_valid = n if valid is None else int(valid.sum())

        # Assignments, slot-major: assignment a = s·N + t is token t's s-th choice.
        a_expert = top_e.t().reshape(-1)
        if valid is not None:
            a_expert = a_expert.masked_fill(~valid.repeat(k), E)   # padding -> "no expert" E
        counts_all = torch.bincount(a_expert, minlength=E + 1)     # [E+1]
        order = torch.argsort(a_expert, stable=True)               # expert-major, priority kept
        sorted_e = a_expert[order]
        starts = counts_all.cumsum(0) - counts_all
        pos = torch.arange(a_expert.numel(), device=xf.device) - starts[sorted_e]
        keep = sorted_e < E
        capacity = self.capacity(n_valid)
        counts = counts_all[:E]
        if capacity is not None:
            keep &= pos < capacity
            counts = counts.clamp(max=capacity)
        slots = order[keep]                                          # kept assignments, grouped by expert
        tokens = slots % n if n else slots
        x_rows = xf[tokens]
        gate_rows = gates.t().reshape(-1)[slots]

        if self.ep_group is None:
            y_rows = self.experts(x_rows, counts)
        else:
            from lmkit_moe.parallel import expert_parallel_apply
            y_rows = expert_parallel_apply(self.experts, x_rows, counts, self.ep_group)

        y_rows = y_rows * gate_rows.to(y_rows.dtype)[:, None]
        out = y_rows.new_zeros(k * n, shape[-1]).index_copy(0, slots, y_rows)
        if k > 1:
            out = out.view(k, n, shape[-1]).sum(0)

        self._last = {
            "aux": load_balancing_loss(probs, top_e, E, valid),
            "z": router_z_loss(logits, valid),
            "routed": counts_all[:E].detach(),
            "kept": counts.detach(),
            "assignments": n_valid * k,
            "capacity": capacity,
        }
        return self.drop(out).view(shape)

    # -- lmkit hooks -------------------------------------------------------------

    def lmkit_aux_losses(self) -> dict[str, torch.Tensor]:
        """Weighted aux terms of the latest forward (``collect_aux_losses`` averages them over layers)."""
        if self._last is None:
            return {}
        return {"moe_aux_loss": self.aux_loss_coef * self._last["aux"],
                "moe_z_loss": self.z_loss_coef * self._last["z"]}

    def lmkit_metrics(self) -> dict[str, torch.Tensor]:
        """Detached scalars of the latest forward: weighted losses, dropped fraction, per-expert load.

        ``expert_load/i`` is the fraction of (non-padding) assignments the router sent to
        expert i before capacity; ``dropped_fraction`` the fraction that overflowed.
        """
        if self._last is None:
            return {}
        last = self._last
        total = max(last["assignments"], 1)
        routed = last["routed"].float()
        out = {
            "aux_loss": (self.aux_loss_coef * last["aux"]).detach(),
            "z_loss": (self.z_loss_coef * last["z"]).detach(),
            "dropped_fraction": (routed.sum() - last["kept"].sum().float()) / total,
        }
        load = routed / total
        for i in range(self.num_experts):
            out[f"expert_load/{i}"] = load[i]
        return out

    def reset_stats(self) -> None:
        """Forget the latest forward (frees the graph that the stored losses hold)."""
        self._last = None


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``(qualified name, layer)`` for every :class:`MoELayer` in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def moe_metrics(model: nn.Module, prefix: str = "moe/") -> dict[str, torch.Tensor]:
    """Per-layer metrics, keyed ``{prefix}{layer name}/{metric}``, plus layer means of the
    dropped fraction and the two losses under ``{prefix}{metric}``."""
    out: dict[str, torch.Tensor] = {}
    sums: dict[str, list[torch.Tensor]] = {}
    for name, layer in moe_layers(model):
        for key, value in layer.lmkit_metrics().items():
            out[f"{prefix}{name}/{key}"] = value
            if "/" not in key:
                sums.setdefault(key, []).append(value)
    for key, values in sums.items():
        out[f"{prefix}{key}"] = torch.stack(values).mean()
    return out

