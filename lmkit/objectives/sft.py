"""Supervised fine-tuning (InstructGPT's SFT step; UniLM's seq2seq fine-tuning for encoders).

Cross-entropy on demonstrations with the loss on the response tokens only, plus the token
that ends each response (``<eos>``, or the ``[NLU]`` that opens the next turn of a
conversation), so the model learns to stop. The rows come from :mod:`lmkit.data.sft`:
whole examples packed into ``data.seq_len`` tokens, ``[NLU] prompt [S2S] response <eos>``.

* decoders: next-token loss on the response positions, with document masks (no attention
  across the packed examples; positions restart at each example).
* encoders (BERT, ALBERT): UniLM's sequence-to-sequence mask over each packed example
  (prompt tokens see their whole prompt, response tokens see the prompt and the response
  up to themselves), the s2s LM with ``[MASK]``ed targets: each response token (and the
  end token) is replaced by ``[MASK]`` with probability ``mask_prob`` and predicted there.
* encoder–decoders: one example per row, the prompt (all turns up to the last
  ``[S2S]``) to the encoder and the last response plus ``<eos>`` as decoder targets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmkit.data.sft import PROMPT_MARK, RESPONSE_MARK, SFTFormat, check_overlong, sft_source
from lmkit.errors import ConfigError
from lmkit.models.layers import document_ids_from_separators
from lmkit.objectives._common import add_decoder_inputs, check_open_unit, check_special_name, seq2seq_loss
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput, Objective, check_chunked_ce

KINDS = ("decoder", "encoder", "encoder_decoder")


@dataclass
class SFTConfig(SFTFormat):
    """Options of ``sft``: how records are read and prompts written (the fields of
    :class:`lmkit.data.sft.SFTFormat`), and the options below.

    Fields of a jsonl record: ``prompt_field``/``response_field`` (a pair), or
    ``messages_field`` (a list of ``{role_field: ..., content_field: ...}``; messages whose
    role is ``response_role`` are responses, every other message is prompt text).
    ``template``: how a prompt is written, ``{prompt}`` standing for its text.
    ``overlong``: an example longer than ``data.seq_len`` tokens is an ``error``, or is
    ``skip``ped, or ``truncate``d to its first ``seq_len`` tokens (the end of the response
    and its ``<eos>`` are then not learned). ``mask_prob``: encoders only, the share of
    response tokens masked and predicted in each row (UniLM's fine-tuning masks 70%).
    """

    name: str = "sft"
    overlong: str = "error"
    mask_prob: float = 0.7
    decoder_start_token: str = "<pad>"  # encoder–decoders only (T5: <pad>; BART: <eos>)
    chunked_ce: int = 0  # > 0: LM head + cross-entropy fused over chunks of this many tokens

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)
        check_open_unit("mask_prob", self.mask_prob, " (encoders: the share of response tokens masked, e.g. 0.7)")
        check_special_name("decoder_start_token", self.decoder_start_token)
        check_overlong(self.overlong)
        self.check()

    def format(self) -> SFTFormat:
        """The record/prompt options alone (the cache key holds them, not the training options)."""
        return SFTFormat(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SFTFormat)}).check()


# -- which tokens are what (vectorized over [B, L] rows) ---------------------------------------------
def _last_marker_kind(rows: torch.Tensor, marks: tuple[int, int, int], inclusive: bool) -> torch.Tensor:
    """Per position: 1/2/3 when the last ``[NLU]``/``[S2S]``/``<eos>`` at (``inclusive``) or before it is that
    marker, 0 when there is none. ``marks`` = (nlu, s2s, eos) ids."""
    nlu, s2s, eos = marks
    kind = (rows == nlu).long() + 2 * (rows == s2s).long() + 3 * (rows == eos).long()
    B, L = rows.shape
    pos = torch.arange(L).expand(B, L)
    last = torch.where(kind > 0, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    if not inclusive:
        last = torch.cat([torch.full((B, 1), -1, dtype=last.dtype), last[:, :-1]], dim=1)
    return torch.where(last >= 0, kind.gather(1, last.clamp(min=0)), torch.zeros_like(kind))


def response_targets(rows: torch.Tensor, marks: tuple[int, int, int]) -> torch.Tensor:
    """Bool [B, L]: the tokens learned — every token after a ``[S2S]`` up to and including the next marker."""
    return _last_marker_kind(rows, marks, inclusive=False) == 2


def seq2seq_attention(rows: torch.Tensor, marks: tuple[int, int, int]) -> torch.Tensor:
    """Bool [B, L, L] UniLM seq2seq mask of packed examples (True = may attend).

    Query ``q`` sees key ``k`` iff both are in the same example (``<eos>``-separated) and
    ``k <= q``, or both are in the same prompt segment (``[NLU]`` .. ``[S2S]``): prompts are
    bidirectional, responses causal and see their prompt; a prompt never sees its response.
    """
    nlu, s2s, eos = marks
    doc = document_ids_from_separators(rows, eos)
    kind = _last_marker_kind(rows, marks, inclusive=True)
    in_prompt = (kind == 1) | (rows == s2s)
    segment = (rows == nlu).cumsum(dim=1)
    L = rows.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None]
    same_prompt = in_prompt[:, :, None] & in_prompt[:, None, :] & (segment[:, :, None] == segment[:, None, :])
    return (doc[:, :, None] == doc[:, None, :]) & (causal | same_prompt)


# -- collators --------------------------------------------------------------------------------------
class DecoderSFTCollator(Collator):
    """Next-token inputs/labels of packed rows, labels only on response targets; ``document_ids``."""

    def __init__(self, marks):
        self.marks = marks

    def __call__(self, blocks, gen):
        targets = response_targets(blocks, self.marks)
        labels = torch.where(targets[:, 1:], blocks[:, 1:], IGNORE_INDEX)
        inputs = blocks[:, :-1]
        return {"input_ids": inputs, "labels": labels,
                "document_ids": document_ids_from_separators(inputs, self.marks[2])}


class EncoderSFTCollator(Collator):
    """UniLM s2s LM: response targets replaced by ``[MASK]`` with probability ``mask_prob`` and predicted."""

    def __init__(self, marks, mask_id: int, mask_prob: float):
        self.marks, self.mask_id, self.mask_prob = marks, mask_id, mask_prob

    def __call__(self, blocks, gen):
        targets = response_targets(blocks, self.marks)
        chosen = targets & (torch.rand(blocks.shape, generator=gen) < self.mask_prob)
        return {"input_ids": blocks.masked_fill(chosen, self.mask_id),
                "labels": torch.where(chosen, blocks, IGNORE_INDEX),
                "attn_mask": seq2seq_attention(blocks, self.marks),
                "document_ids": document_ids_from_separators(blocks, self.marks[2])}


class Seq2SeqSFTCollator(Collator):
    """One example per row: encoder = the example up to its last ``[S2S]``, targets = last response + ``<eos>``."""

    def __init__(self, marks, start_id: int, pad_id: int):
        self.marks, self.start_id, self.pad_id = marks, start_id, pad_id

    def __call__(self, blocks, gen):
        s2s, eos = self.marks[1], self.marks[2]
        sources, targets = [], []
        for row in blocks:  # a loop over examples (a few per row), never over tokens
            ends = torch.nonzero(row == eos).flatten().tolist()
            start = 0
            for end in ends:
                example, start = row[start:end + 1], end + 1
                marks = torch.nonzero(example == s2s).flatten()
                if not len(marks):  # text without a response (a plain corpus scored by evaluate): nothing to learn
                    continue
                split = int(marks[-1]) + 1
                sources.append(example[:split])
                targets.append(example[split:])
        if not sources:  # rows of padding only (the tail that aligns the validation split): nothing to learn
            sources, targets = [blocks[0, :1]], [torch.full((1,), IGNORE_INDEX, dtype=blocks.dtype)]
        input_ids = _pad(sources, self.pad_id)
        batch = {"input_ids": input_ids, "padding_mask": _pad([torch.ones_like(s, dtype=torch.bool) for s in sources],
                                                               False),
                 "labels": _pad(targets, IGNORE_INDEX)}
        return add_decoder_inputs(batch, self.start_id, self.pad_id)


def _pad(seqs: list[torch.Tensor], value) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


# -- the objective ----------------------------------------------------------------------------------
class SFT(Objective):
    """Supervised fine-tuning on prompt/response examples, loss on the responses only."""

    kinds = KINDS

    @classmethod
    def needs_for(cls, cfg, kind: str | None) -> frozenset[str]:
        """Decoders: document masks; encoders: the UniLM mask (and document positions); encoder–decoders: decoder inputs."""
        return frozenset({"decoder": {"document_ids"}, "encoder": {"attn_mask", "document_ids"},
                          "encoder_decoder": {"decoder_input_ids"}}.get(kind, set()))

    @staticmethod
    def data_source(cfg: SFTConfig, data_cfg, source):
        """The run's data source read as SFT records (called by the training before the tokenizer is built)."""
        return sft_source(cfg.format(), data_cfg, source, cfg.overlong)

    def __init__(self, cfg: SFTConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.marks = (tokenizer.special_id(PROMPT_MARK), tokenizer.special_id(RESPONSE_MARK), tokenizer.eos_id)
        self.mask_id, self.pad_id = tokenizer.mask_id, tokenizer.pad_id
        self.start_id = tokenizer.special_id(cfg.decoder_start_token)
        self.kind = "decoder"  # settled by attach()

    def attach(self, model) -> None:
        kind = getattr(model, "kind", None)
        if kind not in KINDS:
            raise ConfigError(f"objective 'sft' trains {', '.join(KINDS)} models; {type(model).__name__} is of kind {kind}")
        self.kind = kind

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        return seq_len, seq_len  # the rows of lmkit.data.sft, one block each

    def make_collator(self) -> Collator:
        if self.kind == "encoder":
            return EncoderSFTCollator(self.marks, self.mask_id, self.cfg.mask_prob)
        if self.kind == "encoder_decoder":
            return Seq2SeqSFTCollator(self.marks, self.start_id, self.pad_id)
        return DecoderSFTCollator(self.marks)

    def loss(self, model, batch) -> LossOutput:
        if self.kind == "encoder_decoder":
            return seq2seq_loss(self, model, batch)
        extra = {"attn_mask": batch["attn_mask"]} if "attn_mask" in batch else {}
        hidden = model(batch["input_ids"], document_ids=batch["document_ids"], **extra)
        return self.lm_head_nll(model, hidden, batch["labels"], self.cfg.chunked_ce)


def prompt_ids(tokenizer, fmt: SFTFormat, prompt: str) -> list[int]:
    """What an SFT model reads before its response: ``[NLU] template(prompt) [S2S]`` (as in training)."""
    return ([tokenizer.special_id(PROMPT_MARK)] + tokenizer.encode(fmt.render(prompt))
            + [tokenizer.special_id(RESPONSE_MARK)])


def respond(model, tokenizer, fmt: SFTFormat, prompt: str, *, decoder_start_id: int | None = None,
            stream=None, **options) -> list[str]:
    """The responses of an SFT model to one prompt (``options``: :class:`lmkit.generation.GenerationOptions`).

    The prompt is written in ``fmt``'s template between the markers, exactly as in
    training; generation ends at ``<eos>`` (or at a ``[NLU]``: the end of a turn).
    """
    from lmkit.generation import GenerationOptions, generate_ids

    opts = GenerationOptions(**options)
    opts.stop = list(opts.stop or []) + [PROMPT_MARK]
    opts.check()
    was_training = model.training
    model.eval()
    try:
        _, texts = generate_ids(model, prompt_ids(tokenizer, fmt, prompt), opts, tokenizer=tokenizer,
                                eos_id=tokenizer.eos_id, decoder_start_id=decoder_start_id, stream=stream)
    finally:
        model.train(was_training)
    return texts


def run_format(path, template: str | None = None) -> SFTFormat | None:
    """The SFT format of the run behind ``path`` (a run directory or a checkpoint inside one): None when the
    run was not trained with ``sft`` and no ``template`` is given; ``template`` replaces the run's."""
    from pathlib import Path

    import yaml

    p = Path(path)
    config = p / "config.yaml" if p.is_dir() else p.parent.parent / "config.yaml"
    section = {}
    if config.is_file():
        try:
            section = (yaml.safe_load(config.read_text()) or {}).get("objective") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            section = {}
    if section.get("name") != "sft" and template is None:
        return None
    fields = {k: v for k, v in section.items() if k in SFTConfig.__dataclass_fields__ and k != "name"}
    if template is not None:
        fields["template"] = template
    return SFTConfig(**fields).format()
