"""lmkit's side-by-side benchmark suite: every number is a ratio measured in one run.

    python tools/bench.py [--quick] [--out bench.json] [--only overhead,models,data,optim,gpu]

1. overhead: lmkit's full training loop vs a plain PyTorch loop (tools/bench_overhead.py).
2. models:   training-step tokens/s of lmkit's GPT, BERT, T5 vs HF transformers' GPT2LMHeadModel,
             BertForMaskedLM, T5ForConditionalGeneration built from configs of identical sizes
             (needs the `bench` extra: pip install -e ".[bench]"; nothing is downloaded).
3. data:     tokenization + packing tokens/s, and each noise function vs per-example references
             (tools/bench_noise.py) and HF's DataCollatorForLanguageModeling.
4. optim:    optimizer state bytes of AdamW vs Adafactor vs SGD for the default and GPT-2 124M shapes.
5. gpu:      GPT-2 124M, seq 1024, bf16, torch.compile, flash/cuDNN SDPA, chunked LM-head loss: tokens/s
             and MFU (CUDA only; LMKIT_BENCH_GPU_MODES, LMKIT_BENCH_GPU_BATCH).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def _timeit(step, warmup=3, min_time=3.0, max_iters=200):
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (time.perf_counter() - t0 < min_time or n < 3):
        step()
        n += 1
    return (time.perf_counter() - t0) / n


def _timeit_pair(step_a, step_b, warmup=2, min_time=3.0, max_iters=100):
    """Median seconds per call of two steps measured alternately (a, b, a, b, ...).

    Alternating makes slow drifts of a shared machine (other tenants, memory bandwidth)
    hit both sides alike; the median drops outliers.
    """
    import statistics

    for _ in range(warmup):
        step_a()
        step_b()
    times_a, times_b, t0 = [], [], time.perf_counter()
    while len(times_a) < max_iters and (time.perf_counter() - t0 < 2 * min_time or len(times_a) < 5):
        for step, times in ((step_a, times_a), (step_b, times_b)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def _train_step(model_fn, params):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION_OPS = ("_scaled_dot_product", "aten::_flash_attention")


def _kernel_share(step, iters: int = 2) -> dict:
    """Fractions of a step's CPU time spent in matrix multiplies and in SDPA (torch.profiler)."""
    from torch.profiler import profile

    step()
    with profile() as prof:
        for _ in range(iters):
            step()
    total = matmul = attention = 0.0
    for event in prof.key_averages():
        t = event.self_cpu_time_total
        total += t
        if event.key in MATMUL_OPS:
            matmul += t
        elif any(k in event.key for k in ATTENTION_OPS):
            attention += t
    return {"matmul": matmul / total, "attention": attention / total}


