"""`--section cache`: what the block KV cache saves on one decode (SPEC section 6).

A random native LLaDA whose layers dominate its cost (width 256, 4 layers, vocabulary 4,096),
prompts of 64 tokens, a 128-position window in blocks of 16 with one step per position, 16 slots
and 16 prompts: wall time and forward tokens of one decode with cache none, prefix and dual, for
Full, confidence_threshold and Prophet. Ratios are over `none` under the same rule, measured in
one run (runs interleaved, the best of `--repeats` counts). The positions alone predict 0.41
(prefix) and 0.14 (dual) for Full.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial

import torch

from benchmarks.harness import Table, interleaved
from prophet import DecodeConfig, decode
from prophet.models import CHAR_TOKEN_IDS, LLaDAConfig, LLaDAModel, NativeAdapter, char_tokenizer

CACHES = ("none", "prefix", "dual")
RULES = {"full": dict(rule="full"), "confidence_threshold": dict(rule="confidence_threshold", confidence=0.9),
         "prophet": dict(rule="prophet", region="window", statistic="min")}
CASES_TABLE = Table(("rule", "<21"), ("cache", "<7"), ("wall s", "8.2f"), ("wall/none", "9.3f"),
                    ("fwd tokens", "11d"), ("tok/none", "8.3f"), ("mean steps", "10.1f"))


def random_llada(width: int = 256, layers: int = 4, vocab: int = 4096, seed: int = 0) -> NativeAdapter:
    """A random-weight native LLaDA behind the adapter (fp32, CPU)."""
    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=width, n_heads=4, n_layers=layers, mlp_hidden_size=4 * width, vocab_size=vocab,
                      max_sequence_length=1024, **CHAR_TOKEN_IDS)
    return NativeAdapter(LLaDAModel(cfg).eval(), char_tokenizer(), name=f"random-llada-{width}x{layers}")


def workload(n: int, prompt: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of `prompt` content tokens (ids past the special ones)."""
    g = torch.Generator().manual_seed(seed)
    first = max(CHAR_TOKEN_IDS.values()) + 1
    return torch.randint(first, vocab, (n, prompt), generator=g).tolist()


def run(args: argparse.Namespace) -> dict:
    """Wall time and forward tokens of one decode per cache mode and rule; ratios over none."""
    model = random_llada(vocab=args.cache_vocab)
    prompts = workload(args.cache_slots, args.cache_prompt, args.cache_vocab)
    G = args.cache_window
    base = DecodeConfig(gen_length=G, steps=G, block_length=args.cache_block, batch_size=args.cache_slots,
                        thresholds=(8.0, 5.0, 3.0))
    cases = [(rule, cache) for rule in RULES for cache in CACHES]
    runs = interleaved({(rule, cache): partial(decode, model, prompts, replace(base, cache=cache, **RULES[rule]))
                        for rule, cache in cases}, args.repeats)
    best = {case: t.wall_s for case, t in runs.items()}
    tokens = {case: int(t.result.forward_tokens.sum()) for case, t in runs.items()}
    steps = {case: float(t.result.steps_used.double().mean()) for case, t in runs.items()}
    out: dict = {"model": model.name, "prompt": args.cache_prompt, "window": G, "block": args.cache_block,
                 "slots": args.cache_slots, "threads": torch.get_num_threads(), "cases": []}
    print(f"cache: {model.name}, vocab {args.cache_vocab}, prompt {args.cache_prompt}, window {G}, "
          f"blocks of {args.cache_block}, {args.cache_slots} slots/prompts, best of {args.repeats}")
    print(CASES_TABLE.header())
    for rule, cache in cases:
        wall_ratio = best[rule, cache] / best[rule, "none"]
        tok_ratio = tokens[rule, cache] / tokens[rule, "none"]
        out["cases"].append({"rule": rule, "cache": cache, "wall_s": best[rule, cache],
                             "forward_tokens": tokens[rule, cache], "mean_steps": steps[rule, cache],
                             "wall_ratio": wall_ratio, "token_ratio": tok_ratio})
        print(CASES_TABLE.row(rule, cache, best[rule, cache], wall_ratio, tokens[rule, cache], tok_ratio,
                              steps[rule, cache]))
    for cache in ("prefix", "dual"):
        out[f"{cache}_wall_ratio"] = best["full", cache] / best["full", "none"]
        out[f"{cache}_token_ratio"] = tokens["full", cache] / tokens["full", "none"]
    print(f"  Full: prefix wall {out['prefix_wall_ratio']:.3f} (target <= 0.5), "
          f"dual wall {out['dual_wall_ratio']:.3f} (target <= 0.25)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags."""
    p.add_argument("--cache-prompt", type=int, default=64, help="cache: prompt tokens")
    p.add_argument("--cache-window", type=int, default=128, help="cache: generation window (= steps)")
    p.add_argument("--cache-block", type=int, default=16, help="cache: block length")
    p.add_argument("--cache-slots", type=int, default=16, help="cache: slots (and prompts)")
    p.add_argument("--cache-vocab", type=int, default=4096, help="cache: vocabulary of the random model")
