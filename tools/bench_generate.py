"""Generation speed: lmkit (KV cache, and uncached) vs transformers ``generate`` on the same weights.

GPT-2 124M shape (random init), greedy, a 32-token prompt, ``--new`` tokens (256), batch 1 and 8,
one process. The lmkit model is exported with :mod:`lmkit.interop` and loaded as
GPT2LMHeadModel, so both run the very same weights; batch 1 checks that the tokens agree.
Every row generates exactly ``--new`` tokens (no eos stop on either side). Prints one JSON line
per measurement and a table.

    python tools/bench_generate.py [--batch 1 8] [--new 256] [--uncached-new 64] [--device cpu] [--threads N] [--repeat 2]
                                   [--compile]

``--compile`` adds two rows per batch: ``cache=static`` (fixed-shape cache, eager) and ``compile=true``
(the decode step compiled over it; CUDA graphs on a GPU), timed after one warm-up generation that compiles
(its seconds are printed as ``compile_seconds``); both are checked to give the KV-cache row's tokens.

Uncached decoding reruns the whole context every step (cost grows with the length), so it is
timed over ``--uncached-new`` tokens by default and reported as tokens/s over those.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from lmkit.generation import GenerationOptions, generate_ids  # noqa: E402
from lmkit.models.gpt import GPT, GPTConfig  # noqa: E402


def lmkit_tokens(model, prompt, new, batch, use_cache, cache="dynamic", compile=False):
    opts = GenerationOptions(max_new_tokens=new, temperature=0, num_samples=batch, use_cache=use_cache, cache=cache,
                             compile=compile)
    ids, _ = generate_ids(model, prompt, opts, eos_id=None)
    return ids


REPEAT = 1


def time_it(fn, device):
    """The output and the best wall time of ``REPEAT`` runs (a shared machine's noise only slows a run)."""
    best = None
    for _ in range(REPEAT):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        best = took if best is None else min(best, took)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--uncached-new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-uncached", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is reported")
    ap.add_argument("--compile", action="store_true", help="also cache=static and compile=true")
    args = ap.parse_args(argv)
    global REPEAT
    REPEAT = args.repeat
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from lmkit.interop.exporter import export_model
    from lmkit.tokenizers.byte import ByteTokenizer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50257)
    model = GPT(cfg).eval()
    tmp = tempfile.mkdtemp(prefix="bench_generate")
    export_model(model, ByteTokenizer(), os.path.join(tmp, "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(tmp, "hf")).eval()
    model.to(args.device)
    hf.to(args.device)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50257, (args.prompt_len,), generator=gen).tolist()
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} threads")
    rows = []

    def record(impl, batch, new, seconds):
        row = {"impl": impl, "batch": batch, "new_tokens": new, "seconds": round(seconds, 3),
               "tokens_per_s": round(batch * new / seconds, 1), "device": machine, "torch": torch.__version__,
               "transformers": transformers.__version__}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with torch.no_grad():
        lmkit_tokens(model, prompt, 8, 1, True)  # warm-up
        hf.generate(torch.tensor([prompt], device=args.device), max_new_tokens=8, do_sample=False)
        for batch in args.batch:
            ours, s = time_it(lambda: lmkit_tokens(model, prompt, args.new, batch, True), args.device)
            record("lmkit (KV cache)", batch, args.new, s)
            inp = torch.tensor([prompt] * batch, device=args.device)
            theirs, s = time_it(lambda: hf.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=args.new,
                                                    min_new_tokens=args.new, do_sample=False, num_beams=1,
                                                    pad_token_id=0), args.device)
            record("transformers generate", batch, args.new, s)
            same = theirs[:, len(prompt):].tolist() == ours
            print(json.dumps({"batch": batch, "same_tokens_as_transformers": same}), flush=True)
            if args.compile:
                static, s = time_it(lambda: lmkit_tokens(model, prompt, args.new, batch, True, "static"), args.device)
                record("lmkit static cache", batch, args.new, s)
                t0 = time.perf_counter()
                lmkit_tokens(model, prompt, 8, batch, True, "static", True)  # compiles the decode step
                warm = time.perf_counter() - t0
                compiled, s = time_it(lambda: lmkit_tokens(model, prompt, args.new, batch, True, "static", True),
                                      args.device)
                record("lmkit static + compile", batch, args.new, s)
                print(json.dumps({"batch": batch, "compile_seconds": round(warm, 1),
                                  "same_tokens_as_kv_cache": static == ours and compiled == ours}), flush=True)
            if not args.skip_uncached:  # like for like: both over --uncached-new tokens
                _, s = time_it(lambda: lmkit_tokens(model, prompt, args.uncached_new, batch, True), args.device)
                record("lmkit (KV cache)", batch, args.uncached_new, s)
                _, s = time_it(lambda: lmkit_tokens(model, prompt, args.uncached_new, batch, False), args.device)
                record("lmkit uncached", batch, args.uncached_new, s)
    print()
    print(f"{'impl':<24}{'batch':>6}{'new':>6}{'tok/s':>10}")
    for r in rows:
        print(f"{r['impl']:<24}{r['batch']:>6}{r['new_tokens']:>6}{r['tokens_per_s']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
