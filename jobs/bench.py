"""Benchmarks by section; a table for people, then one JSON object as the last line of stdout.

    .venv/bin/python jobs/bench.py --section batching
    .venv/bin/python jobs/bench.py --section batching --model scripted   # force the scripted model

Each section is one function `(args) -> dict`, registered in SECTIONS; the printed JSON is
{section: dict, ...}. Ratios are measured within one run; no absolute time is a target.

batching: decode N prompts whose rows commit at mixed steps with `full` and with `prophet`, and
report (wall-clock speed-up) / (step speed-up) with continuous batching, with finished rows
frozen in static batches, and at batch size 1. Model: the tiny trained LLaDA on Sudoku when
checkpoints/tiny-llada exists, else ScriptedDLM whose forward also runs a real MLP over
embeddings of every position (so a step costs real compute in proportion to rows x length).

pipeline: steady rows/s of jobs/generate.py's pipeline (2 actors, local Ray) over the bare decode
loop on the same prompts, and the fixed start-up seconds (benchmarks/throughput.py).

forward (GPU): the native LLaDA-8B with random bf16 weights, one forward per batch x sequence
(default 1x384, 8x384, 32x512): time, TFLOP/s, MFU against the bf16 matmul peak measured on the
same GPU, and peak memory (benchmarks/forward.py).

    .venv/bin/python jobs/bench.py --section forward                      # on a GPU machine
    .venv/bin/python jobs/bench.py --section forward --forward-model tiny  # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prophet import DecodeConfig, DecodeResult, decode  # noqa: E402
from prophet.scripted import ScriptedDLM  # noqa: E402
from prophet.types import DLM, last_positions  # noqa: E402
from benchmarks import cache as cache_section  # noqa: E402
from benchmarks import gpu as gpu_section  # noqa: E402
from benchmarks import memory as memory_section  # noqa: E402

TINY_LLADA = ROOT / "checkpoints" / "tiny-llada"


class CostlyScriptedDLM(ScriptedDLM):
    """ScriptedDLM whose forward also runs a real MLP over every position, like a model's cost.

    The MLP's output enters the logits multiplied by zero (exactly: its values are bounded), so
    the scripted logits, and every decision, are unchanged.
    """

    def __init__(self, gen_length: int, hidden: int = 128, layers: int = 2, seed: int = 0) -> None:
        super().__init__(gen_length)
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(self.vocab_size, hidden, generator=g) / hidden ** 0.5
        self.weights = [(torch.randn(hidden, 4 * hidden, generator=g) / hidden ** 0.5,
                         torch.randn(4 * hidden, hidden, generator=g) / (4 * hidden) ** 0.5) for _ in range(layers)]

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Scripted logits plus zero times a bounded function of the MLP's hidden states."""
        h = self.embed[ids]  # (B, L, H)
        for w_in, w_out in self.weights:
            h = h + torch.nn.functional.gelu(h @ w_in) @ w_out
        return super().logits(ids, attention_mask, last) + 0.0 * torch.tanh(last_positions(h, last)[..., :1])


@dataclass
class Workload:
    """A model, its prompts and the two decode settings compared."""

    name: str
    model: DLM
    prompts: list[list[int]]
    full: DecodeConfig
    prophet: DecodeConfig


def scripted_workload(n: int, batch_size: int) -> Workload:
    """ScriptedDLM with real MLP compute, 32-position window, prompts of 8-24 tokens."""
    G = 32
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 25, (n,), generator=g).tolist()
    prompts = [torch.randint(4, 32, (k,), generator=g).tolist() for k in lens]
    full = DecodeConfig(gen_length=G, steps=G, block_length=G, batch_size=batch_size)
    name = "ScriptedDLM + 2-layer MLP (hidden 128) per position (scripted stand-in)"
    return Workload(name, CostlyScriptedDLM(G), prompts, full, replace(full, rule="prophet"))


def tiny_workload(n: int, batch_size: int) -> Workload:
    """The tiny trained LLaDA on held-out Sudoku prompts; prophet as calibrated for it."""
    from prophet.models import load_model
    from prophet.tasks import get_task
    from prophet.tasks.evaluation import task_config

    model = load_model(TINY_LLADA)
    task = get_task("sudoku4")
    prompts = [model.encode(ex.prompt) for ex in task.examples("test", n, seed=0)]
    full = replace(task_config(model, task), batch_size=batch_size)
    cal = TINY_LLADA / "calibration.json"
    prophet = full.with_calibration(cal) if cal.exists() else replace(full, rule="prophet")
    prophet = replace(prophet, rule="prophet")
    return Workload("tiny-llada (checkpoints/tiny-llada) on sudoku4 test prompts", model, prompts, full, prophet)


