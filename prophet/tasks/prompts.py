"""The bundled prompt set of the main job: held-out test prompts of every task, reproducibly.

    python -m prophet.tasks write-prompts pipeline/data/default_prompts.jsonl
"""
from __future__ import annotations

import json
from pathlib import Path

from prophet.tasks.base import Task

DEFAULT_SEED = 2026      # distinct from jobs/evaluate.py's seed 0, still the test split
DEFAULT_PER_TASK = 100


def default_prompts(tasks: dict[str, Task], n_per_task: int = DEFAULT_PER_TASK,
                    seed: int = DEFAULT_SEED) -> list[dict]:
    """Rows {id, prompt, answer, task}: n_per_task test-split prompts of each task, in task order."""
    rows = []
    for name, task in tasks.items():
        for i, ex in enumerate(task.examples("test", n_per_task, seed=seed)):
            rows.append({"id": f"{name}-{i:04d}", "prompt": ex.prompt, "answer": ex.answer, "task": name})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """One JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
