"""Reports from real Parquet files written in the exact output schema of jobs/generate.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.report import (ReportError, build_report, commit_third, compare_runs, format_report,
                             quantile_from_counts, scan_run, scan_runs, short_summary, write_comparison,
                             write_report)
from pipeline.schema import MANIFEST, OUTPUT_SCHEMA
from pipeline.scoring import exact_match, final_number, gsm8k_match

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START = 1_700_000_000.0
PASSTHROUGH = pa.schema([pa.field("answer", pa.string()), pa.field("task", pa.string())])


def make_rows(n: int, seed: int = 0, budget: int = 24, workers: int = 3, error_every: int = 7,
              commit_prob: float = 0.6, correct_prob: float = 0.8) -> list[dict]:
    """n output rows: some errors, some early commits, mixed tasks and answers, several workers."""
    from prophet.tasks import get_task

    rng = np.random.default_rng(seed)
    examples = {t: get_task(t).examples("test", n, seed=seed) for t in ("sudoku4", "running_parity")}
    rows = []
    for i in range(n):
        task = "sudoku4" if i % 2 else "running_parity"
        prompt, answer = examples[task][i].prompt, examples[task][i].answer
        base = {"id": f"r{i:05d}", "prompt": prompt, "gen_length": budget, "steps_budget": budget,
                "decode_s": float(rng.uniform(0.1, 2.0)), "finished_at": START + float(rng.uniform(0, 30)),
                "worker_id": f"host:{100 + i % workers}", "model": "tiny-llada", "settings_hash": "abc",
                "answer": answer, "task": task}
        if error_every and i % error_every == error_every - 1:
            rows.append(base | {"status": "error", "error": "prompt too long" if i % 2 else "NaN logits"})
            continue
        early = bool(rng.random() < commit_prob)
        steps = int(rng.integers(1, budget + 1)) if early else budget
        completion = answer if rng.random() < correct_prob else answer + "1"
        rows.append(base | {"completion": completion, "completion_ids": [int(c) for c in completion],
                            "prompt_tokens": 5, "generated_tokens": len(completion), "steps_used": steps,
                            "committed_early": early, "commit_step": steps if early else None,
                            "commit_gap": 9.5 if early else None, "status": "ok"})
    return rows


def write_run(path: Path, rows: list[dict], files: int = 2, manifest: dict | None = None) -> Path:
    """Write rows as Parquet files in the output schema (plus answer/task passthrough) and a manifest."""
    path.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(list(OUTPUT_SCHEMA) + list(PASSTHROUGH))
    for k, chunk in enumerate(np.array_split(np.arange(len(rows)), files)):
        table = pa.Table.from_pylist([rows[i] for i in chunk], schema=schema)
        pq.write_table(table, path / f"part-{k:03d}.parquet")
    if manifest is not False:
        m = {"status": "complete", "first_started_at": START, "started_at": START, "ended_at": START + 31.0,
             "wall_s": 31.0, "runs": [{"run_id": "x", "started_at": START, "ended_at": START + 31.0, "wall_s": 31.0}]}
        (path / MANIFEST).write_text(json.dumps(manifest or m))
    return path


def ok_column(rows: list[dict], name: str) -> np.ndarray:
    """A column over the ok rows."""
    return np.array([r[name] for r in rows if r["status"] == "ok"])


def check_png(path: str | Path) -> None:
    """A real PNG file: magic bytes, nonzero size, and matplotlib reads it back as an image."""
    import matplotlib.image as mpimg

    data = Path(path).read_bytes()
    assert len(data) > 100 and data[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = make_rows(300)
    return write_run(tmp_path / "run", rows, files=3), rows


def test_report_figures_agree_with_the_rows(run_dir):
    path, rows = run_dir
    r = build_report(path, scorer="exact")
    steps = ok_column(rows, "steps_used")
    ok = [x for x in rows if x["status"] == "ok"]
    assert r["rows"] == 300 and r["ok"] == len(ok) and r["errors"] == 300 - len(ok) == 300 // 7
    assert sum(r["error_kinds"].values()) == r["errors"]
    assert r["generated_tokens"] == sum(x["generated_tokens"] for x in ok)
    s = r["steps"]
    assert s["mean"] == pytest.approx(steps.mean())
    assert s["p50"] == pytest.approx(np.percentile(steps, 50))
    assert s["p90"] == pytest.approx(np.percentile(steps, 90))
    assert s["max"] == steps.max()
    assert s["speedup"] == pytest.approx(24 / steps.mean())
    assert r["wall_s"] == 31.0
    assert r["rows_per_s"] == pytest.approx(300 / 31.0)
    assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / 31.0)
    assert (r["model"], r["settings_hashes"], r["files"]) == ("tiny-llada", ["abc"], 3)


def test_mixed_settings_are_flagged(tmp_path):
    rows = make_rows(10)
    rows[3]["settings_hash"] = "def"
    path = write_run(tmp_path / "m", rows, files=1)
    assert build_report(path)["settings_hashes"] == ["abc", "def"]
    assert "2 different decode settings" in short_summary(path)


def test_early_commit_shares_and_thirds_match_a_hand_count(run_dir):
    path, rows = run_dir
    e = build_report(path)["early_commit"]
    early = [x for x in rows if x["status"] == "ok" and x["committed_early"]]
    # 1-based commit step k was decided at progress (k - 1) / 24: first third k <= 8, middle 9..16.
    hand = {"first": sum(x["commit_step"] <= 8 for x in early),
            "middle": sum(9 <= x["commit_step"] <= 16 for x in early),
            "last": sum(x["commit_step"] >= 17 for x in early)}
    assert e["rows"] == len(early) and e["by_third"] == hand
    assert e["share"] == pytest.approx(len(early) / len(ok_column(rows, "id")))


def test_commit_third_boundaries_follow_the_rule_progress():
    got = commit_third(np.array([1, 8, 9, 16, 17, 24]), np.array([24] * 6))
    assert got.tolist() == [0, 0, 1, 1, 2, 2]


def test_per_worker_rows_sum_to_the_total(run_dir):
    path, rows = run_dir
    r = build_report(path)
    assert len(r["workers"]) == 3
    assert sum(w["rows"] for w in r["workers"]) == r["rows"]
    assert sum(w["ok"] for w in r["workers"]) == r["ok"]
    assert sum(w["generated_tokens"] for w in r["workers"]) == r["generated_tokens"]
    assert sum(w["rows_per_s"] for w in r["workers"]) == pytest.approx(r["rows_per_s"])
    w0 = next(w for w in r["workers"] if w["worker_id"] == "host:100")
    mine = [x for x in rows if x["worker_id"] == "host:100"]
    assert w0["rows"] == len(mine)
    assert w0["mean_decode_s"] == pytest.approx(np.mean([x["decode_s"] for x in mine]))
    assert w0["first_finished_at"] == min(x["finished_at"] for x in mine)


def test_accuracy_equals_a_hand_count(run_dir):
    path, rows = run_dir
    a = build_report(path, scorer="exact")["accuracy"]
    correct = sum(x["status"] == "ok" and x["completion"] == x["answer"] for x in rows)
    n_ok = sum(x["status"] == "ok" for x in rows)
    assert (a["correct"], a["scored"], a["scored_ok"]) == (correct, 300, n_ok)
    assert a["accuracy"] == pytest.approx(correct / 300)  # error rows count as wrong
    assert a["accuracy_ok"] == pytest.approx(correct / n_ok)
    sud = [x for x in rows if x["task"] == "sudoku4"]
    assert a["by_task"]["sudoku4"]["correct"] == sum(x["status"] == "ok" and x["completion"] == x["answer"]
                                                     for x in sud)


def test_gsm8k_scorer_on_a_custom_answer_column(tmp_path):
    rows = make_rows(20, error_every=0)
    for i, r in enumerate(rows):
        r["gold"] = f"so she pays 1,{i:03d} dollars.\n#### 1{i:03d}"
        r["completion"] = f"The answer is 1,{i:03d}." if i % 3 else "The answer is 7"
    path = tmp_path / "g"
    path.mkdir()
    schema = pa.schema(list(OUTPUT_SCHEMA) + [pa.field("gold", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path / "a.parquet")
    (path / MANIFEST).write_text(json.dumps({"wall_s": 2.0}))
    a = build_report(path, scorer="gsm8k", answer_column="gold")["accuracy"]
    assert (a["correct"], a["scored"]) == (sum(1 for i in range(20) if i % 3), 20)


def test_task_scorer_uses_prophet_tasks(tmp_path):
    rows = make_rows(8, error_every=0, correct_prob=1.0)
    for i, r in enumerate(rows):
        r["answer"] = None  # the task scorer needs no answer column: it checks against the prompt
        if i >= 5:  # change the last character: no longer the task's answer
            r["completion"] = r["completion"][:-1] + ("0" if r["completion"][-1] != "0" else "1")
    a = build_report(write_run(tmp_path / "t", rows, files=1), scorer="task")["accuracy"]
    assert (a["scorer"], a["correct"], a["scored"]) == ("task", 5, 8)
    assert build_report(tmp_path / "t", scorer="auto")["accuracy"]["correct"] == 5
    assert a["by_task"]["sudoku4"]["scored"] == 4


def test_auto_scorer_skips_accuracy_where_the_task_scorer_cannot_read_the_rows(tmp_path):
    rows = make_rows(4, error_every=0)
    rows[1]["prompt"] = "not a sudoku"
    path = write_run(tmp_path / "r", rows, files=1)
    assert "cannot score prompt 'not a sudoku'" in _error_of(path, scorer="task")  # named explicitly: an error
    r = build_report(path, scorer="auto")
    assert r["accuracy"] is None and "not a sudoku" in r["accuracy_skipped"] and r["rows"] == 4
    text = short_summary(path)
    assert "4 rows" in text and "accuracy: not scored" in text
    assert "Accuracy not scored" in format_report(r)


def test_scorer_helpers():
    assert exact_match(" 12  34\n", "12 34") and not exact_match("12", None)
    assert final_number("a 3 then -1,250.5 end") == final_number("-1250.50")
    assert gsm8k_match("so 72.", "... #### 72") and not gsm8k_match("72", "#### 73")
    assert not gsm8k_match("no number", "#### 5")


def test_quantile_from_counts_matches_numpy():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 101):
        values = rng.integers(0, 40, n)
        counts = np.bincount(values)
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            assert quantile_from_counts(counts, q) == pytest.approx(np.percentile(values, 100 * q))
    assert quantile_from_counts(np.zeros(3, np.int64), 0.5) is None


def test_write_report_makes_json_markdown_and_valid_pngs(run_dir):
    path, _ = run_dir
    r = write_report(scan_run(path, scorer="exact"))
    assert json.loads((path / "__report" / "report.json").read_text()) == json.loads(json.dumps(r))
    md = (path / "__report" / "report.md").read_text()
    assert "steps used mean" in md and "host:101" in md and "## Accuracy (exact)" in md
    assert sorted(Path(p).name for p in r["plots"]) == ["commit_step.png", "steps_used.png", "throughput.png"]
    for p in r["plots"]:
        check_png(p)
    # the report's own files do not confuse a second report
    assert build_report(path)["rows"] == 300


def test_all_error_run_still_reports(tmp_path):
    rows = make_rows(6, error_every=1)
    r = write_report(scan_run(write_run(tmp_path / "e", rows, files=1)))
    assert (r["ok"], r["errors"], r["steps"]["mean"], r["steps"]["speedup"]) == (0, 6, None, None)
    for p in r["plots"]:
        check_png(p)
    assert "6 errors" in short_summary(tmp_path / "e")


def test_short_summary_names_the_key_figures(run_dir):
    path, _ = run_dir
    text = short_summary(path)
    assert "300 rows" in text and "speed-up" in text and "accuracy (task)" in text
    assert len(text.splitlines()) <= 5


def test_compare_runs_speedup_and_accuracy_difference(tmp_path):
    full = make_rows(60, seed=1, commit_prob=0.0, correct_prob=1.0, error_every=0)
    prophet = [dict(r) for r in full]
    for i, r in enumerate(prophet):  # every row commits at step 6 of 24; rows 0..5 go wrong
        r.update(steps_used=6, committed_early=True, commit_step=6,
                 completion=r["answer"] + ("x" if i < 6 else ""))
    prophet.append(dict(prophet[0], id="only-in-b"))
    a = write_run(tmp_path / "full", full)
    b = write_run(tmp_path / "prophet", prophet, manifest={"wall_s": 7.75})
    scans = scan_runs([a, b], scorer="exact")
    c = compare_runs(scans)
    (p,) = c["pairs"]
    assert (p["a"], p["b"]) == ("full", "prophet")
    assert p["step_speedup"] == pytest.approx(24 / 6)
    assert p["rows_per_s_ratio"] == pytest.approx((61 / 7.75) / (60 / 31.0))
    assert p["accuracy_diff"] == pytest.approx((60 - 6) / 61 - 1.0)
    assert p["common"]["rows"] == 60 and p["common"]["step_speedup"] == pytest.approx(4.0)
    assert p["common"]["accuracy_diff"] == pytest.approx(-6 / 60)
    assert p["common"]["same_completion"] == pytest.approx(54 / 60)
    out = write_comparison(c, tmp_path / "cmp")
    check_png(out["plots"][0])
    assert "4.00x" in (tmp_path / "cmp" / "compare.md").read_text()


def test_cli_single_run_prints_table_then_json(run_dir, tmp_path):
    path, _ = run_dir
    out = tmp_path / "elsewhere"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(path), "--scorer", "exact",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["rows"] == 300 and last["accuracy"]["scorer"] == "exact"
    assert "| rows (ok / error) |" in proc.stdout
    assert (out / "report.json").is_file() and (out / "steps_used.png").is_file()
    assert not (path / "report.json").exists()


def test_cli_compares_several_runs(tmp_path):
    a = write_run(tmp_path / "a", make_rows(30, seed=2))
    b = write_run(tmp_path / "b", make_rows(30, seed=3))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(a), str(b), "--scorer", "exact"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["label"] for r in last["runs"]] == ["a", "b"] and len(last["pairs"]) == 1
    assert (a / "__report" / "compare.json").is_file() and (a / "__report" / "accuracy_vs_steps.png").is_file()


def test_output_dir_with_report_reads_as_one_dataset(tmp_path):
    """.manifest.json and __report/ are names Parquet readers skip: the directory reads as a dataset."""
    import pandas as pd
    import pyarrow.dataset as ds
    from datasets import load_dataset

    path = write_run(tmp_path / "r", make_rows(30, seed=4))
    write_report(scan_run(path, scorer="exact"))
    assert (path / "__report" / "report.json").is_file() and not (path / "report.json").exists()
    assert len(pd.read_parquet(path)) == 30
    assert pq.read_table(path).num_rows == 30
    assert ds.dataset(path).count_rows() == 30
    loaded = load_dataset("parquet", data_dir=str(path), cache_dir=str(tmp_path / "hf"))
    assert loaded["train"].num_rows == 30


def test_legacy_manifest_json_is_still_read(tmp_path):
    """An output of an older version (manifest.json) still reports and resumes."""
    from pipeline import output

    path = write_run(tmp_path / "r", make_rows(10, seed=5))
    (path / MANIFEST).rename(path / "manifest.json")
    assert output.read_manifest(str(path)) == json.loads((path / "manifest.json").read_text())
    assert scan_run(path, scorer="none").report["rows"] == 10
    output.write_manifest(str(path), {"status": "complete"})  # the next run rewrites it under the new name
    assert not (path / "manifest.json").exists() and output.read_manifest(str(path)) == {"status": "complete"}


# ---------------------------------------------------------------------------- clear errors

def _error_of(path, **kw) -> str:
    with pytest.raises(ReportError) as info:
        build_report(path, **kw)
    return str(info.value)


def test_missing_directory_is_a_clear_error(tmp_path):
    assert "no such directory" in _error_of(tmp_path / "nope")


def test_remote_uri_is_a_clear_error():
    assert "local directories only" in _error_of("s3://bucket/run")
    assert short_summary("s3://bucket/run").startswith("report unavailable: s3://bucket/run: reports read local")


def test_directory_without_parquet_is_a_clear_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{}")
    assert "no Parquet files" in _error_of(tmp_path)


def test_missing_manifest_is_a_clear_error(tmp_path):
    write_run(tmp_path / "r", make_rows(5), files=1, manifest=False)
    assert ".manifest.json: missing" in _error_of(tmp_path / "r")


def test_malformed_manifest_is_a_clear_error(tmp_path):
    write_run(tmp_path / "r", make_rows(5), files=1)
    (tmp_path / "r" / MANIFEST).write_text("{not json")
    assert "not valid JSON" in _error_of(tmp_path / "r")


def test_corrupt_parquet_names_the_file(tmp_path):
    path = write_run(tmp_path / "r", make_rows(20), files=2)
    (path / "part-001.parquet").write_bytes(b"PAR1 this is not parquet")
    msg = _error_of(path)
    assert "part-001.parquet" in msg and "not a readable Parquet file" in msg


def test_truncated_parquet_names_the_file(tmp_path):
    path = write_run(tmp_path / "r", make_rows(20), files=2)
    data = (path / "part-000.parquet").read_bytes()
    (path / "part-000.parquet").write_bytes(data[: len(data) // 2])
    assert "part-000.parquet" in _error_of(path)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    pq.write_table(pa.table({"id": ["a"], "status": ["ok"]}), path / "x.parquet")
    (path / MANIFEST).write_text("{}")
    msg = _error_of(path)
    assert "missing column(s)" in msg and "steps_used" in msg


def test_missing_answer_column_names_the_option(run_dir):
    path, _ = run_dir
    msg = _error_of(path, scorer="exact", answer_column="gold")
    assert "'gold'" in msg and "--answer-column" in msg


def test_unknown_task_in_rows_is_a_clear_error(tmp_path):
    rows = make_rows(4, error_every=0)
    rows[2]["task"] = "chess"
    msg = _error_of(write_run(tmp_path / "r", rows, files=1), scorer="task")
    assert "'chess'" in msg


def test_cli_error_exits_2_with_message(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_format_report_is_markdown(run_dir):
    path, _ = run_dir
    text = format_report(build_report(path))
    assert text.startswith("# Report:") and "| figure | value |" in text


def test_answer_column_may_be_any_column_even_the_completion(run_dir):
    path, _ = run_dir
    a = build_report(path, scorer="exact", answer_column="completion")["accuracy"]
    assert a["correct"] == a["scored_ok"] and a["accuracy_ok"] == 1.0


def test_resumed_job_counts_the_wall_time_of_every_run(tmp_path):
    runs = [{"run_id": "a", "started_at": START, "wall_s": 10.0}, {"run_id": "b", "started_at": START + 50, "wall_s": 5.0}]
    path = write_run(tmp_path / "r", make_rows(30), manifest={"first_started_at": START, "started_at": START + 50,
                                                              "wall_s": 5.0, "runs": runs, "status": "complete"})
    r = build_report(path)
    assert (r["wall_s"], r["wall_source"], r["runs"]) == (15.0, "manifest runs", 2)
    assert r["rows_per_s"] == pytest.approx(30 / 15.0)


def test_running_job_estimates_wall_time_from_finish_times(tmp_path):
    rows = make_rows(30)
    path = write_run(tmp_path / "r", rows, manifest={"started_at": START, "status": "running",
                                                     "runs": [{"run_id": "a", "started_at": START}]})
    r = build_report(path)
    assert r["wall_s"] == pytest.approx(max(x["finished_at"] for x in rows) - START)
    assert r["wall_source"].startswith("estimated") and r["job_status"] == "running"


def test_hidden_temporary_parts_and_subfolders_are_not_rows(tmp_path):
    path = write_run(tmp_path / "r", make_rows(30), files=2)
    (path / ".part-x.parquet.tmp").write_bytes(b"half written")
    (path / ".part-y.parquet").write_bytes(b"half written")
    write_run(path / "sub", make_rows(5), files=1)
    assert build_report(path)["rows"] == 30


def test_throughput_timeline_holds_every_row_of_each_worker(run_dir):
    from pipeline.report.plots import throughput_series

    path, rows = run_dir
    scan = scan_run(path)
    assert scan.tick == pytest.approx(31.0 / 500)  # the job's span over 500 bins
    for w in scan.report["workers"]:
        per_tick = scan.timeline[w["worker_id"]]
        assert sum(per_tick.values()) == w["rows"]
        x, y = throughput_series(per_tick, scan.tick, START, START + 31.0)
        width = x[1] - x[0]
        assert (y * width).sum() == pytest.approx(w["rows"]) and x.min() > 0 and x.max() < 31.0
