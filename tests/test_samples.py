"""Several samples per prompt (decoding.num_samples): one output row per (input id, sample)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import JobConfigError
from pipeline.actor import row_seed
from pipeline.io import expand_samples
from pipeline.run import run, samples_identical


def test_expand_samples_gives_unique_ids_and_a_sample_column():
    t = expand_samples(pa.table({"id": ["a", "b"], "prompt": ["x", "y"]}), 3)
    assert t.column("id").to_pylist() == ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2"]
    assert t.column("sample").to_pylist() == [0, 1, 2] * 2 and t.column("source_id").to_pylist() == ["a"] * 3 + ["b"] * 3
    assert t.column("prompt").to_pylist() == ["x"] * 3 + ["y"] * 3
    one = pa.table({"id": ["a"], "prompt": ["x"]})
    assert expand_samples(one, 1).equals(one)  # one sample: the output of before, unchanged


def test_identical_samples_are_detected():
    assert samples_identical({"temperature": 0.0, "alg_temp": 0.0, "remasking": "low_confidence"})
    assert not samples_identical({"temperature": 0.7, "alg_temp": 0.0, "remasking": "low_confidence"})
    assert not samples_identical({"temperature": 0.0, "alg_temp": 0.0, "remasking": "random"})


@pytest.mark.ray
def test_num_samples_limit_resume_and_settings_change(ray_local, tmp_path, tiny_model_dir, task_rows):
    from test_pipeline_ray import job, read_output, write_jsonl

    src = write_jsonl(tmp_path / "in" / "p.jsonl", [{"id": f"q{i}", **r} for i, r in enumerate(task_rows[:4])])
    # Temperature 3 and Full decoding: the trained sudoku model is so sure of its answers that at 0.7
    # (or under its calibrated Prophet, whose all-in fill is the argmax) every sample comes out alike.
    over = {"input.id_column": "id", "decoding.num_samples": 3, "decoding.temperature": 3.0}
    logs: list[str] = []
    first = run(job(tmp_path, tiny_model_dir, src, **over, **{"input.limit": 2}), log=logs.append)
    assert (first.rows, first.status) == (6, "partial")  # the limit counts prompts, each with all its samples
    s = run(job(tmp_path, tiny_model_dir, src, **over), log=logs.append)  # resumes the other 2 prompts
    assert s.rows == 6 and (s.total_rows, s.unique_ids) == (12, 12)
    assert not any("identical" in line for line in logs)
    t = read_output(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in t) == sorted(f"q{i}#{k}" for i in range(4) for k in range(3))
    assert all(r["id"] == f"{r['source_id']}#{r['sample']}" for r in t)
    assert len({row_seed(0, r["id"]) for r in t}) == 12  # own seeds per sample
    drawn = {q: {r["completion"] for r in t if r["source_id"] == q} for q in {r["source_id"] for r in t}}
    assert any(len(c) > 1 for c in drawn.values()), "no prompt got different samples"
    with pytest.raises(JobConfigError, match="settings"):
        run(job(tmp_path, tiny_model_dir, src, **{**over, "decoding.num_samples": 2}), log=lambda _: None)
    warned: list[str] = []
    run(job(tmp_path / "greedy", tiny_model_dir, src, **{"input.id_column": "id", "decoding.num_samples": 2,
                                                         "input.limit": 1}), log=warned.append)
    assert any("identical" in line for line in warned)
