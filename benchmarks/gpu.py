"""`--section gpu`: the one script for a lent H100/H200 (torch; DeepSpeed only for the tp check, no Ray).

1. Forward MFU of native LLaDA-8B with random bf16 weights at `--section forward`'s shapes.
2. Decode tokens/s and peak memory at prompt 128 / window 256 / blocks of 32 / 32 slots (32
   prompts) for cache none/prefix/dual x Full / Prophet / confidence_threshold. Random weights
   never give Prophet a confident gap, so its rows cost what Full's do: they time the rule's own
   overhead; the step savings come from the trained models (evaluate). The budget is `--gpu-steps`
   steps (default 64: 8 per block of 32, 4 tokens per step) so that all nine decodes fit.
3. LLaDA2-mini (SPEC section 8: 16B parameters, 256 experts of which 8 per token, 1.4B active)
   with random bf16 weights, built on the GPU (no CPU copy): the time of one forward of 32/64/128
   rows x one block (32 positions) against a 512-position cached prefix, and the MoE layers' share
   of it (each SparseMoE timed alone on the hidden states that forward gave it); then decode
   tokens/s and peak memory per rule (full, confidence_threshold 0.95, prophet on the block) on
   the block host, prompt 512, window 256, 32 slots. The cache holds zeros, not a prefill's keys:
   attention costs the same whatever the keys' values.

4. SDAR-8B and Fast-dLLM-v2-7B with random bf16 weights on the block host: ms of one cached block
   pass of 32 rows, decode tokens/s (benchmarks/block_families.py), within `--gpu-families-s`.

5. Where the machine has two or more GPUs: the tp check (benchmarks/tp.py's gpu_check). NCCL
   initialisation of two local ranks, a random LLaDA at --gpu-model's shape (fp32 by default, so
   that the ranks' partial sums agree with one device's sum closely enough for the tokens to be
   equal), one decode whole on rank 0 and one sharded by DeepSpeed AutoTP over both: tokens/s at
   tp 1 and tp 2 and whether the tokens are equal, within `--gpu-tp-s` seconds after the rest.
   With one GPU it prints that it was skipped and why; `--gpu-tp-backend gloo` runs it on CPU ranks.

Decodes stop starting once `--gpu-budget-s` is spent (LLaDA-8B's leave `--gpu-llada2-s` and
`--gpu-families-s` of it to the later parts, LLaDA2's leave `--gpu-families-s`), so the whole run
finishes in under 8 minutes on one GPU (with two or more, the tp check's `--gpu-tp-s` come on top:
under 10); on a CPU `--gpu-model tiny` runs the same code (tiny models of every
family) in seconds.
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace

import torch

from benchmarks.block import llada2_config, random_llada2
from benchmarks.block_families import print_rows, run_block_families
from benchmarks.cache import workload
from benchmarks.forward import MODELS, measure_forward, parse_shapes, print_shapes, random_llada
from benchmarks.harness import Table, best_seconds, sync
from benchmarks.tp import gpu_check, print_check
from prophet import DecodeConfig, decode
from prophet.models import CHAR_TOKEN_IDS, LLaDA2Config, NativeAdapter, char_tokenizer
from prophet.models.layers import CacheIndex
from prophet.models.moe import SparseMoE

CACHES = ("none", "prefix", "dual")
RULES = {"full": dict(rule="full"), "prophet": dict(rule="prophet", region="window", statistic="min"),
         "confidence_threshold": dict(rule="confidence_threshold", confidence=0.9)}
CASES = {(cache, rule): dict(cache=cache, **kw) for cache in CACHES for rule, kw in RULES.items()}
# the block host's rules: its exact cache always; confidence_threshold at the host's 0.95 (LLaDA2's)
BLOCK_CASES = {("exact", "full"): dict(rule="full"), ("exact", "confidence_threshold"): dict(rule="confidence_threshold"),
               ("exact", "prophet"): dict(rule="prophet", region="block")}
# the LLaDA2 shape run beside each --gpu-model: LLaDA2-mini's defaults (ids of the char tokenizer,
# in range of any vocabulary: random weights need no real tokenizer), or a tiny one for CPU runs
LLADA2 = {"llada-8b": ("llada2-mini", LLaDA2Config(**CHAR_TOKEN_IDS)),
          "tiny": ("llada2-tiny", llada2_config(width=64, layers=2, vocab=128, block=8))}
NEEDS_GPU = True  # not in jobs/bench.py's default sections without one
FORWARD2_TABLE = Table(("rows", ">5"), ("ms", "9.2f"), ("MoE ms", "9.2f"), ("MoE", ">6"), ("peak GiB", "8.2f"))
DECODE_TABLE = Table(("cache", "<7"), ("rule", "<21"), ("wall s", "8.2f"), ("tok/s", "9.1f"), ("fwd tokens", "11d"),
                     ("peak GiB", "8.2f"))


def _reset_peak(device: torch.device) -> None:
    """Free cached blocks and restart the device's high-water mark (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """The device's high-water mark since _reset_peak, GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def decode_table(model: NativeAdapter, base: DecodeConfig, prompts: list[list[int]], deadline: float,
                 cases: dict[tuple[str, str], dict] = CASES) -> list[dict]:
    """One decode per (cache, rule) case, started only before `deadline` (perf_counter seconds): wall
    seconds, generated tokens/s, forward tokens, peak memory."""
    device = torch.device(model.device)
    decode(model, prompts[:2], replace(base, steps=base.num_blocks, batch_size=2))  # warm-up (kernels, allocator)
    rows = []
    for (cache, rule), kw in cases.items():
        if time.perf_counter() > deadline:
            rows.append({"cache": cache, "rule": rule, "skipped": "time budget spent"})
            continue
        _reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        res = decode(model, prompts, replace(base, **kw))
        sync(device)
        wall = time.perf_counter() - t0
        rows.append({"cache": cache, "rule": rule, "wall_s": wall,
                     "tokens_per_s": len(prompts) * base.gen_length / wall,
                     "mean_steps": float(res.steps_used.double().mean()),
                     "forward_tokens": int(res.forward_tokens.sum()), "peak_memory_gib": _peak_gib(device)})
    return rows


