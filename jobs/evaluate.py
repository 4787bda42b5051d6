"""Accuracy and steps of every commit rule on held-out task prompts, per model and task.

    .venv/bin/python jobs/evaluate.py                      # shipped tiny models, all tasks
    .venv/bin/python jobs/evaluate.py --model checkpoints/tiny-dream --task sudoku4 --n 200

Rules: Full, Half (half the steps), one-shot (a single step), Prophet with the default thresholds
(8/5/3) for each region and statistic, Prophet calibrated (MODEL/calibration.json unless
--calibration is given), a uniform schedule with the calibrated Prophet's mean steps rounded (the
same compute, not adapted per row), gap_parallel and confidence_threshold. A table for people,
then the last stdout line is JSON: {"results": [{"model", "task", "rule", "accuracy", "mean_steps",
"budget", "speedup" (Full's measured mean steps over the rule's), "speedup_vs_budget", "n",
"mean_forward_tokens"}, ...]}.

    .venv/bin/python jobs/evaluate.py --cache --task sudoku4 --n 4000   # the KV-cache table

--cache evaluates instead the block KV cache: blocks of `--cache-block` (8 on Sudoku's 24-position
window, 3 blocks) at the task's steps, cache none / prefix / dual x Full / calibrated Prophet
thresholds / confidence_threshold, with mean forward tokens and both ratios measured against Full
without cache (its measured steps and forward tokens, not the budget). `--cache-refresh-every K`
(repeatable) adds each cached mode refreshing every K steps inside a block.

A block-diffusion model (default host 'block', e.g. checkpoints/tiny-llada2) gets the block table
instead (`block_configs`): Full, confidence_threshold 0.95 (LLaDA2's default), calibrated Prophet,
with look-ahead 1 (region window), with the threshold rule on top, each also with LLaDA2.1 editing
(threshold 0.9), and with `--parallel-calibration FILE` a Prophet row fitted with the threshold
rule on top (jobs/calibrate.py --parallel confidence_threshold). Besides the usual fields each row
has "recompute_token_ratio": the mean forward tokens of Full decoded by `prophet.decode_reference`
(LLaDA2's reference loop: no cache, every pass forwards the whole sequence up to its last decoded
block) over the row's own.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prophet.config import PRESETS, DecodeConfig  # noqa: E402
from prophet.models import load_model  # noqa: E402
from prophet.models.loading import native_family, read_config  # noqa: E402
from prophet.tasks import TASKS, Task, get_task  # noqa: E402
from prophet.tasks.evaluation import half, rule_label, run_task, task_config  # noqa: E402
from prophet.types import TextDLM  # noqa: E402

SHIPPED = ("checkpoints/tiny-llada", "checkpoints/tiny-dream")
STATISTICS = (("mean", 0.1), ("min", 0.1), ("quantile", 0.1))


def rule_configs(model: TextDLM, task: Task, calibration: Path | None) -> list[tuple[str | None, DecodeConfig]]:
    """(label or None for the automatic one, config) of every rule to evaluate."""
    full = task_config(model, task)
    out: list[tuple[str | None, DecodeConfig]] = [(None, full), (None, half(full)),
                                                  (None, replace(full, steps=1))]
    for region in ("window", "block"):
        for stat, q in STATISTICS:
            out.append((None, replace(full, rule="prophet", thresholds=PRESETS["default"], region=region,
                                      statistic=stat, quantile=q)))
    if calibration is not None:
        cal = full.with_calibration(calibration)
        source = json.loads(calibration.read_text()).get("task", "?")
        th = "/".join(f"{t:g}" for t in cal.thresholds)
        stat = cal.statistic if cal.statistic != "quantile" else f"q{cal.quantile:g}"
        out.append((f"prophet calibrated[{source}] {th} {cal.region} {stat}", cal))
        out.append((f"gap_parallel calibrated[{source}] {th}", replace(full, rule="gap_parallel",
                                                                        thresholds=cal.thresholds)))
    out.append((None, replace(full, rule="gap_parallel", thresholds=PRESETS["default"])))
    out.append((None, replace(full, rule="confidence_threshold", confidence=0.9)))
    return out


CACHES = ("none", "prefix", "dual")


def model_and_calibration(model_dir: Path, calibration: Path | None) -> tuple[TextDLM, Path | None]:
    """The loaded model and its calibration file: `calibration`, else MODEL/calibration.json if present."""
    cal = calibration or (model_dir / "calibration.json")
    return load_model(model_dir), (cal if cal.is_file() else None)


def cache_configs(model: TextDLM, task: Task, calibration: Path | None, block: int,
                  refresh: Sequence[int] = ()) -> list[tuple[str | None, DecodeConfig]]:
    """Full, the calibrated Prophet thresholds and confidence_threshold, each with every cache mode, in
    blocks; each cached mode also with every cache_refresh_every in `refresh`."""
    full = replace(task_config(model, task), block_length=block)
    rules: list[tuple[str, DecodeConfig]] = [("full", full)]
    if calibration is not None:
        # the fitted thresholds, given explicitly: they were calibrated without blocks or cache
        fitted = replace(full, block_length=None).with_calibration(calibration)
        rules.append(("prophet calibrated", replace(full, rule="prophet", thresholds=fitted.thresholds,
                                                    region=fitted.region, statistic=fitted.statistic,
                                                    quantile=fitted.quantile)))
    rules.append(("confidence_threshold", replace(full, rule="confidence_threshold", confidence=0.9)))
    out: list[tuple[str | None, DecodeConfig]] = []
    for name, cfg in rules:
        label = rule_label(cfg, full.steps) + (" (calibrated)" if name == "prophet calibrated" else "")
        out.append((f"{label} [no cache, blocks of {block}]", cfg))
        for cache in CACHES[1:]:
            for every in (None, *refresh):
                c = replace(cfg, cache=cache, cache_refresh_every=every)
                again = f", refresh every {every}" if every else ""
                out.append((f"{label} [{cache} cache, blocks of {block}{again}]", c))
    return out


def evaluate_cache(model_dir: Path, task_names: Sequence[str], n: int, calibration: Path | None,
                   block: int, seed: int = 0, refresh: Sequence[int] = ()) -> list[dict]:
    """The cache table: every cache mode x rule on n held-out prompts; ratios against Full without cache."""
    model, cal = model_and_calibration(model_dir, calibration)
    rows = []
    for task_name in task_names:
        task = get_task(task_name)
        examples = task.examples("test", task.available("test", n), seed=seed)
        base = run_task(model, task, examples, task_config(model, task), seed=seed)  # Full, no cache, no blocks
        print(f"{model_dir.name:12s} {task.name:12s} {'full (no blocks, no cache): the reference':64s} "
              f"{100 * base.accuracy:6.1f}% {base.mean_steps:6.2f} {base.mean_forward_tokens:8.1f}")
        for label, cfg in cache_configs(model, task, cal, block, refresh):
            out = run_task(model, task, examples, cfg, label=label, seed=seed)
            row = out.row(model_dir.name, task.name) | {
                "cache": cfg.cache, "block_length": block, "cache_refresh_every": cfg.cache_refresh_every,
                "accuracy_vs_full_points": round(100 * (out.accuracy - base.accuracy), 2),
                "step_ratio_vs_full": round(base.mean_steps / out.mean_steps, 3),
                "forward_token_ratio_vs_full": round(base.mean_forward_tokens / out.mean_forward_tokens, 3)}
            print(f"{model_dir.name:12s} {task.name:12s} {out.rule:64s} {100 * out.accuracy:6.1f}% "
                  f"{out.mean_steps:6.2f} {out.mean_forward_tokens:8.1f} {row['step_ratio_vs_full']:6.2f}x "
                  f"{row['forward_token_ratio_vs_full']:6.2f}x", flush=True)
            rows.append(row)
    return rows


def is_block_model(model_dir: Path) -> bool:
    """Whether the directory holds a native block-diffusion family (read from config.json, no weights)."""
    fam = native_family(read_config(model_dir))
    return fam is not None and fam[0].default_host == "block"


def block_configs(model: TextDLM, task: Task, calibration: Path | None, parallel: Path | None = None,
                  editing: float = 0.9) -> list[tuple[str, DecodeConfig]]:
    """(label, config) of the block table; each rule also with editing at `editing`. `parallel`: a
    calibration fitted with the threshold rule on top (jobs/calibrate.py --parallel), for that row;
    else the row is `calibration`'s thresholds with the threshold rule added."""
    full = task_config(model, task)
    rules = [("full", full), ("confidence_threshold p>0.95", replace(full, rule="confidence_threshold",
                                                                     confidence=0.95))]
    if calibration is not None:
        cal = full.with_calibration(calibration)
        name = f"prophet calibrated {rule_label(cal, full.steps).removeprefix('prophet ')}"
        rules += [(name, cal),
                  (f"{name} + look-ahead 1 (region window)", replace(cal, lookahead=1, region="window")),
                  (f"{name} + parallel confidence_threshold p>0.95",
                   replace(cal, parallel="confidence_threshold", confidence=0.95))]
    if parallel is not None:
        both = full.with_calibration(parallel)
        if both.parallel == "none":
            raise ValueError(f"--parallel-calibration {parallel}: fitted without 'parallel' (use jobs/calibrate.py "
                             "--parallel confidence_threshold)")
        name = f"prophet calibrated with parallel {rule_label(both, full.steps).removeprefix('prophet ')}"
        rules.append((f"{name} + parallel {both.parallel} p>{both.confidence:g}", both))
    return [(label + suffix, replace(cfg, editing_threshold=e)) for label, cfg in rules
            for suffix, e in (("", None), (f" + editing {editing:g}", editing))]


