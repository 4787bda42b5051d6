"""Calibration and the held-out table on the block host: tiny-llada2's shipped calibration loads with
the settings it was fitted under, `calibrate_block` decodes every setting for real, and
jobs/evaluate.py gives a block-diffusion model its own table."""
from __future__ import annotations

import json

import pytest
from tiny_support import ROOT, load_job, one_thread  # noqa: F401 (one_thread is an autouse fixture)

from prophet.models import load_model
from prophet.tasks import calibration as calibration_mod
from prophet.tasks import get_task
from prophet.tasks.calibration import HOST_FIELDS, calibrate
from prophet.tasks.evaluation import run_task, task_config

LLADA2 = ROOT / "checkpoints" / "tiny-llada2"


@pytest.fixture(scope="module")
def llada2():
    return load_model(LLADA2)


@pytest.mark.parametrize("name", ["calibration.json", "calibration-parallel.json"])
def test_shipped_llada2_calibration_matches_the_block_hosts_config(llada2, name):
    path = LLADA2 / name
    data = json.loads(path.read_text())
    task = get_task(data["task"])
    full = task_config(llada2, task)
    assert data["calibrated_with"] == {k: full.to_dict()[k] for k in HOST_FIELDS}  # what the table decodes with
    assert data["calibrated_with"]["host"] == "block"
    cfg = full.with_calibration(path)
    assert cfg.rule == "prophet" and cfg.region == data["decode"]["region"] == "block"
    assert cfg.thresholds == tuple(data["decode"]["thresholds"])
    val = data["validation"]
    assert val["chosen"]["accuracy"] >= val["floor"]
    assert not val["beat_half"] or val["chosen"]["accuracy"] > val["half"]["accuracy"]
    assert cfg.parallel == data["decode"].get("parallel", "none")
    assert val["chosen"]["mean_steps"] == min(r["mean_steps"] for r in val["best_per_statistic_and_shape"])
    assert val["chosen"]["mean_steps"] < val["full"]["mean_steps"]


def test_calibrate_block_runs_each_setting_and_records_the_parallel_rule(llada2, monkeypatch, tmp_path):
    monkeypatch.setattr(calibration_mod, "BLOCK_LEVELS", (1.0, 30.0))  # fires early / never fires
    monkeypatch.setattr(calibration_mod, "BLOCK_SHAPES", (0.0,))
    monkeypatch.setattr(calibration_mod, "BLOCK_STATISTICS", (("min", 0.1),))
    task = get_task("sudoku4")
    examples = task.examples("valid", 12, seed=3)
    out = calibrate(llada2, task, examples, tolerance=100.0, log=lambda _: None, beat_half=False,
                    parallel="confidence_threshold", confidence=0.9)
    val = out["validation"]
    assert val["settings_run"] == 2 and out["calibrated_with"]["host"] == "block"
    # the lower threshold commits earlier: fewer steps, and the chosen row is its real run
    assert out["decode"]["thresholds"] == [1.0, 1.0, 1.0]
    assert (out["decode"]["parallel"], out["decode"]["confidence"]) == ("confidence_threshold", 0.9)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(out))
    cfg = task_config(llada2, task).with_calibration(path)
    again = run_task(llada2, task, examples, cfg)
    assert again.row("", "") | {"model": val["chosen"]["model"], "task": "sudoku4"} == val["chosen"]
    assert cfg.parallel == "confidence_threshold" and cfg.confidence == 0.9


def test_evaluate_gives_a_block_model_its_table_with_the_recompute_ratio(capsys):
    evaluate = load_job("evaluate")
    out = evaluate.main(["--model", str(LLADA2), "--task", "sudoku4", "--n", "6", "--threads", "1"])
    rows = out["results"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    ref, full, full_edit = rows[:3]
    assert ref["rule"].startswith("full, recomputed") and full["rule"] == "full"
    assert len(rows) == 1 + 2 * 5  # the reference, then 5 settings each without and with editing
    assert full_edit["rule"] == "full + editing 0.9"
    # the reference equals the cached host token for token; it only forwards more positions
    assert ref["accuracy"] == full["accuracy"] and ref["mean_forward_tokens"] > full["mean_forward_tokens"]
    assert full["recompute_token_ratio"] == pytest.approx(ref["mean_forward_tokens"] / full["mean_forward_tokens"],
                                                          abs=1e-3)
    labels = [r["rule"] for r in rows]
    assert any("look-ahead 1" in r for r in labels) and any("parallel confidence_threshold" in r for r in labels)
