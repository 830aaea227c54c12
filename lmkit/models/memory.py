"""Segment-level recurrence memory (Transformer-XL, XLNet), kept per split.

A model with recurrence holds one :class:`StreamMemory` as its ``stream_memory`` attribute: the
per-layer hidden states of the segments it saw last, with stop-gradient, which the next segment
attends over. The training loop (:class:`lmkit.module.LMModule`) sets its ``mode``: ``"train"``
during training steps, ``"val"`` during validation (reset at the start of each validation
epoch), ``None`` everywhere else, so that evaluation, generation, scoring and tests are stateless
and unrelated requests never see each other's states. The memory only makes sense when row r of
each batch continues row r of the previous one: such models set ``stream_order = True`` and the
data module then serves stream-ordered batches (:mod:`lmkit.data.sampler`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class StreamMemory:
    """Recurrence memory of one model, kept per split (``"train"``, ``"val"``).

    ``mode`` None (the default) is stateless: :meth:`read` gives None and :meth:`write` does
    nothing. Otherwise :meth:`read` gives the current mode's per-layer memories [B, M', D]
    (M' <= ``length``) and :meth:`write` appends new states, keeping the last ``length``.
    Only the ``"train"`` memory is saved (:meth:`state_dict`, through the model's
    ``get_extra_state``): a resumed run goes on with the memory the interrupted one had.
    """

    def __init__(self, length: int):
        if length < 0:
            raise ValueError(f"memory length must be >= 0, got {length}")
        self.length = length
        self.mode: str | None = None
        self._memories: dict[str, list[torch.Tensor]] = {}

    def read(self, batch_size: int) -> list[torch.Tensor] | None:
        """The current mode's per-layer memories, or None (no mode, nothing stored, another batch size)."""
        if self.mode is None:
            return None
        layers = self._memories.get(self.mode)
        if not layers or layers[0].shape[0] != batch_size:
            return None
        return layers

    def write(self, layers: list[torch.Tensor]) -> None:
        """Per layer: ``cat(previous memory, new states)[:, -length:]``, detached, for the current mode."""
        if self.mode is None or self.length == 0 or not layers:
            return
        previous = self.read(layers[0].shape[0])
        if previous is not None:
            layers = [torch.cat([m.to(h), h], dim=1) for m, h in zip(previous, layers)]
        self._memories[self.mode] = [h[:, -self.length:].detach() for h in layers]

    def reset(self, mode: str) -> None:
        """Forget ``mode``'s memory (the mode itself is set through :attr:`mode`)."""
        self._memories.pop(mode, None)

    def state_dict(self) -> dict:
        """The ``"train"`` memory (on CPU), with the data-parallel rank that holds it.

        Each rank has its own memory but a checkpoint holds rank 0's model state: another rank
        restored from it starts with an empty memory (see :meth:`load_state_dict`).
        """
        layers = self._memories.get("train") or []
        return {"train": [m.detach().cpu() for m in layers], "rank": _rank(), "length": self.length}

    def load_state_dict(self, state: dict) -> None:
        """Restore the ``"train"`` memory (kept only on the rank that saved it, and cut to ``length``)."""
        self._memories.pop("train", None)
        layers = list(state.get("train") or [])
        if layers and int(state.get("rank", 0)) == _rank() and self.length > 0:
            self._memories["train"] = [m[:, -self.length:] for m in layers]
