"""Part of `--section gpu`: SDAR-8B and Fast-dLLM-v2-7B shapes with random bf16 weights on the block host.

Per family: the milliseconds of one cached block pass of 32 rows (each row's next attention block,
its queries attending to a cached prompt of `--gpu-prompt` positions; Fast-dLLM v2 also runs the
position before the block, its shift), and decode tokens/s of 32 prompts through `prophet.decode`
on the block host (window `--gpu-window`, 4 tokens per step, rules full and confidence_threshold
0.9). Random weights give no real confidence, so the threshold rarely fires: the rows time the
passes, not the rule's savings. `--gpu-model tiny` runs the same code on a CPU in seconds.
"""
from __future__ import annotations

import time

import torch

from benchmarks.forward import _building_on
from benchmarks.harness import Table, best_seconds, sync
from prophet import DecodeConfig, decode
from prophet.models import (CHAR_TOKEN_IDS, DreamModel, FastDLLMConfig, NativeAdapter, SDARConfig, SDARModel,
                            char_tokenizer)

ROWS = 32
TINY = dict(vocab_size=char_tokenizer().vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **CHAR_TOKEN_IDS)
TABLE = Table(("family", "<16"), ("block", "5d"), ("pass ms", "8.2f"), ("rule", "<21"), ("tok/s", "9.1f"),
              ("mean steps", "10.1f"), ("peak GiB", "8.2f"))


def families(tiny: bool) -> dict[str, object]:
    """The flagship configs (SDAR-8B-Chat at block 4, Fast_dLLM_v2_7B at 32), or tiny ones of the same kinds."""
    if tiny:
        return {"sdar-tiny": SDARConfig(**TINY, head_dim=16), "fast-dllm-tiny": FastDLLMConfig(**TINY, bd_size=8)}
    return {"sdar-8b": SDARConfig(), "fast-dllm-v2-7b": FastDLLMConfig()}


def block_pass_ms(model: NativeAdapter, prompt: int, device: torch.device, repeats: int) -> float:
    """Milliseconds of one scored block pass of ROWS rows against a cached prompt of `prompt` positions."""
    bl, lead = int(model.block_length), model.query_lead
    prompt = max(bl, prompt // bl * bl)  # whole blocks, so the pass is one block
    model.setup_cache(ROWS, prompt + bl)
    slots, g = torch.arange(ROWS, device=device), torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.vocab_size, (ROWS, prompt + bl), generator=g).to(device)
    pos = torch.arange(prompt + bl, device=device).expand(ROWS, -1)
    model.block_logits(ids[:, :prompt], pos[:, :prompt], slots, torch.full((ROWS,), prompt, device=device), 0,
                       scored=False)
    q = slice(prompt - lead, prompt + bl)
    ends = torch.full((ROWS,), prompt + bl, device=device)
    seconds = best_seconds(lambda: model.block_logits(ids[:, q], pos[:, q], slots, ends, 0), device, repeats)
    model.drop_cache()
    return seconds * 1e3


def run_block_families(tiny: bool, prompt: int, window: int, repeats: int, budget_s: float) -> list[dict]:
    """Per family: the block pass and one decode per rule, until `budget_s` is spent; returns the rows."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, t0 = [], time.perf_counter()
    for name, cfg in families(tiny).items():
        if time.perf_counter() - t0 > budget_s:
            rows.append({"family": name, "skipped": "time budget spent"})
            continue
        with _building_on(device, dtype):
            module = (SDARModel(cfg) if isinstance(cfg, SDARConfig) else DreamModel(cfg)).eval()
        model = NativeAdapter(module, char_tokenizer(), name=f"random-{name}")
        ms = block_pass_ms(model, prompt, device, repeats)
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(5, model.vocab_size, (ROWS, prompt), generator=g).tolist()
        for rule, kw in {"full": {}, "confidence_threshold": {"confidence": 0.9}}.items():
            base = DecodeConfig(host="block", gen_length=window, steps=window // min(4, model.block_length),
                                batch_size=ROWS, rule=rule, **kw)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            res = decode(model, prompts, base)
            sync(device)
            wall = time.perf_counter() - t
            rows.append({"family": name, "block": model.block_length, "pass_ms": ms, "rule": rule, "wall_s": wall,
                         "tokens_per_s": ROWS * window / wall, "mean_steps": float(res.steps_used.double().mean()),
                         "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                             if device.type == "cuda" else None)})
        del model, module
    return rows


def print_rows(rows: list[dict]) -> None:
    """The people's table of run_block_families."""
    print(f"gpu: block families, {ROWS} rows, random weights")
    print(TABLE.header())
    for r in rows:
        if "skipped" in r:
            print(f"  {r['family']:<16} skipped: {r['skipped']}")
            continue
        print(TABLE.row(r["family"], r["block"], r["pass_ms"], r["rule"], r["tokens_per_s"], r["mean_steps"],
                        r["peak_memory_gib"]))