def print_decode(rows: list[dict]) -> None:
    """decode_table's rows as the printed table."""
    print(DECODE_TABLE.header())
    for r in rows:
        if "skipped" in r:
            print(f"  {r['cache']:<7} {r['rule']:<21} skipped: {r['skipped']}")
            continue
        print(DECODE_TABLE.row(r["cache"], r["rule"], r["wall_s"], r["tokens_per_s"], r["forward_tokens"],
                               r["peak_memory_gib"]))


@torch.inference_mode()
def block_forward(net: torch.nn.Module, rows: int, prefix: int, device: torch.device, repeats: int) -> dict:
    """One cached forward of `rows` x one block after a `prefix`-position cache: its best seconds, the
    MoE layers' (each SparseMoE alone on the hidden states this forward gave it), peak memory."""
    bl = net.block_length
    _reset_peak(device)
    net.setup_cache(rows, prefix + bl)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(max(CHAR_TOKEN_IDS.values()) + 1, net.config.vocab_size, (rows, bl), device=device, generator=g)
    positions = (prefix + torch.arange(bl, device=device)).expand(rows, bl)  # (rows, bl) the block after the prefix
    index = CacheIndex(slots=torch.arange(rows, device=device), positions=positions,
                       lengths=torch.full((rows,), prefix + bl, device=device), first_slot=0)
    moe_inputs: list[tuple[SparseMoE, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: moe_inputs.append((mod, args[0])))
             for m in net.modules() if isinstance(m, SparseMoE)]
    try:
        net(ids, None, cache=index)
    finally:
        for h in hooks:
            h.remove()
    seconds = best_seconds(lambda: net(ids, None, cache=index), device, repeats)
    moe = best_seconds(lambda: [mod(x) for mod, x in moe_inputs], device, repeats)
    peak = _peak_gib(device)
    net.drop_cache()
    return {"rows": rows, "positions": bl, "prefix": prefix, "seconds": seconds, "moe_seconds": moe,
            "moe_share": moe / seconds, "moe_layers": len(moe_inputs), "peak_memory_gib": peak}


def run_llada2(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, deadline: float) -> dict:
    """LLaDA2 at --gpu-model's size: cached one-block forwards and their MoE share, then the block host's decodes."""
    label, cfg = LLADA2[args.gpu_model]
    model = random_llada2(cfg, device, dtype, name=f"random-{label}")
    net = model.module
    params = sum(p.numel() for p in net.parameters())
    rows_list = [int(r) for r in args.gpu_llada2_rows.split(",")]
    fwd = [block_forward(net, r, args.gpu_llada2_prefix, device, args.repeats) for r in rows_list]
    print(f"gpu: {label} (random {str(dtype).removeprefix('torch.')}, {params / 1e9:.2f}B parameters) on {device}: "
          f"one block of {net.block_length} after a {args.gpu_llada2_prefix}-position cache")
    FORWARD2_TABLE.print([(r["rows"], 1e3 * r["seconds"], 1e3 * r["moe_seconds"], f"{100 * r['moe_share']:5.1f}%",
                           r["peak_memory_gib"]) for r in fwd])
    prompts = workload(args.gpu_llada2_slots, args.gpu_llada2_prefix, cfg.vocab_size)
    base = DecodeConfig(host="block", gen_length=args.gpu_llada2_window, steps=args.gpu_llada2_window,
                        block_length=net.block_length, batch_size=args.gpu_llada2_slots)
    rows = decode_table(model, base, prompts, deadline, BLOCK_CASES)
    print(f"gpu: {label} decode on the block host, prompt {args.gpu_llada2_prefix}, window {args.gpu_llada2_window} "
          f"(steps = window), {args.gpu_llada2_slots} slots")
    print_decode(rows)
    return {"model": label, "parameters": params, "forward": fwd, "decode": rows}


