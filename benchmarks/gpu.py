"""`--section gpu`: the one script for a lent H100/H200 (torch only: no Ray or DeepSpeed there).

1. Forward MFU of native LLaDA-8B with random bf16 weights at `--section forward`'s shapes.
2. Decode tokens/s and peak memory at prompt 128 / window 256 / blocks of 32 / 32 slots (32
   prompts) for cache none/prefix/dual x Full / Prophet / confidence_threshold. Random weights
   never give Prophet a confident gap, so its rows cost what Full's do: they time the rule's own
   overhead; the step savings come from the trained models (evaluate). The budget is `--gpu-steps`
   steps (default 64: 8 per block of 32, 4 tokens per step) so that all nine decodes fit.

3. SDAR-8B and Fast-dLLM-v2-7B with random bf16 weights on the block host: ms of one cached block
   pass of 32 rows, decode tokens/s (benchmarks/block_families.py), within `--gpu-families-s`.

Every decode stops the section cleanly when `--gpu-budget-s` is spent, so the whole run finishes
in under 8 minutes; on a CPU `--gpu-model tiny` runs the same code in seconds.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from benchmarks.block_families import print_rows, run_block_families
from benchmarks.forward import MODELS, measure_forward, parse_shapes, print_shapes, random_llada
from benchmarks.harness import Table, sync
from prophet import DecodeConfig, decode
from prophet.models import NativeAdapter, char_tokenizer

CACHES = ("none", "prefix", "dual")
RULES = {"full": dict(rule="full"), "prophet": dict(rule="prophet", region="window", statistic="min"),
         "confidence_threshold": dict(rule="confidence_threshold", confidence=0.9)}
NEEDS_GPU = True  # not in jobs/bench.py's default sections without one
DECODE_TABLE = Table(("cache", "<7"), ("rule", "<21"), ("wall s", "8.2f"), ("tok/s", "9.1f"), ("fwd tokens", "11d"),
                     ("peak GiB", "8.2f"))


def decode_table(model: NativeAdapter, base: DecodeConfig, prompts: list[list[int]], budget_s: float) -> list[dict]:
    """One decode per (cache, rule): wall seconds, generated tokens/s, forward tokens, peak memory."""
    device = torch.device(model.device)
    decode(model, prompts[:2], replace(base, steps=base.num_blocks, batch_size=2))  # warm-up (kernels, allocator)
    rows, t_start = [], time.perf_counter()
    for cache in CACHES:
        for rule, kw in RULES.items():
            if time.perf_counter() - t_start > budget_s:
                rows.append({"cache": cache, "rule": rule, "skipped": "time budget spent"})
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            res = decode(model, prompts, replace(base, cache=cache, **kw))
            sync(device)
            wall = time.perf_counter() - t0
            rows.append({"cache": cache, "rule": rule, "wall_s": wall,
                         "tokens_per_s": len(prompts) * base.gen_length / wall,
                         "mean_steps": float(res.steps_used.double().mean()),
                         "forward_tokens": int(res.forward_tokens.sum()),
                         "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                             if device.type == "cuda" else None)})
    return rows


def run(args: argparse.Namespace) -> dict:
    """Forward MFU, then the decode table; prints both, returns the JSON object."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu_model == "llada-8b" and device.type != "cuda":
        raise SystemExit("bench gpu: LLaDA-8B needs a GPU; --gpu-model tiny runs the same code on a CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = MODELS[args.gpu_model]
    t0 = time.perf_counter()
    fwd = measure_forward(cfg, parse_shapes(args.forward_shapes), device, dtype, repeats=args.repeats,
                          peak_n=args.peak_n if device.type == "cuda" else 256)
    print(f"gpu: forward of {args.gpu_model} (random {fwd['dtype']}) on {fwd['device']}, "
          f"matmul peak {fwd['matmul_peak_tflops']:.1f} TFLOP/s")
    print_shapes(fwd)
    model = NativeAdapter(random_llada(cfg, device, dtype), char_tokenizer(), name=f"random-{args.gpu_model}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.gpu_slots, args.gpu_prompt), generator=g)
    special = torch.tensor([model.mask_id, model.pad_id, model.eos_id])
    prompts = torch.where(torch.isin(ids, special), special.max() + 1, ids).tolist()  # no special id in prompts
    base = DecodeConfig(gen_length=args.gpu_window, steps=args.gpu_steps, block_length=args.gpu_block,
                        batch_size=args.gpu_slots)
    budget = args.gpu_budget_s - (time.perf_counter() - t0)
    rows = decode_table(model, base, prompts, budget)
    print(f"gpu: decode, prompt {args.gpu_prompt}, window {args.gpu_window}, blocks of {args.gpu_block}, "
          f"{args.gpu_steps} steps, {args.gpu_slots} slots")
    print(DECODE_TABLE.header())
    for r in rows:
        if "skipped" in r:
            print(f"  {r['cache']:<7} {r['rule']:<21} skipped: {r['skipped']}")
            continue
        print(DECODE_TABLE.row(r["cache"], r["rule"], r["wall_s"], r["tokens_per_s"], r["forward_tokens"],
                               r["peak_memory_gib"]))
    families = block_families(args)
    return {"forward": fwd, "decode": rows, "block_families": families, "total_s": time.perf_counter() - t0}


def block_families(args: argparse.Namespace) -> list[dict]:
    """3. SDAR-8B and Fast-dLLM-v2-7B on the block host (benchmarks/block_families.py), own time budget."""
    rows = run_block_families(args.gpu_model == "tiny", args.gpu_prompt, args.gpu_window, args.repeats,
                              args.gpu_families_s)
    print_rows(rows)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags."""
    p.add_argument("--gpu-model", choices=["llada-8b", "tiny"], default="llada-8b",
                   help="gpu: LLaDA-8B (a GPU) or the tiny LLaDA (any device), random weights")
    p.add_argument("--gpu-prompt", type=int, default=128, help="gpu: prompt tokens")
    p.add_argument("--gpu-window", type=int, default=256, help="gpu: generation window")
    p.add_argument("--gpu-block", type=int, default=32, help="gpu: block length")
    p.add_argument("--gpu-steps", type=int, default=64, help="gpu: step budget of the window")
    p.add_argument("--gpu-slots", type=int, default=32, help="gpu: slots (and prompts)")
    p.add_argument("--gpu-budget-s", type=float, default=420.0, help="gpu: stop starting decodes after this")
    p.add_argument("--gpu-families-s", type=float, default=120.0,
                   help="gpu: stop starting SDAR / Fast-dLLM v2 decodes after this")
