"""What a new user runs first, run as they would: the default job in a fresh process, its console read.

One real job through `jobs/generate.py` (its own local Ray, the shipped tiny model, the bundled
prompts) with several samples at a temperature the shipped calibration was not fitted at.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sampled_job(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`jobs/generate.py --output OUT --limit 20 --num-samples 3 --temperature 0.7`, stdout+stderr as one text."""
    if not (ROOT / "checkpoints" / "tiny-llada" / "calibration.json").is_file():
        pytest.skip("checkpoints/tiny-llada is not trained yet")
    out = tmp_path_factory.mktemp("first-hour") / "s"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as on a fresh clone
    p = subprocess.run([sys.executable, "jobs/generate.py", "--output", str(out), "--limit", "20",
                        "--num-samples", "3", "--temperature", "0.7"],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:]
    return p, out


def test_several_samples_at_a_temperature_run_on_the_default_model(sampled_job):
    p, out = sampled_job
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["ok"], summary["unique_ids"]) == (60, 60, 60)  # 20 prompts x 3 samples
    t = pq.read_table(out).to_pylist()
    assert len({(r["source_id"], r["sample"]) for r in t}) == 60 and len({r["source_id"] for r in t}) == 20
    warned = [line for line in p.stdout.splitlines() if "calibrated on another sampling path" in line]
    assert len(warned) == 1 and "temperature (calibrated 0.0, here 0.7)" in warned[0]


# Error-level lines: Ray's C++ log lines ("[2026-12-03 17:11:06,261 E 5413 5413] core_worker.cc:..."),
# Python logging's ERROR records, and tracebacks.
ERROR_LINE = re.compile(r"^\[[^\]]* E \d+ \d+\]|\bERROR\b|Traceback \(most recent call last\)")


def test_a_clean_run_shows_no_error_level_line_on_the_console(sampled_job):
    p, _ = sampled_job
    assert "Ray started" in p.stdout and "MapBatches(GenerateActor)" in p.stdout  # the console was read
    errors = [line for line in p.stdout.splitlines() if ERROR_LINE.search(line)]
    assert not errors, "error-level lines on a clean run's console:\n" + "\n".join(errors)


def test_the_error_line_pattern_knows_rays_error_lines():
    line = ("[2026-12-03 17:11:06,261 E 5413 5413] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(GenerateActor))' has constructor arguments in the object store")
    assert ERROR_LINE.search(line) and ERROR_LINE.search("2026-12-03 17:11:06 ERROR x.py:1 -- boom")
    assert not ERROR_LINE.search("2026-12-03 17:11:04,877\tINFO worker.py:2038 -- Started a local Ray instance.")
    assert not ERROR_LINE.search("[2026-12-03 17:11:06,261 I 5413 5413] core_worker.cc:1: fine")
