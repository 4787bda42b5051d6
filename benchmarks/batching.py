"""`--section batching`: does Prophet's step saving reach the wall clock?

N prompts whose rows commit at mixed steps are decoded with `full` and with `prophet`, and the
section reports (wall-clock speed-up) / (step speed-up) with continuous batching, with finished
rows frozen in static batches, and at batch size 1. Model: the tiny trained LLaDA on Sudoku when
checkpoints/tiny-llada exists, else ScriptedDLM whose forward also runs a real MLP over
embeddings of every position (so a step costs real compute in proportion to rows x length).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

import torch

from benchmarks.harness import TINY_LLADA, Table, timed_pair
from prophet import DecodeConfig, decode
from prophet.scripted import ScriptedDLM
from prophet.types import DLM, last_positions


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


def run(args: argparse.Namespace) -> dict:
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


MODES_TABLE = Table(("mode", "<11"), ("prompts", ">7"), ("full s", "8.2f"), ("prophet s", "9.2f"),
                    ("steps x", "8.2f"), ("wall x", "7.2f"), ("ratio", "6.2f"), ("cpu ratio", "9.2f"))


def _print_table(work: Workload, rows: list[tuple[str, dict]], mixed: dict, args: argparse.Namespace) -> None:
    print(f"batching: {work.name}")
    print(f"  full: {work.full.steps} steps; prophet: thresholds {work.prophet.thresholds}, region "
          f"{work.prophet.region}, statistic {work.prophet.statistic}; batch size {args.batch_size}, "
          f"{torch.get_num_threads()} torch thread(s), best of {args.repeats} interleaved runs")
    print(f"  prophet rows: {mixed}")
    MODES_TABLE.print([(mode, r["prompts"], r["wall_full_s"], r["wall_prophet_s"], r["step_speedup"],
                        r["wall_speedup"], r["ratio"], r["cpu_ratio"]) for mode, r in rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags (--batch-size is the pipeline section's slots too)."""
    p.add_argument("--model", choices=["auto", "tiny", "scripted"], default="auto",
                   help="batching: the tiny trained LLaDA if present (auto), or the scripted model")
    p.add_argument("--prompts", type=int, default=256, help="batching: prompts decoded per setting")
    p.add_argument("--batch1-prompts", type=int, default=64, help="batching: prompts decoded at batch size 1")
    p.add_argument("--batch-size", type=int, default=32, help="batching: slots in the forward pass")
