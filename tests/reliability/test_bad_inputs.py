"""A catalogue of bad inputs, each refused from the CLI with one clear message, exit status 2
and no run directory left behind. docs/reliability.md lists every case with its message.

Cases already covered by tests/test_cli.py (in a subprocess) are not repeated here:
``objective=causal_lm`` (missing ``+``), an unknown objective, a misspelled group option
(``optimizer=adamww``), a misspelled key (``trainer.max_stepz``), a negative learning rate,
a zero batch size, an incompatible objective/architecture (``model=bert_tiny``), a data
path that does not exist, a sequence longer than the model's positions, and an empty
corpus. These run ``lmkit.cli.main`` in-process (the same code as ``python -m lmkit``);
tests/reliability/test_untrusted.py runs the pickled-checkpoint case in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from lmkit_test_utils import REPO, TINY
from reliability_helpers import error_lines

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def cli(args, capsys) -> tuple[int, str]:
    from lmkit.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def assert_refused(tmp_path, rc, err, expected):
    assert rc == 2, err[-3000:]
    errors = error_lines(err)
    assert len(errors) == 1, err[-3000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists(), "a refused run must not leave a run directory"
    assert not (tmp_path / "multirun").exists(), "a refused sweep must not leave a sweep directory"


# -- data -----------------------------------------------------------------------------------
LONG_NAME = "n" * 300  # one file name longer than the 255 bytes file systems allow


def _many_characters(n: int = 420) -> str:
    """A corpus of ``n`` distinct CJK characters in short words: an alphabet larger than a 300-token vocabulary."""
    chars = [chr(0x4E00 + i) for i in range(n)]
    words = ["".join(chars[(i + 5 * j) % n] for j in range(1 + i % 3)) for i in range(2 * n)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n"


def _files(tmp: Path, args=()) -> dict[str, Path]:
    (tmp / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02 not text")
    (tmp / "latin1.txt").write_bytes("café olé\n".encode("latin-1"))
    (tmp / "tiny.txt").write_text("far too little text for one step\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    (tmp / "nofield.jsonl").write_text(json.dumps({"body": "text under another key"}) + "\n")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "blank.txt").write_text(" \n\t\n   \n\n")
    (tmp / "binaries").mkdir()
    for i in range(3):
        (tmp / "binaries" / f"blob{i}.bin").write_bytes(bytes(range(256)) * 4)
    (tmp / "hidden_only").mkdir()
    (tmp / "hidden_only" / ".notes.txt").write_text("hidden files are skipped\n")
    (tmp / "good.txt").write_text("Some perfectly good text.\n" * 50)
    (tmp / "loop").symlink_to("loop")
    (tmp / "dangling").symlink_to("no_such_target.txt")
    (tmp / "number.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    (tmp / "array.jsonl").write_text(json.dumps(["a", "list", "not", "an", "object"]) + "\n")
    (tmp / "typo.jsonl").write_text(json.dumps({"text": "a record"}) + "\n")
    (tmp / "records.jsonl").write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    (tmp / "file_not_dir").write_text("a regular file where a directory is expected\n")
    joined = " ".join(args)
    if "fifo" in joined:
        os.mkfifo(tmp / "fifo")
    if "late_nul.txt" in joined:  # one 1 MB line, binary past the first 64 KiB
        (tmp / "late_nul.txt").write_bytes(b"a" * 100_000 + b"\x00\x01\x02" + b"b" * 900_000)
    if "huge_array.jsonl" in joined:  # one 2 MB line that is JSON but not an object
        (tmp / "huge_array.jsonl").write_text(json.dumps(["word"] * 250_000) + "\n")
    if "many_chars.txt" in joined:
        (tmp / "many_chars.txt").write_text(_many_characters())
    if "locked" in joined:
        (tmp / "locked.txt").write_text("text nobody may read\n" * 50)
        (tmp / "locked.txt").chmod(0)
        (tmp / "locked_dir").mkdir()
        (tmp / "locked_dir" / "a.txt").write_text("text\n")
        (tmp / "locked_dir").chmod(0)
    return {p.name: p for p in tmp.iterdir()}


def _unlock(tmp: Path) -> None:
    for name in ("locked.txt", "locked_dir"):
        if (tmp / name).exists():
            (tmp / name).chmod(0o755)


ROOT_READS_ANYTHING = pytest.mark.skipif(AS_ROOT, reason="root reads files whatever their permissions (chmod 000)")

DATA_CASES = [
    ("binary file", ["data=text", "data.path=binary.txt"], "looks like a binary file (it contains NUL bytes)"),
    ("non-UTF-8 file", ["data=text", "data.path=latin1.txt"], "is not valid UTF-8 (bad byte at offset 3)"),
    ("corpus smaller than one step", ["data=text", "data.path=tiny.txt"], "the corpus is too small"),
    ("empty directory", ["data=text", "data.path=empty_dir"], "contains no files"),
    ("invalid JSON line", ["data=jsonl", "data.path=bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    ("missing JSON field", ["data=jsonl", "data.path=nofield.jsonl"], "no field 'text'"),
    ("data source without a path", ["data=text"], "data.path is not set"),
    ("empty file", ["data=text", "data.path=empty.txt"], "the corpus is empty"),
    ("whitespace-only file", ["data=text", "data.path=blank.txt"], "the corpus is empty"),
    ("directory of binaries", ["data=text", "data.path=binaries"], "looks like a binary file"),
    ("directory of hidden files only", ["data=text", "data.path=hidden_only"], "contains no files"),
    ("huge single line, binary past 64 KiB", ["data=text", "data.path=late_nul.txt"], "looks like a binary file"),
    ("huge single JSON line that is not an object", ["data=jsonl", "data.path=huge_array.jsonl"],
     "huge_array.jsonl:1: the line is a JSON array, not an object"),
    ("JSON line that is a list", ["data=jsonl", "data.path=array.jsonl"], "the line is a JSON array, not an object"),
    ("non-string text field", ["data=jsonl", "data.path=number.jsonl"], "field 'text' is int, not a string"),
    ("misspelled text field", ["data=jsonl", "data.path=typo.jsonl", "data.text_field=txt"],
     "no field 'txt'. Did you mean 'data.text_field=text'?"),
    ("empty text field name", ["data=jsonl", "data.path=typo.jsonl", "data.text_field="],
     "data.text_field must name the JSON field"),
    ("symlink loop", ["data=text", "data.path=loop"], "is a symbolic link that leads nowhere"),
    ("dangling symlink", ["data=text", "data.path=dangling"], "is a symbolic link that leads nowhere"),
    ("named pipe (FIFO)", ["data=text", "data.path=fifo"], "is a named pipe (FIFO), not a file"),
    ("character device", ["data=text", "data.path=/dev/null"], "is a device, not a file"),
    pytest.param("unreadable file (chmod 000)", ["data=text", "data.path=locked.txt"], "Permission denied",
                 marks=ROOT_READS_ANYTHING, id="unreadable file (chmod 000)"),
    pytest.param("unreadable directory (chmod 000)", ["data=text", "data.path=locked_dir"], "permission denied",
                 marks=ROOT_READS_ANYTHING, id="unreadable directory (chmod 000)"),
    ("300-character file name", ["data=text", f"data.path={LONG_NAME}.txt"], "is 304 bytes long; file systems allow"),
    ("one of several paths missing", ["data=text", "data.path=[good.txt,missing.txt]"], "does not exist"),
    ("data path that is a mapping", ["data=text", "data.path={a:1}"], "data.path must be a file or directory"),
    ("misspelled data source", ["data.source=jsnl"], "unknown dataset 'jsnl'. Did you mean 'jsonl'?"),
    ("unknown HF builder", ["data=hf", "data.path=records.jsonl", "data.hf_builder=jsn"],
     "unknown data.hf_builder 'jsn'. Did you mean 'json'?"),
    ("HF dataset without the text column", ["data=hf", "data.path=records.jsonl", "data.text_field=body"],
     "dataset has no column 'body'"),
    ("cache directory under a regular file", ["data.cache_dir=file_not_dir/cache"],
     "data.cache_dir='file_not_dir/cache' cannot be created: 'file_not_dir' is a file"),
    ("300-character cache directory name", [f"data.cache_dir={LONG_NAME}"], "data.cache_dir: the name"),
    ("wordpiece vocabulary smaller than the corpus alphabet",
     ["data=text", "data.path=many_chars.txt", "tokenizer=wordpiece", "tokenizer.vocab_size=300"],
     "tokenizer.vocab_size=300 is too small for this corpus"),
    ("unigram vocabulary smaller than the corpus alphabet",
     ["data=text", "data.path=many_chars.txt", "tokenizer=unigram", "tokenizer.vocab_size=300"],
     "tokenizer.vocab_size=300 is too small for this corpus"),
]


def _param(case):
    """A table row (a tuple, or a pytest.param for a row with marks) as a pytest parameter named by its case."""
    if hasattr(case, "marks"):
        return pytest.param(*case.values[1:], marks=case.marks, id=case.id)
    return pytest.param(*case[1:], id=case[0])


def _case_id(case) -> str:
    return case.id if hasattr(case, "marks") else case[0]


@pytest.mark.parametrize("args, expected", [_param(c) for c in DATA_CASES])
def test_bad_data(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path, args)
    try:
        rc, err = cli(TINY + args, capsys)
    finally:
        _unlock(tmp_path)
    assert_refused(tmp_path, rc, err, expected)


# -- config ---------------------------------------------------------------------------------
NO_CUDA = pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is visible here: the GPU accelerator is valid")
BERT, ALBERT = ["model=bert_tiny", "+objective=mlm"], ["model=albert_tiny", "+objective=sop"]
T5, BART = ["model=t5_tiny", "+objective=span_corruption"], ["model=bart_tiny", "+objective=bart_denoising"]

CONFIG_CASES = [
    ("misspelled group name", ["optimiser=adamw"], "unknown config key 'optimiser'"),
    ("misspelled top-level key", ["seeed=1"], "Did you mean 'seed'?"),
    ("value of the wrong type", ["trainer.max_steps=ten"], "invalid value for 'trainer.max_steps'"),
    ("zero steps", ["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
    ("unknown precision", ["trainer.precision=fp16"], "trainer.precision must be one of"),
    ("too short sequences", ["data.seq_len=1"], "data.seq_len must be >= 2"),
    ("non-positive dist timeout", ["trainer.dist_timeout_s=0"], "trainer.dist_timeout_s must be > 0"),
    ("negative non-finite budget", ["trainer.max_nonfinite_steps=-1"], "trainer.max_nonfinite_steps must be >= 0"),
    # tokenizer
    ("negative vocabulary", ["tokenizer.vocab_size=-5"], "tokenizer.vocab_size must be >= 1, got -5"),
    ("trained vocabulary of 0", ["tokenizer=bpe", "tokenizer.vocab_size=0"], "tokenizer.vocab_size must be >= 267, got 0"),
    ("trained vocabulary below the byte alphabet", ["tokenizer=bpe", "tokenizer.vocab_size=100"],
     "tokenizer.vocab_size must be >= 267, got 100 (a trained tokenizer's vocabulary holds the 256 byte-level"),
    ("vocabulary of a billion", ["tokenizer=bpe", "tokenizer.vocab_size=1000000000"],
     "tokenizer.vocab_size must be <= 2097152, got 1000000000"),
    ("negative min_frequency", ["tokenizer=bpe", "tokenizer.min_frequency=-1"], "tokenizer.min_frequency must be >= 0"),
    ("negative sentinel count", ["tokenizer.num_sentinels=-1"], "tokenizer.num_sentinels must be >= 0"),
    ("misspelled tokenizer", ["tokenizer=bytes"], "unknown tokenizer 'bytes'. Did you mean 'byte'?"),
    # models (TINY: d_model 32, 2 heads)
    ("heads not dividing d_model (gpt)", ["model.n_head=3"], "model.d_model=32 is not divisible by model.n_head=3"),
    ("heads not dividing d_model (bert)", BERT + ["model.n_head=5"], "model.d_model=32 is not divisible by model.n_head=5"),
    ("heads not dividing d_model (albert)", ALBERT + ["model.n_head=3"], "is not divisible by model.n_head=3"),
    ("heads not dividing d_model (t5)", T5 + ["model.n_head=3"], "is not divisible by model.n_head=3"),
    ("heads not dividing d_model (bart)", BART + ["model.n_head=3"], "is not divisible by model.n_head=3"),
    ("zero heads", ["model.n_head=0"], "model.n_head must be >= 1"),
    ("zero layers", ["model.n_layer=0"], "model.n_layer must be >= 1"),
    ("zero-width model", ["model.d_model=0"], "model.d_model must be >= 1"),
    ("zero feed-forward width", ["model.d_ff=0"], "model.d_ff must be >= 1 or null"),
    ("zero positions", ["model.max_seq_len=0"], "model.max_seq_len must be >= 1"),
    ("zero model vocabulary", ["model.vocab_size=0"], "model.vocab_size must be >= 1 or null"),
    ("model vocabulary below the tokenizer's", ["model.vocab_size=10"],
     "model.vocab_size=10 is smaller than the tokenizer's vocabulary"),
    ("positions that cannot be allocated", ["model.max_seq_len=100000000000"],
     "the model cannot be built here: it has at least 3,200.0B parameters"),
    ("width that cannot be allocated", ["model.d_model=1048576"], "the model cannot be built here"),
    ("dropout of 1.5", ["model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
    ("negative dropout", BERT + ["model.dropout=-0.1"], "model.dropout must be in [0, 1)"),
    ("dropout of 1", BART + ["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    ("misspelled init scheme", ["model.init=xavir"], "model.init must be one of normal, xavier; got 'xavir'. Did you mean 'xavier'?"),
    ("zero init std", ["model.init_std=0"], "model.init_std must be > 0"),
    ("misspelled activation", BERT + ["model.activation=gelu_exac"], "Did you mean 'gelu_exact'?"),
    ("zero layer-norm epsilon", BERT + ["model.layer_norm_eps=0"], "model.layer_norm_eps must be > 0"),
    ("negative segment vocabulary", BERT + ["model.type_vocab_size=-1"], "model.type_vocab_size must be >= 0"),
    ("misspelled ALBERT sharing", ALBERT + ["model.share=atention"], "Did you mean 'attention'?"),
    ("zero ALBERT embedding size", ALBERT + ["model.embedding_size=0"], "model.embedding_size must be >= 1"),
    ("misspelled T5 ffn", T5 + ["model.ffn=gated_gelu"], "Did you mean 'gated-gelu'?"),
    ("too few T5 position buckets", T5 + ["model.num_buckets=2"], "model.num_buckets must be >= 4"),
    ("T5 max_distance within the exact buckets", T5 + ["model.max_distance=4"], "model.max_distance must be >= 17"),
    ("zero decoder layers (t5)", T5 + ["model.n_decoder_layer=0"], "model.n_decoder_layer must be >= 1 or null"),
    ("zero decoder layers (bart)", BART + ["model.n_decoder_layer=0"], "model.n_decoder_layer must be >= 1 or null"),
    # issue 16: Transformer-XL / XLNet memory, GPT-3 banded attention, options of another architecture
    ("negative memory length", ["model=transformer_xl_tiny", "model.memory_len=-1"], "model.memory_len must be >= 0, got -1"),
    ("negative XLNet memory length", ["+objective=plm", "model.memory_len=-1"], "model.memory_len must be >= 0, got -1"),
    ("banded window not shorter than the rows", ["model.n_layer=2", "model.attention=alternating_local",
                                                 "model.attention_window=32"],
     "model.attention_window=32 is not shorter than data.seq_len=32"),
    ("misspelled attention", ["model.n_layer=2", "model.attention=alternating_locl", "model.attention_window=8"],
     "Did you mean 'alternating_local'?"),
    ("option of another architecture", BERT + ["model.attention=alternating_local"],
     "model.attention is not an option of architecture 'bert'; only gpt, llama have it"),
    ("sequence-length phases not increasing", ["data.seq_len_schedule=[{until_step:5,seq_len:16},{until_step:3,seq_len:16}]"],
     "data.seq_len_schedule[1].until_step=3 is not after the previous phase's end (step 5)"),
    ("mixture without its preset", ["data.mixture=[{source: text, path: a.txt, weight: 1}]"],
     "data.mixture is an option of the data=mixture preset, not of data=tinyshakespeare"),
    ("litdata store that does not exist", ["data=litdata", "data.path=no_store"],
     "litdata store 'no_store' does not exist"),
    ("litdata with a length schedule", ["data=litdata", "data.path=no_store", "data.seq_len_schedule=[{until_step: 2, seq_len: 16}]"],
     "data.seq_len_schedule cannot be combined with data=litdata"),
    ("mixture entry that is a litdata store", ["data=mixture", "data.mixture=[{source: litdata, path: s, weight: 1}]"],
     "data.mixture[0].source=litdata: a mixture's entries are text sources"),
    ("validation length past the positions", ["data.val_seq_lens=[128]"],
     "data.val_seq_lens[0]=128 is longer than the model's positions (model.max_seq_len=64)"),
    ("validation length listed twice", ["data.val_seq_lens=[16,16]"], "data.val_seq_lens=[16, 16] lists a length twice"),
    ("a recipe's objective given again", ["experiment=roberta_recipe", "+objective=nsp"],
     "experiment=roberta_recipe already chooses the objective: drop '+objective=nsp'"),
    # objectives
    ("permutation LM on a non-XLNet architecture", ["+objective=plm", "model=bert_tiny"],
     "objective 'plm' needs an architecture that accepts two_stream"),
    ("permutation LM predicting everything", ["+objective=plm", "objective.k=1"], "objective.k must be > 1"),
    ("biLM on a non-ELMo architecture", ["+objective=bilm", "model=bert_tiny"],
     "objective 'bilm' needs an architecture that accepts bilm_states"),
    ("ELECTRA generator larger than the discriminator", ["+objective=electra", "objective.generator_size=1.5"],
     "a generator larger than the discriminator"),
    ("mask probability above 1", BERT + ["objective.mask_prob=1.5"], "objective.mask_prob must be strictly between 0 and 1"),
    ("NaN mask probability", BERT + ["objective.mask_prob=nan"], "objective.mask_prob must be strictly between 0 and 1, got nan"),
    ("misspelled masking mode", BERT + ["objective.mode=robert"], "Did you mean 'roberta'?"),
    ("infinite mean span", T5 + ["objective.mean_noise_span_length=inf"], "objective.mean_noise_span_length must be a number >= 1"),
    ("zero noise density", T5 + ["objective.noise_density=0"], "objective.noise_density must be strictly between 0 and 1"),
    ("infinite Poisson lambda", BART + ["objective.poisson_lambda=inf"], "objective.poisson_lambda must be > 0"),
    ("BART mask ratio of 1", BART + ["objective.mask_ratio=1.0"], "objective.mask_ratio must be in [0, 1)"),
    ("infinite UL2 weight", ["+objective=ul2", "objective.weights=[1,1,1,1,1,1,inf]"],
     "objective.weights must hold 7 finite non-negative numbers"),
    ("NaN SBO weight", ["+objective=span_bert", "objective.sbo_weight=nan"], "objective.sbo_weight must be a finite number"),
    ("NSP negative share above 1", ["+objective=nsp", "objective.negative_prob=2"], "objective.negative_prob must be in [0, 1]"),
    ("misspelled decoder start token", T5 + ["objective.decoder_start_token='<pda>'"], "Did you mean '<pad>'?"),
    ("negative chunk size", ["+objective=causal_lm", "objective.chunked_ce=-1"], "objective.chunked_ce must be >= 0"),
    # optimizer and schedule
    ("infinite learning rate", ["optimizer.lr=inf"], "optimizer.lr must be a finite number, got inf"),
    ("NaN learning rate", ["optimizer.lr=nan"], "optimizer.lr must be positive, got nan"),
    ("zero learning rate", ["optimizer.lr=0"], "optimizer.lr must be positive"),
    ("beta of 1", ["optimizer.betas=[0.9,1.0]"], "optimizer.betas must be two numbers in [0, 1)"),
    ("one beta", ["optimizer.betas=[0.9]"], "optimizer.betas must be two numbers in [0, 1)"),
    ("zero epsilon", ["optimizer.eps=0"], "optimizer.eps must be > 0"),
    ("negative epsilon", ["optimizer.eps=-1e-8"], "optimizer.eps must be > 0"),
    ("negative momentum", ["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum must be in [0, 1)"),
    ("Nesterov without momentum", ["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"],
     "optimizer.nesterov=true needs optimizer.momentum > 0"),
    ("negative weight decay", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay must be >= 0"),
    ("infinite weight decay", ["optimizer.weight_decay=inf"], "optimizer.weight_decay must be a finite number"),
    ("positive Adafactor decay exponent", ["optimizer=adafactor", "optimizer.beta2_decay=0.5"],
     "optimizer.beta2_decay must be <= 0"),
    ("negative warmup", ["scheduler.warmup_steps=-1"], "scheduler.warmup_steps must be >= 0"),
    ("LR floor above 1", ["scheduler.min_lr_ratio=1.5"], "scheduler.min_lr_ratio must be in [0, 1]"),
    ("NaN LR floor", ["scheduler.min_lr_ratio=nan"], "scheduler.min_lr_ratio must be in [0, 1], got nan"),
    ("zero decay steps", ["scheduler.decay_steps=0"], "scheduler.decay_steps must be >= 1 or null"),
    # trainer
    ("keep_last_k below -1", ["trainer.keep_last_k=-3"], "trainer.keep_last_k must be >= -1, got -3 (-1 = keep every"),
    ("zero devices", ["trainer.devices=0"], "got 0 (0 devices cannot train"),
    ("devices that are not a number", ["trainer.devices=abc"], "trainer.devices is auto, a number of devices"),
    pytest.param("all devices (-1) on a CPU", ["trainer.devices=-1"], "trainer.devices=-1 on the CPU",
                 marks=NO_CUDA, id="all devices (-1) on a CPU"),
    ("max_time that is not a duration", ["trainer.max_time=abc"], "trainer.max_time='abc' is not a duration: write DD:HH:MM:SS"),
    ("max_time with three fields", ["trainer.max_time=1:00:00"], "trainer.max_time='1:00:00' is not a duration"),
    ("max_time of zero", ["trainer.max_time=00:00:00:00"], "is no time at all"),
    ("max_time with a misspelled unit", ["trainer.max_time={hourz:1}"], "unknown key 'hourz'. Did you mean 'hours'?"),
    pytest.param("GPU accelerator without a GPU", ["trainer.accelerator=gpu"],
                 "trainer.accelerator=gpu but no CUDA device is visible", marks=NO_CUDA, id="GPU accelerator without a GPU"),
    pytest.param("CUDA accelerator without a GPU", ["trainer.accelerator=cuda"],
                 "trainer.accelerator=cuda but no CUDA device is visible", marks=NO_CUDA,
                 id="CUDA accelerator without a GPU"),
    pytest.param("MPS accelerator off a Mac", ["trainer.accelerator=mps"], "Apple's MPS backend is not available",
                 marks=pytest.mark.skipif(HAS_MPS, reason="MPS is available here"), id="MPS accelerator off a Mac"),
    ("misspelled accelerator", ["trainer.accelerator=gpux"], "unknown trainer.accelerator 'gpux'. Did you mean 'gpu'?"),
    ("zero nodes", ["trainer.num_nodes=0"], "trainer.num_nodes must be >= 1"),
    ("negative validation batches", ["trainer.val_batches=-1"], "trainer.val_batches must be >= 0"),
    ("negative logging interval", ["trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps must be >= 0"),
    ("negative gradient clip", ["trainer.gradient_clip=-1"], "trainer.gradient_clip must be >= 0"),
    ("infinite gradient clip", ["trainer.gradient_clip=inf"], "trainer.gradient_clip must be a finite number"),
    ("infinite dist timeout", ["trainer.dist_timeout_s=inf"], "trainer.dist_timeout_s must be a finite number"),
    ("misspelled compile mode", ["trainer.compile_mode=max_autotune"], "Did you mean 'max-autotune'?"),
    # seed, logger, strategy, data sizes
    ("negative seed", ["seed=-1"], "seed must be in [0, 2**32 - 1]"),
    ("seed of 2**32", ["seed=4294967296"], "seed must be in [0, 2**32 - 1]"),
    ("seed that is not a number", ["seed=abc"], "seed must be an integer"),
    ("misspelled logger", ["logger.name=cvs"], "Did you mean 'csv'?"),
    ("misspelled wandb mode", ["logger.mode=onlin"], "Did you mean 'online'?"),
    ("misspelled process-group backend", ["strategy.process_group_backend=ncll"], "Did you mean 'nccl'?"),
    ("zero ramp start", ["data.batch_ramp_start=0"], "data.batch_ramp_start must be >= 1"),
    ("negative ramp", ["data.batch_ramp_steps=-1"], "data.batch_ramp_steps must be >= 0"),
    ("NaN validation share", ["data.val_fraction=nan"], "data.val_fraction must be in [0, 1), got nan"),
    ("zero gradient accumulation", ["data.grad_accum=0"], "data.grad_accum must be >= 1"),
    ("negative workers", ["data.num_workers=-1"], "data.num_workers must be >= 0"),
    # command line
    ("unresolvable interpolation", ["trainer.max_steps=${nope}"], "cannot resolve the value of 'trainer.max_steps'"),
    ("misspelled hydra key", ["hydra.runn.dir=x"], "unknown config key 'hydra.runn.dir'"),
    ("sweep with one bad value", ["-m", "optimizer.lr=0.001,-1"], "optimizer.lr must be positive, got -1.0"),
    ("override without a value", ["trainer.max_steps"], "cannot parse the command line"),
]


@pytest.mark.parametrize("args, expected", [_param(c) for c in CONFIG_CASES])
def test_bad_config(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(TINY + args, capsys)
    assert_refused(tmp_path, rc, err, expected)


def test_run_directory_under_a_regular_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file_not_dir").write_text("x\n")
    rc, err = cli(TINY + ["hydra.run.dir=file_not_dir/run"], capsys)
    assert_refused(tmp_path, rc, err, "file_not_dir")


# -- launch environment -----------------------------------------------------------------------
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
               "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME",
               "SLURM_LOCALID", "SLURM_NODEID")
TORCHRUN_2 = {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}

ENV_CASES = [
    ("WORLD_SIZE without RANK", {"WORLD_SIZE": "2"}, [], "sets WORLD_SIZE=2 but not RANK"),
    ("garbage LOCAL_WORLD_SIZE", {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "abc"},
     [], "LOCAL_WORLD_SIZE='abc' is not a non-negative integer"),
    ("garbage RANK (read by Lightning at import)", {"RANK": "abc"}, [], "RANK='abc' is not a non-negative integer"),
    ("garbage LOCAL_RANK", {"LOCAL_RANK": "x1"}, [], "LOCAL_RANK='x1' is not a non-negative integer"),
    ("garbage SLURM_PROCID", {"SLURM_PROCID": "first"}, [], "SLURM_PROCID='first' is not a non-negative integer"),
    ("garbage WORLD_SIZE", {"WORLD_SIZE": "two"}, [], "WORLD_SIZE='two' is not a non-negative integer"),
    ("zero WORLD_SIZE", {"WORLD_SIZE": "0"}, [], "WORLD_SIZE=0: a launch has at least one process"),
    ("RANK outside WORLD_SIZE", {"WORLD_SIZE": "2", "RANK": "3"}, [], "RANK=3 but WORLD_SIZE=2"),
    ("LOCAL_RANK outside LOCAL_WORLD_SIZE", {"LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "2"}, [],
     "LOCAL_RANK=4 but LOCAL_WORLD_SIZE=2"),
    ("garbage SLURM_NTASKS", {"SLURM_NTASKS": "many", "SLURM_PROCID": "0"}, [], "SLURM_NTASKS='many' is not"),
    ("devices contradicting torchrun", TORCHRUN_2, ["trainer.devices=3"],
     "trainer.devices=3 but torchrun started 2 processes per node"),
    ("nodes contradicting torchrun", TORCHRUN_2, ["trainer.num_nodes=2"], "trainer.num_nodes=2 but torchrun started 1 node"),
]


@pytest.mark.parametrize("env, args, expected", [_param(c) for c in ENV_CASES])
def test_bad_launch_environment(tmp_path, monkeypatch, capsys, env, args, expected):
    monkeypatch.chdir(tmp_path)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, err = cli(TINY + args, capsys)
    assert_refused(tmp_path, rc, err, expected)


# -- warnings (not refusals) --------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["scheduler.warmup_steps=10", "trainer.max_steps=2"],
     "lmkit: warning: scheduler.warmup_steps=10 is longer than the run (trainer.max_steps=2): the learning rate never "
     "reaches optimizer.lr (it ends at 20% of it)."),
    (["data.batch_ramp_steps=50", "data.grad_accum=2", "trainer.max_steps=2"],
     "lmkit: warning: data.batch_ramp_steps=50 is longer than the run (trainer.max_steps=2): the batch never reaches "
     "its full size"),
], ids=["warmup longer than the run", "batch ramp longer than the run"])
def test_schedules_longer_than_the_run_warn_once(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(TINY + args, capsys)
    assert rc == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("lmkit: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(expected), err[-3000:]


# -- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A finished 2-step run with the byte tokenizer."""
    from lmkit.api import run

    run_dir = tmp_path_factory.mktemp("byte-run")
    run(TINY + ["trainer.max_steps=2"], run_dir)
    return run_dir


