"""Load test: many short prompts through the local pipeline; every id once, throughput, RSS per actor.

    python jobs/loadtest.py --rows 20000            # the RELIABILITY.md figure (a few minutes on 2 cores)
    python jobs/loadtest.py --rows 500 --engine torch

Writes `--rows` sudoku4 prompts (cycled; ids derive from the line, so repeats are distinct rows) to
a JSONL file, runs `pipeline.run.run` on a local Ray with a cheap decode setting, and samples the
resident memory of every GenerateActor process from outside (psutil, every --sample-s seconds)
while it runs. Then it reads the output's id column back and checks that every id is there once.
Prints a table for people and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny-llada"
MB = 1 << 20


@dataclass
class RssSampler:
    """Polls the RSS of this process's descendants whose command line names `needle` (Ray titles actor
    workers after their class; a local Ray started here is our child, so other jobs' actors on the
    machine are not counted), plus this process, until stopped; samples are (seconds since start, bytes)."""

    needle: str = "GenerateActor"
    interval_s: float = 0.5
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    driver: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "RssSampler":
        """Start sampling in a daemon thread."""
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            now = time.time() - self._t0
            self.driver.append(me.memory_info().rss)
            for p in me.children(recursive=True):
                try:
                    if self.needle in " ".join(p.cmdline()):
                        self.samples.setdefault(p.pid, []).append((now, p.memory_info().rss))
                except psutil.Error:  # gone between listing and reading
                    continue
            self._stop.wait(self.interval_s)


def actor_memory(samples: list[tuple[float, int]]) -> dict:
    """Peak RSS of one actor process, and RSS at a quarter, half and the end of its life (steadiness)."""
    rss = [b for _, b in samples]
    at = lambda q: rss[min(len(rss) - 1, int(q * (len(rss) - 1)))] / MB  # noqa: E731
    return {"samples": len(rss), "lived_s": round(samples[-1][0] - samples[0][0], 1),
            "peak_rss_mb": round(max(rss) / MB, 1), "rss_mb_at_25%": round(at(0.25), 1),
            "rss_mb_at_50%": round(at(0.5), 1), "rss_mb_at_end": round(at(1.0), 1),
            "growth_25%_to_end_mb": round(at(1.0) - at(0.25), 1)}


def write_prompts(path: Path, n: int) -> list[str]:
    """n short sudoku4 prompts as JSONL; returns the ids the pipeline derives ('<file>:<line>')."""
    from prophet.tasks import get_task

    examples = get_task("sudoku4").examples("test", min(n, 1000), seed=0)
    with open(path, "w") as f:
        for i in range(n):
            ex = examples[i % len(examples)]
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
    return [f"{path.name}:{i}" for i in range(n)]


def check_ids(out_dir: str, expected: list[str]) -> dict:
    """Rows, distinct ids, missing and duplicated ids in the output (reads the id column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import output

    ids = [i for p in output.part_files(out_dir) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    got = set(ids)
    return {"rows_in_output": len(ids), "unique_ids": len(got), "missing": len(set(expected) - got),
            "duplicated": len(ids) - len(got), "unexpected": len(got - set(expected)),
            "errors": sum(pc.sum(pc.equal(pq.read_table(p, columns=["status"]).column("status"), "error")).as_py() or 0
                          for p in output.part_files(out_dir))}


def model_dir(work: Path, wanted: str | None) -> Path:
    """--model, else the shipped tiny LLaDA when trained, else a random-init tiny LLaDA (same shapes)."""
    if wanted:
        return Path(wanted)
    if (SHIPPED / "config.json").is_file() and any(SHIPPED.glob("*.safetensors")):
        return SHIPPED
    from benchmarks.throughput import random_tiny_llada

    return random_tiny_llada(work / "random-tiny-llada")


def load_test(args: argparse.Namespace) -> dict:
    """Run the load; returns the figures."""
    from pipeline.config import load_job_config
    from pipeline.run import run

    work = Path(args.work or tempfile.mkdtemp(prefix="prophet-load-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "prompts.jsonl"
    expected = write_prompts(src, args.rows)
    model = model_dir(work, args.model)
    out = work / "out"
    cfg = load_job_config(None, {
        "input.path": str(src), "output.dir": str(out), "output.overwrite": True, "model.dir": str(model),
        "model.engine": args.engine, "decoding.gen_length": args.gen_length, "decoding.steps": args.steps,
        "decoding.batch_size": args.slots, "execution.actors": args.actors, "execution.batch_size": args.batch_size})
    sampler = RssSampler(interval_s=args.sample_s).start()
    try:
        summary = run(cfg, log=lambda line: print(line, flush=True))
    finally:
        sampler.stop()
    figures = {"rows": args.rows, "model": model.name, "engine": args.engine, "actors": args.actors,
               "gen_length": args.gen_length, "steps": args.steps, "wall_s": round(summary.wall_s, 1),
               "rows_per_s": round(args.rows / summary.wall_s, 1), "status": summary.status, "output": str(out),
               **check_ids(str(out), expected),
               "driver_peak_rss_mb": round(max(sampler.driver) / MB, 1),
               "actor_processes": {pid: actor_memory(s) for pid, s in sorted(sampler.samples.items()) if s}}
    figures["steady_rows_per_s"] = round(steady(str(out)), 1)
    figures["rows_lost"] = figures["missing"]
    return figures


def steady(out_dir: str) -> float:
    """Rows/s while every actor was producing (benchmarks.throughput.steady_rate over the output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import output
    from benchmarks.throughput import steady_rate

    table = pa.concat_tables([pq.read_table(p, columns=["worker_id", "finished_at"])
                              for p in output.part_files(out_dir)])
    return steady_rate(table)[0]


def table(f: dict) -> str:
    """A few lines for people."""
    lines = [f"{f['rows']} rows, {f['actors']} actors ({f['engine']}), gen_length {f['gen_length']}, steps "
             f"{f['steps']}, model {f['model']}: {f['status']} in {f['wall_s']} s = {f['rows_per_s']} rows/s "
             f"(steady {f['steady_rows_per_s']} rows/s)",
             f"output: {f['rows_in_output']} rows, {f['unique_ids']} distinct ids, missing {f['missing']}, "
             f"duplicated {f['duplicated']}, error rows {f['errors']}; driver peak RSS {f['driver_peak_rss_mb']} MB",
             "actor pid | lived s | peak RSS MB | RSS at 25% | 50% | end | growth 25%->end MB"]
    for pid, m in f["actor_processes"].items():
        lines.append(f"{pid} | {m['lived_s']} | {m['peak_rss_mb']} | {m['rss_mb_at_25%']} | {m['rss_mb_at_50%']} | "
                     f"{m['rss_mb_at_end']} | {m['growth_25%_to_end_mb']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of the load test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="prompts to push through (default 20000)")
    p.add_argument("--model", help="model directory (default: checkpoints/tiny-llada, or a random tiny LLaDA)")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed", help="actor engine")
    p.add_argument("--actors", type=int, default=2, help="actors in the pool (default 2)")
    p.add_argument("--gen-length", type=int, default=8, help="generated positions (cheap: 8)")
    p.add_argument("--steps", type=int, default=8, help="step budget (default 8)")
    p.add_argument("--slots", type=int, default=64, help="decode slots per forward pass (default 64)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per actor call (default 256)")
    p.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling interval in seconds")
    p.add_argument("--work", help="working directory for the input and output (default: a new temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the load test; exit 1 if any id is missing or duplicated."""
    figures = load_test(parse_args(argv))
    print(table(figures))
    print(json.dumps(figures), flush=True)
    return 0 if figures["missing"] == figures["duplicated"] == figures["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
