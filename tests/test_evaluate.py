"""The shipped tiny models, their calibration, jobs/evaluate.py's JSON and the bundled prompt set."""
from __future__ import annotations

import json

import pytest
from tiny_support import ROOT, load_job, one_thread  # noqa: F401 (one_thread is an autouse fixture)

from prophet.config import DecodeConfig
from prophet.models import load_model
from prophet.tasks import TASKS, get_task
from prophet.tasks.calibration import Candidate, pooled_gaps, ranked, simulate, trace_full
from prophet.tasks.evaluation import rule_label, run_task, task_config
from prophet.tasks.prompts import default_prompts

SHIPPED = [ROOT / "checkpoints" / "tiny-llada", ROOT / "checkpoints" / "tiny-dream"]
PROMPTS = ROOT / "pipeline" / "data" / "default_prompts.jsonl"


@pytest.fixture(scope="module", params=SHIPPED, ids=lambda p: p.name)
def shipped(request):
    return load_model(request.param)


def test_shipped_models_solve_heldout_sudoku_with_full_decoding(shipped):
    task = get_task("sudoku4")
    examples = task.examples("test", 64, seed=7)
    assert all(task.is_heldout(e.prompt) for e in examples)
    out = run_task(shipped, task, examples, task_config(shipped, task))
    assert out.accuracy >= 0.9, out.accuracy
    assert out.mean_steps == task.budget.steps


def full_and_one_shot(model, task_name: str, n: int) -> tuple[float, float]:
    task = get_task(task_name)
    examples = task.examples("test", n, seed=7)
    full = run_task(model, task, examples, task_config(model, task))
    return full.accuracy, run_task(model, task, examples, task_config(model, task, steps=1)).accuracy


def test_refinement_matters_on_sudoku_for_both_models(shipped):
    # held-out n=4000: one-shot 81.9% (llada) and 82.3% (dream) against full 99.9% and 100%
    full, one_shot = full_and_one_shot(shipped, "sudoku4", 128)
    assert full >= 0.95 and full > one_shot + 0.08, (full, one_shot)


def test_refinement_matters_on_running_parity_for_llada():
    # tiny-llada: one-shot 72.8% against full 100% (n=430). The 4,000-step tiny-dream learned
    # parity well enough to write it in one shot (97.2%): the task shows the effect on LLaDA only.
    full, one_shot = full_and_one_shot(load_model(SHIPPED[0]), "running_parity", 64)
    assert full >= 0.95 and full > one_shot + 0.15, (full, one_shot)


@pytest.mark.parametrize("model_dir", SHIPPED, ids=lambda p: p.name)
def test_shipped_calibration_is_accepted_and_met_its_constraint(model_dir):
    path = model_dir / "calibration.json"
    data = json.loads(path.read_text())
    cfg = DecodeConfig(**data["calibrated_with"]).with_calibration(path)  # the settings it was fitted with
    assert cfg.rule == "prophet" and cfg.thresholds == tuple(data["decode"]["thresholds"])
    val = data["validation"]
    floor = val["full"]["accuracy"] - val["tolerance_points"] / 100
    assert val["chosen"]["accuracy"] >= floor - 1e-9  # the real decoder's run, not the simulation
    assert val["beat_half"] and val["chosen"]["accuracy"] > val["half"]["accuracy"]
    assert val["chosen_simulated"]["mean_steps"] == pytest.approx(val["chosen"]["mean_steps"], abs=0.2)
    assert val["chosen"]["mean_steps"] <= min(r["mean_steps"] for r in val["best_per_statistic_and_shape"]) + 0.2
    assert data["task"] == "sudoku4" and val["split"] == "valid"


