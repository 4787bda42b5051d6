"""`--section block`: what the block host's exact KV cache saves on one decode (SPEC section 8).

A random LLaDA2-family model whose layers dominate its cost (width 256, 4 layers, 8 experts of
which 2 per token plus a shared one, vocabulary 4,096, blocks of 16), prompts of several blocks,
16 slots and 16 prompts: wall time and forward tokens of one decode with the block host (prefill,
one block per step, one store pass per block, continuous batching) against the reference's way
(`decode_reference`: one row at a time, every pass recomputing the whole prefix), per rule, and
the look-ahead's cost (Prophet with 0 and 1 look-ahead blocks). Ratios are cache over reference
under the same rule, measured in one run (runs interleaved, the best of `--repeats` counts).
Random weights give no real confidence: Prophet rarely fires here; its accuracy per forward token
is the trained model's question (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial

import torch

from benchmarks.harness import Table, interleaved
from benchmarks.cache import workload
from benchmarks.forward import random_model
from prophet import DecodeConfig, decode, decode_reference
from prophet.models import CHAR_TOKEN_IDS, LLaDA2Config, LLaDA2Model, NativeAdapter, char_tokenizer

RULES = {"full": dict(rule="full"), "confidence_threshold": dict(rule="confidence_threshold"),
         "prophet": dict(rule="prophet", region="window"),
         "prophet+lookahead1": dict(rule="prophet", region="window", lookahead=1)}
TABLE = Table(("rule", "<19"), ("way", "<9"), ("wall s", "8.2f"), ("wall/ref", "8.3f"), ("fwd tokens", "11d"),
              ("tok/ref", "8.3f"), ("mean steps", "10.1f"))


def llada2_config(width: int = 256, layers: int = 4, vocab: int = 4096, block: int = 16) -> LLaDA2Config:
    """A small LLaDA2-family shape (8 experts, 2 per token in 2 groups, a shared expert, a dense first layer)."""
    return LLaDA2Config(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, num_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=width,
                        num_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=2048,
                        block_length=block, **CHAR_TOKEN_IDS)


def random_llada2(cfg: LLaDA2Config, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                  seed: int = 0, name: str | None = None) -> NativeAdapter:
    """A random-weight LLaDA2-family model of `cfg` behind the adapter, built on the device in the dtype."""
    torch.manual_seed(seed)
    net = random_model(LLaDA2Model, cfg, device, dtype)
    return NativeAdapter(net, char_tokenizer(), name=name or f"random-llada2-{cfg.hidden_size}x{cfg.num_hidden_layers}")


def run(args: argparse.Namespace) -> dict:
    """Wall time and forward tokens of one decode per rule, cached block host vs recomputing reference."""
    model = random_llada2(llada2_config(vocab=args.block_vocab, block=args.block_block))
    prompts = workload(args.block_slots, args.block_prompt, args.block_vocab)
    G = args.block_window
    base = DecodeConfig(host="block", gen_length=G, steps=G, batch_size=args.block_slots, thresholds=(8.0, 5.0, 3.0))
    ways = {"cache": decode, "ref": decode_reference}
    cases = [(rule, way) for rule in RULES for way in ways]
    runs = interleaved({(rule, way): partial(ways[way], model, prompts, replace(base, **RULES[rule]))
                        for rule, way in cases}, args.repeats)
    best = {case: t.wall_s for case, t in runs.items()}
    tokens = {case: int(t.result.forward_tokens.sum()) for case, t in runs.items()}
    steps = {case: float(t.result.steps_used.double().mean()) for case, t in runs.items()}
    # the ways differ in cost only (in fp32 a near-tie may flip a token: reported, not asserted)
    same = {rule: bool(torch.equal(runs[rule, "cache"].result.tokens, runs[rule, "ref"].result.tokens))
            for rule in RULES}
    out: dict = {"model": model.name, "prompt": args.block_prompt, "window": G, "block": args.block_block,
                 "slots": args.block_slots, "threads": torch.get_num_threads(), "tokens_equal": same, "cases": []}
    print(f"block: {model.name}, vocab {args.block_vocab}, prompt {args.block_prompt}, window {G}, blocks of "
          f"{args.block_block}, {args.block_slots} slots/prompts, best of {args.repeats}")
    print(TABLE.header())
    for rule, way in cases:
        wall_ratio, tok_ratio = best[rule, way] / best[rule, "ref"], tokens[rule, way] / tokens[rule, "ref"]
        out["cases"].append({"rule": rule, "way": way, "wall_s": best[rule, way], "forward_tokens": tokens[rule, way],
                             "mean_steps": steps[rule, way], "wall_ratio": wall_ratio, "token_ratio": tok_ratio})
        print(TABLE.row(rule, way, best[rule, way], wall_ratio, tokens[rule, way], tok_ratio, steps[rule, way]))
    out["cache_wall_ratio"] = best["full", "cache"] / best["full", "ref"]
    out["cache_token_ratio"] = tokens["full", "cache"] / tokens["full", "ref"]
    out["lookahead_token_ratio"] = tokens["prophet+lookahead1", "cache"] / tokens["prophet", "cache"]
    print(f"  Full: cache/ref wall {out['cache_wall_ratio']:.3f}, forward tokens {out['cache_token_ratio']:.3f}; "
          f"look-ahead 1 costs {out['lookahead_token_ratio']:.2f}x the forward tokens of Prophet without")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags."""
    p.add_argument("--block-prompt", type=int, default=64, help="block: prompt tokens")
    p.add_argument("--block-window", type=int, default=128, help="block: generation window (= steps)")
    p.add_argument("--block-block", type=int, default=16, help="block: the model's attention block")
    p.add_argument("--block-slots", type=int, default=16, help="block: slots (and prompts)")
    p.add_argument("--block-vocab", type=int, default=4096, help="block: vocabulary of the random model")
