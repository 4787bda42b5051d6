"""python -m prophet.tasks write-prompts OUT.jsonl [--n-per-task N] [--seed S]"""
from __future__ import annotations

import argparse

from prophet.tasks import TASKS
from prophet.tasks.prompts import DEFAULT_PER_TASK, DEFAULT_SEED, default_prompts, write_jsonl


def main() -> None:
    """Write the bundled held-out prompt set."""
    p = argparse.ArgumentParser(prog="python -m prophet.tasks")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-prompts", help="write held-out test prompts of every task as JSONL")
    w.add_argument("out")
    w.add_argument("--n-per-task", type=int, default=DEFAULT_PER_TASK)
    w.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args()
    path = write_jsonl(default_prompts(TASKS, args.n_per_task, args.seed), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