def _resume_cases(run_dir: Path, tmp: Path) -> dict:
    good = run_dir / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    shutil.copy(good, tmp / "copied.ckpt")
    (tmp / "no_ckpts" / "checkpoints").mkdir(parents=True)
    return {
        "missing path": (["resume=nope.ckpt"], "resume='nope.ckpt' does not exist"),
        "resume=last without runs": (["resume=last"], "resume=last: no run with checkpoints under"),
        "run directory without checkpoints": (["resume=no_ckpts"], "no usable checkpoint in 'no_ckpts/checkpoints'"),
        "truncated checkpoint": (["resume=truncated.ckpt"], "checkpoint 'truncated.ckpt' is truncated or corrupted"),
        "tokenizer differs from the checkpoint's": (
            ["tokenizer=bpe", "tokenizer.vocab_size=300", f"resume={run_dir}"],
            "the tokenizer of this run does not match the one the checkpoint was trained with"),
        "checkpoint of another model size": (
            ["model.d_model=64", "resume=copied.ckpt"], "does not fit this model: model.wte.weight has shape"),
    }


RESUME_CASES = ["missing path", "resume=last without runs", "run directory without checkpoints",
                "truncated checkpoint", "tokenizer differs from the checkpoint's", "checkpoint of another model size"]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_resume(tmp_path, monkeypatch, capsys, byte_run, case):
    monkeypatch.chdir(tmp_path)
    args, expected = _resume_cases(byte_run, tmp_path)[case]
    rc, err = cli(TINY + args, capsys)
    assert rc == 2 and not (tmp_path / "outputs").exists()
    assert_refused(tmp_path, rc, err, expected)


