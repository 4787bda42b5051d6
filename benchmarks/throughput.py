"""`--section pipeline`: the pipeline's overhead, steady-state rows/s through Ray actors over the bare decode loop.

`measure` decodes the same prompts twice with the same model and settings: once in this process
(`prophet.decode`, one call, `bare_threads` torch threads) and once through `pipeline.run.run` on a
local Ray (`actors` actors of one thread each). The pipeline's steady rate is read from its own
output: rows finished while every actor was producing, over that window. The fixed start-up cost
is the wall time the steady rate does not explain: wall - rows / steady rate (Ray start, actor
spin-up and model loads, the first batch's wait, the final count and shutdown).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def steady_rate(table: pa.Table) -> tuple[float, float]:
    """(rows/s, window seconds) over the window in which every worker had finished a batch and none
    had finished its last: rows finished inside it, after its start, over its length."""
    workers = pc.unique(table.column("worker_id")).to_pylist()
    starts, ends = [], []
    for w in workers:
        t = table.filter(pc.equal(table.column("worker_id"), w)).column("finished_at")
        starts.append(pc.min(t).as_py())
        ends.append(pc.max(t).as_py())
    lo, hi = max(starts), min(ends)
    if hi <= lo:  # one worker did everything before another produced: fall back to the whole span
        lo, hi = min(starts), max(ends)
    done = table.column("finished_at")
    inside = pc.sum(pc.and_(pc.greater(done, lo), pc.less_equal(done, hi))).as_py() or 0
    return inside / (hi - lo), hi - lo


def bare_rate(model_dir: Path, texts: Sequence[str], ids: Sequence[str], decode: dict, threads: int,
              seed: int = 0) -> float:
    """Rows/s of one `prophet.decode` call over every prompt, in this process with `threads` threads."""
    import torch

    from pipeline.actor import row_seed
    from pipeline.config import decode_config_from_dict
    from prophet.decode import decode as run_decode
    from prophet.models import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(model_dir)
        cfg = decode_config_from_dict(decode)
        prompts = [model.encode(t) for t in texts]
        seeds = [row_seed(seed, i) for i in ids]
        run_decode(model, prompts[:16], cfg, seeds=seeds[:16])  # warm-up
        t0 = time.perf_counter()
        run_decode(model, prompts, cfg, seeds=seeds)
        return len(prompts) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def measure(model_dir: Path, rows: list[dict], work_dir: Path, overrides: dict, actors: int = 2,
            bare_threads: int = 2, bare_rows: int = 512) -> dict:
    """Pipeline steady rows/s over bare rows/s, and start-up seconds.

    The bare loop runs before and after the pipeline (averaged, so drifting load from other
    processes hits both alike), with `bare_threads` threads (`ratio`) and with one thread: twice the
    one-thread rate is what `actors` single-thread actors could reach with no overhead at all
    (`ratio_vs_ideal`, the stricter figure where small ops scale badly over threads). The bare loop
    decodes an evenly spaced `bare_rows` of the prompts (same mix, a rate is a rate): on a busy
    machine two threads can be ten times slower than one, and the whole set would take minutes.
    """
    import os

    from pipeline import output
    from pipeline.config import load_job_config
    from pipeline.run import plan_job
    from pipeline.run import run as run_job

    src = work_dir / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_job_config(None, {"input.path": str(src), "input.id_column": "id", "model.dir": str(model_dir),
                                 "output.dir": str(work_dir / "out"), "output.overwrite": True,
                                 "execution.actors": actors, **overrides})
    decode = plan_job(cfg).decode
    step = max(1, len(rows) // bare_rows)
    texts, ids = [r["prompt"] for r in rows][::step], [r["id"] for r in rows][::step]

    def bare_pair() -> tuple[float, float]:
        return (bare_rate(model_dir, texts, ids, decode, bare_threads), bare_rate(model_dir, texts, ids, decode, 1))

    load_before = os.getloadavg()[0]
    before = bare_pair()
    summary = run_job(cfg, log=lambda _: None)
    after = bare_pair()
    table = pa.concat_tables([pq.read_table(p, columns=["worker_id", "finished_at", "status"])
                              for p in output.part_files(str(work_dir / "out"))])
    rate, window = steady_rate(table)
    bare, bare1 = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    return {"ratio": round(rate / bare, 3), "startup_s": round(summary.wall_s - len(rows) / rate, 2),
            "ratio_vs_ideal": round(rate / (actors * bare1), 3),
            "pipeline_rows_per_s": round(rate, 2), "steady_window_s": round(window, 2),
            "bare_rows_per_s": round(bare, 2), "bare_1thread_rows_per_s": round(bare1, 2),
            "bare_before_after": [round(before[0], 2), round(after[0], 2)],
            "wall_s": round(summary.wall_s, 2), "rows": len(rows), "bare_rows": len(texts), "ok": summary.ok,
            "actors": actors,
            "actor_threads": 1, "bare_threads": bare_threads, "load_avg_1min": [load_before, os.getloadavg()[0]],
            "batch_size": cfg.execution.batch_size, "slots": cfg.decoding.batch_size,
            "decode": {k: decode[k] for k in ("gen_length", "steps", "rule", "thresholds", "region", "statistic")}}


def random_tiny_llada(out_dir: Path, max_length: int = 64) -> Path:
    """A random-init tiny LLaDA with the char tokenizer, saved like the shipped ones (real loader,
    real compute, nonsense output): the stand-in where no trained checkpoint exists."""
    import torch

    from prophet.models import CHAR_TOKEN_IDS, LLaDAConfig, LLaDAModel, char_tokenizer, save_model

    tok = char_tokenizer()
    torch.manual_seed(0)
    module = LLaDAModel(LLaDAConfig(d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=64,
                                    vocab_size=tok.vocab_size, max_sequence_length=max_length, **CHAR_TOKEN_IDS))
    return save_model(module, tok, out_dir)


def run(args: argparse.Namespace) -> dict:
    """Pipeline steady rows/s (2 actors x 1 thread, local Ray) over the bare decode loop (one process,
    2 threads) on the same prompts, model and settings, and the fixed start-up seconds."""
    import tempfile

    from benchmarks.harness import ROOT, TINY_LLADA
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags (its slots are batching's --batch-size)."""
    p.add_argument("--pipeline-prompts", type=int, default=2048, help="pipeline: prompts (half per task)")
    p.add_argument("--pipeline-batch-size", type=int, default=128, help="pipeline: rows per actor call")
