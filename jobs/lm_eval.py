"""lm-evaluation-harness's own CLI with the "prophet" model registered (needs the `lmeval` extra).

    .venv/bin/python jobs/lm_eval.py --model prophet \\
        --model_args model=checkpoints/tiny-llada,gen_length=24,steps=24,rule=prophet,thresholds=8/5/3 \\
        --tasks prophet_sudoku4 --include_path /tmp/prophet-tasks --log_samples --output_path /tmp/out

    .venv/bin/python jobs/lm_eval.py write-tasks /tmp/prophet-tasks --task sudoku4 --n 200

Every argument goes to lm-eval unchanged; after its table comes one "prophet summary" line per
task (the metrics next to mean steps, budget, speed-up and mean forward tokens) and a last JSON
line {"prophet": {task: {...}}}. `write-tasks DIR` writes an offline task directory instead
(held-out prompts of the project's tasks as local JSONL, see prophet.lmeval.write_task_dir).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
# run as a script, jobs/ is sys.path[0] and this file would shadow the lm_eval package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "jobs"]
sys.path.insert(0, str(ROOT))


def write_tasks(argv: Sequence[str]) -> list[str]:
    """The write-tasks subcommand."""
    from prophet.lmeval import write_task_dir
    from prophet.tasks import TASKS

    p = argparse.ArgumentParser(prog="jobs/lm_eval.py write-tasks")
    p.add_argument("directory", type=Path)
    p.add_argument("--task", action="append", choices=sorted(TASKS), help="task (repeatable); default: all")
    p.add_argument("--n", type=int, default=1000, help="held-out prompts per task")
    p.add_argument("--seed", type=int, default=0, help="as jobs/evaluate.py --seed: the same prompts")
    a = p.parse_args(argv)
    names = write_task_dir(a.directory, a.task or list(TASKS), a.n, a.seed)
    print(f"wrote {', '.join(names)} under {a.directory}: --include_path {a.directory.resolve()}")
    return names


def run_cli(argv: Sequence[str]) -> dict:
    """lm-eval's CLI as it is (`lm_eval.__main__.cli_evaluate`), recording the results it computes and
    the prophet model it builds, then the summary lines. Returns {"results": ..., "prophet": summary}."""
    import lm_eval
    import lm_eval.evaluator as evaluator
    from prophet.lmeval import ProphetLM, summary_lines
    from lm_eval.__main__ import cli_evaluate

    seen: dict = {}
    simple_evaluate = evaluator.simple_evaluate

    def recording(*args, **kwargs):
        results = simple_evaluate(*args, **kwargs)
        seen["results"] = results
        return results

    built: list[ProphetLM] = []
    init = ProphetLM.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    old_argv = sys.argv
    sys.argv = ["lm-eval", *argv]
    evaluator.simple_evaluate = recording  # the CLI looks it up at call time through lm_eval
    ProphetLM.__init__ = remember
    try:
        cli_evaluate()
    finally:
        sys.argv, evaluator.simple_evaluate, ProphetLM.__init__ = old_argv, simple_evaluate, init
        lm_eval.__dict__.pop("simple_evaluate", None)
    results = seen.get("results") or {}
    summary: dict = {}
    for lm in built:
        for line in summary_lines(results, lm):
            print(line)
        summary |= lm.summary()
    print(json.dumps({"prophet": summary}))
    return {"results": results, "prophet": summary}


def main(argv: Sequence[str] | None = None) -> dict | list[str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["write-tasks"]:
        return write_tasks(argv[1:])
    return run_cli(argv)


if __name__ == "__main__":
    main()