# -- plugins --------------------------------------------------------------------------------
BOOM = "raise RuntimeError('boom: this plugin is broken')\n"
DUP = """
import lmkit
from lmkit.optim.optimizers import build_sgd, OptimizerConfig

@lmkit.hookimpl
def lmkit_register_optimizers():
    return [lmkit.Component("adamw", lambda groups, cfg: build_sgd(groups, cfg), OptimizerConfig)]
"""


NOT_COMPONENTS = """
import lmkit

@lmkit.hookimpl
def lmkit_register_optimizers():
    return ["adamw2", {"name": "lion"}]
"""
NOT_A_DATACLASS = """
import lmkit
from lmkit.optim.optimizers import build_sgd

class PlainConfig:  # forgot @dataclass
    lr = 0.1

@lmkit.hookimpl
def lmkit_register_optimizers():
    return [lmkit.Component("plainopt", build_sgd, PlainConfig)]
"""
ASSERTING_CONFIG = """
from dataclasses import dataclass

import lmkit
from lmkit.optim.schedulers import build_constant

@dataclass
class StrictConfig:
    name: str = "strict"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self):
        assert self.warmup_steps == 0, "strict takes no warmup"

@lmkit.hookimpl
def lmkit_register_schedulers():
    return [lmkit.Component("strict", build_constant, StrictConfig)]
"""
RAISING_HOOK = """
import lmkit

@lmkit.hookimpl
def lmkit_register_optimizers():
    raise KeyError("lion_config")
"""
MISSING_MODULE = "import lmkit_this_module_does_not_exist\n"

