"""``python -m lmkit export RUN_DIR|CHECKPOINT OUT_DIR [--force]``: a Hugging Face model directory.

Writes ``config.json``, ``model.safetensors`` and the tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) so that offline
``AutoModelFor...from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``
load it: gpt -> GPT2LMHeadModel, bert -> BertForMaskedLM (BertForPreTraining with an NSP
head), albert -> AlbertForMaskedLM (AlbertForPreTraining with a SOP head), t5 ->
T5ForConditionalGeneration, bart -> BartForConditionalGeneration.

RUN_DIR exports its newest checkpoint. OUT_DIR must be new or empty; ``--force`` replaces a
non-empty one. The directory appears whole or not at all (written next to it, then renamed).
"""
from __future__ import annotations

from lmkit.errors import ConfigError

USAGE = "usage: python -m lmkit export RUN_DIR|CHECKPOINT OUT_DIR [--force]"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    force = "--force" in argv
    args = [a for a in argv if a != "--force"]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise ConfigError(f"export: unknown option {flags[0]}. {USAGE}")
    if len(args) != 2:
        raise ConfigError(f"export takes a run directory (or checkpoint) and an output directory. {USAGE}")
    from lmkit.interop.exporter import export

    info = export(args[0], args[1], force=force)
    print(f"lmkit: exported {info['checkpoint']} as {info['architecture']} to {info['out_dir']}")
    if info["left_out"]:
        print(f"lmkit: left out: {'; '.join(info['left_out'])}")
    return 0
