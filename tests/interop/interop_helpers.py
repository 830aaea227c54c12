"""Shared by the interop tests: offline transformers, tiny models, logits of lmkit vs HF."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norms and biases (initialised to 1 and 0, they would hide a swapped or dropped tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "ln" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def hf_model(out_dir, auto_class: str):
    return getattr(transformers, auto_class).from_pretrained(str(out_dir)).eval()


def batch(vocab: int, B: int = 2, T: int = 24, pad_from: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    pad = torch.ones(B, T, dtype=torch.bool)
    if pad_from is not None:
        pad[-1, pad_from:] = False  # right padding in the last row
    return ids, pad


def max_logit_diff(model, hf, ids, pad, token_type_ids=None, dec=None, dec_pad=None) -> float:
    """max |lmkit logits - HF logits| over real (unpadded) positions, fp32."""
    with torch.no_grad():
        if model.kind == "encoder_decoder":
            a = model.logits(model(ids, padding_mask=pad, decoder_input_ids=dec, decoder_padding_mask=dec_pad))
            b = hf(input_ids=ids, attention_mask=pad.long(), decoder_input_ids=dec,
                   decoder_attention_mask=None if dec_pad is None else dec_pad.long()).logits
            keep = torch.ones_like(dec, dtype=torch.bool) if dec_pad is None else dec_pad
        else:
            kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            a = model.logits(model(ids, padding_mask=pad, **kwargs))
            out = hf(input_ids=ids, attention_mask=pad.long(), **kwargs)
            b = out.logits if hasattr(out, "logits") else out.prediction_logits
            keep = pad
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b)[keep].abs().max().item()


def same_state(a: dict, b: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """Names whose tensors differ (bit for bit) or exist on one side only."""
    keys = {k for k in set(a) | set(b) if not k.startswith(skip)}
    return sorted(k for k in keys if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]))


def first_val_loss_gap(built, hf_dir) -> float:
    """|lmkit's loss - the HF causal LM's loss| on the first validation micro-batch of a built run (``lmkit.api.build``)."""
    dm, module = built.datamodule, built.module
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))["micro_batches"][0]
    module.eval()
    with torch.no_grad():
        out = module.objective.loss(module.model, batch)
        logits = hf_model(hf_dir, "AutoModelForCausalLM")(input_ids=batch["input_ids"]).logits
        hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    return abs(out.loss_sum / out.n_targets - hf_loss).item()