ONE_COMPONENT = """
import lmkit
from lmkit.optim.optimizers import build_sgd, OptimizerConfig

@lmkit.hookimpl
def lmkit_register_optimizers():
    return lmkit.Component("sgd2", build_sgd, OptimizerConfig)
"""

PLUGIN_CASES = [
    ("plugin hook returning one Component, not a list", ONE_COMPONENT, [],
     "lmkit_register_optimizers must return a list of lmkit.registry.Component objects, got Component"),
    ("plugin hook returning non-Components", NOT_COMPONENTS, [],
     "lmkit_register_optimizers must return lmkit.registry.Component objects, got str"),
    ("plugin config class that is not a dataclass", NOT_A_DATACLASS, ["optimizer.name=plainopt"],
     "is not a dataclass: a component's config_cls must be a @dataclass"),
    ("plugin config check failing with an assert", ASSERTING_CONFIG, ["scheduler.name=strict"],
     "invalid 'scheduler' config: AssertionError: strict takes no warmup"),
    ("plugin hook raising, its component asked for", RAISING_HOOK, ["optimizer.name=lion"],
     "lmkit_register_optimizers raised KeyError"),
    ("plugin importing a missing module, strict mode", MISSING_MODULE, ["+strict"],
     "No module named 'lmkit_this_module_does_not_exist' (strict mode"),
]