def evaluate_block(model_dir: Path, task_names: Sequence[str], n: int, calibration: Path | None,
                   seed: int = 0, parallel: Path | None = None) -> list[dict]:
    """The block table on n held-out prompts of each task; prints one line per setting."""
    from prophet import decode_reference
    from prophet.tasks.evaluation import completions

    model, cal = model_and_calibration(model_dir, calibration)
    rows = []
    for task_name in task_names:
        task = get_task(task_name)
        examples = task.examples("test", task.available("test", n), seed=seed)
        prompts = [model.encode(ex.prompt) for ex in examples]
        ref = decode_reference(model, prompts, task_config(model, task), seeds=[seed + i for i in range(len(prompts))])
        ref_ok = [task.score(ex.prompt, t) for ex, t in
                  zip(examples, completions(model, ref.tokens, ref.num_generated))]
        ref_tokens = float(ref.forward_tokens.double().mean())
        print(f"{model_dir.name:12s} {task.name:14s} {'full, recomputed (prophet.decode_reference)':72s} "
              f"{100 * sum(ref_ok) / len(ref_ok):6.1f}% {float(ref.steps_used.double().mean()):6.2f} "
              f"{ref_tokens:8.1f} {1.0:6.2f}x", flush=True)
        rows.append({"model": model_dir.name, "task": task.name, "rule": "full, recomputed (decode_reference)",
                     "accuracy": round(sum(ref_ok) / len(ref_ok), 4),
                     "mean_steps": round(float(ref.steps_used.double().mean()), 4), "n": len(ref_ok),
                     "mean_forward_tokens": round(ref_tokens, 2), "recompute_token_ratio": 1.0})
        for label, cfg in block_configs(model, task, cal, parallel):
            out = run_task(model, task, examples, cfg, label=label, seed=seed)
            ratio = ref_tokens / out.mean_forward_tokens
            print(f"{model_dir.name:12s} {task.name:14s} {out.rule:72s} {100 * out.accuracy:6.1f}% "
                  f"{out.mean_steps:6.2f} {out.mean_forward_tokens:8.1f} {ratio:6.2f}x", flush=True)
            rows.append(out.row(model_dir.name, task.name) | {"recompute_token_ratio": round(ratio, 3)})
    return rows