def timed_pair(model: DLM, prompts: Sequence[Sequence[int]], a: DecodeConfig, b: DecodeConfig,
               repeats: int) -> list[tuple[float, float, DecodeResult]]:
    """Best (least disturbed) wall and process-CPU seconds and the result of decoding under a and b.

    Runs are interleaved (a, b, a, b, ...) so that load from other processes on a shared machine
    hits both alike; CPU seconds (one torch thread) are the cross-check that load cannot skew.
    """
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    results: list[DecodeResult] = []
    for _ in range(repeats):
        results = []
        for i, cfg in enumerate((a, b)):
            t0, c0 = time.perf_counter(), time.process_time()
            results.append(decode(model, prompts, cfg))
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [(min(w), min(c), r) for w, c, r in zip(wall, cpu, results)]


def bench_batching(args: argparse.Namespace) -> dict:
    """Wall-clock speed-up over step speed-up of prophet vs full: continuous, frozen, batch 1."""
    use_tiny = args.model == "tiny" or (args.model == "auto" and (TINY_LLADA / "config.json").exists())
    work = (tiny_workload if use_tiny else scripted_workload)(args.prompts, args.batch_size)
    decode(work.model, work.prompts[:8], work.prophet)  # warm-up
    modes = {"continuous": dict(continuous=True), "frozen": dict(continuous=False),
             "batch1": dict(batch_size=1, continuous=True)}
    rows, out = [], {}
    for mode, kw in modes.items():
        n_prompts = args.batch1_prompts if mode == "batch1" else len(work.prompts)
        prompts = work.prompts[:n_prompts]
        (wall_full, cpu_full, res_full), (wall_pro, cpu_pro, res_pro) = timed_pair(
            work.model, prompts, replace(work.full, **kw), replace(work.prophet, **kw), args.repeats)
        step_speedup = float(res_full.steps_used.double().mean() / res_pro.steps_used.double().mean())
        wall_speedup = wall_full / wall_pro
        out[mode] = {"prompts": n_prompts, "wall_full_s": round(wall_full, 3), "wall_prophet_s": round(wall_pro, 3),
                     "step_speedup": round(step_speedup, 3), "wall_speedup": round(wall_speedup, 3),
                     "ratio": round(wall_speedup / step_speedup, 3),
                     "cpu_ratio": round(cpu_full / cpu_pro / step_speedup, 3),
                     "forward_rows_full": res_full.forward_rows, "forward_rows_prophet": res_pro.forward_rows}
        rows.append((mode, out[mode]))
    steps = res_pro.steps_used
    mixed = {"distinct_commit_steps": len(set(res_pro.commit_step[res_pro.committed_early].tolist())),
             "committed_early": round(float(res_pro.committed_early.double().mean()), 3),
             "steps_min": int(steps.min()), "steps_median": float(steps.double().median()),
             "steps_max": int(steps.max())}
    _print_table(work, rows, mixed, args)
    return {"wall_over_steps_ratio": out["continuous"]["ratio"], "frozen_ratio": out["frozen"]["ratio"],
            "batch1_ratio": out["batch1"]["ratio"], "cpu_over_steps_ratio": out["continuous"]["cpu_ratio"],
            "load_avg_1min": round(os.getloadavg()[0], 2), "model": work.name, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "prophet_rows": mixed, "modes": out}


def _print_table(work: Workload, rows: list[tuple[str, dict]], mixed: dict, args: argparse.Namespace) -> None:
    print(f"batching: {work.name}")
    print(f"  full: {work.full.steps} steps; prophet: thresholds {work.prophet.thresholds}, region "
          f"{work.prophet.region}, statistic {work.prophet.statistic}; batch size {args.batch_size}, "
          f"{torch.get_num_threads()} torch thread(s), best of {args.repeats} interleaved runs")
    print(f"  prophet rows: {mixed}")
    print(f"  {'mode':<11} {'prompts':>7} {'full s':>8} {'prophet s':>9} {'steps x':>8} {'wall x':>7} {'ratio':>6} "
          f"{'cpu ratio':>9}")
    for mode, r in rows:
        print(f"  {mode:<11} {r['prompts']:>7} {r['wall_full_s']:>8.2f} {r['wall_prophet_s']:>9.2f} "
              f"{r['step_speedup']:>8.2f} {r['wall_speedup']:>7.2f} {r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f}")


