"""`--section memory`: the decoder's working memory at a real vocabulary.

A one-layer random native LLaDA and Dream with LLaDA-8B's vocabulary (126,464) in bf16, 8 rows,
a 128-position window (LLaDA in blocks of 32, Dream one block), temperature 0 and 0.7, rules
Full and Prophet: the peak memory of one decode beyond the model, over the size of the bf16
window logits (8 x 128 x 126,464 x 2 bytes = 259 MB). Target: at most 2.0 in every case.

On a GPU the peak is torch.cuda.max_memory_allocated. On the CPU it is the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set before the
decode, in a child process whose malloc returns every block of 64 KiB or more to the system when
freed (MALLOC_MMAP_THRESHOLD_), so what is resident is what is allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness import ROOT, Table
from prophet import DecodeConfig, decode
from prophet.models import CHAR_TOKEN_IDS, DreamConfig, DreamModel, LLaDAConfig, LLaDAModel, NativeAdapter, char_tokenizer

VOCAB = 126_464
RULES = {"full": dict(rule="full"), "prophet": dict(rule="prophet", thresholds=(1e9, 1e9, 1e9))}  # never commits
CASES_TABLE = Table(("host", "<6"), ("temp", "5.1f"), ("rule", "<8"), ("peak MB", "9.0f"), ("peak/logits", "11.2f"))


def random_model(host: str, vocab: int = VOCAB, width: int = 64) -> NativeAdapter:
    """A one-layer random native model of the host's family, bf16, with a `vocab`-wide head."""
    torch.manual_seed(0)
    if host == "llada":
        module = LLaDAModel(LLaDAConfig(d_model=width, n_heads=2, n_layers=1, mlp_hidden_size=2 * width,
                                        vocab_size=vocab, max_sequence_length=512, **CHAR_TOKEN_IDS))
    else:
        ids = {"mask_token_id": CHAR_TOKEN_IDS["mask_token_id"], "pad_token_id": CHAR_TOKEN_IDS["pad_token_id"],
               "eos_token_id": CHAR_TOKEN_IDS["eos_token_id"], "bos_token_id": None, "eot_token_id": None}
        module = DreamModel(DreamConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                                        num_key_value_heads=1, num_hidden_layers=1, vocab_size=vocab,
                                        max_position_embeddings=512, **ids))
    return NativeAdapter(module.to(torch.bfloat16).eval(), char_tokenizer(), name=f"random-{host}-1x{width}")


def _rss(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_of(fn) -> int:
    """Peak bytes allocated while fn() runs, beyond what was allocated before."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - base


def measure(rows: int, window: int, steps: int, vocab: int) -> dict:
    """Every case's peak over the bf16 window logits."""
    logits_bytes = rows * window * vocab * 2
    out: dict = {"vocab": vocab, "rows": rows, "window": window, "steps": steps, "logits_mb": logits_bytes / 2**20,
                 "device": "cuda" if torch.cuda.is_available() else "cpu", "cases": []}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for host, block in (("llada", 32), ("dream", None)):
        model = random_model(host, vocab)
        if dev == "cuda":
            model.module.to(dev)
            model.device = torch.device(dev)
        first = max(CHAR_TOKEN_IDS.values()) + 1
        prompts = torch.randint(first, 200, (rows, 16), generator=torch.Generator().manual_seed(1)).tolist()
        base = DecodeConfig(host=host, gen_length=window, steps=steps, block_length=block, batch_size=rows)
        decode(model, prompts[:1], replace(base, gen_length=8, steps=8, block_length=None))  # warm the kernels
        for temperature in (0.0, 0.7):
            for rule, kw in RULES.items():
                cfg = replace(base, temperature=temperature, **kw)
                peak = _peak_of(lambda: decode(model, prompts, cfg))
                out["cases"].append({"host": host, "temperature": temperature, "rule": rule, "peak_mb": peak / 2**20,
                                     "peak_over_logits": peak / logits_bytes})
    out["peak_over_logits"] = max(c["peak_over_logits"] for c in out["cases"])
    return out


def run(args: argparse.Namespace) -> dict:
    """Run `measure` (in a child process on the CPU, see the module docstring) and print the table."""
    params = dict(rows=args.memory_rows, window=args.memory_window, steps=args.memory_steps, vocab=args.memory_vocab)
    if torch.cuda.is_available():
        out = measure(**params)
    else:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        code = f"import json; from benchmarks.memory import measure; print(json.dumps(measure(**{params!r})))"
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              check=True)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"memory: one-layer random models, vocab {out['vocab']}, bf16, {out['rows']} rows, window {out['window']}, "
          f"{out['steps']} steps, {out['device']}; bf16 window logits {out['logits_mb']:.0f} MB")
    CASES_TABLE.print([(c["host"], c["temperature"], c["rule"], c["peak_mb"], c["peak_over_logits"])
                       for c in out["cases"]])
    print(f"  worst {out['peak_over_logits']:.2f} (target <= 2.0)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags."""
    p.add_argument("--memory-rows", type=int, default=8, help="memory: rows in the batch")
    p.add_argument("--memory-window", type=int, default=128, help="memory: generation window")
    p.add_argument("--memory-steps", type=int, default=8, help="memory: steps (the peak is at the first)")
    p.add_argument("--memory-vocab", type=int, default=VOCAB, help="memory: vocabulary of the random models")
