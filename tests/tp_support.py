"""What each rank of tests/test_tensor_parallel.py runs (importable by name: the ranks are spawned
processes). Every rank decodes every case whole first (no collectives: tp 1), then shards the model
over the group and decodes them again (tp 2); rank 0's record goes back to the test."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("12+30=", "abc", "hello there", "x")
CHECKPOINTS = ("tiny-llada", "tiny-dream", "tiny-llada2")
RANDOM = ("sdar", "sdar_moe", "fast_dllm", "llada_moe")


def load(name: str):
    """A trained tiny checkpoint, or a random tiny model of a family with its head scaled so that its
    ranking gaps are wide (the ranks' partial sums differ from one rank's sum in the last bits, and
    DeepSpeed takes no float64)."""
    from prophet.models import NativeAdapter, char_tokenizer, load_model

    if name in CHECKPOINTS:
        return load_model(str(ROOT / "checkpoints" / name), device="cpu", dtype=torch.float32)
    from tests.test_more_families import tiny

    module = tiny(name, seed=3)
    with torch.no_grad():
        module.lm_head.weight.mul_(40)  # probabilities and gaps that span the rules' thresholds
    return NativeAdapter(module, char_tokenizer())


def configs(model) -> dict[str, dict]:
    """The decode settings compared: caches x temperature x rule on the bidirectional hosts; the block
    host's default, Prophet and sampling on the block families."""
    if model.default_host == "block":
        return {"block-full": {}, "block-prophet": dict(rule="prophet", region="window", thresholds=(2.0, 1.5, 1.0)),
                "block-sampled": dict(temperature=0.7)}
    out = {}
    for cache, temperature, rule in itertools.product(("none", "prefix", "dual"), (0.0, 0.7), ("full", "prophet")):
        kw = dict(cache=cache, temperature=temperature, rule=rule, block_length=8)
        if rule == "prophet":
            kw.update(thresholds=(2.0, 1.5, 1.0))
        out[f"{cache}-T{temperature}-{rule}"] = kw
    return out


def decode_all(model, cases: dict[str, dict]) -> dict[str, list]:
    """Every case's tokens and steps."""
    from prophet import DecodeConfig, decode

    prompts = [model.encode(p) for p in PROMPTS]
    out = {}
    for key, kw in cases.items():
        cfg = DecodeConfig(host=model.default_host, gen_length=16, steps=16, batch_size=2, **kw)
        res = decode(model, prompts, cfg, seeds=[11, 12, 13, 14])
        out[key] = [res.tokens.tolist(), res.steps_used.tolist()]
    return out


def count_all_reduces(model) -> int:
    """All-reduces in one forward of the (sharded) model (the benchmark's clock counts them)."""
    from benchmarks.tp import CollectiveClock

    with CollectiveClock().installed() as clock:
        model.logits(torch.tensor([model.encode("12+30=")]), None)
    return clock.calls


def compare(rank: int, world: int, names: tuple[str, ...]) -> dict:
    """Per model: tokens/steps of every case at tp 1 and at tp `world`, the parameters this rank holds,
    the KV heads its cache holds, the all-reduces per forward and the layer count."""
    from pipeline.parallel import shard_with_deepspeed

    record = {}
    for name in names:
        model = load(name)
        cases = configs(model)
        whole = decode_all(model, cases)
        raw = model.module
        before = {n: p.numel() for n, p in raw.named_parameters()}
        model.module = shard_with_deepspeed(raw, model.dtype, world)
        sharded = decode_all(model, cases)
        after = {n: p.numel() for n, p in raw.named_parameters()}
        raw.setup_cache(1, 8)
        kv_heads = raw.cache_holders()[0].kv_cache.k.shape[2]
        raw.drop_cache()
        record[name] = dict(whole=whole, sharded=sharded, before=before, after=after, kv_heads=kv_heads,
                            all_kv_heads=raw.kv_heads, all_reduces=count_all_reduces(model),
                            layers=len(raw.cache_holders()), untied_head=getattr(raw, "lm_head", None) is not None)
    return record
