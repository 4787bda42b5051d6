"""Batch generation with a masked diffusion LM and Prophet early commit, on Ray.

    python jobs/generate.py                       # the embedded default: bundled prompts, tiny model, local Ray
    python jobs/generate.py --config my_job.yaml  # or flags; see --help
    ray job submit --working-dir . -- python jobs/generate.py --config my_job.yaml

Prints a short summary; the last stdout line is one JSON object (output, rows, ok, errors, wall_s, ...).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main_config  # noqa: E402
from pipeline.config import JobConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the job, print the summary and the JSON line."""
    try:
        cfg = main_config(argv)
        if cfg is None:
            return 0
        from pipeline.run import Interrupted, PipelineError, run

        try:
            summary = run(cfg, log=lambda line: print(line, flush=True))
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Interrupted as e:  # the manifest says "interrupted"; the same command resumes
            print(f"error: {e}", file=sys.stderr)
            return 128 + e.signum
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    print(json.dumps(summary.to_json()), flush=True)
    if summary.problem:  # input ids missing from the output: the job is not done
        print(f"error: {summary.problem}", file=sys.stderr)
        return 1
    return 0 if summary.errors == 0 or summary.ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