def evaluate(model_dir: Path, task_names: Sequence[str], n: int, calibration: Path | None,
             seed: int = 0) -> list[dict]:
    """Every rule on n held-out test prompts of each task; prints one table line per rule."""
    model, cal = model_and_calibration(model_dir, calibration)
    name = model_dir.name
    rows = []
    for task_name in task_names:
        task = get_task(task_name)
        examples = task.examples("test", task.available("test", n), seed=seed)
        full_steps = None  # Full's measured mean steps (the first config): speed-ups are against it, not the budget
        for label, cfg in rule_configs(model, task, cal):
            runs = [run_task(model, task, examples, cfg, label=label, seed=seed)]
            if label and label.startswith("prophet calibrated"):
                # the same compute spent uniformly: does adapting the stop per row beat it?
                k = max(1, round(runs[0].mean_steps))
                runs.append(run_task(model, task, examples, replace(cfg, rule="full", steps=k),
                                     label=f"fixed {k} steps (calibrated prophet's mean)", seed=seed))
            full_steps = full_steps or runs[0].mean_steps
            for out in runs:
                speedup = full_steps / out.mean_steps
                print(f"{name:12s} {task.name:12s} {out.rule:48s} {100 * out.accuracy:6.1f}% "
                      f"{out.mean_steps:6.2f} / {out.budget:<3d} {speedup:5.2f}x", flush=True)
                rows.append(out.row(name, task.name) | {"speedup": round(speedup, 4),
                                                        "speedup_vs_budget": round(out.speedup, 4)})
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", help="model directory (repeatable); default: the shipped tiny models")
    p.add_argument("--task", action="append", choices=sorted(TASKS), help="task (repeatable); default: all")
    p.add_argument("--calibration", type=Path, help="calibration file; default: MODEL/calibration.json")
    p.add_argument("--parallel-calibration", type=Path,
                   help="block models: a calibration fitted with the threshold rule on top, for its own row")
    p.add_argument("--n", type=int, default=1000, help="held-out test prompts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--cache", action="store_true", help="evaluate the KV cache modes instead (see above)")
    p.add_argument("--cache-block", type=int, default=8, help="--cache: block length")
    p.add_argument("--cache-refresh-every", type=int, action="append", default=[], metavar="K",
                   help="--cache: also run each cached mode refreshing every K steps inside a block "
                        "(repeatable)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Evaluate, print the table, then the JSON line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [Path(m) for m in (args.model or [str(ROOT / s) for s in SHIPPED])]
    tasks = args.task or list(TASKS)
    if args.cache:
        print(f"{'model':12s} {'task':12s} {'rule':64s} {'acc':>7s} {'steps':>6s} {'fwd tok':>8s} "
              f"{'steps/full':>7s} {'tok/full':>7s}")
        results = [row for m in models
                   for row in evaluate_cache(m, tasks, args.n, args.calibration, args.cache_block, args.seed,
                                             args.cache_refresh_every)]
        print(json.dumps({"results": results}))
        return {"results": results}
    blocks = [m for m in models if is_block_model(m)]
    results = []
    if blocks:
        print(f"{'model':12s} {'task':14s} {'rule':72s} {'acc':>7s} {'steps':>6s} {'fwd tok':>8s} recompute/tok")
        results += [row for m in blocks for row in evaluate_block(m, tasks, args.n, args.calibration, args.seed,
                                                                  args.parallel_calibration)]
    if len(blocks) < len(models):
        print(f"{'model':12s} {'task':12s} {'rule':48s} {'acc':>7s} {'steps':>6s} / budget speedup")
        results += [row for m in models if m not in blocks
                    for row in evaluate(m, tasks, args.n, args.calibration, args.seed)]
    summary = {"results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
