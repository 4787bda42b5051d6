"""The decode stage in a Ray Data pipeline of one's own: read_* -> build_stage(config) -> the user's
transforms -> write_parquet, on the session's local Ray with the tiny model."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import output
from pipeline.config import JobConfigError, load_job_config
from pipeline.run import run
from pipeline.schema import OUTPUT_COLUMNS
from pipeline.stage import StageConfig, build_stage

CONFIG = {"model": {"dir": None, "engine": "torch"}, "decoding": {"gen_length": 8, "steps": 8, "batch_size": 4},
          "execution": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 4}}


def config(model_dir, **columns) -> dict:
    return {**CONFIG, "model": {**CONFIG["model"], "dir": str(model_dir)}, **columns}


@pytest.mark.ray
def test_a_users_read_json_stage_filter_write_parquet_pipeline(ray_local, tmp_path, tiny_model_dir, task_rows):
    import ray.data

    rows = [{"question": r["prompt"], "qid": f"q{i}", "answer": str(r.get("answer"))}
            for i, r in enumerate(task_rows[:5])]
    rows.append({"question": "", "qid": "q-empty", "answer": "none"})  # an error row, not a failure
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def add_chars(batch: pa.Table) -> pa.Table:  # a user's own transform (local: shipped by value)
        return batch.append_column("chars", pc.utf8_length(pc.fill_null(batch.column("completion"), "")))

    stage = build_stage(config(tiny_model_dir, prompt_column="question", id_column="qid"))
    ds = stage(ray.data.read_json(str(src)))
    ds = ds.map_batches(add_chars, batch_format="pyarrow")  # the user keeps transforming
    ds.write_parquet(str(tmp_path / "out"))

    table = pq.read_table(tmp_path / "out")
    assert table.column_names[:len(OUTPUT_COLUMNS)] == list(OUTPUT_COLUMNS)
    assert {"answer", "chars"} <= set(table.column_names)   # passthrough, then the user's own column
    got = {r["id"]: r for r in table.to_pylist()}
    assert set(got) == {r["qid"] for r in rows}
    assert got["q-empty"]["status"] == "error" and "empty" in got["q-empty"]["error"]
    ok = [r for k, r in got.items() if k != "q-empty"]
    assert all(r["status"] == "ok" and r["settings_hash"] == stage.plan.settings_hash for r in ok)
    assert all(r["chars"] == len(r["completion"]) for r in ok)

    # one code path: the job over the same file gives the same settings hash and the same completions
    job = load_job_config(None, {**{f"{k}.{f}": v for k, sec in config(tiny_model_dir).items() for f, v in sec.items()},
                                 "input.path": str(src), "output.dir": str(tmp_path / "job"),
                                 "input.prompt_column": "question", "input.id_column": "qid"})
    assert run(job, log=lambda _: None).rows == len(rows)
    from_job = {r["id"]: r for r in pq.read_table(output.part_files(str(tmp_path / "job"))).to_pylist()}
    assert {k: (r["settings_hash"], r["status"], r["completion"]) for k, r in from_job.items()} == \
        {k: (r["settings_hash"], r["status"], r["completion"]) for k, r in got.items()}


def test_a_bad_stage_config_fails_at_build_time_naming_the_field(tmp_path, tiny_model_dir):
    with pytest.raises(JobConfigError, match="model.dir: no such directory"):
        build_stage(config(tmp_path / "nope"))
    with pytest.raises(JobConfigError, match="decoding.steps"):
        build_stage({**config(tiny_model_dir), "decoding": {"steps": "many"}})
    assert isinstance(build_stage(StageConfig.model_validate(config(tiny_model_dir))).cfg, StageConfig)