def _model_cases(tf, vocab: dict, chunked_ce: int, B: int, T: int, L: int = 4, D: int = 256, H: int = 4):
    """(name, lmkit model, lmkit loss, HF model, HF loss, tokens) for GPT, BERT and T5 of one size."""
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.models.t5 import T5, T5Config
    from lmkit.objectives.linear_cross_entropy import linear_cross_entropy

    ce = torch.nn.functional.cross_entropy
    torch.manual_seed(0)
    cases = []
    V = vocab["gpt"]
    ids = torch.randint(0, V, (B, T))
    gpt = GPT(GPTConfig(n_layer=L, n_head=H, d_model=D, vocab_size=V, max_seq_len=T))
    hf_gpt = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                                              resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    if chunked_ce:  # objective.chunked_ce: head + loss fused over chunks of tokens
        def gpt_loss(gpt=gpt, ids=ids):
            return linear_cross_entropy(gpt(ids[:, :-1]), gpt.output_embedding(), ids[:, 1:], chunked_ce) / ids[:, 1:].numel()
    else:
        def gpt_loss(gpt=gpt, ids=ids):
            return ce(gpt.logits(gpt(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten())
    cases.append(("GPT", gpt, gpt_loss, hf_gpt, lambda: hf_gpt(input_ids=ids, labels=ids).loss, B * T))

    V = vocab["bert"]
    bids = torch.randint(0, V, (B, T))
    mlm_labels = torch.where(torch.rand(B, T) < 0.15, bids, torch.full_like(bids, -100))
    bert = BERT(BERTConfig(n_layer=L, n_head=H, d_model=D, vocab_size=V, max_seq_len=T))
    hf_bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                               intermediate_size=4 * D, max_position_embeddings=T,
                                               hidden_dropout_prob=0, attention_probs_dropout_prob=0))

    def bert_loss():  # the head only where predicted, as lmkit's MLM objectives compute it
        sel = mlm_labels != -100
        return ce(bert.logits(bert(bids)[sel]), mlm_labels[sel])

    cases.append(("BERT", bert, bert_loss, hf_bert, lambda: hf_bert(input_ids=bids, labels=mlm_labels).loss, B * T))

    V = vocab["t5"]
    tids, dec_ids = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T // 4))
    t5 = T5(T5Config(n_layer=L, n_head=H, d_model=D, vocab_size=V, max_seq_len=T))
    hf_t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=D, d_kv=D // H, d_ff=4 * D, num_layers=L,
                                                      num_heads=H, dropout_rate=0, decoder_start_token_id=0))
    if chunked_ce:  # objective.chunked_ce on T5: tied head rescaled by head_input, then fused with the loss
        def t5_loss(t5=t5):
            hidden = t5.head_input(t5(tids, decoder_input_ids=dec_ids))
            return linear_cross_entropy(hidden, t5.output_embedding(), dec_ids, chunked_ce) / dec_ids.numel()
    else:
        def t5_loss(t5=t5):
            return ce(t5.logits(t5(tids, decoder_input_ids=dec_ids)).flatten(0, 1), dec_ids.flatten())
    cases.append(("T5", t5, t5_loss,
                  hf_t5, lambda: hf_t5(input_ids=tids, decoder_input_ids=dec_ids, labels=dec_ids).loss,
                  B * (T + T // 4)))
    return cases


def bench_models(quick: bool) -> list[dict]:
    """Training steps of lmkit's GPT, BERT, T5 vs HF's, at a small and at the models' real vocabularies.

    For the small vocabulary the step's matmul + attention share (lmkit side, profiled) gives
    the best ratio any implementation using the same kernels could reach: HF time / lmkit
    matmul-and-attention time.
    """
    try:
        import transformers as tf
    except ImportError:
        return [{"skipped": "transformers is not installed (pip install -e '.[bench]')"}]
    B, T = 16, 128
    min_time = 1.5 if quick else 4.0
    settings = [("vocab 512", {"gpt": 512, "bert": 512, "t5": 512}, 0),
                ("real vocab", {"gpt": 50257, "bert": 30522, "t5": 32128}, 4096)]
    rows = []
    for setting, vocab, chunked in settings:
        for name, ours, our_loss, theirs, their_loss, tokens in _model_cases(tf, vocab, chunked, B, T):
            ours_step = _train_step(our_loss, ours.parameters())
            t_ours, t_hf = _timeit_pair(ours_step, _train_step(their_loss, theirs.parameters()), min_time=min_time)
            row = {"model": name, "setting": setting, "vocab": vocab[name.lower()], "chunked_ce": chunked if name in ("GPT", "T5") else 0,
                   "lmkit_tokens_per_s": tokens / t_ours, "hf_tokens_per_s": tokens / t_hf, "ratio": t_hf / t_ours,
                   "params_lmkit": sum(p.numel() for p in ours.parameters()),
                   "params_hf": sum(p.numel() for p in theirs.parameters())}
            if name == "GPT" and chunked:  # the same model with the plain logits path, for the fused head's own gain
                def plain_loss(gpt=ours, V=vocab["gpt"]):
                    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
                    return torch.nn.functional.cross_entropy(gpt.logits(gpt(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten())

                t_chunked, t_plain = _timeit_pair(ours_step, _train_step(plain_loss, ours.parameters()), min_time=min_time)
                row["chunked_ce_speedup"] = t_plain / t_chunked
            if setting == "vocab 512":
                share = _kernel_share(ours_step)
                row.update(matmul_share=share["matmul"], attention_share=share["attention"],
                           ratio_bound=t_hf / (t_ours * (share["matmul"] + share["attention"])))
            rows.append(row)
    return rows


def bench_data(quick: bool) -> dict:
    from lmkit.data.cache import build_token_array
    from lmkit.data.sources import BuiltinSource
    from lmkit.tokenizers.byte import ByteTokenizer

    src = BuiltinSource("tinyshakespeare")
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    arr = build_token_array(src, tok)
    t_byte = time.perf_counter() - t0
    out = {"tokenize_pack_byte_tokens_per_s": len(arr) / t_byte}
    import bench_noise

    out["noise"] = bench_noise.run(128 if quick else 256, 512, 0.3 if quick else 0.5)
    try:
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models, pre_tokenizers

        from lmkit.noise import NoiseVocab, mlm_mask

        hf_tok = Tokenizer(models.WordLevel({**{chr(i + 33): i for i in range(200)}, "[MASK]": 200, "[PAD]": 201, "[UNK]": 202}, unk_token="[UNK]"))
        hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=hf_tok, mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]")
        collator = DataCollatorForLanguageModeling(fast, mlm_probability=0.15, return_tensors="pt")
        B, L = 256, 512
        rows = torch.randint(0, 200, (B, L))
        examples = [{"input_ids": r} for r in rows]
        vocab = NoiseVocab.from_tokenizer(ByteTokenizer())
        byte_rows = torch.randint(0, 256, (B, L))
        gen = torch.Generator().manual_seed(0)
        t_hf = _timeit(lambda: collator(examples), warmup=1, min_time=1.0)
        t_ours = _timeit(lambda: mlm_mask(byte_rows, gen, vocab, mode="bernoulli"), warmup=1, min_time=1.0)
        out["mlm_vs_hf_collator"] = {"lmkit_seq_per_s": B / t_ours, "hf_seq_per_s": B / t_hf, "ratio": t_hf / t_ours}
    except ImportError:
        out["mlm_vs_hf_collator"] = {"skipped": "transformers is not installed"}
    return out


def bench_optim() -> list[dict]:
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.optim.optimizers import OptimizerConfig, build_adafactor, build_adamw, build_sgd

    rows = []
    for shape, cfg in [("gpt_tiny (byte vocab)", GPTConfig(vocab_size=266)),
                       ("gpt2_124m", GPTConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50257))]:
        model = GPT(cfg)
        params = [p for p in model.parameters()]
        two_d = {id(p) for p in params if p.dim() == 2}
        row = {"shape": shape, "params": sum(p.numel() for p in params)}
        for name, build in [("adamw", build_adamw), ("adafactor", build_adafactor), ("sgd", build_sgd)]:
            opt = build([{"params": params}], OptimizerConfig(name=name, lr=1e-3))
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
            two_d_bytes = sum(t.numel() * t.element_size() for p, s in opt.state.items() if id(p) in two_d
                              for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
            row[f"{name}_state_bytes"] = total
            row[f"{name}_2d_state_bytes"] = two_d_bytes
        row["adafactor_over_adamw_2d"] = row["adafactor_2d_state_bytes"] / row["adamw_2d_state_bytes"]
        rows.append(row)
        del model, params
    return rows


def bench_gpu(quick: bool) -> dict:
    """GPT-2 124M, seq 1024, bf16 autocast, fused AdamW: tokens/s, MFU and peak memory per mode.

    A mode is ``eager`` or ``compile`` plus options joined by ``+``: ``cudnn`` (SDPA's cuDNN
    attention instead of flash), ``chunked`` (LM head + cross-entropy fused over 4096-token
    chunks, lmkit's ``objective.chunked_ce``). Modes come from LMKIT_BENCH_GPU_MODES.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    import os

    import torch.nn.functional as F

    from lmkit.accounting import ACCELERATORS, flops_from_model
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.objectives.linear_cross_entropy import linear_cross_entropy

    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = GPTConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50304)
    B, T = int(os.environ.get("LMKIT_BENCH_GPU_BATCH", 16)), 1024
    modes = os.environ.get("LMKIT_BENCH_GPU_MODES", "eager,compile").split(",")
    model_flops = flops_from_model(GPT(cfg))  # 6N + 12·L·H·Q·T, N = every parameter but the position table
    n_params, flops_per_token = model_flops.params, model_flops.per_token(T)
    peak = ACCELERATORS["h100_sxm"].bf16  # H100/H200 SXM dense bf16
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": B, "seq": T,
           "params_non_pos": n_params, "flops_per_token": flops_per_token, "peak_flops_assumed": peak}
    for mode in modes:
        base, *opts = mode.split("+")
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
        if "cudnn" in opts:  # only cuDNN (and math as the fallback) left enabled
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(True)

        def loss_fn(inp, tgt):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hidden = model(inp)
                if "chunked" in opts:
                    return linear_cross_entropy(hidden, model.output_embedding(), tgt, 4096) / tgt.numel()
                logits = model.logits(hidden)
            return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())

        fn = torch.compile(loss_fn) if base == "compile" else loss_fn

        def step():
            loss = fn(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            t_compile = time.perf_counter()
            first = step().item()
            for _ in range(4):
                step()
            torch.cuda.synchronize()
            t_compile = time.perf_counter() - t_compile
            torch.cuda.reset_peak_memory_stats()
            n = 10 if quick else 30
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / n
            tps = B * T / dt
            out[mode] = {"tokens_per_s": tps, "step_ms": 1000 * dt, "mfu": tps * flops_per_token / peak,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_loss": first,
                         "warmup_s": t_compile}
        except Exception as e:  # a mode the installed torch cannot run is reported, not fatal
            out[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[gpu] {mode}: {out[mode]}", flush=True)
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        del model, opt
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="overhead,models,data,optim,gpu")
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args()
    parts = args.only.split(",")
    result = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if "overhead" in parts:
        import bench_overhead

        steps = 30 if args.quick else 60
        # two alternating rounds, best of each: a slow spell of the shared machine hits one round, not one side
        plains, fws = [], []
        for _ in range(2):
            plains.append(bench_overhead.plain_loop([], steps, 8))
            fws.append(bench_overhead.lmkit_loop([], steps, 8))
        plain, fw = max(plains), max(fws)
        result["overhead"] = {"plain_tokens_per_s": plain, "lmkit_tokens_per_s": fw, "overhead_pct": 100 * (1 - fw / plain),
                              "rounds": {"plain": plains, "lmkit": fws}}
        print(f"[overhead] plain {plain:,.0f} tok/s, lmkit {fw:,.0f} tok/s: overhead {100 * (1 - fw / plain):.1f}% (target <= 5%)")
    if "models" in parts:
        result["models"] = bench_models(args.quick)
        for r in result["models"]:
            if "skipped" in r:
                print(f"[models] skipped: {r['skipped']}")
            else:
                bound = f"  (matmul {100 * r['matmul_share']:.0f}% + attention {100 * r['attention_share']:.0f}% of the step: bound {r['ratio_bound']:.2f}x)" if "ratio_bound" in r else ""
                if "chunked_ce_speedup" in r:
                    bound += f"  (chunked_ce={r['chunked_ce']} vs plain logits: {r['chunked_ce_speedup']:.2f}x)"
                print(f"[models] {r['setting']:<10} {r['model']:<5} lmkit {r['lmkit_tokens_per_s']:>9,.0f} tok/s  HF {r['hf_tokens_per_s']:>9,.0f} tok/s  ratio {r['ratio']:.2f}x (target >= 1.3x){bound}")
    if "data" in parts:
        result["data"] = bench_data(args.quick)
        d = result["data"]
        print(f"[data] tokenize+pack (byte): {d['tokenize_pack_byte_tokens_per_s']:,.0f} tokens/s")
        for r in d["noise"]:
            print(f"[data] {r.get('name', r)}: {r}")
        print(f"[data] mlm vs HF DataCollatorForLanguageModeling: {d['mlm_vs_hf_collator']}")
    if "optim" in parts:
        result["optim"] = bench_optim()
        for r in result["optim"]:
            print(f"[optim] {r['shape']}: AdamW {r['adamw_state_bytes'] / 2**20:.1f} MiB, Adafactor {r['adafactor_state_bytes'] / 2**20:.2f} MiB, "
                  f"SGD {r['sgd_state_bytes'] / 2**20:.1f} MiB; Adafactor/AdamW on 2-D weights {100 * r['adafactor_over_adamw_2d']:.2f}%")
    if "gpu" in parts:
        result["gpu"] = bench_gpu(args.quick)
        print(f"[gpu] {result['gpu']}")
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
