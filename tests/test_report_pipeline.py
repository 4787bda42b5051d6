"""Reports on real small runs of the generation pipeline (local Ray, tiny model, real Parquet)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import output
from pipeline.report import compare_runs, scan_run, scan_runs, short_summary, write_comparison, write_report

pytestmark = pytest.mark.ray

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(ray_local, tmp_path_factory, tiny_model_dir, task_rows) -> tuple[Path, Path]:
    """Full decoding and Prophet decoding of the same 24 sudoku4 prompts plus one row that errors."""
    from pipeline.config import load_job_config
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp("report_runs")
    rows = task_rows[:24] + [{"prompt": "", "answer": "-", "task": "sudoku4"}]  # empty prompt: an error row
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"input.path": str(src), "model.dir": str(tiny_model_dir), "model.engine": "torch",
            "decoding.gen_length": 24, "decoding.steps": 24, "decoding.batch_size": 8,
            "execution.actors": 1, "execution.cpus_per_actor": 0.5, "execution.batch_size": 8}
    # Thresholds this low make rows commit early with the trained model or a random stand-in alike
    # (a gap is >= 0, so every row commits by the last third at the latest).
    settings = {"full": {"decoding.rule": "full"},
                "prophet": {"decoding.rule": "prophet", "decoding.thresholds": [0.05, 0.02, 0.0]}}
    dirs = []
    for name, over in settings.items():
        cfg = load_job_config(None, {**base, **over, "output.dir": str(tmp / name)})
        run(cfg, log=lambda _: None)
        dirs.append(tmp / name)
    return dirs[0], dirs[1]


def read_rows(out: Path) -> pa.Table:
    """Every part of a run, all columns (the test may; the report must not need to)."""
    return pa.concat_tables([pq.read_table(p) for p in output.part_files(str(out))])


def test_report_of_a_real_run_agrees_with_its_rows(two_runs):
    out = two_runs[1]
    t = read_rows(out).to_pydict()
    r = write_report(scan_run(out, scorer="task"))
    ok = np.array(t["status"]) == "ok"
    steps = np.array(t["steps_used"], dtype=float)[ok]
    assert (r["rows"], r["ok"], r["errors"]) == (25, int(ok.sum()), int((~ok).sum())) and r["errors"] >= 1
    assert r["steps"]["mean"] == pytest.approx(steps.mean())
    assert r["steps"]["p50"] == pytest.approx(np.percentile(steps, 50))
    assert r["steps"]["p90"] == pytest.approx(np.percentile(steps, 90))
    assert r["steps"]["max"] == steps.max()
    assert r["generated_tokens"] == sum(g for g, o in zip(t["generated_tokens"], ok) if o)
    assert r["early_commit"]["rows"] == sum(bool(c) for c, o in zip(t["committed_early"], ok) if o)
    assert sum(r["early_commit"]["by_third"].values()) == r["early_commit"]["rows"]
    assert sum(w["rows"] for w in r["workers"]) == 25
    assert {w["worker_id"] for w in r["workers"]} == set(t["worker_id"])
    manifest = json.loads((out / ".manifest.json").read_text())
    assert r["wall_s"] == pytest.approx(manifest["wall_s"]) and r["job_status"] == "complete"

    from prophet.tasks import get_task

    hand = sum(o and get_task(k).score(p, c) for p, c, k, o in zip(t["prompt"], t["completion"], t["task"], ok))
    assert (r["accuracy"]["correct"], r["accuracy"]["scored"]) == (hand, 25)
    for p in r["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert f"{r['rows']} rows" in short_summary(out)
    # After a real run and a report the directory reads as one dataset (.manifest.json, __report/ skipped).
    import pandas as pd
    import pyarrow.dataset as ds
    from datasets import load_dataset

    assert len(pd.read_parquet(out)) == pq.read_table(out).num_rows == ds.dataset(out).count_rows() == 25
    hf = load_dataset("parquet", data_dir=str(out), cache_dir=str(out.parent / "hf_cache"))
    assert hf["train"].num_rows == 25


def test_comparison_of_full_and_prophet_runs(two_runs):
    full, prophet = two_runs
    c = write_comparison(compare_runs(scan_runs([full, prophet], scorer="task")), full / "__report")
    (pair,) = c["pairs"]
    steps = {}
    for name, out in (("full", full), ("prophet", prophet)):
        t = read_rows(out)
        ok = np.array(t.column("status").to_pylist()) == "ok"
        steps[name] = np.array(t.column("steps_used").to_pylist(), dtype=float)[ok]
    assert steps["full"].mean() == 24.0  # the full rule never commits early
    assert steps["prophet"].max() <= 17 and pair["step_speedup"] > 1.0
    assert pair["step_speedup"] == pytest.approx(steps["full"].mean() / steps["prophet"].mean())
    assert pair["common"]["rows"] == len(steps["full"]) == len(steps["prophet"])
    assert pair["accuracy_diff"] == pytest.approx(c["runs"][1]["accuracy"] - c["runs"][0]["accuracy"])
    assert (full / "__report" / "accuracy_vs_steps.png").read_bytes()[:8] == PNG_MAGIC