def run(args: argparse.Namespace) -> dict:
    """LLaDA-8B: forward MFU and the decode table; then LLaDA2 (run_llada2); prints each, returns the JSON object."""
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
    deadline = t0 + args.gpu_budget_s
    rows = decode_table(model, base, prompts, deadline - args.gpu_llada2_s - args.gpu_families_s)
    print(f"gpu: decode, prompt {args.gpu_prompt}, window {args.gpu_window}, blocks of {args.gpu_block}, "
          f"{args.gpu_steps} steps, {args.gpu_slots} slots")
    print_decode(rows)
    del model  # LLaDA-8B's 16 GB leave the device before LLaDA2-mini's 32 GB arrive
    gc.collect()  # a reference cycle would keep them until the next collection
    _reset_peak(device)
    llada2 = run_llada2(args, device, dtype, deadline - args.gpu_families_s)
    gc.collect()
    families = block_families(args, deadline)
    tp = tp_check(args)
    return {"forward": fwd, "decode": rows, "llada2": llada2, "block_families": families, "tp": tp,
            "total_s": time.perf_counter() - t0}


def tp_check(args: argparse.Namespace) -> dict:
    """5. tp 1 against tp 2 on two GPUs of this machine (NCCL), or why it was skipped."""
    spec = dict(prompt=args.gpu_tp_prompt, window=args.gpu_tp_window, steps=args.gpu_tp_steps, block=args.gpu_tp_block,
                slots=args.gpu_tp_slots, cache=args.gpu_tp_cache)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.gpu_tp_dtype]
    if torch.cuda.is_available():  # rank 0 shares GPU 0 with this process: hand back what its caches hold
        gc.collect()
        _reset_peak(torch.device("cuda"))
    out = gpu_check(MODELS[args.gpu_model], spec, dtype, args.gpu_tp_s, args.gpu_tp_backend)
    print_check(out)
    return out


def block_families(args: argparse.Namespace, deadline: float) -> list[dict]:
    """4. SDAR-8B and Fast-dLLM-v2-7B on the block host (benchmarks/block_families.py), until the deadline."""
    rows = run_block_families(args.gpu_model == "tiny", args.gpu_prompt, args.gpu_window, args.repeats,
                              max(0.0, deadline - time.perf_counter()))
    print_rows(rows)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags."""
    p.add_argument("--gpu-model", choices=["llada-8b", "tiny"], default="llada-8b",
                   help="gpu: LLaDA-8B then LLaDA2-mini (a GPU), or tiny models of both (any device); random weights")
    p.add_argument("--gpu-prompt", type=int, default=128, help="gpu: prompt tokens")
    p.add_argument("--gpu-window", type=int, default=256, help="gpu: generation window")
    p.add_argument("--gpu-block", type=int, default=32, help="gpu: block length")
    p.add_argument("--gpu-steps", type=int, default=64, help="gpu: step budget of the window")
    p.add_argument("--gpu-slots", type=int, default=32, help="gpu: slots (and prompts)")
    p.add_argument("--gpu-budget-s", type=float, default=420.0, help="gpu: stop starting decodes after this")
    p.add_argument("--gpu-llada2-s", type=float, default=150.0,
                   help="gpu: seconds of --gpu-budget-s that LLaDA-8B's decodes leave to LLaDA2's")
    p.add_argument("--gpu-llada2-rows", default="32,64,128", help="gpu: LLaDA2 forward, rows of one block each")
    p.add_argument("--gpu-llada2-prefix", type=int, default=512,
                   help="gpu: LLaDA2 cached prefix of the forward, and the decode's prompt tokens")
    p.add_argument("--gpu-llada2-window", type=int, default=256, help="gpu: LLaDA2 decode window (= steps)")
    p.add_argument("--gpu-llada2-slots", type=int, default=32, help="gpu: LLaDA2 decode slots (and prompts)")
    p.add_argument("--gpu-families-s", type=float, default=120.0,
                   help="gpu: stop starting SDAR / Fast-dLLM v2 decodes after this")
    p.add_argument("--gpu-tp-s", type=float, default=90.0,
                   help="gpu: seconds after the rest in which the tp check (2+ GPUs) starts its decodes")
    p.add_argument("--gpu-tp-backend", choices=["nccl", "gloo"], default="nccl",
                   help="gpu: the tp check's process group (nccl: needs 2 GPUs, else skipped; gloo: CPU ranks)")
    p.add_argument("--gpu-tp-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="gpu: tp check dtype (bf16's rounding of the ranks' partial sums may flip near-tied tokens)")
    p.add_argument("--gpu-tp-prompt", type=int, default=64, help="gpu: tp check prompt tokens")
    p.add_argument("--gpu-tp-window", type=int, default=64, help="gpu: tp check generation window")
    p.add_argument("--gpu-tp-steps", type=int, default=16, help="gpu: tp check step budget")
    p.add_argument("--gpu-tp-block", type=int, default=32, help="gpu: tp check block length")
    p.add_argument("--gpu-tp-slots", type=int, default=8, help="gpu: tp check slots (and prompts)")
    p.add_argument("--gpu-tp-cache", choices=list(CACHES), default="none", help="gpu: tp check cache mode")
