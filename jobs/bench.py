"""Benchmarks by section; a table for people, then one JSON object as the last line of stdout.

    .venv/bin/python jobs/bench.py --section batching
    .venv/bin/python jobs/bench.py --section batching --model scripted   # force the scripted model
    .venv/bin/python jobs/bench.py --section forward                      # on a GPU machine
    .venv/bin/python jobs/bench.py --section forward --forward-model tiny  # CPU smoke run

Each section is a module of benchmarks/ with `run(args) -> dict` and `add_arguments(parser)`,
registered in SECTIONS; the printed JSON is {section: dict, ...}. Ratios are measured within one
run; no absolute time is a target. Timing and tables are shared (benchmarks/harness.py).

- batching (benchmarks/batching.py): Prophet's wall-clock speed-up over its step speed-up with
  continuous batching, frozen static batches and batch size 1.
- pipeline (benchmarks/throughput.py): steady rows/s of jobs/generate.py's pipeline (2 actors,
  local Ray) over the bare decode loop on the same prompts, and the fixed start-up seconds.
- forward (benchmarks/forward.py, GPU): native LLaDA-8B with random bf16 weights, one forward per
  batch x sequence: time, TFLOP/s, MFU against the measured bf16 matmul peak, peak memory.
- cache (benchmarks/cache.py): what the block KV cache saves, per cache mode and rule.
- block (benchmarks/block.py): the block host's exact cache against the reference's recompute of
  every prefix on a random LLaDA2-family model, per rule, and look-ahead's cost.
- gpu (benchmarks/gpu.py, GPU): the one script for a lent H100/H200, forward MFU and decode tokens/s.
- memory (benchmarks/memory.py): the decoder's peak memory at a real vocabulary.
- tp (benchmarks/tp.py): one decode at tensor-parallel size 1 and 2 (local gloo ranks), per cache
  mode: wall time and the share spent in all-reduces (the cost of communication on a CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import batching, block, cache, forward, gpu, memory, throughput, tp  # noqa: E402

SECTIONS: dict[str, ModuleType] = {"batching": batching, "pipeline": throughput, "forward": forward, "cache": cache,
                                   "block": block, "gpu": gpu, "memory": memory, "tp": tp}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared flags, then every section's own (a section's flags are named after it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", action="append", choices=sorted(SECTIONS),
                   help="repeatable; default: all (forward and gpu only where a GPU is present)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per setting (the best counts)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a busy 2-core machine small ops with 2 threads wait "
                        "on each other)")
    for module in SECTIONS.values():
        module.add_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the chosen sections; print each one's table, then the merged JSON object last."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    default = [s for s in sorted(SECTIONS) if not getattr(SECTIONS[s], "NEEDS_GPU", False) or torch.cuda.is_available()]
    results = {name: SECTIONS[name].run(args) for name in (args.section or default)}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
