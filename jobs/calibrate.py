"""Choose Prophet's thresholds, region and statistic for one model on the validation split.

    .venv/bin/python jobs/calibrate.py --model checkpoints/tiny-llada --task sudoku4

Sweeps thresholds (logit units of THIS model) x region x statistic on validation prompts (held
out from training and distinct from the test prompts jobs/evaluate.py uses), keeps the setting
with the largest step speed-up whose accuracy is at least Full's minus --tolerance points and
above Half's (unless --no-beat-half), and writes {"decode": {...}, "model", "task", "validation": {...}} to --out (default
MODEL/calibration.json), the format DecodeConfig.with_calibration reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prophet.models import load_model  # noqa: E402
from prophet.tasks import TASKS, get_task  # noqa: E402
from prophet.tasks.calibration import calibrate  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--task", default="sudoku4", choices=sorted(TASKS))
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points below Full allowed")
    p.add_argument("--beat-half", action=argparse.BooleanOptionalAction, default=True,
                   help="also require accuracy above Half's (half the steps) on the same prompts")
    p.add_argument("--n", type=int, default=500, help="validation prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="fit on sampled paths (the jobs' --temperature); recorded in calibrated_with")
    p.add_argument("--region", default="block", choices=("block", "window"),
                   help="block host only: the region Prophet watches (other hosts sweep 'window')")
    p.add_argument("--parallel", default="none", choices=("none", "confidence_threshold"),
                   help="block host only: Prophet's normal update (the threshold rule on top with --confidence)")
    p.add_argument("--confidence", type=float, default=0.95, help="--parallel confidence_threshold: its threshold")
    p.add_argument("--out", type=Path, help="output file; default MODEL/calibration.json")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Calibrate, write the file, print its path and the chosen setting (JSON last)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    model = load_model(args.model)
    examples = task.examples("valid", task.available("valid", args.n), seed=args.seed)
    result = calibrate(model, task, examples, args.tolerance, beat_half=args.beat_half, temperature=args.temperature,
                       region=args.region, parallel=args.parallel, confidence=args.confidence)
    result["command"] = "jobs/calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or args.model / "calibration.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps({"decode": result["decode"], "chosen": result["validation"]["chosen"],
                      "full": result["validation"]["full"]}))
    return result


if __name__ == "__main__":
    main()