def test_evaluate_json_has_the_fields_and_consistent_numbers(capsys):
    evaluate = load_job("evaluate")
    evaluate.main(["--model", str(SHIPPED[0]), "--task", "sudoku4", "--n", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads(lines[-1])["results"]
    rules = [r["rule"] for r in results]
    assert {"full", "half", "one-shot"} <= set(rules)
    assert any(r.startswith("prophet calibrated[sudoku4]") for r in rules)
    assert sum(r.startswith("prophet 8/5/3 ") for r in rules) == 6  # 2 regions x 3 statistics
    for r in results:
        assert set(r) >= {"model", "task", "rule", "accuracy", "mean_steps", "budget", "speedup"}
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["mean_steps"] <= r["budget"] == 24
        assert r["speedup_vs_budget"] == pytest.approx(r["budget"] / r["mean_steps"], rel=1e-3)
    by_rule = {r["rule"]: r for r in results}
    for r in results:  # speed-ups are against Full's measured steps, not the budget
        assert r["speedup"] == pytest.approx(by_rule["full"]["mean_steps"] / r["mean_steps"], rel=1e-3)
    assert by_rule["full"]["mean_steps"] == 24 and by_rule["half"]["mean_steps"] == 12
    assert by_rule["one-shot"]["mean_steps"] == 1
    calibrated = next(r for r in results if r["rule"].startswith("prophet calibrated[sudoku4]"))
    fixed = [r for r in results if r["rule"].startswith("fixed ")]
    assert len(fixed) == 1 and fixed[0]["mean_steps"] == max(1, round(calibrated["mean_steps"]))
    assert len(lines) == len(results) + 2  # header, one line per rule, JSON last


def test_ranked_orders_passing_settings_by_steps_then_accuracy():
    a, b, c, d = (Candidate("window", "min", 0.1, 0.0, lvl) for lvl in (2.0, 4.0, 6.0, 8.0))
    rows = [(a, 0.95, 3.0), (b, 0.99, 5.0), (c, 0.995, 8.0), (d, 0.999, 8.0)]
    assert [r[0] for r in ranked(rows, floor=0.985)] == [b, d, c]
    assert ranked(rows, floor=0.90)[0][0] == a and ranked(rows, floor=0.9999) == []
    assert b.thresholds == (4.0, 4.0, 4.0) and Candidate("block", "mean", 0.1, 1.0, 2.0).thresholds == (4.0, 3.0, 2.0)


@pytest.fixture(scope="module")
def llada_trace():
    model, task = load_model(SHIPPED[0]), get_task("sudoku4")
    examples = task.examples("valid", 32, seed=3)
    return model, task, examples, trace_full(model, task, examples, task_config(model, task))


@pytest.mark.parametrize("setting", [("min", 0.1, (3.0, 2.5, 2.0)), ("mean", 0.1, (8.0, 5.0, 3.0)),
                                     ("quantile", 0.25, (7.0, 5.0, 3.0))], ids=lambda s: s[0])
def test_traced_simulation_predicts_the_real_decoder(llada_trace, setting):
    """One traced Full run tells what Prophet would do: compare with prophet.decode itself."""
    model, task, examples, trace = llada_trace
    stat, q, th = setting
    acc, steps = simulate(trace, pooled_gaps(trace, stat, q), th)
    real = run_task(model, task, examples, task_config(model, task, rule="prophet", thresholds=th,
                                                        statistic=stat, quantile=q))
    assert acc == pytest.approx(real.accuracy, abs=1.01 / 32) and steps == pytest.approx(real.mean_steps, abs=0.2)
    assert trace.full.mean_steps == 24 and trace.fill_correct[:, -1].tolist() == list(trace.full.correct)


def test_rule_labels_name_the_setting():
    full = DecodeConfig(gen_length=24, steps=24)
    assert rule_label(full, 24) == "full" and rule_label(DecodeConfig(gen_length=24, steps=12), 24) == "half"
    p = DecodeConfig(gen_length=24, steps=24, rule="prophet", thresholds=(6, 4, 2), region="block",
                     statistic="quantile", quantile=0.25)
    assert rule_label(p, 24) == "prophet 6/4/2 block q0.25"


def test_bundled_prompts_are_heldout_scorable_and_reproducible():
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    assert rows == default_prompts(TASKS)  # the file is exactly what the documented command writes
    assert len(rows) == 200 and len({r["id"] for r in rows}) == len(rows)
    assert {r["task"] for r in rows} == set(TASKS)
    for r in rows:
        task = get_task(r["task"])
        assert task.split_of(r["prompt"]) == "test" and task.score(r["prompt"], r["answer"])


def test_accuracy_floor_is_full_minus_tolerance_and_strictly_above_half():
    from prophet.tasks.calibration import accuracy_floor

    assert accuracy_floor(0.999, 0.25) == pytest.approx(0.9965)
    assert accuracy_floor(0.999, 0.25, half=0.990, n=4000) == pytest.approx(0.9965)  # Half far below: tolerance rules
    assert accuracy_floor(0.999, 0.25, half=0.998, n=4000) == pytest.approx(0.998125)  # one more right than Half
    assert accuracy_floor(1.0, 0.5, half=1.0, n=100) > 1.0  # Half perfect: nothing can beat it


def test_calibrate_chooses_a_setting_the_real_decoder_confirms_and_records_half():
    from prophet.tasks.calibration import calibrate

    model, task = load_model(SHIPPED[0]), get_task("sudoku4")
    examples = task.examples("valid", 48, seed=5)
    out = calibrate(model, task, examples, tolerance=2.0, log=lambda _: None, beat_half=False)
    val = out["validation"]
    assert val["half"] is None and val["chosen"]["accuracy"] >= val["full"]["accuracy"] - 0.02
    assert val["chosen"]["speedup"] > 1
    DecodeConfig(gen_length=24, steps=24, **out["decode"])  # the file's decode fields are a valid config
    # Full and Half both solve these 48 puzzles: no early commit can be more accurate than Half
    with pytest.raises(RuntimeError, match=r"and above Half \(1.0000\).*--no-beat-half"):
        calibrate(model, task, examples, tolerance=2.0, log=lambda _: None)


def test_calibration_on_sampled_paths_is_recorded_and_its_trace_is_exact():
    """At temperature > 0 each row's noise comes from its seed and Prophet's all-in fill is the argmax,
    so the traced Full run still predicts the real Prophet run: simulated = measured."""
    from prophet.tasks.calibration import calibrate

    model, task = load_model(SHIPPED[0]), get_task("sudoku4")
    examples = task.examples("valid", 48, seed=5)
    out = calibrate(model, task, examples, tolerance=5.0, log=lambda _: None, beat_half=False, temperature=2.0)
    val = out["validation"]
    assert out["calibrated_with"]["temperature"] == 2.0
    assert val["chosen_simulated"] == {"accuracy": val["chosen"]["accuracy"], "mean_steps": val["chosen"]["mean_steps"]}


def test_evaluate_cache_table_refresh_every_step_equals_no_cache(capsys):
    """--cache rows per rule: no cache, prefix, dual, each also refreshed every step; a refresh at
    every step is exactly no cache (tokens, steps and forward tokens); a cache without refresh
    sends fewer positions through the model."""
    evaluate = load_job("evaluate")
    out = evaluate.main(["--cache", "--task", "sudoku4", "--n", "6", "--model", str(SHIPPED[0]),
                         "--cache-refresh-every", "1", "--threads", "1"])
    rows = out["results"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert len(rows) == 3 * (1 + 2 * 2)  # full, prophet, confidence_threshold x (none + 2 caches x 2)
    for i in range(0, len(rows), 5):
        none, *cached = rows[i:i + 5]
        assert none["cache"] == "none" and none["cache_refresh_every"] is None
        for row in cached:
            fresh = row["cache_refresh_every"] == 1
            if fresh:
                assert (row["accuracy"], row["mean_steps"], row["mean_forward_tokens"]) == \
                    (none["accuracy"], none["mean_steps"], none["mean_forward_tokens"]), row
            else:
                assert row["mean_forward_tokens"] < none["mean_forward_tokens"], row
            assert row["forward_token_ratio_vs_full"] > 0
