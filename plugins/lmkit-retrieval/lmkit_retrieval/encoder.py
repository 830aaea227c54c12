"""The frozen encoder that embeds chunks: mean-pooled last hidden states (RETRO's time-averaged BERT).

Any model :func:`lmkit.generation.read_model` reads serves: an lmkit run directory or checkpoint
of any architecture (encoder, decoder, encoder–decoder: its encoder's states), or a local
Hugging Face directory. The embedding of a token sequence is the mean of the model's last
hidden states over its real tokens (padding excluded).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from lmkit.errors import ConfigError


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, bytes): it changes whenever the embeddings may change."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ChunkEncoder:
    """A frozen model in eval mode that maps token rows to mean-pooled embeddings.

    ``path``: the run / checkpoint / HF directory it was read from (recorded in a store's
    manifest); ``fingerprint``: :func:`model_fingerprint`; ``d``: the embedding size.
    """

    def __init__(self, model, tokenizer, path: str, device: str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.path = path
        self.device = torch.device(device)
        self.fingerprint = model_fingerprint(self.model)
        self.d = int(model.d_model)
        self.max_len = getattr(model, "max_seq_len", None)

    @classmethod
    def load(cls, path, device: str = "cpu") -> "ChunkEncoder":
        from lmkit.generation import read_model

        model, tokenizer, _, _ = read_model(path)
        return cls(model, tokenizer, str(Path(path).resolve()), device)

    def check_length(self, length: int, key: str = "chunk_len") -> None:
        if self.max_len is not None and length > self.max_len:
            raise ConfigError(f"{key}={length} is longer than the encoder's max_seq_len={self.max_len} "
                              f"({self.path}); use a shorter {key} or another encoder")

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, T, d] of ``ids`` [B, T] (``mask``: bool, True = real token; None = all real)."""
        if getattr(self.model, "kind", None) == "encoder_decoder":
            return self.model.encode(ids, padding_mask=mask)
        return self.model(ids, padding_mask=mask)

    @torch.inference_mode()
    def embed(self, ids, mask=None) -> np.ndarray:
        """float32 [B, d]: the mean of the last hidden states over each row's real tokens (``mask`` None: all
        tokens are real, as in a store's chunks; the model then runs without a padding mask, which is faster)."""
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
        if mask is None:
            return self.hidden(ids).float().mean(1).cpu().numpy()
        mask = torch.as_tensor(mask, device=self.device)
        w = mask.unsqueeze(-1).float()
        pooled = (self.hidden(ids, mask).float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        return pooled.cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), d] of whole texts (each cut to the encoder's max_seq_len)."""
        from lmkit.generation import encode_text

        rows = [encode_text(self.tokenizer, t)[: self.max_len or None] for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ConfigError("a query has no tokens: give some text, e.g. query=\"To be, or not to be\"")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, r in enumerate(rows):  # one row per query text (not per token)
            ids[i, :len(r)] = r
            mask[i, :len(r)] = True
        return self.embed(ids, mask)