def bench_pipeline(args: argparse.Namespace) -> dict:
    """Pipeline steady rows/s (2 actors x 1 thread, local Ray) over the bare decode loop (one process,
    2 threads) on the same prompts, model and settings, and the fixed start-up seconds."""
    import tempfile

    from benchmarks.throughput import measure, random_tiny_llada
    from prophet.tasks import TASKS

    with tempfile.TemporaryDirectory() as tmp:
        model = TINY_LLADA if (TINY_LLADA / "config.json").exists() else random_tiny_llada(Path(tmp) / "rand")
        per_task = args.pipeline_prompts // len(TASKS)
        rows = [{"id": f"{t.name}-{i}", "prompt": ex.prompt} for t in TASKS.values()
                for i, ex in enumerate(t.examples("train", per_task, seed=0))]
        cal = model / "calibration.json"
        overrides = {"decoding.gen_length": 24, "decoding.steps": 24, "decoding.batch_size": args.batch_size,
                     "decoding.confidence_eos_eot_inf": True,  # as the calibration was fitted
                     "execution.batch_size": args.pipeline_batch_size,
                     **({"decoding.calibration": str(cal)} if cal.exists() else {"decoding.rule": "prophet"})}
        out = measure(model, rows, Path(tmp), overrides)
    out["model"] = str(model.relative_to(ROOT)) if model == TINY_LLADA else "random-init tiny LLaDA (no checkpoint)"
    print(f"pipeline: {out['rows']} prompts, {out['model']}, rule {out['decode']['rule']}, "
          f"{out['actors']} actors x 1 thread vs bare loop x {out['bare_threads']} threads")
    print(f"  pipeline steady {out['pipeline_rows_per_s']:.1f} rows/s over {out['steady_window_s']:.1f}s; bare "
          f"{out['bare_rows_per_s']:.1f} rows/s (before/after {out['bare_before_after']}); ratio {out['ratio']:.2f}")
    print(f"  vs two ideal 1-thread loops ({out['bare_1thread_rows_per_s']:.1f} rows/s each): {out['ratio_vs_ideal']:.2f}; "
          f"start-up {out['startup_s']:.1f}s of {out['wall_s']:.1f}s wall; load avg {out['load_avg_1min']}")
    return out


def bench_forward(args: argparse.Namespace) -> dict:
    """Native LLaDA forward per batch x sequence: seconds, TFLOP/s, MFU against the measured bf16
    matmul peak, peak memory. LLaDA-8B needs a GPU; `--forward-model tiny` is the CPU smoke run."""
    from benchmarks.forward import MODELS, measure_forward, parse_shapes

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.forward_model == "llada-8b" and device.type != "cuda":
        raise SystemExit("bench forward: LLaDA-8B (16 GB of bf16 weights) needs a GPU; "
                         "use --forward-model tiny for a CPU run of the same code")
    try:
        shapes = parse_shapes(args.forward_shapes)
    except ValueError as e:
        raise SystemExit(f"--forward-shapes: {e}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.forward_dtype]
    out = measure_forward(MODELS[args.forward_model], shapes, device, dtype, repeats=args.repeats,
                          peak_n=args.peak_n)
    out["model"] = f"{args.forward_model} (random weights)"
    print(f"forward: {out['model']}, {out['parameters'] / 1e9:.2f}B parameters, {out['dtype']} on {out['device']}; "
          f"measured matmul peak {out['matmul_peak_tflops']:.1f} TFLOP/s (n={out['peak_matmul_n']})")
    print(f"  {'batch x seq':>12} {'ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'GFLOP/tok':>9} {'peak GiB':>8}")
    for r in out["shapes"]:
        mem = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else f"{'-':>8}"
        print(f"  {r['batch']:>5} x {r['seq']:<5} {1e3 * r['seconds']:9.2f} {r['tflops']:8.2f} "
              f"{100 * r['mfu']:5.1f}% {r['gflop_per_token']:9.2f} {mem}")
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"batching": bench_batching, "pipeline": bench_pipeline,
                                                             "forward": bench_forward,
                                                             "cache": cache_section.bench_cache,
                                                             "gpu": gpu_section.bench_gpu,
                                                             "memory": memory_section.bench_memory}


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the chosen sections; print each one's table, then the merged JSON object last."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", action="append", choices=sorted(SECTIONS),
                   help="repeatable; default: all (forward only where a GPU is present)")
    p.add_argument("--model", choices=["auto", "tiny", "scripted"], default="auto",
                   help="batching: the tiny trained LLaDA if present (auto), or the scripted model")
    p.add_argument("--prompts", type=int, default=256, help="batching: prompts decoded per setting")
    p.add_argument("--batch1-prompts", type=int, default=64, help="batching: prompts decoded at batch size 1")
    p.add_argument("--batch-size", type=int, default=32, help="batching: slots in the forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per setting (the best counts)")
    p.add_argument("--pipeline-prompts", type=int, default=2048, help="pipeline: prompts (half per task)")
    p.add_argument("--pipeline-batch-size", type=int, default=128, help="pipeline: rows per actor call")
    p.add_argument("--forward-model", choices=["llada-8b", "tiny"], default="llada-8b",
                   help="forward: LLaDA-8B (GPU) or a tiny LLaDA (any device), random weights")
    p.add_argument("--forward-shapes", default="1x384,8x384,32x512", help="forward: BATCHxSEQUENCE,...")
    p.add_argument("--forward-dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="forward: weights dtype")
    p.add_argument("--device", default="auto", help="forward: cuda, cuda:N or cpu (auto: cuda if present)")
    p.add_argument("--peak-n", type=int, default=8192, help="forward: n of the n x n x n matmul that measures the peak")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a busy 2-core machine small ops with 2 threads wait "
                        "on each other)")
    cache_section.add_arguments(p)
    gpu_section.add_arguments(p)
    memory_section.add_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    default = [s for s in sorted(SECTIONS) if s not in ("forward", "gpu") or torch.cuda.is_available()]
    results = {name: SECTIONS[name](args) for name in (args.section or default)}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