@pytest.mark.parametrize("source, args, expected", [_param(c) for c in PLUGIN_CASES])
def test_bad_plugin(tmp_path, monkeypatch, capsys, fake_plugin, fresh_plugins, source, args, expected):
    monkeypatch.chdir(tmp_path)
    if "+strict" in args:
        args = [a for a in args if a != "+strict"]
        monkeypatch.setenv("LMKIT_STRICT_PLUGINS", "1")
    fake_plugin("lmkit-hostile", "lmkit_test_hostile", source, version="0.9")
    rc, err = cli(TINY + args, capsys)
    assert_refused(tmp_path, rc, err, expected)


@pytest.fixture
def fresh_plugins():
    from lmkit.plugins import get_plugin_manager

    get_plugin_manager.cache_clear()
    yield
    get_plugin_manager.cache_clear()


def test_plugin_raising_at_import_is_named_when_its_component_is_asked_for(tmp_path, monkeypatch, capsys,
                                                                          fake_plugin, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    fake_plugin("lmkit-boom", "lmkit_test_boom", BOOM, version="0.4")
    rc, err = cli(TINY + ["callbacks=[boom_callback]"], capsys)
    assert "lmkit: warning: plugin 'lmkit_test_boom' from lmkit-boom 0.4 failed to load: RuntimeError: boom" in err
    assert_refused(tmp_path, rc, err, "unknown callback 'boom_callback'")
    assert "plugin 'lmkit_test_boom' from lmkit-boom 0.4 failed to load: RuntimeError: boom" in error_lines(err)[0]


def test_two_plugins_registering_one_name(tmp_path, monkeypatch, capsys, fake_plugin, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    fake_plugin("lmkit-dup", "lmkit_test_dup_cli", DUP, version="2.0")
    rc, err = cli(TINY, capsys)
    assert_refused(tmp_path, rc, err, "optimizer 'adamw' is registered twice: by lmkit")
    assert "and by lmkit-dup 2.0" in error_lines(err)[0]


# -- the catalogue as a whole -------------------------------------------------------------------
CATALOGUE = [_case_id(c) for c in DATA_CASES + CONFIG_CASES + ENV_CASES + PLUGIN_CASES] + RESUME_CASES + [
    "plugin raising at import, one of its components asked for", "two plugins registering one name"]


def test_catalogue_has_at_least_80_hostile_inputs():
    assert len(CATALOGUE) >= 80, len(CATALOGUE)
    assert len(set(CATALOGUE)) == len(CATALOGUE), "case names must be unique"


def test_every_case_is_listed_in_docs_reliability():
    """docs/reliability.md keeps one catalogue row per case: ``| case name | input | message |``."""
    text = (REPO / "docs" / "reliability.md").read_text()
    rows = {m.group(1).strip() for m in re.finditer(r"^\| ([^|`]+?) (?:[†‡] )?\|", text, re.M)}
    missing = [case for case in CATALOGUE if case not in rows]
    assert not missing, f"add these cases to docs/reliability.md: {missing}"
